//! PKI helpers: the cluster CA, host and console certificates, key fingerprints, and the
//! TLS 1.3-only rustls and quinn configurations built from them.

use std::{fmt, path::Path, str::FromStr, sync::Arc, time::Duration};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, PublicKeyData,
};
use rustls::{
    DigitallySignedStruct, RootCertStore, SignatureScheme,
    client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier},
    crypto::CryptoProvider,
    server::WebPkiClientVerifier,
};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{
    model::{HostId, OperatorName},
    protocol::{ALPN_CONTROL, ALPN_ENROLL},
};

/// ALPN of the engine's API for operators (windows and ctl elsewhere); the number is its
/// major version.
pub const ALPN_OPERATOR: &[u8] = b"dunes-operator/1";

/// DNS name in the console's certificate; it marks the console role.
pub const CONSOLE_CERT_NAME: &str = "console.dunes";
const HOST_NAME_SUFFIX: &str = ".host.dunes";
const OPERATOR_NAME_SUFFIX: &str = ".operator.dunes";
const CA_VALIDITY_DAYS: i64 = 3650;
/// An agent's self-signed certificate, shown only until enrollment.
const SELF_SIGNED_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How long a certificate the CA signs lasts by default; it is renewed at two thirds of it.
pub const DEFAULT_CERT_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Certificates start this much before they are issued, for clocks a little behind.
const CLOCK_SKEW: Duration = Duration::from_secs(3600);

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PkiError {
    #[error("certificate generation failed")]
    Generate(#[from] rcgen::Error),
    #[error("TLS configuration failed")]
    Tls(#[from] rustls::Error),
    #[error("client certificate verifier failed")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("certificate does not parse")]
    Parse,
    #[error("certificate request names {found:?}, expected {expected:?}")]
    WrongName {
        expected: String,
        found: Vec<String>,
    },
    #[error("QUIC configuration failed: {0}")]
    Quic(String),
    #[error("cannot write {path}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// The crypto provider every Dunes TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Fills `buf` from the system's secure random source.
pub fn fill_random(buf: &mut [u8]) {
    rustls::crypto::ring::default_provider()
        .secure_random
        .fill(buf)
        .expect("the system random source works");
}

/// The DNS name a host's certificate carries.
pub fn host_cert_name(host_id: &HostId) -> String {
    format!("{host_id}{HOST_NAME_SUFFIX}")
}

/// The DNS name an operator's certificate carries.
pub fn operator_cert_name(name: &OperatorName) -> String {
    format!("{name}{OPERATOR_NAME_SUFFIX}")
}

/// SHA-256 of a certificate's public key (SubjectPublicKeyInfo). It stays the same when the
/// CA re-signs the same key, so it can be pinned across enrollment.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Fingerprint(pub [u8; 32]);

impl Fingerprint {
    pub fn of_public_key(spki_der: &[u8]) -> Self {
        Fingerprint(Sha256::digest(spki_der).into())
    }

    pub fn of_certificate(cert_der: &[u8]) -> Result<Self, PkiError> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(cert_der).map_err(|_| PkiError::Parse)?;
        Ok(Self::of_public_key(cert.public_key().raw))
    }
}

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sha256:{}", hex::encode(self.0))
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid fingerprint: expected sha256: and 64 hex digits")]
pub struct FingerprintError;

impl FromStr for Fingerprint {
    type Err = FingerprintError;
    fn from_str(s: &str) -> Result<Self, FingerprintError> {
        let s = s.trim();
        let s = s
            .strip_prefix("sha256:")
            .or_else(|| s.strip_prefix("SHA256:"))
            .unwrap_or(s);
        let digits: String = s.chars().filter(|c| *c != ':' && *c != ' ').collect();
        let bytes = hex::decode(digits.to_ascii_lowercase()).map_err(|_| FingerprintError)?;
        Ok(Fingerprint(bytes.try_into().map_err(|_| FingerprintError)?))
    }
}

/// DNS names in a certificate's subject alternative names.
pub fn cert_dns_names(cert_der: &[u8]) -> Result<Vec<String>, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| PkiError::Parse)?;
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push((*dns).to_string());
            }
        }
    }
    Ok(names)
}

