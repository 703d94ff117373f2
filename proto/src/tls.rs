//! Mutual TLS: who a process is, the files that prove it, and the rustls
//! configs built from them (docs/SECURITY.md).
//!
//! One [`Tls`] per process: the CA bundle (`ca.pem`), the certificate
//! (`<stem>.pem`) and its key (`<stem>.key`), all in one directory. Servers
//! require a client certificate signed by the CA; clients verify the server's
//! certificate against the CA *and* a DNS name the caller chooses
//! ([`Identity::dns_name`]), so a coordinator only talks to the participant
//! it registered. [`Tls::reload`] re-reads the files: new connections use the
//! new ones, connections already open keep theirs.
//!
//! Identities live in the certificate as a URI SAN,
//! `spiffe://twopc/<role>/<name>` ([`Identity`]).

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls_pki_types::pem::PemObject as _;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, ServerConfig};

/// The URI SAN prefix of every twopc identity.
pub const URI_PREFIX: &str = "spiffe://twopc/";

/// The DNS SAN every node certificate carries besides its own, which a
/// client checks when it may talk to any node of the cluster.
pub const ANY_NODE_DNS: &str = "nodes.twopc";

/// What a certificate's holder may do (the table in docs/SECURITY.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// A coordinator node: RaftPeer, and Prepare/Decide on participants.
    Node,
    /// A participant: Resolve (and Join) for its own branches.
    Participant,
    /// An application: the client API.
    Client,
    /// An operator: the Admin service.
    Admin,
}

impl Role {
    /// Every role, in the order of the table.
    pub const ALL: [Role; 4] = [Role::Node, Role::Participant, Role::Client, Role::Admin];

    /// The role's name in a SAN and in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Node => "node",
            Role::Participant => "participant",
            Role::Client => "client",
            Role::Admin => "admin",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = TlsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL.into_iter().find(|r| r.as_str() == s).ok_or_else(|| {
            TlsError::Identity(format!("unknown role {s:?}: expected node, participant, client or admin"))
        })
    }
}

/// Who a certificate names: a role and a name (`node:3`, `participant:bank-a`, `client:app`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    /// What it may do.
    pub role: Role,
    /// Which one: a node id, a participant name, or a free name for clients and admins.
    pub name: String,
}

impl Identity {
    /// `node:<id>`.
    pub fn node(id: u64) -> Self {
        Self { role: Role::Node, name: id.to_string() }
    }

    /// `participant:<name>`.
    pub fn participant(name: &str) -> Self {
        Self { role: Role::Participant, name: name.to_owned() }
    }

    /// `client:<name>`.
    pub fn client(name: &str) -> Self {
        Self { role: Role::Client, name: name.to_owned() }
    }

    /// `admin:<name>`.
    pub fn admin(name: &str) -> Self {
        Self { role: Role::Admin, name: name.to_owned() }
    }

    /// The URI SAN naming it: `spiffe://twopc/<role>/<name>`.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{}/{}", self.role, self.name)
    }

    /// Reads an identity back from a URI SAN; `None` for a URI that is not twopc's.
    pub fn from_uri(uri: &str) -> Option<Self> {
        let (role, name) = uri.strip_prefix(URI_PREFIX)?.split_once('/')?;
        let role = role.parse().ok()?;
        (!name.is_empty() && !name.contains('/')).then(|| Self { role, name: name.to_owned() })
    }

    /// The DNS SAN a dialer checks: `node-<id>.twopc`, `<name>.participant.twopc`,
    /// `<name>.client.twopc`, `<name>.admin.twopc`.
    pub fn dns_name(&self) -> String {
        match self.role {
            Role::Node => format!("node-{}.twopc", self.name),
            role => format!("{}.{role}.twopc", self.name),
        }
    }

    /// The file stem of its certificate and key in a TLS directory:
    /// `node-<id>`, `participant-<name>`, `client-<name>`, `admin-<name>`.
    pub fn file_stem(&self) -> String {
        format!("{}-{}", self.role, self.name)
    }

    /// The identity named in a DER certificate's URI SANs.
    ///
    /// # Errors
    /// The certificate does not parse, or names no twopc identity.
    pub fn from_cert(der: &[u8]) -> Result<Self, TlsError> {
        let sans = CertSummary::parse(der)?;
        sans.identity.ok_or_else(|| {
            TlsError::Identity(format!(
                "the certificate names no {URI_PREFIX}<role>/<name> URI (SANs: {:?})",
                sans.sans
            ))
        })
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.role, self.name)
    }
}

