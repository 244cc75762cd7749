//! An operator's credential file: who they are, where the engine is, their key, their
//! certificate and the cluster CA, in one TOML file only its owner may read.

use std::path::Path;

use dunes_shared::{model::OperatorName, pki};
use rustls::pki_types::CertificateDer;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub operator: OperatorName,
    /// The engine's operator endpoint, `host:port`.
    pub engine: String,
    pub key_pem: String,
    pub certificate_pem: String,
    pub ca_pem: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialError {
    #[error("cannot read the credential {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "the credential {path} may be read by others (mode {mode:o}); chmod 600 it, as it holds a private key"
    )]
    Open { path: String, mode: u32 },
    #[error("the credential {path} does not read: {message}")]
    Parse { path: String, message: String },
    #[error("cannot write the credential {path}")]
    Write {
        path: String,
        #[source]
        source: pki::PkiError,
    },
}

fn der_of(pem_text: &str, what: &str) -> Result<Vec<u8>, pki::PkiError> {
    pem::parse(pem_text)
        .map(pem::Pem::into_contents)
        .map_err(|_| {
            tracing::debug!("{what} is not PEM");
            pki::PkiError::Parse
        })
}

impl Credential {
    /// Reads a credential, refusing one that others may read.
    pub fn load(path: &Path) -> Result<Credential, CredentialError> {
        use std::os::unix::fs::PermissionsExt;
        let shown = path.display().to_string();
        let read = |source| CredentialError::Read {
            path: shown.clone(),
            source,
        };
        let mode = std::fs::metadata(path).map_err(read)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(CredentialError::Open { path: shown, mode });
        }
        let text = std::fs::read_to_string(path).map_err(read)?;
        toml::from_str(&text).map_err(|e| CredentialError::Parse {
            path: shown,
            message: e.message().to_string(),
        })
    }

    /// Writes it, readable by its owner only.
    pub fn write(&self, path: &Path) -> Result<(), CredentialError> {
        let text = format!(
            "# Dunes operator credential of {} for the engine at {}. It holds a private key:\n# keep it to yourself.\n{}",
            self.operator,
            self.engine,
            toml::to_string(self).map_err(|e| CredentialError::Parse {
                path: path.display().to_string(),
                message: e.to_string(),
            })?
        );
        pki::write_secret_file(path, text.as_bytes()).map_err(|source| CredentialError::Write {
            path: path.display().to_string(),
            source,
        })
    }

    pub fn identity(&self) -> Result<pki::Identity, pki::PkiError> {
        Ok(pki::Identity {
            key_pem: self.key_pem.clone(),
            cert_der: CertificateDer::from(der_of(&self.certificate_pem, "the certificate")?),
        })
    }

    /// When its certificate is due for renewal: two thirds into its life.
    pub fn renew_at(&self) -> Result<std::time::SystemTime, pki::PkiError> {
        Ok(pki::cert_validity(&self.identity()?.cert_der)?.renew_at())
    }

    pub fn ca_der(&self) -> Result<CertificateDer<'static>, pki::PkiError> {
        Ok(CertificateDer::from(der_of(&self.ca_pem, "the CA")?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_credential_is_written_for_its_owner_only_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("alice.toml");
        let credential = Credential {
            operator: OperatorName::new("alice").unwrap(),
            engine: "127.0.0.1:7450".into(),
            key_pem: pki::generate_key_pem().unwrap(),
            certificate_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"
                .into(),
            ca_pem: "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into(),
        };
        credential.write(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(Credential::load(&path).unwrap(), credential);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = Credential::load(&path).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        std::fs::write(dir.path().join("bad.toml"), "operator = 3").unwrap();
        std::fs::set_permissions(
            dir.path().join("bad.toml"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        assert!(matches!(
            Credential::load(&dir.path().join("bad.toml")),
            Err(CredentialError::Parse { .. })
        ));
    }
}