/// The host a certificate was issued to, if it is a host certificate.
pub fn cert_host_id(cert_der: &[u8]) -> Option<HostId> {
    cert_dns_names(cert_der).ok()?.iter().find_map(|n| {
        n.strip_suffix(HOST_NAME_SUFFIX)
            .and_then(|id| HostId::new(id).ok())
    })
}

/// The operator a certificate was issued to, if it is an operator certificate.
pub fn cert_operator_name(cert_der: &[u8]) -> Option<OperatorName> {
    cert_dns_names(cert_der).ok()?.iter().find_map(|n| {
        n.strip_suffix(OPERATOR_NAME_SUFFIX)
            .and_then(|name| OperatorName::new(name).ok())
    })
}

/// Whether a certificate carries the console role.
pub fn cert_is_console(cert_der: &[u8]) -> bool {
    cert_dns_names(cert_der).is_ok_and(|names| names.iter().any(|n| n == CONSOLE_CERT_NAME))
}

fn leaf_params(dns_name: &str, lifetime: Duration) -> Result<CertificateParams, PkiError> {
    let mut params = CertificateParams::new(vec![dns_name.to_string()])?;
    params.distinguished_name.push(DnType::CommonName, dns_name);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params.use_authority_key_identifier_extension = true;
    // Without an explicit serial rcgen derives it from the key, and every re-issue would repeat it.
    let mut serial = [0u8; 16];
    fill_random(&mut serial);
    serial[0] &= 0x7f;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
    Ok(params)
}

/// When a certificate was issued and when it expires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CertValidity {
    pub issued: std::time::SystemTime,
    pub expires: std::time::SystemTime,
}

impl CertValidity {
    /// Two thirds into its life: when it is renewed.
    pub fn renew_at(&self) -> std::time::SystemTime {
        let life = self
            .expires
            .duration_since(self.issued)
            .unwrap_or(Duration::ZERO);
        self.issued + life * 2 / 3
    }

    pub fn lifetime(&self) -> Duration {
        self.expires
            .duration_since(self.issued)
            .unwrap_or(Duration::ZERO)
    }
}

/// The validity of a certificate, read from it.
pub fn cert_validity(cert_der: &[u8]) -> Result<CertValidity, PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| PkiError::Parse)?;
    let at = |t: x509_parser::time::ASN1Time| {
        std::time::UNIX_EPOCH + Duration::from_secs(t.timestamp().max(0) as u64)
    };
    let validity = cert.validity();
    let (not_before, expires) = (at(validity.not_before), at(validity.not_after));
    // Issued CLOCK_SKEW after its start, unless that is past its end (a foreign certificate).
    let issued = (not_before + CLOCK_SKEW).min(expires);
    Ok(CertValidity { issued, expires })
}

/// A private key with its certificate chain, ready for TLS.
#[derive(Debug)]
pub struct Identity {
    pub key_pem: String,
    pub cert_der: CertificateDer<'static>,
}

impl Identity {
    pub fn private_key(&self) -> Result<PrivateKeyDer<'static>, PkiError> {
        let key = KeyPair::from_pem(&self.key_pem)?;
        Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
            key.serialize_der(),
        )))
    }

    pub fn fingerprint(&self) -> Result<Fingerprint, PkiError> {
        Fingerprint::of_certificate(&self.cert_der)
    }
}

/// A new key pair, as PEM.
pub fn generate_key_pem() -> Result<String, PkiError> {
    Ok(KeyPair::generate()?.serialize_pem())
}

/// The fingerprint of a PEM key's public half.
pub fn key_fingerprint(key_pem: &str) -> Result<Fingerprint, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    Ok(Fingerprint::of_public_key(&key.subject_public_key_info()))
}

/// The self-signed certificate an agent presents until it is enrolled.
pub fn self_signed_host_cert(
    key_pem: &str,
    host_id: &HostId,
) -> Result<CertificateDer<'static>, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = leaf_params(&host_cert_name(host_id), SELF_SIGNED_VALIDITY)?;
    params.use_authority_key_identifier_extension = false;
    Ok(params.self_signed(&key)?.der().clone())
}