/// What a certificate says, for `twopc certs show` and for reading a peer's identity.
#[derive(Debug, Clone)]
pub struct CertSummary {
    /// The subject's distinguished name.
    pub subject: String,
    /// The issuer's distinguished name.
    pub issuer: String,
    /// Valid from, RFC 3339.
    pub not_before: String,
    /// Valid until, RFC 3339.
    pub not_after: String,
    /// Whether it is a CA certificate.
    pub is_ca: bool,
    /// Every SAN, as `DNS:name` or `URI:uri`.
    pub sans: Vec<String>,
    /// The twopc identity among the URI SANs, if any.
    pub identity: Option<Identity>,
}

impl CertSummary {
    /// Parses a DER certificate.
    ///
    /// # Errors
    /// It is not an X.509 certificate.
    pub fn parse(der: &[u8]) -> Result<Self, TlsError> {
        use x509_parser::prelude::{FromDer as _, GeneralName, X509Certificate};
        let (_, cert) =
            X509Certificate::from_der(der).map_err(|e| TlsError::Identity(format!("not an X.509 certificate: {e}")))?;
        let mut sans = Vec::new();
        let mut identity = None;
        if let Ok(Some(ext)) = cert.subject_alternative_name() {
            for name in &ext.value.general_names {
                match name {
                    GeneralName::DNSName(dns) => sans.push(format!("DNS:{dns}")),
                    GeneralName::URI(uri) => {
                        sans.push(format!("URI:{uri}"));
                        identity = identity.or_else(|| Identity::from_uri(uri));
                    }
                    other => sans.push(format!("{other:?}")),
                }
            }
        }
        let validity = cert.validity();
        Ok(Self {
            subject: cert.subject().to_string(),
            issuer: cert.issuer().to_string(),
            not_before: validity.not_before.to_datetime().to_string(),
            not_after: validity.not_after.to_datetime().to_string(),
            is_ca: cert.is_ca(),
            sans,
            identity,
        })
    }
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (in the message, not a separate cause, so it is said once).
        error: std::io::Error,
    },
    /// A file holds no usable PEM of the kind expected.
    #[error("{path}: {why}")]
    Pem {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// rustls refused the certificates or key.
    #[error("TLS setup: {0}")]
    Rustls(String),
    /// A certificate names no twopc identity, or another one than expected.
    #[error("{0}")]
    Identity(String),
}

/// The TLS settings of a process: the directory of its files and the limits of its listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsConfig {
    /// Holds `ca.pem`, and the process's `<stem>.pem` and `<stem>.key`
    /// (see [`Identity::file_stem`]; `twopc certs init` writes them).
    pub dir: PathBuf,
    /// TLS handshakes a listener runs at once; more connections wait to be
    /// accepted. Default: 64.
    pub handshakes_max: usize,
    /// How long a handshake may take before the connection is dropped.
    /// Default: 5000 ms.
    pub handshake_timeout_ms: u64,
}

impl TlsConfig {
    /// The files in `dir`, every limit at its default.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), handshakes_max: 64, handshake_timeout_ms: 5000 }
    }

    /// Loads the CA bundle and `identity`'s certificate and key.
    ///
    /// # Errors
    /// A missing or unreadable file, or one rustls refuses.
    pub fn load(&self, identity: &Identity) -> Result<Tls, TlsError> {
        if self.handshakes_max == 0 {
            return Err(TlsError::Rustls("handshakes_max must be at least 1".into()));
        }
        let stem = identity.file_stem();
        let files = Files {
            ca: self.dir.join("ca.pem"),
            cert: self.dir.join(format!("{stem}.pem")),
            key: self.dir.join(format!("{stem}.key")),
            identity: identity.clone(),
        };
        let loaded = files.load()?;
        Ok(Tls {
            inner: Arc::new(Inner {
                files,
                identity: identity.clone(),
                handshakes_max: self.handshakes_max,
                handshake_timeout: Duration::from_millis(self.handshake_timeout_ms),
                current: RwLock::new(Arc::new(loaded)),
            }),
        })
    }
}

/// A process's loaded TLS material; cheap to clone, shared by its servers and clients.
#[derive(Clone)]
pub struct Tls {
    inner: Arc<Inner>,
}

struct Inner {
    files: Files,
    identity: Identity,
    handshakes_max: usize,
    handshake_timeout: Duration,
    current: RwLock<Arc<Loaded>>,
}

/// Two handles are equal when they share the same loaded files.
impl PartialEq for Tls {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}

impl Eq for Tls {}

impl fmt::Debug for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tls").field("identity", &self.inner.identity).field("cert", &self.inner.files.cert).finish()
    }
}

struct Files {
    ca: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    /// Who the certificate must name.
    identity: Identity,
}

