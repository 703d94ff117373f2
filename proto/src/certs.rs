//! Making a CA and the certificates of a cluster (`twopc certs init`, and
//! tests, which make theirs in a temporary directory).
//!
//! Keys are ECDSA P-256. Each leaf carries its identity as a URI SAN and the
//! DNS SANs a dialer checks ([`Identity::dns_name`]; a node also
//! [`ANY_NODE_DNS`]), and may serve and dial (both extended key usages).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::tls::{ANY_NODE_DNS, Identity, Role, TlsError};

/// How long a CA certificate is valid. Default of `twopc certs init`: 10 years.
pub const CA_LIFETIME_DAYS: i64 = 3650;

/// How long a leaf certificate is valid. Default of `twopc certs init`: 90
/// days (rotate with SIGHUP well before, docs/SECURITY.md).
pub const LEAF_LIFETIME_DAYS: i64 = 90;

/// A certificate and its private key, PEM-encoded.
#[derive(Debug, Clone)]
pub struct Pem {
    /// The certificate.
    pub cert: String,
    /// The private key (PKCS#8).
    pub key: String,
}

/// A certificate authority held in memory.
pub struct CertAuthority {
    issuer: Issuer<'static, KeyPair>,
    pem: Pem,
}

fn gen_err(e: rcgen::Error) -> TlsError {
    TlsError::Rustls(format!("making a certificate: {e}"))
}

impl CertAuthority {
    /// A new self-signed CA named `name`, valid for `lifetime_days` from now.
    ///
    /// # Errors
    /// Key generation or signing failed.
    pub fn new(name: &str, lifetime_days: i64) -> Result<Self, TlsError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(lifetime_days);
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.self_signed(&key).map_err(gen_err)?;
        let pem = Pem { cert: cert.pem(), key: key.serialize_pem() };
        Ok(Self { issuer: Issuer::new(params, key), pem })
    }

    /// The CA whose `ca.pem` and `ca.key` are in `dir` (to issue more
    /// certificates from it: a node or participant added later).
    ///
    /// # Errors
    /// A file is missing, or is not a CA certificate or a private key.
    pub fn load(dir: &Path) -> Result<Self, TlsError> {
        let read = |name: &str| {
            let path = dir.join(name);
            std::fs::read_to_string(&path).map_err(|error| TlsError::Read { path, error })
        };
        let pem = Pem { cert: read("ca.pem")?, key: read("ca.key")? };
        let bad = |name: &str, e: rcgen::Error| TlsError::Pem { path: dir.join(name), why: e.to_string() };
        let key = KeyPair::from_pem(&pem.key).map_err(|e| bad("ca.key", e))?;
        let issuer = Issuer::from_ca_cert_pem(&pem.cert, key).map_err(|e| bad("ca.pem", e))?;
        Ok(Self { issuer, pem })
    }

    /// The CA's own certificate and key.
    pub fn pem(&self) -> &Pem {
        &self.pem
    }

    /// A certificate for `identity`, valid from `not_before` to `not_after`.
    ///
    /// # Errors
    /// The identity's name cannot be a DNS name, or signing failed.
    pub fn issue_between(
        &self,
        identity: &Identity,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Pem, TlsError> {
        let bad_name = |e: rcgen::Error| TlsError::Identity(format!("{identity} cannot be put in a certificate: {e}"));
        let mut dns = vec![identity.dns_name()];
        if identity.role == Role::Node {
            dns.push(ANY_NODE_DNS.to_owned());
        }
        let mut params = CertificateParams::new(dns).map_err(bad_name)?;
        let uri = identity.uri().try_into().map_err(bad_name)?;
        params.subject_alt_names.push(SanType::URI(uri));
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, identity.to_string());
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(gen_err)?;
        let cert = params.signed_by(&key, &self.issuer).map_err(gen_err)?;
        Ok(Pem { cert: cert.pem(), key: key.serialize_pem() })
    }

    /// A certificate for `identity`, valid for `lifetime_days` from now.
    ///
    /// # Errors
    /// As [`CertAuthority::issue_between`].
    pub fn issue(&self, identity: &Identity, lifetime_days: i64) -> Result<Pem, TlsError> {
        let now = OffsetDateTime::now_utc();
        self.issue_between(identity, now - Duration::hours(1), now + Duration::days(lifetime_days))
    }

    /// Writes `ca.pem` and `ca.key` into `dir` (created if missing).
    ///
    /// # Errors
    /// The directory or a file cannot be written.
    pub fn write_ca(&self, dir: &Path) -> Result<(), TlsError> {
        write_pair(dir, "ca", &self.pem)
    }

    /// Issues `identity` a certificate valid for `lifetime_days` and writes
    /// `<stem>.pem` and `<stem>.key` into `dir`; returns the certificate's path.
    ///
    /// # Errors
    /// As [`CertAuthority::issue`] and [`CertAuthority::write_ca`].
    pub fn write_issued(&self, dir: &Path, identity: &Identity, lifetime_days: i64) -> Result<PathBuf, TlsError> {
        let pem = self.issue(identity, lifetime_days)?;
        write_pair(dir, &identity.file_stem(), &pem)?;
        Ok(dir.join(format!("{}.pem", identity.file_stem())))
    }
}

/// Writes `<stem>.pem` and `<stem>.key` (the key readable by its owner only).
///
/// # Errors
/// The directory or a file cannot be written.
pub fn write_pair(dir: &Path, stem: &str, pem: &Pem) -> Result<(), TlsError> {
    let write = |path: PathBuf, text: &str, private: bool| {
        std::fs::create_dir_all(dir).map_err(|error| TlsError::Read { path: dir.to_owned(), error })?;
        let tmp = path.with_extension("tmp");
        let failed = |error| TlsError::Read { path: tmp.clone(), error };
        // A stale temporary file from an interrupted run may have any mode: start afresh.
        match std::fs::remove_file(&tmp) {
            Err(error) if error.kind() != std::io::ErrorKind::NotFound => return Err(failed(error)),
            _ => {}
        }
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        // A private key is created readable by its owner only: set after
        // writing, another local user could open it in between.
        #[cfg(unix)]
        if private {
            use std::os::unix::fs::OpenOptionsExt as _;
            options.mode(0o600);
        }
        let mut file = options.open(&tmp).map_err(failed)?;
        std::io::Write::write_all(&mut file, text.as_bytes()).map_err(failed)?;
        // A rename, so a process reloading on SIGHUP never reads half a file.
        std::fs::rename(&tmp, &path).map_err(|error| TlsError::Read { path, error })
    };
    write(dir.join(format!("{stem}.key")), &pem.key, true)?;
    write(dir.join(format!("{stem}.pem")), &pem.cert, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    // A private key is never readable by others, not even for a moment: it is
    // created with mode 0600, over a stale temporary file of any mode.
    #[cfg(unix)]
    #[test]
    fn a_private_key_is_written_readable_by_its_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::write(dir.path().join("node-1.tmp"), "stale").expect("a stale temporary file");
        let pem = Pem { cert: "CERT".into(), key: "KEY".into() };
        write_pair(dir.path(), "node-1", &pem).expect("written");
        let mode = |name: &str| std::fs::metadata(dir.path().join(name)).expect("written").permissions().mode() & 0o777;
        assert_eq!(mode("node-1.key"), 0o600);
        assert_eq!(std::fs::read_to_string(dir.path().join("node-1.key")).expect("read"), "KEY");
        assert_eq!(std::fs::read_to_string(dir.path().join("node-1.pem")).expect("read"), "CERT");
        assert!(!dir.path().join("node-1.tmp").exists());
    }
}