/// A certificate signing request for a host key.
pub fn host_csr(key_pem: &str, host_id: &HostId) -> Result<Vec<u8>, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = leaf_params(&host_cert_name(host_id), SELF_SIGNED_VALIDITY)?;
    // A CSR cannot carry this extension; the CA adds it when signing.
    params.use_authority_key_identifier_extension = false;
    params.serial_number = None;
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// A certificate signing request for an operator's key.
pub fn operator_csr(key_pem: &str, name: &OperatorName) -> Result<Vec<u8>, PkiError> {
    let key = KeyPair::from_pem(key_pem)?;
    let mut params = leaf_params(&operator_cert_name(name), SELF_SIGNED_VALIDITY)?;
    params.use_authority_key_identifier_extension = false;
    params.serial_number = None;
    Ok(params.serialize_request(&key)?.der().to_vec())
}

/// The cluster certificate authority, held by the console.
pub struct CertificateAuthority {
    issuer: Issuer<'static, KeyPair>,
    key_pem: String,
    cert_der: CertificateDer<'static>,
    /// How long the certificates it signs last.
    leaf_lifetime: Duration,
}

impl fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertificateAuthority")
            .finish_non_exhaustive()
    }
}

impl CertificateAuthority {
    pub fn generate() -> Result<Self, PkiError> {
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params
            .distinguished_name
            .push(DnType::CommonName, "Dunes cluster CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::from_secs(3600);
        params.not_after = now + time::Duration::days(CA_VALIDITY_DAYS);
        let cert_der = params.self_signed(&key)?.der().clone();
        let key_pem = key.serialize_pem();
        Ok(CertificateAuthority {
            issuer: Issuer::new(params, key),
            key_pem,
            cert_der,
            leaf_lifetime: DEFAULT_CERT_LIFETIME,
        })
    }

    pub fn load(key_pem: &str, cert_der: &[u8]) -> Result<Self, PkiError> {
        let cert_der = CertificateDer::from(cert_der.to_vec());
        let issuer = Issuer::from_ca_cert_der(&cert_der, KeyPair::from_pem(key_pem)?)?;
        Ok(CertificateAuthority {
            issuer,
            key_pem: key_pem.to_string(),
            cert_der,
            leaf_lifetime: DEFAULT_CERT_LIFETIME,
        })
    }

    /// The CA, signing certificates that last `lifetime`.
    pub fn with_leaf_lifetime(mut self, lifetime: Duration) -> Self {
        self.leaf_lifetime = lifetime;
        self
    }

    pub fn leaf_lifetime(&self) -> Duration {
        self.leaf_lifetime
    }

    pub fn key_pem(&self) -> &str {
        &self.key_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    /// Issues the console's certificate for its key.
    pub fn issue_console_cert(&self, key_pem: &str) -> Result<CertificateDer<'static>, PkiError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(leaf_params(CONSOLE_CERT_NAME, self.leaf_lifetime)?
            .signed_by(&key, &self.issuer)?
            .der()
            .clone())
    }

    /// Signs a host's CSR after checking its signature and that it asks for exactly the
    /// host's name; the certificate gets our parameters, not the requester's.
    pub fn sign_host_csr(
        &self,
        csr_der: &[u8],
        host_id: &HostId,
    ) -> Result<CertificateDer<'static>, PkiError> {
        self.sign_csr_for(csr_der, host_cert_name(host_id))
    }

    /// Signs an operator's CSR, which must ask for exactly the operator's name.
    pub fn sign_operator_csr(
        &self,
        csr_der: &[u8],
        name: &OperatorName,
    ) -> Result<CertificateDer<'static>, PkiError> {
        self.sign_csr_for(csr_der, operator_cert_name(name))
    }

    fn sign_csr_for(
        &self,
        csr_der: &[u8],
        expected: String,
    ) -> Result<CertificateDer<'static>, PkiError> {
        let der = rustls_pki_types::CertificateSigningRequestDer::from(csr_der.to_vec());
        let mut csr = CertificateSigningRequestParams::from_der(&der)?;
        let found: Vec<String> = csr
            .params
            .subject_alt_names
            .iter()
            .map(|san| match san {
                rcgen::SanType::DnsName(name) => name.to_string(),
                other => format!("{other:?}"),
            })
            .collect();
        if found != [expected.clone()] {
            return Err(PkiError::WrongName { expected, found });
        }
        csr.params = leaf_params(&expected, self.leaf_lifetime)?;
        Ok(csr.signed_by(&self.issuer)?.der().clone())
    }
}

