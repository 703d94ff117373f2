//! The NATS connection flags of `twopc bank --events-nats` and `twopc view
//! sync`: TLS (`--nats-ca`, `--nats-cert`, `--nats-key`) and credentials
//! (`--nats-token`, `--nats-user` with `TWOPC_NATS_PASSWORD`, or
//! `--nats-nkey` with a file holding an NKey user seed). A
//! plaintext connection to a host other than this machine is refused unless
//! `--insecure` (docs/SECURITY.md).

use std::path::PathBuf;

use clap::Args;
use twopc_participant::outbox::{NatsAuth, NatsConnect};

/// How to connect to the NATS server. `Debug` shows no secret.
#[derive(Clone, Default, Args)]
pub struct NatsArgs {
    /// TLS to NATS, trusting the CA certificates in this PEM file (the server's certificate must chain to one).
    #[arg(long, env = "TWOPC_NATS_CA", value_name = "FILE")]
    pub nats_ca: Option<PathBuf>,
    /// The PEM certificate presented to a NATS server that verifies clients (mutual TLS); needs --nats-key.
    #[arg(long, env = "TWOPC_NATS_CERT", value_name = "FILE", requires = "nats_key")]
    pub nats_cert: Option<PathBuf>,
    /// The PEM private key of --nats-cert.
    #[arg(long, env = "TWOPC_NATS_KEY", value_name = "FILE", requires = "nats_cert")]
    pub nats_key: Option<PathBuf>,
    /// A token for the NATS server's authorization; better given through the environment.
    #[arg(long, env = "TWOPC_NATS_TOKEN", hide_env_values = true, conflicts_with_all = ["nats_user", "nats_nkey"])]
    pub nats_token: Option<String>,
    /// A NATS user; its password comes from TWOPC_NATS_PASSWORD.
    #[arg(long, env = "TWOPC_NATS_USER", requires = "nats_password", conflicts_with = "nats_nkey")]
    pub nats_user: Option<String>,
    /// Authenticate as the NKey user whose seed (SU..., as `nk -gen user` writes it) is in this file; read at each connection.
    #[arg(long, env = "TWOPC_NATS_NKEY", value_name = "FILE")]
    pub nats_nkey: Option<PathBuf>,
    /// The password of --nats-user; better given through the environment.
    #[arg(long, env = "TWOPC_NATS_PASSWORD", hide_env_values = true, requires = "nats_user")]
    pub nats_password: Option<String>,
}

impl std::fmt::Debug for NatsArgs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |secret: &Option<String>| secret.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsArgs")
            .field("nats_ca", &self.nats_ca)
            .field("nats_cert", &self.nats_cert)
            .field("nats_key", &self.nats_key)
            .field("nats_token", &redacted(&self.nats_token))
            .field("nats_user", &self.nats_user)
            .field("nats_password", &redacted(&self.nats_password))
            .field("nats_nkey", &self.nats_nkey)
            .finish()
    }
}

impl NatsArgs {
    /// These settings as the environment of a child `twopc bank` of a
    /// local run (`demo`, `bench --local`): secrets go through the
    /// environment, never a command line other users can read.
    pub fn child_env(&self) -> Vec<(&'static str, std::ffi::OsString)> {
        let paths = [
            ("TWOPC_NATS_CA", &self.nats_ca),
            ("TWOPC_NATS_CERT", &self.nats_cert),
            ("TWOPC_NATS_KEY", &self.nats_key),
            ("TWOPC_NATS_NKEY", &self.nats_nkey),
        ];
        let secrets = [
            ("TWOPC_NATS_TOKEN", &self.nats_token),
            ("TWOPC_NATS_USER", &self.nats_user),
            ("TWOPC_NATS_PASSWORD", &self.nats_password),
        ];
        let paths = paths.into_iter().filter_map(|(name, path)| Some((name, path.as_ref()?.clone().into_os_string())));
        let secrets = secrets.into_iter().filter_map(|(name, value)| Some((name, value.as_ref()?.into())));
        paths.chain(secrets).collect()
    }

    /// The connection to `url` these flags describe, checked: the files
    /// readable, and no plaintext off this machine unless `--insecure`.
    ///
    /// # Errors
    /// A one-line reason naming the flag.
    pub fn connect(&self, url: &str) -> anyhow::Result<NatsConnect> {
        let auth = match (&self.nats_token, &self.nats_user, &self.nats_password, &self.nats_nkey) {
            (Some(token), _, _, _) => NatsAuth::Token(token.clone()),
            (None, Some(user), Some(password), _) => {
                NatsAuth::UserPassword { user: user.clone(), password: password.clone() }
            }
            (None, _, _, Some(seed_file)) => NatsAuth::NkeySeedFile(seed_file.clone()),
            _ => NatsAuth::None,
        };
        let nats = NatsConnect {
            url: url.to_owned(),
            ca_file: self.nats_ca.clone(),
            client_cert: self.nats_cert.clone().zip(self.nats_key.clone()),
            auth,
        };
        nats.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
        if nats.plaintext_off_host() && !super::certs::tls_args().insecure {
            anyhow::bail!(
                "refusing to send events in plaintext to NATS at {}, which is not this machine: give --nats-ca \
                 FILE (and --nats-cert/--nats-key for mutual TLS) or a tls:// URL, or --insecure to accept it",
                nats.shown_url()
            );
        }
        Ok(nats)
    }
}
