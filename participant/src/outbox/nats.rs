//! [`NatsConnect`]: how a relay or a consumer reaches the NATS server: its
//! URL, TLS (the CA to trust, and a client certificate for mutual TLS) and
//! credentials (a token, a user and password, or an NKey whose seed is in
//! a file). Secrets never appear in `Debug` output or logs.

use std::fmt;
use std::path::PathBuf;

/// How to authenticate to the NATS server, beyond a client certificate.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum NatsAuth {
    /// No credentials (or only the client certificate).
    #[default]
    None,
    /// The server's `authorization { token }`.
    Token(String),
    /// A user of the server's `authorization { users }`.
    UserPassword {
        /// The user name.
        user: String,
        /// Its password.
        password: String,
    },
    /// A user of the server's `authorization { users = [{ nkey }] }`: the
    /// file holds the user's NKey seed (`SU...`, as `nk -gen user` writes
    /// it), read at each connection so a rotated seed is picked up; the
    /// seed signs the server's challenge and never leaves this process.
    NkeySeedFile(PathBuf),
}

impl fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::None => f.write_str("None"),
            Self::Token(_) => f.write_str("Token(<redacted>)"),
            Self::UserPassword { user, .. } => write!(f, "UserPassword {{ user: {user:?}, password: <redacted> }}"),
            Self::NkeySeedFile(path) => write!(f, "NkeySeedFile({path:?})"),
        }
    }
}

/// The NATS server and how to connect to it. `Debug` shows the URL without
/// its user and password ([`NatsConnect::shown_url`]) and no credential.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct NatsConnect {
    /// The server, such as `nats://127.0.0.1:4222` or `tls://nats.internal:4222`.
    pub url: String,
    /// PEM certificates of the CAs that sign the server's certificate.
    /// Setting it, a client certificate or a `tls://` URL requires TLS: the
    /// connection fails rather than fall back to plaintext.
    pub ca_file: Option<PathBuf>,
    /// A PEM certificate and its PEM private key this client presents, for
    /// a server that verifies clients (mutual TLS).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Credentials for the server's authorization.
    pub auth: NatsAuth,
}

impl fmt::Debug for NatsConnect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NatsConnect")
            .field("url", &self.shown_url())
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("auth", &self.auth)
            .finish()
    }
}

/// The URL schemes a connection may use: `nats` (TLS if the server or these
/// settings ask for it) and `tls` (always TLS). Others are refused, since
/// the client would not apply TLS to them (websockets).
const SCHEMES: [&str; 2] = ["nats", "tls"];

impl NatsConnect {
    /// Plaintext, no credentials, to the server at `url`.
    pub fn new(url: impl Into<String>) -> Self {
        Self { url: url.into(), ..Self::default() }
    }

    /// The URL as logs and errors show it: anything up to its last `@` (a
    /// user and password, or a token) is replaced by `***`. [`validate`]
    /// refuses such a URL, so this only guards a config that skipped it.
    ///
    /// [`validate`]: NatsConnect::validate
    pub fn shown_url(&self) -> String {
        let url = self.url.trim();
        let (scheme, rest) = url.split_once("://").map_or(("", url), |(scheme, rest)| (scheme, rest));
        match rest.rfind('@') {
            Some(at) => {
                let separator = if scheme.is_empty() { "" } else { "://" };
                format!("{scheme}{separator}***@{}", &rest[at + 1..])
            }
            None => url.to_owned(),
        }
    }

    /// Whether the connection must be TLS.
    pub fn requires_tls(&self) -> bool {
        scheme_of(&self.url).eq_ignore_ascii_case("tls") || self.ca_file.is_some() || self.client_cert.is_some()
    }

    /// Whether the connection would carry events in plaintext to a host that
    /// is not this machine: a front end refuses it unless told otherwise.
    pub fn plaintext_off_host(&self) -> bool {
        !self.requires_tls() && !is_loopback(host_of(&self.url))
    }

