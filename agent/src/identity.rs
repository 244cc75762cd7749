//! The agent's identity in its data dir: key, certificates, cluster CA and join token.
//!
//! Layout (all under `DATA_DIR/identity/`): `key.pem` (0600), `host-id`, `cert.der` (self-signed
//! until enrollment, then CA-signed), `ca.der` (once enrolled), `token.sha256` (0600, while a
//! join token is outstanding).

use std::path::{Path, PathBuf};

use dunes_shared::{
    durable,
    model::HostId,
    pki::{self, Fingerprint, Identity, PkiError},
    token,
};
use hex::FromHex;
use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("cannot access {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} holds an invalid host id")]
    BadHostId { path: String },
    #[error("this data dir belongs to host {found}, not {wanted}")]
    HostIdMismatch { found: HostId, wanted: HostId },
    #[error(transparent)]
    Pki(#[from] PkiError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> IdentityError {
    let path = path.display().to_string();
    move |source| IdentityError::Io { path, source }
}

/// How long a join token can be used after it was issued.
pub const TOKEN_LIFETIME: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

#[derive(Debug)]
pub struct AgentIdentity {
    dir: PathBuf,
    pub host_id: HostId,
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
    pub ca_der: Option<CertificateDer<'static>>,
}

impl AgentIdentity {
    /// Loads the identity, creating key and self-signed certificate on first start.
    pub fn load_or_create(data_dir: &Path, wanted: Option<&HostId>) -> Result<Self, IdentityError> {
        let dir = data_dir.join("identity");
        std::fs::create_dir_all(&dir).map_err(io(&dir))?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        let id_path = dir.join("host-id");
        let host_id = match std::fs::read_to_string(&id_path) {
            Ok(text) => {
                let found = HostId::new(text.trim()).map_err(|_| IdentityError::BadHostId {
                    path: id_path.display().to_string(),
                })?;
                if let Some(wanted) = wanted.filter(|w| **w != found) {
                    return Err(IdentityError::HostIdMismatch {
                        found,
                        wanted: wanted.clone(),
                    });
                }
                found
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let id = wanted.cloned().unwrap_or_else(default_host_id);
                durable::write_file(&id_path, format!("{id}\n").as_bytes(), 0o644)
                    .map_err(io(&id_path))?;
                id
            }
            Err(e) => return Err(io(&id_path)(e)),
        };
        let key_path = dir.join("key.pem");
        let key_pem = match std::fs::read_to_string(&key_path) {
            Ok(k) => k,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = pki::generate_key_pem()?;
                pki::write_secret_file(&key_path, k.as_bytes())?;
                k
            }
            Err(e) => return Err(io(&key_path)(e)),
        };
        let cert_path = dir.join("cert.der");
        let cert_der = match std::fs::read(&cert_path) {
            Ok(c) => CertificateDer::from(c),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let c = pki::self_signed_host_cert(&key_pem, &host_id)?;
                durable::write_file(&cert_path, &c, 0o644).map_err(io(&cert_path))?;
                c
            }
            Err(e) => return Err(io(&cert_path)(e)),
        };
        let ca_path = dir.join("ca.der");
        let ca_der = match std::fs::read(&ca_path) {
            // A CA without the certificate it signed (enrollment stopped between its two
            // writes) is no enrollment: the agent starts over with a fresh join token.
            Ok(c) => Some(CertificateDer::from(c))
                .filter(|ca| pki::host_cert_issued_by(&cert_der, ca, &host_id).is_ok()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&ca_path)(e)),
        };
        Ok(AgentIdentity {
            dir,
            host_id,
            key_pem,
            cert_der,
            ca_der,
        })
    }

    pub fn fingerprint(&self) -> Result<Fingerprint, PkiError> {
        pki::key_fingerprint(&self.key_pem)
    }

    pub fn tls_identity(&self) -> Identity {
        Identity {
            key_pem: self.key_pem.clone(),
            cert_der: self.cert_der.clone(),
        }
    }

    pub fn is_enrolled(&self) -> bool {
        self.ca_der.is_some()
    }

    /// Stores a CA-signed certificate and the CA, after the caller verified them.
    pub fn install(
        &mut self,
        cert: CertificateDer<'static>,
        ca: CertificateDer<'static>,
    ) -> Result<(), IdentityError> {
        let ca_path = self.dir.join("ca.der");
        let cert_path = self.dir.join("cert.der");
        // CA first: a crash in between leaves a CA with the old self-signed cert, which a
        // re-enrollment repairs; the reverse order would leave a cert no one can verify.
        write_atomic(&ca_path, &ca)?;
        write_atomic(&cert_path, &cert)?;
        self.ca_der = Some(ca);
        self.cert_der = cert;
        Ok(())
    }

    fn token_path(&self) -> PathBuf {
        self.dir.join("token.sha256")
    }

    /// Makes a fresh one-time join token; only its hash is stored.
    pub fn issue_token(&self) -> Result<String, IdentityError> {
        let token = token::generate_token();
        pki::write_secret_file(
            &self.token_path(),
            hex::encode(token::token_hash(&token)).as_bytes(),
        )?;
        Ok(token)
    }

    pub fn has_token(&self) -> bool {
        self.token_path().exists()
    }

    /// Whether an unused join token younger than [`TOKEN_LIFETIME`] is outstanding.
    pub fn has_fresh_token(&self) -> bool {
        std::fs::metadata(self.token_path())
            .and_then(|m| m.modified())
            .ok()
            .and_then(|issued| issued.elapsed().ok())
            .is_some_and(|age| age < TOKEN_LIFETIME)
    }

    /// Whether enrollment is offered: always before the first enrollment; afterwards only
    /// while a fresh token from `dunes-agent token` is unused.
    pub fn enrollment_open(&self) -> bool {
        !self.is_enrolled() || self.has_fresh_token()
    }

    /// Whether `candidate` is the outstanding join token, and still fresh.
    pub fn token_matches(&self, candidate: &str) -> bool {
        if !self.has_fresh_token() {
            return false;
        }
        let Ok(stored) = std::fs::read_to_string(self.token_path()) else {
            return false;
        };
        let Ok(stored) = <[u8; 32]>::from_hex(stored.trim()) else {
            return false;
        };
        token::hashes_match(&stored, &token::token_hash(candidate))
    }

    /// Spends the token: it cannot be used again.
    pub fn consume_token(&self) -> Result<(), IdentityError> {
        let path = self.token_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&path)(e)),
            // The removal must be on disk: a token spent before a crash stays spent.
            _ => durable::sync_dir(&self.dir).map_err(io(&self.dir)),
        }
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), IdentityError> {
    durable::write_file(path, bytes, 0o644).map_err(io(path))
}