/// Checks that `cert_der` is valid now, issued by `ca`, for `host_id`.
pub fn verify_host_cert(
    cert_der: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    host_id: &HostId,
) -> Result<(), PkiError> {
    verify_host_cert_at(cert_der, ca, host_id, UnixTime::now())
}

/// Checks that `cert_der` was issued by `ca` for `host_id`, whatever the clock says: it tells
/// a certificate of this CA from one that is not, even once it has expired.
pub fn host_cert_issued_by(
    cert_der: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    host_id: &HostId,
) -> Result<(), PkiError> {
    let (_, cert) = x509_parser::parse_x509_certificate(cert_der).map_err(|_| PkiError::Parse)?;
    let not_before =
        u64::try_from(cert.validity().not_before.timestamp()).map_err(|_| PkiError::Parse)?;
    // One second into the certificate's life, when it was valid if it was ever valid.
    let at = UnixTime::since_unix_epoch(Duration::from_secs(not_before + 1));
    verify_host_cert_at(cert_der, ca, host_id, at)
}

fn verify_host_cert_at(
    cert_der: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
    host_id: &HostId,
    at: UnixTime,
) -> Result<(), PkiError> {
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
        Arc::new(root_store(ca)?),
        provider(),
    )
    .build()
    .map_err(|e| PkiError::Tls(rustls::Error::General(e.to_string())))?;
    let name = ServerName::try_from(host_cert_name(host_id)).map_err(|_| PkiError::Parse)?;
    verifier.verify_server_cert(cert_der, &[], &name, &[], at)?;
    Ok(())
}

/// Checks that `cert_der` is a console certificate issued by `ca` and valid now.
pub fn verify_console_cert(
    cert_der: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<(), PkiError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
        .build()?
        .verify_client_cert(cert_der, &[], UnixTime::now())?;
    let found = cert_dns_names(cert_der)?;
    if !found.iter().any(|n| n == CONSOLE_CERT_NAME) {
        return Err(PkiError::WrongName {
            expected: CONSOLE_CERT_NAME.to_string(),
            found,
        });
    }
    Ok(())
}

/// The operator a certificate names, once it is checked to be an operator certificate
/// issued by `ca` and valid now. A host's or the console's certificate is refused here.
pub fn verify_operator_cert(
    cert_der: &CertificateDer<'static>,
    ca: &CertificateDer<'static>,
) -> Result<OperatorName, PkiError> {
    WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
        .build()?
        .verify_client_cert(cert_der, &[], UnixTime::now())?;
    cert_operator_name(cert_der).ok_or_else(|| PkiError::WrongName {
        expected: format!("NAME{OPERATOR_NAME_SUFFIX}"),
        found: cert_dns_names(cert_der).unwrap_or_default(),
    })
}

/// Server side of the operator endpoint: the console's certificate, and a client
/// certificate from the CA required (which role it carries is checked at the hello).
pub fn operator_server_config(
    identity: &Identity,
    ca: &CertificateDer<'static>,
) -> Result<rustls::ServerConfig, PkiError> {
    let verifier =
        WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
            .build()?;
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![identity.cert_der.clone()], identity.private_key()?)?;
    config.alpn_protocols = vec![ALPN_OPERATOR.to_vec()];
    Ok(config)
}

/// Client side of the operator endpoint: verifies the console against the CA and
/// presents the operator's certificate.
pub fn operator_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ClientConfig, PkiError> {
    host_client_config(ca, identity, ALPN_OPERATOR)
}

fn root_store(ca_der: &CertificateDer<'static>) -> Result<RootCertStore, PkiError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca_der.clone())?;
    Ok(roots)
}