    /// Checks the URL and that every file given can be read, so that a
    /// typo is reported at start-up rather than as a connection that keeps
    /// failing.
    ///
    /// # Errors
    /// A one-line reason naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        if self.url.trim().is_empty() {
            return Err("the NATS URL is empty".into());
        }
        if self.url.contains(',') {
            return Err(format!(
                "NATS URL {}: give one server; the client learns the cluster's others from it",
                self.shown_url()
            ));
        }
        if self.url.contains('@') {
            return Err(format!(
                "NATS URL {}: credentials do not go in the URL, which logs and process lists show; give them \
                 as a token, a user and password, or an NKey seed file (twopc: --nats-token, --nats-user \
                 with TWOPC_NATS_PASSWORD, or --nats-nkey)",
                self.shown_url()
            ));
        }
        let scheme = scheme_of(&self.url);
        if !scheme.is_empty() && !SCHEMES.iter().any(|s| s.eq_ignore_ascii_case(scheme)) {
            return Err(format!(
                "NATS URL {}: scheme {scheme}:// is not supported; use nats:// or tls://",
                self.shown_url()
            ));
        }
        let files = self.ca_file.iter().chain(self.client_cert.iter().flat_map(|(cert, key)| [cert, key]));
        for file in files {
            std::fs::metadata(file)
                .and_then(|m| if m.is_file() { Ok(()) } else { Err(std::io::Error::other("not a file")) })
                .map_err(|e| format!("NATS TLS file {}: {e}", file.display()))?;
        }
        match &self.auth {
            NatsAuth::Token(token) if token.is_empty() => Err("the NATS token is empty".into()),
            NatsAuth::UserPassword { user, .. } if user.is_empty() => Err("the NATS user is empty".into()),
            NatsAuth::NkeySeedFile(path) => read_user_key(path).map(drop),
            _ => Ok(()),
        }
    }

    /// The client's connect options for these settings, named `name` (the
    /// server's connection list shows it).
    ///
    /// # Errors
    /// An NKey seed file that cannot be read or holds no user seed. It is
    /// read here, and again at each reconnection, so a seed rotated in the
    /// file is used from the next one on.
    pub fn options(&self, name: &str) -> Result<async_nats::ConnectOptions, String> {
        let options = match &self.auth {
            NatsAuth::None => async_nats::ConnectOptions::new(),
            NatsAuth::Token(token) => async_nats::ConnectOptions::with_token(token.clone()),
            NatsAuth::UserPassword { user, password } => {
                async_nats::ConnectOptions::with_user_and_password(user.clone(), password.clone())
            }
            NatsAuth::NkeySeedFile(path) => {
                read_user_key(path)?;
                let path = path.clone();
                async_nats::ConnectOptions::with_auth_callback(move |nonce| {
                    let signed = sign_with_seed_file(&path, &nonce);
                    async move { signed }
                })
            }
        };
        let mut options = options.name(name).require_tls(self.requires_tls());
        if !self.requires_tls() {
            // Plaintext was allowed for the hosts named; servers the cluster
            // announces may be elsewhere.
            options = options.ignore_discovered_servers();
        }
        if let Some(ca) = &self.ca_file {
            options = options.add_root_certificates(ca.clone());
        }
        if let Some((cert, key)) = &self.client_cert {
            options = options.add_client_certificate(cert.clone(), key.clone());
        }
        Ok(options)
    }
}

/// The NKey answer to a server's challenge `nonce`: the public key of the
/// seed in the file at `path` (read now) and the nonce signed with it.
fn sign_with_seed_file(path: &std::path::Path, nonce: &[u8]) -> Result<async_nats::Auth, async_nats::AuthError> {
    let pair = read_user_key(path).map_err(async_nats::AuthError::new)?;
    let mut auth = async_nats::Auth::new();
    auth.signature = Some(pair.sign(nonce).map_err(|e| async_nats::AuthError::new(format!("NKey signature: {e}")))?);
    auth.nkey = Some(pair.public_key());
    Ok(auth)
}

/// The NKey user key whose seed is in the file at `path`; errors name the
/// file, never its content.
fn read_user_key(path: &std::path::Path) -> Result<nkeys::KeyPair, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("NATS NKey seed file {}: {e}", path.display()))?;
    let seed = text.trim();
    let pair = if seed.starts_with("SU") { nkeys::KeyPair::from_seed(seed).ok() } else { None };
    pair.ok_or_else(|| {
        format!(
            "NATS NKey seed file {}: it does not hold a user seed (one line starting SU, as `nk -gen user` writes)",
            path.display()
        )
    })
}