/// The machine's host name, turned into a valid host id.
pub fn default_host_id() -> HostId {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(dunes_shared::model::NAME_MAX_LEN)
        .collect();
    HostId::new(cleaned.trim_matches('-'))
        .unwrap_or_else(|_| HostId::new("host").expect("valid literal"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_persists_and_tokens_are_one_time() {
        let dir = tempfile::tempdir().unwrap();
        let id = HostId::new("h1").unwrap();
        let a = AgentIdentity::load_or_create(dir.path(), Some(&id)).unwrap();
        let b = AgentIdentity::load_or_create(dir.path(), None).unwrap();
        assert_eq!(a.host_id, b.host_id);
        assert_eq!(a.fingerprint().unwrap(), b.fingerprint().unwrap());
        assert!(!a.is_enrolled());
        let err = AgentIdentity::load_or_create(dir.path(), Some(&HostId::new("h2").unwrap()))
            .unwrap_err();
        assert!(matches!(err, IdentityError::HostIdMismatch { .. }));

        assert!(!a.token_matches("anything"));
        let token = a.issue_token().unwrap();
        assert!(a.token_matches(&token));
        assert!(!a.token_matches("0000-0000"));
        let newer = a.issue_token().unwrap();
        assert!(!a.token_matches(&token), "a new token replaces the old one");
        a.consume_token().unwrap();
        assert!(!a.token_matches(&newer));
    }

    #[test]
    fn a_half_written_enrollment_is_no_enrollment() {
        let dir = tempfile::tempdir().unwrap();
        let id = HostId::new("h1").unwrap();
        let mut a = AgentIdentity::load_or_create(dir.path(), Some(&id)).unwrap();
        let ca = pki::CertificateAuthority::generate().unwrap();
        // The CA written, the signed certificate not yet: as if stopped in between.
        write_atomic(&dir.path().join("identity/ca.der"), ca.cert_der()).unwrap();
        assert!(
            !AgentIdentity::load_or_create(dir.path(), None)
                .unwrap()
                .is_enrolled()
        );
        let csr = pki::host_csr(&a.key_pem, &id).unwrap();
        let signed = ca.sign_host_csr(&csr, &id).unwrap();
        a.install(signed, ca.cert_der().clone()).unwrap();
        assert!(
            AgentIdentity::load_or_create(dir.path(), None)
                .unwrap()
                .is_enrolled()
        );
    }
}
