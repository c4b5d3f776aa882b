//! The cluster's small PKI: one CA that issues the controller's server certificate and one
//! client certificate per node.
//!
//! # Naming scheme
//!
//! A node certificate names exactly one node, twice:
//! * subject common name `system:weir-node:<node>` (readable in logs and `openssl x509`), and
//! * one URI subject alternative name `weir://node/<node>` (what the server checks).
//!
//! `<node>` is the Kubernetes Node name, a DNS subdomain name
//! (<https://kubernetes.io/docs/concepts/overview/working-with-objects/names/#dns-subdomain-names>),
//! so it cannot contain `/` or `:` and the identity cannot be confused with another.
//! Node certificates carry the extended key usage `clientAuth` only; the controller
//! certificate carries `serverAuth` only, DNS and IP subject alternative names and the common
//! name `weir-controller`. TLS peers check the key usage (RFC 5280 §4.2.1.12), so neither
//! kind of certificate can stand in for the other.
//!
//! The CA signs with ECDSA P-256. Issued certificates get a random 128-bit serial, are
//! backdated by [`CLOCK_SKEW`] and last [`LEAF_VALIDITY`]; the CA lasts [`CA_VALIDITY`].

use std::{
    fs,
    io::{self, Write},
    net::IpAddr,
    path::{Path, PathBuf},
    time::Duration,
};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};
use rustls_pki_types::{CertificateDer, pem::PemObject};
use time::OffsetDateTime;
use x509_parser::{
    certificate::X509Certificate, certification_request::X509CertificationRequest,
    extensions::GeneralName, oid_registry, prelude::FromDer,
};

/// Prefix of a node certificate's subject common name.
pub const NODE_COMMON_NAME_PREFIX: &str = "system:weir-node:";
/// Prefix of a node certificate's URI subject alternative name.
pub const NODE_URI_PREFIX: &str = "weir://node/";
/// Subject common name of the controller certificate.
pub const CONTROLLER_COMMON_NAME: &str = "weir-controller";

/// Lifetime of the cluster CA.
pub const CA_VALIDITY: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Lifetime of controller and node certificates.
pub const LEAF_VALIDITY: Duration = Duration::from_secs(365 * 24 * 3600);
/// How far `notBefore` lies in the past, so a peer whose clock is a little behind accepts a
/// certificate issued a moment ago.
pub const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// What went wrong with keys, certificates or their files.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("reading {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("writing {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("{what}: no PEM certificate found")]
    NoCertificate { what: String },
    #[error("{what}: not a valid certificate: {reason}")]
    BadCertificate { what: String, reason: String },
    #[error("{what}: not a usable PEM private key: {source}")]
    BadKey { what: String, source: rcgen::Error },
    #[error("{what}: {reason}")]
    NotACa { what: String, reason: &'static str },
    #[error("CA key does not belong to the CA certificate")]
    KeyMismatch,
    #[error("invalid node name {name:?}: {reason}")]
    InvalidNodeName { name: String, reason: &'static str },
    #[error("invalid DNS name {name:?} for the controller certificate: {source}")]
    InvalidDnsName { name: String, source: rcgen::Error },
    #[error("invalid certificate signing request: {reason}")]
    BadCsr { reason: String },
    #[error(
        "certificate signing request uses an unsupported key ({key}); use ECDSA P-256 or P-384, or Ed25519"
    )]
    UnsupportedKey { key: String },
    #[error("issuing a certificate for {subject}: {source}")]
    Issue {
        subject: String,
        source: rcgen::Error,
    },
    #[error("generating a key: {source}")]
    KeyGeneration { source: rcgen::Error },
    #[error("certificate is not a weir node identity: {reason}")]
    NotANodeIdentity { reason: String },
}

/// A certificate and its private key, both PEM.
#[derive(Clone)]
pub struct IssuedCert {
    pub cert_pem: String,
    pub key_pem: String,
}

impl std::fmt::Debug for IssuedCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IssuedCert")
            .field("cert_pem", &self.cert_pem)
            .field("key_pem", &"<redacted>")
            .finish()
    }
}