/// The scheme of a NATS URL, empty for `host:port`.
fn scheme_of(url: &str) -> &str {
    url.trim().split_once("://").map_or("", |(scheme, _)| scheme)
}

/// The host of a NATS URL (`nats://user:pass@host:port/path`, `host:port`, `host`).
fn host_of(url: &str) -> &str {
    let rest = url.trim().split_once("://").map_or(url.trim(), |(_, rest)| rest);
    let rest = rest.split('/').next().unwrap_or(rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    if let Some(bracketed) = rest.strip_prefix('[') {
        return bracketed.split_once(']').map_or(bracketed, |(host, _)| host);
    }
    rest.split([':', '/']).next().unwrap_or(rest)
}

fn is_loopback(host: &str) -> bool {
    host == "localhost" || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback())
}

#[cfg(test)]
mod tests {
    use super::*;

    // Secrets never reach a log line through Debug.
    #[test]
    fn debug_output_never_shows_a_secret() {
        let mut nats = NatsConnect::new("tls://nats:4222");
        nats.auth = NatsAuth::Token("s3cret-token".into());
        assert!(!format!("{nats:?}").contains("s3cret"), "{nats:?}");
        nats.auth = NatsAuth::UserPassword { user: "bank".into(), password: "s3cret-pw".into() };
        let shown = format!("{nats:?}");
        assert!(!shown.contains("s3cret") && shown.contains("bank"), "{shown}");
        let in_url = NatsConnect::new("nats://bank:s3cret@10.0.0.5:4222");
        assert_eq!(in_url.shown_url(), "nats://***@10.0.0.5:4222");
        assert!(!format!("{in_url:?}").contains("s3cret"), "{in_url:?}");
        let with_slash = NatsConnect::new("nats://bank:s3/cret@10.0.0.5:4222");
        assert!(!with_slash.shown_url().contains("cret"), "{}", with_slash.shown_url());
    }

    // Plaintext is refused off this machine, allowed on loopback, and any TLS setting makes it TLS.
    #[test]
    fn plaintext_is_flagged_only_off_this_machine() {
        let off_host = |url: &str| NatsConnect::new(url).plaintext_off_host();
        for local in ["nats://127.0.0.1:4222", "localhost:4222", "nats://[::1]:4222", "nats://u:p@localhost"] {
            assert!(!off_host(local), "{local}");
        }
        for remote in ["nats://10.0.0.5:4222", "nats.internal:4222"] {
            assert!(off_host(remote), "{remote}");
        }
        assert!(off_host("nats://10.0.0.5:4222/x@localhost"), "a path is not the host");
        assert!(!off_host("tls://nats.internal:4222") && !off_host("TLS://nats.internal:4222"));
        let mut with_ca = NatsConnect::new("nats://nats.internal:4222");
        with_ca.ca_file = Some("ca.pem".into());
        assert!(with_ca.requires_tls() && !with_ca.plaintext_off_host());
    }

    // A missing file, an empty URL or an empty credential is named at start-up.
    #[test]
    fn validate_names_what_is_wrong() {
        assert!(NatsConnect::new(" ").validate().is_err_and(|e| e.contains("URL")));
        let mut nats = NatsConnect::new("tls://nats:4222");
        nats.ca_file = Some("/nonexistent/ca.pem".into());
        assert!(nats.validate().is_err_and(|e| e.contains("/nonexistent/ca.pem")));
        let mut nats = NatsConnect::new("nats://127.0.0.1:4222");
        nats.auth = NatsAuth::Token(String::new());
        assert!(nats.validate().is_err_and(|e| e.contains("token")));
        assert_eq!(NatsConnect::new("nats://127.0.0.1:4222").validate(), Ok(()));
        let in_url = NatsConnect::new("nats://bank:s3cret@127.0.0.1:4222").validate().expect_err("a password");
        assert!(in_url.contains("credentials do not go in the URL") && !in_url.contains("s3cret"), "{in_url}");
        let list = NatsConnect::new("nats://127.0.0.1:4222,nats://10.0.0.5:4222").validate().expect_err("a list");
        assert!(list.contains("one server"), "{list}");
        for websocket in ["ws://127.0.0.1:8080", "wss://nats.internal:443"] {
            let why = NatsConnect::new(websocket).validate().expect_err(websocket);
            assert!(why.contains("not supported"), "{why}");
        }
    }
}