struct Loaded {
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
}

const ALPN_H2: &[u8] = b"h2";

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error })?;
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem { path: path.to_owned(), why: format!("bad PEM: {e}") })?;
    if certs.is_empty() {
        return Err(TlsError::Pem { path: path.to_owned(), why: "no CERTIFICATE in it".into() });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = std::fs::read(path).map_err(|error| TlsError::Read { path: path.to_owned(), error })?;
    PrivateKeyDer::from_pem_slice(&bytes)
        .map_err(|e| TlsError::Pem { path: path.to_owned(), why: format!("no private key in it: {e}") })
}

impl Files {
    fn load(&self) -> Result<Loaded, TlsError> {
        let mut roots = RootCertStore::empty();
        for ca in read_certs(&self.ca)? {
            roots
                .add(ca)
                .map_err(|e| TlsError::Pem { path: self.ca.clone(), why: format!("not a CA certificate: {e}") })?;
        }
        let roots = Arc::new(roots);
        let certs = read_certs(&self.cert)?;
        let named =
            Identity::from_cert(&certs[0]).map_err(|e| TlsError::Identity(format!("{}: {e}", self.cert.display())))?;
        if named != self.identity {
            let (path, expected) = (self.cert.display(), &self.identity);
            return Err(TlsError::Identity(format!("{path} names {named}, but this process is {expected}")));
        }
        let key = read_key(&self.key)?;
        let rustls_err = |e: rustls::Error| TlsError::Rustls(e.to_string());

        let verifier = WebPkiClientVerifier::builder_with_provider(Arc::clone(&roots), provider())
            .build()
            .map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs.clone(), key.clone_key())
            .map_err(rustls_err)?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];

        let mut client = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(rustls_err)?
            .with_root_certificates(roots)
            .with_client_auth_cert(certs, key)
            .map_err(rustls_err)?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Loaded { server: Arc::new(server), client: Arc::new(client) })
    }
}

impl Tls {
    /// Who this process is.
    pub fn identity(&self) -> &Identity {
        &self.inner.identity
    }

    /// Re-reads the files (on SIGHUP). New connections use the new ones;
    /// open connections keep theirs. On error the old ones stay in use.
    ///
    /// # Errors
    /// As [`TlsConfig::load`].
    pub fn reload(&self) -> Result<(), TlsError> {
        let loaded = Arc::new(self.inner.files.load()?);
        *self.inner.current.write().unwrap_or_else(std::sync::PoisonError::into_inner) = loaded;
        Ok(())
    }

    fn current(&self) -> Arc<Loaded> {
        Arc::clone(&self.inner.current.read().unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// The server side now: the client must present a certificate of the CA.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current().server)
    }

    /// The client side now: the server must present a certificate of the CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.current().client)
    }

    /// TLS handshakes a listener runs at once.
    pub fn handshakes_max(&self) -> usize {
        self.inner.handshakes_max
    }

    /// How long one handshake may take.
    pub fn handshake_timeout(&self) -> Duration {
        self.inner.handshake_timeout
    }

    /// A dialer that accepts only a server whose certificate carries `dns_name`
    /// (an [`Identity::dns_name`], or [`ANY_NODE_DNS`]).
    ///
    /// # Errors
    /// `dns_name` is not a valid DNS name.
    pub fn dial(&self, dns_name: &str) -> Result<TlsDial, TlsError> {
        let server_name = ServerName::try_from(dns_name.to_owned())
            .map_err(|e| TlsError::Identity(format!("{dns_name:?} is not a DNS name a certificate can carry: {e}")))?;
        Ok(TlsDial { tls: self.clone(), server_name })
    }
}

/// How a client dials over TLS: the process's [`Tls`] and the name the server must prove.
#[derive(Clone, Debug)]
pub struct TlsDial {
    pub(crate) tls: Tls,
    pub(crate) server_name: ServerName<'static>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip_through_their_uri_and_others_are_not_read() {
        for id in [Identity::node(3), Identity::participant("bank-a"), Identity::client("app"), Identity::admin("ops")]
        {
            assert_eq!(Identity::from_uri(&id.uri()), Some(id.clone()), "{id}");
        }
        assert_eq!(Identity::node(3).dns_name(), "node-3.twopc");
        assert_eq!(Identity::participant("bank-a").dns_name(), "bank-a.participant.twopc");
        for other in
            ["spiffe://other/node/1", "spiffe://twopc/root/x", "spiffe://twopc/node/", "spiffe://twopc/node/a/b"]
        {
            assert_eq!(Identity::from_uri(other), None, "{other}");
        }
    }
}