/// Server side of an agent. Without a CA (not yet enrolled) only enrollment is offered and no
/// client certificate is asked for. With one, client certificates are verified against it;
/// a client may still connect without one, for enrollment only — the control protocol
/// refuses such a connection at its hello.
/// `offer_enroll` adds the enrollment ALPN for an enrolled agent (while a fresh join token
/// is outstanding); an agent not enrolled offers it always.
pub fn agent_server_config(
    identity: &Identity,
    client_ca: Option<&CertificateDer<'static>>,
    offer_enroll: bool,
) -> Result<rustls::ServerConfig, PkiError> {
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?;
    let (builder, alpn) = match client_ca {
        Some(ca) => {
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(root_store(ca)?), provider())
                    .allow_unauthenticated()
                    .build()?;
            // rustls picks the first of these the client offers: a console offers control only,
            // an enrolling or probing client offers enrollment first.
            let mut alpn = vec![ALPN_CONTROL.to_vec()];
            if offer_enroll {
                alpn.insert(0, ALPN_ENROLL.to_vec());
            }
            (builder.with_client_cert_verifier(verifier), alpn)
        }
        None => (builder.with_no_client_auth(), vec![ALPN_ENROLL.to_vec()]),
    };
    let mut config =
        builder.with_single_cert(vec![identity.cert_der.clone()], identity.private_key()?)?;
    config.alpn_protocols = alpn;
    Ok(config)
}

/// Client side of the control protocol: verifies the agent against the CA (the server name
/// is the enrolled host's) and presents the console's certificate.
pub fn control_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ClientConfig, PkiError> {
    host_client_config(ca, identity, ALPN_CONTROL)
}

/// A client that verifies a host against the CA and presents `identity`, speaking `alpn`.
fn host_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
    alpn: &[u8],
) -> Result<rustls::ClientConfig, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(root_store(ca)?)
        .with_client_auth_cert(vec![identity.cert_der.clone()], identity.private_key()?)?;
    config.alpn_protocols = vec![alpn.to_vec()];
    Ok(config)
}

/// Client side of a disk transfer: one agent to another, each verified against the CA (the
/// server name is the target host's) with the source's host certificate as client
/// certificate.
pub fn transfer_client_config(
    ca: &CertificateDer<'static>,
    identity: &Identity,
) -> Result<rustls::ClientConfig, PkiError> {
    host_client_config(ca, identity, crate::transfer::ALPN_TRANSFER)
}

/// Client side of enrollment and probes: the agent is not CA-signed yet, so any certificate is
/// accepted here (its signatures still checked) and the caller compares the key fingerprint
/// instead. The control ALPN is offered second, so an enrolled agent that offers no enrollment
/// still shows its key and the caller can say why enrollment is closed.
pub fn enroll_client_config() -> Result<rustls::ClientConfig, PkiError> {
    let mut config = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(FingerprintLater(provider())))
        .with_no_client_auth();
    config.alpn_protocols = vec![ALPN_ENROLL.to_vec(), ALPN_CONTROL.to_vec()];
    Ok(config)
}

#[derive(Debug)]
struct FingerprintLater(Arc<CryptoProvider>);

