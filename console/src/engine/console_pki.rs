//! The console's cluster CA and its own certificate, kept in `DATA_DIR/pki/`.

use std::path::Path;

use dunes_shared::pki::{self, CertificateAuthority, Identity, PkiError};
use rustls::pki_types::CertificateDer;

#[derive(Debug, thiserror::Error)]
pub enum ConsolePkiError {
    #[error("cannot access {path}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Pki(#[from] PkiError),
}

#[derive(Debug)]
pub struct ConsolePki {
    pub ca: CertificateAuthority,
    /// The identity issued at start; see [`ConsolePki::renewed_identity`].
    pub identity: Identity,
    cert_path: std::path::PathBuf,
}

fn read_optional(path: &Path) -> Result<Option<Vec<u8>>, ConsolePkiError> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(b)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(ConsolePkiError::Io {
            path: path.display().to_string(),
            source,
        }),
    }
}

impl ConsolePki {
    /// Loads the CA and console identity, creating them on first start (keys mode 0600);
    /// certificates last [`pki::DEFAULT_CERT_LIFETIME`].
    pub fn load_or_create(data_dir: &Path) -> Result<Self, ConsolePkiError> {
        Self::load_or_create_with(data_dir, pki::DEFAULT_CERT_LIFETIME)
    }

    /// As [`ConsolePki::load_or_create`], signing certificates that last `lifetime`.
    pub fn load_or_create_with(
        data_dir: &Path,
        lifetime: std::time::Duration,
    ) -> Result<Self, ConsolePkiError> {
        use std::os::unix::fs::PermissionsExt;
        let dir = data_dir.join("pki");
        let io = |source| ConsolePkiError::Io {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(&dir).map_err(io)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(
            |source| ConsolePkiError::Io {
                path: dir.display().to_string(),
                source,
            },
        )?;
        let (ca_key, ca_cert) = (dir.join("ca.key"), dir.join("ca.der"));
        let ca = match (read_optional(&ca_key)?, read_optional(&ca_cert)?) {
            (Some(key), Some(cert)) => {
                CertificateAuthority::load(&String::from_utf8_lossy(&key), &cert)?
                    .with_leaf_lifetime(lifetime)
            }
            _ => {
                let ca = CertificateAuthority::generate()?.with_leaf_lifetime(lifetime);
                pki::write_secret_file(&ca_key, ca.key_pem().as_bytes())?;
                dunes_shared::durable::write_file(&ca_cert, ca.cert_der(), 0o644).map_err(
                    |source| ConsolePkiError::Io {
                        path: ca_cert.display().to_string(),
                        source,
                    },
                )?;
                ca
            }
        };
        let (key_path, cert_path) = (dir.join("console.key"), dir.join("console.der"));
        let key_pem = match read_optional(&key_path)? {
            Some(k) => String::from_utf8_lossy(&k).into_owned(),
            None => {
                let k = pki::generate_key_pem()?;
                pki::write_secret_file(&key_path, k.as_bytes())?;
                k
            }
        };
        let pki = ConsolePki {
            ca,
            identity: Identity {
                key_pem,
                cert_der: CertificateDer::from(Vec::new()),
            },
            cert_path,
        };
        // Re-issued at every start, and renewed by the engine while it runs.
        let identity = pki.renewed_identity()?;
        Ok(ConsolePki { identity, ..pki })
    }

    /// A fresh console certificate for the same key, kept in the data dir.
    pub fn renewed_identity(&self) -> Result<Identity, ConsolePkiError> {
        let cert_der: CertificateDer<'static> =
            self.ca.issue_console_cert(&self.identity.key_pem)?;
        dunes_shared::durable::write_file(&self.cert_path, &cert_der, 0o644).map_err(|source| {
            ConsolePkiError::Io {
                path: self.cert_path.display().to_string(),
                source,
            }
        })?;
        Ok(Identity {
            key_pem: self.identity.key_pem.clone(),
            cert_der,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn ca_is_made_once_with_private_keys() {
        let dir = tempfile::tempdir().unwrap();
        let a = ConsolePki::load_or_create(dir.path()).unwrap();
        let b = ConsolePki::load_or_create(dir.path()).unwrap();
        assert_eq!(a.ca.cert_der(), b.ca.cert_der());
        for key in ["pki/ca.key", "pki/console.key"] {
            let mode = std::fs::metadata(dir.path().join(key))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600, "{key}");
        }
        assert!(pki::cert_is_console(&b.identity.cert_der));
    }
}