impl IssuedCert {
    /// Writes the certificate and (owner-only readable) key.
    pub fn write(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem.as_bytes(), false)?;
        write_file(key_path, self.key_pem.as_bytes(), true)
    }
}

/// Checks that `name` is a Kubernetes Node name (an RFC 1123 DNS subdomain name), which is
/// what makes the certificate identities of [this module](self) unambiguous.
pub fn validate_node_name(name: &str) -> Result<(), PkiError> {
    let invalid = |reason| PkiError::InvalidNodeName {
        name: name.to_owned(),
        reason,
    };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > 253 {
        return Err(invalid("longer than 253 characters"));
    }
    for label in name.split('.') {
        if label.is_empty() || label.len() > 63 {
            return Err(invalid(
                "each dot-separated label must have 1 to 63 characters",
            ));
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        {
            return Err(invalid(
                "only lowercase letters, digits, '-' and '.' are allowed",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(invalid("labels must start and end with a letter or digit"));
        }
    }
    Ok(())
}

fn write_file(path: &Path, contents: &[u8], private: bool) -> Result<(), PkiError> {
    let err = |source| PkiError::Write {
        path: path.to_owned(),
        source,
    };
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path).map_err(err)?;
    file.write_all(contents).map_err(err)?;
    file.sync_all().map_err(err)
}

pub(crate) fn read_file(path: &Path) -> Result<String, PkiError> {
    fs::read_to_string(path).map_err(|source| PkiError::Read {
        path: path.to_owned(),
        source,
    })
}

/// Parses the PEM certificates in `pem`; `what` names the source (a file) in errors.
pub(crate) fn parse_certs(pem: &str, what: &str) -> Result<Vec<CertificateDer<'static>>, PkiError> {
    let certs = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| PkiError::BadCertificate {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(PkiError::NoCertificate {
            what: what.to_owned(),
        });
    }
    for cert in &certs {
        X509Certificate::from_der(cert).map_err(|e| PkiError::BadCertificate {
            what: what.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(certs)
}

pub(crate) fn parse_key(pem: &str, what: &str) -> Result<KeyPair, PkiError> {
    KeyPair::from_pem(pem).map_err(|source| PkiError::BadKey {
        what: what.to_owned(),
        source,
    })
}

fn random_serial() -> SerialNumber {
    let mut bytes = [0u8; 16];
    // A positive INTEGER of at most 20 octets (RFC 5280 §4.1.2.2).
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .expect("the operating system's random source works");
    bytes[0] &= 0x7f;
    bytes[0] |= 0x01;
    SerialNumber::from_slice(&bytes)
}

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = OffsetDateTime::now_utc();
    params.not_before = now - CLOCK_SKEW;
    params.not_after = now + lifetime;
}

fn leaf_params(common_name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.serial_number = Some(random_serial());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.use_authority_key_identifier_extension = true;
    validity(&mut params, LEAF_VALIDITY);
    params
}

fn node_params(node: &str) -> Result<CertificateParams, PkiError> {
    validate_node_name(node)?;
    let mut params = leaf_params(&format!("{NODE_COMMON_NAME_PREFIX}{node}"));
    let uri = format!("{NODE_URI_PREFIX}{node}");
    params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(|source| {
        PkiError::Issue {
            subject: node.to_owned(),
            source,
        }
    })?)];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    Ok(params)
}

/// Generates a fresh ECDSA P-256 key.
pub fn generate_key() -> Result<KeyPair, PkiError> {
    KeyPair::generate().map_err(|source| PkiError::KeyGeneration { source })
}

/// A PKCS#10 request for a node certificate (what an agent sends when it bootstraps). It
/// carries only the subject common name; the CA adds everything else.
pub fn node_csr_pem(node: &str, key: &KeyPair) -> Result<String, PkiError> {
    validate_node_name(node)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(
        DnType::CommonName,
        format!("{NODE_COMMON_NAME_PREFIX}{node}"),
    );
    let issue = |source| PkiError::Issue {
        subject: node.to_owned(),
        source,
    };
    params
        .serialize_request(key)
        .map_err(issue)?
        .pem()
        .map_err(issue)
}

/// The cluster certificate authority.
pub struct ClusterCa {
    cert_pem: String,
    cert_der: CertificateDer<'static>,
    issuer: Issuer<'static, KeyPair>,
}

impl std::fmt::Debug for ClusterCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterCa")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

impl ClusterCa {
    /// A new self-signed CA whose subject common name is `name`.
    pub fn generate(name: &str) -> Result<Self, PkiError> {
        let key = generate_key()?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.serial_number = Some(random_serial());
        validity(&mut params, CA_VALIDITY);
        let cert = params.self_signed(&key).map_err(|source| PkiError::Issue {
            subject: name.to_owned(),
            source,
        })?;
        Ok(Self {
            cert_pem: cert.pem(),
            cert_der: cert.der().clone(),
            issuer: Issuer::new(params, key),
        })
    }

    /// The CA from its PEM certificate and key; checks that the certificate is a CA and that
    /// the key is its key.
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Self, PkiError> {
        Self::parse(cert_pem, "CA certificate", key_pem, "CA key")
    }

    /// Loads the CA from PEM files (for example `ca.crt` and `ca.key` of a mounted Secret).
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        Self::parse(
            &read_file(cert_path)?,
            &cert_path.display().to_string(),
            &read_file(key_path)?,
            &key_path.display().to_string(),
        )
    }

    fn parse(
        cert_pem: &str,
        cert_what: &str,
        key_pem: &str,
        key_what: &str,
    ) -> Result<Self, PkiError> {
        let cert_der = parse_certs(cert_pem, cert_what)?.swap_remove(0);
        let key = parse_key(key_pem, key_what)?;
        let (_, cert) =
            X509Certificate::from_der(&cert_der).map_err(|e| PkiError::BadCertificate {
                what: cert_what.to_owned(),
                reason: e.to_string(),
            })?;
        let not_a_ca = |reason| PkiError::NotACa {
            what: cert_what.to_owned(),
            reason,
        };
        match cert.basic_constraints() {
            Ok(Some(bc)) if bc.value.ca => {}
            Ok(_) => return Err(not_a_ca("basic constraints do not mark it as a CA")),
            Err(_) => return Err(not_a_ca("unreadable basic constraints")),
        }
        if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
            return Err(PkiError::KeyMismatch);
        }
        let issuer =
            Issuer::from_ca_cert_der(&cert_der, key).map_err(|e| PkiError::BadCertificate {
                what: cert_what.to_owned(),
                reason: e.to_string(),
            })?;
        Ok(Self {
            cert_pem: cert_pem.to_owned(),
            cert_der,
            issuer,
        })
    }

    /// Writes the certificate and the (owner-only readable) key as PEM.
    pub fn save(&self, cert_path: &Path, key_path: &Path) -> Result<(), PkiError> {
        write_file(cert_path, self.cert_pem.as_bytes(), false)?;
        write_file(key_path, self.key_pem().as_bytes(), true)
    }

    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn cert_der(&self) -> &CertificateDer<'static> {
        &self.cert_der
    }

    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// A server certificate for the controller, valid for the given DNS names and addresses
    /// (what agents use to reach it: the Service's DNS names, a node address, `localhost`).
    pub fn issue_controller_cert(
        &self,
        dns_names: &[&str],
        ips: &[IpAddr],
    ) -> Result<IssuedCert, PkiError> {
        let mut params = leaf_params(CONTROLLER_COMMON_NAME);
        for name in dns_names {
            let dns = (*name)
                .try_into()
                .map_err(|source| PkiError::InvalidDnsName {
                    name: (*name).to_owned(),
                    source,
                })?;
            params.subject_alt_names.push(SanType::DnsName(dns));
        }
        params
            .subject_alt_names
            .extend(ips.iter().copied().map(SanType::IpAddress));
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = generate_key()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Issue {
                subject: CONTROLLER_COMMON_NAME.to_owned(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A client certificate (and a fresh key) for the agent on `node`.
    pub fn issue_node_cert(&self, node: &str) -> Result<IssuedCert, PkiError> {
        let params = node_params(node)?;
        let key = generate_key()?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|source| PkiError::Issue {
                subject: node.to_owned(),
                source,
            })?;
        Ok(IssuedCert {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Signs a node certificate for the public key of `csr_pem`.
    ///
    /// Only the key is taken from the request, after checking the request's signature (proof
    /// that the requester holds the private key) and that the key is ECDSA P-256/P-384 or
    /// Ed25519. Subject, alternative names, key usages and lifetime are set here; a request
    /// whose subject names another identity is refused rather than silently corrected, since
    /// it shows a confused or malicious requester.
    pub fn sign_node_csr(&self, node: &str, csr_pem: &str) -> Result<String, PkiError> {
        let params = node_params(node)?;
        let csr =
            CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| PkiError::BadCsr {
                reason: e.to_string(),
            })?;
        check_csr_key(csr_pem)?;
        let expected_cn = format!("{NODE_COMMON_NAME_PREFIX}{node}");
        for (ty, value) in csr.params.distinguished_name.iter() {
            let is_expected_cn = *ty == DnType::CommonName
                && match value {
                    rcgen::DnValue::Utf8String(s) => *s == expected_cn,
                    rcgen::DnValue::PrintableString(s) => s.as_str() == expected_cn,
                    _ => false,
                };
            if !is_expected_cn {
                return Err(PkiError::BadCsr {
                    reason: format!("subject must be empty or CN={expected_cn}"),
                });
            }
        }
        let cert = params
            .signed_by(&csr.public_key, &self.issuer)
            .map_err(|source| PkiError::Issue {
                subject: node.to_owned(),
                source,
            })?;
        Ok(cert.pem())
    }
}

/// Refuses keys other than ECDSA P-256/P-384 and Ed25519. The curve is read from the key
/// itself, not inferred from the signature algorithm, so a key on another curve cannot be
/// mislabelled into a certificate.
fn check_csr_key(csr_pem: &str) -> Result<(), PkiError> {
    use rustls_pki_types::CertificateSigningRequestDer;
    let der = CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes()).map_err(|e| {
        PkiError::BadCsr {
            reason: e.to_string(),
        }
    })?;
    let (_, csr) =
        X509CertificationRequest::from_der(der.as_ref()).map_err(|e| PkiError::BadCsr {
            reason: e.to_string(),
        })?;
    let spki = &csr.certification_request_info.subject_pki;
    let alg = &spki.algorithm.algorithm;
    let curve = spki
        .algorithm
        .parameters
        .as_ref()
        .and_then(|p| p.as_oid().ok());
    let supported = if *alg == oid_registry::OID_KEY_TYPE_EC_PUBLIC_KEY {
        curve.as_ref().is_some_and(|c| {
            *c == oid_registry::OID_EC_P256 || *c == oid_registry::OID_NIST_EC_P384
        })
    } else {
        *alg == oid_registry::OID_SIG_ED25519
    };
    if supported {
        Ok(())
    } else {
        Err(PkiError::UnsupportedKey {
            key: match curve {
                Some(c) => format!("{alg} on curve {c}"),
                None => alg.to_string(),
            },
        })
    }
}

/// The node a client certificate speaks for, following the [naming scheme](self).
///
/// Requires the `clientAuth` key usage, no CA flag, exactly one `weir://node/` URI naming a
/// valid node name, and a common name that agrees with it. The chain to the cluster CA and
/// the validity period are checked by the TLS layer before this runs.
pub fn node_identity(cert_der: &[u8]) -> Result<String, PkiError> {
    let not_node = |reason: String| PkiError::NotANodeIdentity { reason };
    let (_, cert) =
        X509Certificate::from_der(cert_der).map_err(|e| not_node(format!("unparsable: {e}")))?;
    if matches!(cert.basic_constraints(), Ok(Some(bc)) if bc.value.ca) {
        return Err(not_node("it is a CA certificate".into()));
    }
    let client_auth = cert
        .extended_key_usage()
        .map_err(|e| not_node(format!("bad extended key usage: {e}")))?
        .is_some_and(|eku| eku.value.client_auth);
    if !client_auth {
        return Err(not_node("no clientAuth extended key usage".into()));
    }
    let sans = cert
        .subject_alternative_name()
        .map_err(|e| not_node(format!("bad subject alternative names: {e}")))?;
    let mut nodes = sans
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|name| match name {
            GeneralName::URI(uri) => uri.strip_prefix(NODE_URI_PREFIX),
            _ => None,
        });
    let node = match (nodes.next(), nodes.next()) {
        (Some(node), None) => node,
        (None, _) => return Err(not_node(format!("no {NODE_URI_PREFIX}<node> URI"))),
        (Some(_), Some(_)) => return Err(not_node(format!("more than one {NODE_URI_PREFIX} URI"))),
    };
    validate_node_name(node).map_err(|e| not_node(e.to_string()))?;
    let expected_cn = format!("{NODE_COMMON_NAME_PREFIX}{node}");
    let mut cns = cert.subject().iter_common_name().map(|cn| cn.as_str());
    match (cns.next(), cns.next()) {
        (Some(Ok(cn)), None) if cn == expected_cn => Ok(node.to_owned()),
        _ => Err(not_node(format!(
            "subject common name does not match {expected_cn}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn der_of(pem: &str) -> CertificateDer<'static> {
        parse_certs(pem, "test").unwrap().swap_remove(0)
    }

    #[test]
    fn node_certificate_names_its_node() {
        let ca = ClusterCa::generate("test-ca").unwrap();
        let cert = ca.issue_node_cert("worker-1.example").unwrap();
        assert_eq!(
            node_identity(&der_of(&cert.cert_pem)).unwrap(),
            "worker-1.example"
        );
    }

    #[test]
    fn controller_certificate_is_not_a_node_identity() {
        let ca = ClusterCa::generate("test-ca").unwrap();
        let cert = ca
            .issue_controller_cert(&["localhost"], &["127.0.0.1".parse().unwrap()])
            .unwrap();
        let err = node_identity(&der_of(&cert.cert_pem)).unwrap_err();
        assert!(err.to_string().contains("clientAuth"), "{err}");
        // Neither is the CA itself.
        assert!(node_identity(ca.cert_der()).is_err());
    }

    #[test]
    fn node_names_that_could_confuse_identities_are_refused() {
        for bad in ["", "a/b", "Node", "a:b", "-a", "a..b", &"x".repeat(254)] {
            assert!(validate_node_name(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["node-1", "ip-10-0-0-1.ec2.internal", "a"] {
            validate_node_name(good).unwrap();
        }
        let ca = ClusterCa::generate("test-ca").unwrap();
        assert!(matches!(
            ca.issue_node_cert("evil/../node"),
            Err(PkiError::InvalidNodeName { .. })
        ));
    }

    #[test]
    fn ca_survives_save_and_load() {
        let dir = tempfile::tempdir().unwrap();
        let (crt, key) = (dir.path().join("ca.crt"), dir.path().join("ca.key"));
        let ca = ClusterCa::generate("test-ca").unwrap();
        ca.save(&crt, &key).unwrap();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&fs::metadata(&key).unwrap().permissions());
        assert_eq!(mode & 0o077, 0, "CA key must not be group/world readable");
        let loaded = ClusterCa::load(&crt, &key).unwrap();
        assert_eq!(loaded.cert_pem(), ca.cert_pem());
        // The loaded CA issues certificates that chain to the original.
        let cert = loaded.issue_node_cert("n1").unwrap();
        let der = der_of(&cert.cert_pem);
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        let (_, ca_parsed) = X509Certificate::from_der(ca.cert_der()).unwrap();
        parsed
            .verify_signature(Some(ca_parsed.public_key()))
            .expect("signed by the CA key");
        assert_eq!(parsed.issuer(), ca_parsed.subject());
    }

    #[test]
    fn loading_names_the_missing_file() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.crt");
        let err = ClusterCa::load(&missing, &dir.path().join("ca.key")).unwrap_err();
        assert!(err.to_string().contains("nope.crt"), "{err}");
    }

    #[test]
    fn ca_with_someone_elses_key_is_refused() {
        let a = ClusterCa::generate("a").unwrap();
        let b = ClusterCa::generate("b").unwrap();
        assert!(matches!(
            ClusterCa::from_pem(a.cert_pem(), &b.key_pem()),
            Err(PkiError::KeyMismatch)
        ));
    }

    #[test]
    fn leaf_certificate_is_not_accepted_as_ca() {
        let ca = ClusterCa::generate("a").unwrap();
        let leaf = ca.issue_node_cert("n1").unwrap();
        assert!(matches!(
            ClusterCa::from_pem(&leaf.cert_pem, &leaf.key_pem),
            Err(PkiError::NotACa { .. })
        ));
    }

    #[test]
    fn csr_gets_the_servers_subject_not_its_own() {
        let ca = ClusterCa::generate("a").unwrap();
        let key = generate_key().unwrap();
        let csr = node_csr_pem("n1", &key).unwrap();
        let cert = ca.sign_node_csr("n1", &csr).unwrap();
        let der = der_of(&cert);
        assert_eq!(node_identity(&der).unwrap(), "n1");
        let (_, parsed) = X509Certificate::from_der(&der).unwrap();
        assert_eq!(
            parsed.public_key().subject_public_key.data.as_ref(),
            key.public_key_raw()
        );
    }

    #[test]
    fn csr_claiming_another_subject_is_refused() {
        let ca = ClusterCa::generate("a").unwrap();
        let key = generate_key().unwrap();
        // A request for n2's identity presented for n1.
        let csr = node_csr_pem("n2", &key).unwrap();
        assert!(matches!(
            ca.sign_node_csr("n1", &csr),
            Err(PkiError::BadCsr { .. })
        ));
        // A request with an empty subject is fine: the CA sets the subject.
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        let csr = params.serialize_request(&key).unwrap().pem().unwrap();
        let cert = ca.sign_node_csr("n1", &csr).unwrap();
        assert_eq!(node_identity(&der_of(&cert)).unwrap(), "n1");
    }

    #[test]
    fn csr_with_ed25519_key_is_accepted() {
        let ca = ClusterCa::generate("a").unwrap();
        let key = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let csr = node_csr_pem("n1", &key).unwrap();
        let cert = ca.sign_node_csr("n1", &csr).unwrap();
        assert_eq!(node_identity(&der_of(&cert)).unwrap(), "n1");
    }

    #[test]
    fn csr_with_rsa_key_is_refused() {
        let ca = ClusterCa::generate("a").unwrap();
        let csr = include_str!("../tests/fixtures/rsa2048-n1.csr");
        let err = ca.sign_node_csr("n1", csr).unwrap_err();
        assert!(matches!(err, PkiError::UnsupportedKey { .. }), "{err}");
    }

    #[test]
    fn csr_with_key_on_an_unsupported_curve_is_refused() {
        let ca = ClusterCa::generate("a").unwrap();
        let csr = include_str!("../tests/fixtures/secp256k1-n1.csr");
        assert!(ca.sign_node_csr("n1", csr).is_err());
    }

    #[test]
    fn garbage_csr_is_refused() {
        let ca = ClusterCa::generate("a").unwrap();
        let garbage =
            "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n";
        assert!(matches!(
            ca.sign_node_csr("n1", garbage),
            Err(PkiError::BadCsr { .. })
        ));
        assert!(matches!(
            ca.sign_node_csr("n1", "not pem at all"),
            Err(PkiError::BadCsr { .. })
        ));
    }
}