impl ServerCertVerifier for FingerprintLater {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        _message: &[u8],
        _cert: &CertificateDer<'_>,
        _dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        Err(rustls::Error::PeerIncompatible(
            rustls::PeerIncompatible::Tls12NotOffered,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Transport settings shared by every Dunes QUIC endpoint: a lost peer is noticed within
/// a few seconds, and windows are large enough for disk streams.
pub fn transport_config() -> quinn::TransportConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.keep_alive_interval(Some(Duration::from_millis(700)));
    transport.max_idle_timeout(Some(
        quinn::IdleTimeout::try_from(Duration::from_secs(3)).expect("small timeout"),
    ));
    transport.stream_receive_window(quinn::VarInt::from_u32(8 * 1024 * 1024));
    transport.receive_window(quinn::VarInt::from_u32(32 * 1024 * 1024));
    transport.send_window(32 * 1024 * 1024);
    transport
}

pub fn quic_server_config(tls: rustls::ServerConfig) -> Result<quinn::ServerConfig, PkiError> {
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(Arc::new(tls))
        .map_err(|e| PkiError::Quic(e.to_string()))?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

pub fn quic_client_config(tls: rustls::ClientConfig) -> Result<quinn::ClientConfig, PkiError> {
    let crypto = quinn::crypto::rustls::QuicClientConfig::try_from(Arc::new(tls))
        .map_err(|e| PkiError::Quic(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config()));
    Ok(config)
}

/// Writes a secret (a private key, a token hash) readable by its owner only, durably.
pub fn write_secret_file(path: &Path, contents: &[u8]) -> Result<(), PkiError> {
    crate::durable::write_file(path, contents, 0o600).map_err(|source| PkiError::Write {
        path: path.display().to_string(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signed_certificates_last_the_cas_lifetime_and_renew_at_two_thirds() {
        let ca = CertificateAuthority::generate()
            .unwrap()
            .with_leaf_lifetime(Duration::from_secs(90));
        let host = HostId::new("h").unwrap();
        let key = generate_key_pem().unwrap();
        let cert = ca
            .sign_host_csr(&host_csr(&key, &host).unwrap(), &host)
            .unwrap();
        let v = cert_validity(&cert).unwrap();
        let lifetime = v.lifetime().as_secs();
        assert!((89..=91).contains(&lifetime), "{lifetime}");
        let renew_in = v
            .renew_at()
            .duration_since(std::time::SystemTime::now())
            .unwrap()
            .as_secs();
        assert!((58..=61).contains(&renew_in), "{renew_in}");
        let default = CertificateAuthority::generate().unwrap();
        let console = default.issue_console_cert(&key).unwrap();
        assert_eq!(
            cert_validity(&console).unwrap().lifetime().as_secs() / 86400,
            30
        );
    }

    #[test]
    fn host_certificate_round_trip() {
        let ca = CertificateAuthority::generate().unwrap();
        let host = HostId::new("node-1").unwrap();
        let key = generate_key_pem().unwrap();
        let self_signed = self_signed_host_cert(&key, &host).unwrap();
        let csr = host_csr(&key, &host).unwrap();
        let signed = ca.sign_host_csr(&csr, &host).unwrap();
        // The pinned fingerprint survives signing: it is the key's, not the certificate's.
        let fp = key_fingerprint(&key).unwrap();
        assert_eq!(Fingerprint::of_certificate(&self_signed).unwrap(), fp);
        assert_eq!(Fingerprint::of_certificate(&signed).unwrap(), fp);
        assert_eq!(cert_host_id(&signed), Some(host.clone()));
        assert!(!cert_is_console(&signed));
        verify_host_cert(&signed, ca.cert_der(), &host).unwrap();
        assert!(verify_host_cert(&signed, ca.cert_der(), &HostId::new("node-9").unwrap()).is_err());
        assert!(verify_host_cert(&self_signed, ca.cert_der(), &host).is_err());
        // The CA refuses to sign a name other than the host's.
        let other = HostId::new("node-2").unwrap();
        let err = ca.sign_host_csr(&csr, &other).unwrap_err();
        assert!(matches!(err, PkiError::WrongName { .. }), "{err}");
        assert!(ca.sign_host_csr(b"garbage", &host).is_err());
    }

    #[test]
    fn operator_certificates_are_told_apart_from_hosts_and_consoles() {
        let ca = CertificateAuthority::generate().unwrap();
        let other_ca = CertificateAuthority::generate().unwrap();
        let alice = OperatorName::new("alice").unwrap();
        let key = generate_key_pem().unwrap();
        let csr = operator_csr(&key, &alice).unwrap();
        let cert = ca.sign_operator_csr(&csr, &alice).unwrap();
        assert_eq!(verify_operator_cert(&cert, ca.cert_der()).unwrap(), alice);
        assert_eq!(cert_operator_name(&cert), Some(alice.clone()));
        assert_eq!(cert_host_id(&cert), None);
        assert!(!cert_is_console(&cert));
        assert!(verify_console_cert(&cert, ca.cert_der()).is_err());
        // Another CA's operator, a host and the console are no operators here.
        let foreign = other_ca.sign_operator_csr(&csr, &alice).unwrap();
        assert!(verify_operator_cert(&foreign, ca.cert_der()).is_err());
        let host = HostId::new("alice").unwrap();
        let host_cert = ca
            .sign_host_csr(&host_csr(&key, &host).unwrap(), &host)
            .unwrap();
        assert!(matches!(
            verify_operator_cert(&host_cert, ca.cert_der()),
            Err(PkiError::WrongName { .. })
        ));
        let console = ca.issue_console_cert(&key).unwrap();
        assert!(verify_operator_cert(&console, ca.cert_der()).is_err());
        // The CA signs an operator's request for that operator only, and no host's as one.
        let bob = OperatorName::new("bob").unwrap();
        assert!(ca.sign_operator_csr(&csr, &bob).is_err());
        assert!(
            ca.sign_operator_csr(&host_csr(&key, &host).unwrap(), &alice)
                .is_err()
        );
        assert!(ca.sign_host_csr(&csr, &host).is_err());
    }

    #[test]
    fn issued_by_ignores_the_clock_but_not_the_issuer() {
        let ca = CertificateAuthority::generate().unwrap();
        let other_ca = CertificateAuthority::generate().unwrap();
        let host = HostId::new("node-1").unwrap();
        let key_pem = generate_key_pem().unwrap();
        let mut params = leaf_params(&host_cert_name(&host), DEFAULT_CERT_LIFETIME).unwrap();
        let now = OffsetDateTime::now_utc();
        params.not_before = now - time::Duration::days(400);
        params.not_after = now - time::Duration::days(35);
        let key = KeyPair::from_pem(&key_pem).unwrap();
        let expired = params.signed_by(&key, &ca.issuer).unwrap().der().clone();
        assert!(verify_host_cert(&expired, ca.cert_der(), &host).is_err());
        host_cert_issued_by(&expired, ca.cert_der(), &host).unwrap();
        assert!(host_cert_issued_by(&expired, other_ca.cert_der(), &host).is_err());
        let self_signed = self_signed_host_cert(&key_pem, &host).unwrap();
        assert!(host_cert_issued_by(&self_signed, ca.cert_der(), &host).is_err());
    }

    #[test]
    fn console_certificates_are_told_apart() {
        let ca = CertificateAuthority::generate().unwrap();
        let other_ca = CertificateAuthority::generate().unwrap();
        let key = generate_key_pem().unwrap();
        let console = ca.issue_console_cert(&key).unwrap();
        verify_console_cert(&console, ca.cert_der()).unwrap();
        assert!(verify_console_cert(&console, other_ca.cert_der()).is_err());
        let host = HostId::new("node-1").unwrap();
        let csr = host_csr(&key, &host).unwrap();
        let host_cert = ca.sign_host_csr(&csr, &host).unwrap();
        let err = verify_console_cert(&host_cert, ca.cert_der()).unwrap_err();
        assert!(matches!(err, PkiError::WrongName { .. }), "{err}");
    }

    #[test]
    fn ca_reloads_from_its_files() {
        let ca = CertificateAuthority::generate().unwrap();
        let again = CertificateAuthority::load(ca.key_pem(), ca.cert_der()).unwrap();
        let key = generate_key_pem().unwrap();
        let cert = again.issue_console_cert(&key).unwrap();
        assert!(cert_is_console(&cert));
        assert_eq!(cert_host_id(&cert), None);
        let identity = Identity {
            key_pem: key,
            cert_der: cert,
        };
        assert!(control_client_config(ca.cert_der(), &identity).is_ok());
        assert!(agent_server_config(&identity, Some(ca.cert_der()), false).is_ok());
    }

    #[test]
    fn fingerprint_text_round_trip() {
        let fp = Fingerprint([0xab; 32]);
        let text = fp.to_string();
        assert_eq!(text.len(), 7 + 64);
        assert_eq!(text.parse::<Fingerprint>().unwrap(), fp);
        let colons = text.as_bytes()[7..]
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap().to_uppercase())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(colons.parse::<Fingerprint>().unwrap(), fp);
        assert!("sha256:abcd".parse::<Fingerprint>().is_err());
        assert!("zz".repeat(32).parse::<Fingerprint>().is_err());
    }

    #[test]
    fn secret_files_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("dunes-pki-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("key.pem");
        write_secret_file(&path, b"secret").unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
