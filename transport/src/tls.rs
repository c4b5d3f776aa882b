//! TLS settings for both ends, loaded from PEM strings or files.
//!
//! # Trust model
//!
//! One cluster CA ([`crate::pki::ClusterCa`]) is the only trust anchor on both sides.
//! * The controller presents its `serverAuth` certificate; agents check that it chains to the
//!   CA, carries `serverAuth` and names the address they dialled (`server_name`).
//! * Agents present a `clientAuth` node certificate. The server asks every client for a
//!   certificate and refuses the handshake if one is presented that does not chain to the CA
//!   (or lacks `clientAuth`); a client without certificate completes the handshake but can
//!   only call `RequestCertificate` — `Watch` and `ReportStatus` answer `UNAUTHENTICATED`.
//! * Which node a client may act for is decided per call from its certificate
//!   ([`crate::pki::node_identity`]), not at the TLS layer.
//!
//! Only TLS 1.3 is offered (both ends are ours), with the `ring` provider chosen explicitly
//! so the process-wide rustls provider, whichever other crates install, does not matter on
//! the server side.
//!
//! # Files
//!
//! [`TlsFiles::in_dir`] uses the key names of a Kubernetes `kubernetes.io/tls` Secret plus
//! the CA: `ca.crt`, `tls.crt`, `tls.key`, so a Secret mounted as a volume is read as is.

use std::{
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use futures::{Stream, StreamExt};
use rustls::{RootCertStore, ServerConfig, server::WebPkiClientVerifier};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, server::TlsStream};

use crate::pki::{self, PkiError};

/// File name of the cluster CA certificate in a credentials directory.
pub const CA_CERT_FILE: &str = "ca.crt";
/// File name of the own certificate (chain) in a credentials directory.
pub const CERT_FILE: &str = "tls.crt";
/// File name of the own private key in a credentials directory.
pub const KEY_FILE: &str = "tls.key";

/// How long a client may take to complete the TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Handshakes in progress at once; further connections wait in the listen backlog.
const MAX_CONCURRENT_HANDSHAKES: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("{what}: not a usable PEM private key: {reason}")]
    BadKey { what: String, reason: String },
    #[error("{what}: {source}")]
    Rustls { what: String, source: rustls::Error },
    #[error("{what}: no certificate could be used as a trust anchor: {source}")]
    TrustAnchor { what: String, source: rustls::Error },
    #[error("building the client certificate verifier: {0}")]
    Verifier(#[from] rustls::server::VerifierBuilderError),
    #[error("invalid server name {name:?}: {reason}")]
    ServerName { name: String, reason: String },
    #[error(
        "{cert_what} is not valid under the CA in {ca_what} (agents trusting that CA would refuse it): {source}"
    )]
    NotUnderCa {
        cert_what: String,
        ca_what: String,
        source: rustls::Error,
    },
}

/// Where a component's credentials are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    /// The cluster CA certificate.
    pub ca_cert: PathBuf,
    /// The component's own certificate, PEM (leaf first).
    pub cert: PathBuf,
    /// The component's private key, PEM.
    pub key: PathBuf,
}

impl TlsFiles {
    /// `dir/ca.crt`, `dir/tls.crt`, `dir/tls.key`.
    pub fn in_dir(dir: impl AsRef<Path>) -> Self {
        let dir = dir.as_ref();
        Self {
            ca_cert: dir.join(CA_CERT_FILE),
            cert: dir.join(CERT_FILE),
            key: dir.join(KEY_FILE),
        }
    }
}

fn parse_private_key(pem: &str, what: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|e| TlsError::BadKey {
        what: what.to_owned(),
        reason: e.to_string(),
    })
}

fn roots(ca: Vec<CertificateDer<'static>>, what: &str) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in ca {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            what: what.to_owned(),
            source,
        })?;
    }
    Ok(roots)
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Checks that a serving certificate chain is what an agent trusting `roots` accepts (issuer,
/// signature, validity period, server use), whatever name it is dialled by: a certificate
/// from another CA would otherwise only show as handshake failures on every agent.
fn check_server_chain(
    roots: &Arc<RootCertStore>,
    chain: &[CertificateDer<'static>],
) -> Result<(), rustls::Error> {
    use rustls::{
        CertificateError,
        client::{WebPkiServerVerifier, danger::ServerCertVerifier},
    };
    let Some((leaf, intermediates)) = chain.split_first() else {
        return Ok(());
    };
    let verifier = WebPkiServerVerifier::builder_with_provider(roots.clone(), provider())
        .build()
        .map_err(|e| rustls::Error::General(e.to_string()))?;
    // Any name: a mismatch is reported as such and ignored here.
    let name = ServerName::try_from("weir-controller.invalid").expect("a valid DNS name");
    match verifier.verify_server_cert(
        leaf,
        intermediates,
        &name,
        &[],
        rustls_pki_types::UnixTime::now(),
    ) {
        Ok(_) => Ok(()),
        Err(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
        )) => Ok(()),
        Err(e) => Err(e),
    }
}

/// The controller's side: its certificate and key, and the CA that signs agent certificates.
#[derive(Clone)]
pub struct ServerTls {
    config: Arc<ServerConfig>,
}

impl std::fmt::Debug for ServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerTls").finish_non_exhaustive()
    }
}

impl ServerTls {
    pub fn from_pem(ca_pem: &str, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        Self::parse(
            (ca_pem, "CA certificate"),
            (cert_pem, "server certificate"),
            (key_pem, "server key"),
        )
    }

    /// Reads the PEM files; errors name the file at fault.
    pub fn load(files: &TlsFiles) -> Result<Self, TlsError> {
        let (ca, cert, key) = (
            pki::read_file(&files.ca_cert)?,
            pki::read_file(&files.cert)?,
            pki::read_file(&files.key)?,
        );
        Self::parse(
            (&ca, &files.ca_cert.display().to_string()),
            (&cert, &files.cert.display().to_string()),
            (&key, &files.key.display().to_string()),
        )
    }

    fn parse(
        (ca_pem, ca_what): (&str, &str),
        (cert_pem, cert_what): (&str, &str),
        (key_pem, key_what): (&str, &str),
    ) -> Result<Self, TlsError> {
        let roots = Arc::new(roots(pki::parse_certs(ca_pem, ca_what)?, ca_what)?);
        let chain = pki::parse_certs(cert_pem, cert_what)?;
        let key = parse_private_key(key_pem, key_what)?;
        check_server_chain(&roots, &chain).map_err(|source| TlsError::NotUnderCa {
            cert_what: cert_what.to_owned(),
            ca_what: ca_what.to_owned(),
            source,
        })?;
        // Clients without a certificate get through the handshake so they can bootstrap;
        // every other call checks for a node certificate itself.
        let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider())
            .allow_unauthenticated()
            .build()?;
        let mut config = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|source| TlsError::Rustls {
                what: "TLS protocol versions".into(),
                source,
            })?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain, key)
            .map_err(|source| TlsError::Rustls {
                what: format!("{cert_what} with {key_what}"),
                source,
            })?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Self {
            config: Arc::new(config),
        })
    }

    /// TLS connections accepted on `listener`. Handshakes run concurrently and time out after
    /// [`HANDSHAKE_TIMEOUT`]; failed ones are logged and skipped.
    pub(crate) fn incoming(
        &self,
        listener: TcpListener,
    ) -> impl Stream<Item = Result<TlsStream<TcpStream>, io::Error>> + Send + 'static {
        let acceptor = TlsAcceptor::from(self.config.clone());
        futures::stream::unfold(listener, |listener| async move {
            loop {
                match listener.accept().await {
                    Ok((tcp, peer)) => return Some(((tcp, peer), listener)),
                    Err(e) => {
                        // Typically out of file descriptors: back off instead of spinning.
                        tracing::warn!(error = %e, "accepting a connection failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
        })
        .map(move |(tcp, peer)| {
            let acceptor = acceptor.clone();
            async move {
                let _ = tcp.set_nodelay(true);
                match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => Some(tls),
                    Ok(Err(e)) => {
                        tracing::info!(%peer, error = %e, "TLS handshake failed");
                        None
                    }
                    Err(_) => {
                        tracing::info!(%peer, "TLS handshake timed out");
                        None
                    }
                }
            }
        })
        .buffer_unordered(MAX_CONCURRENT_HANDSHAKES)
        .filter_map(|tls| async move { tls.map(Ok) })
    }
}

/// The agent's side: the CA to check the controller against, the name the controller's
/// certificate must carry, and (except while bootstrapping) the node certificate and key.
#[derive(Clone)]
pub struct ClientTls {
    ca_pem: String,
    identity: Option<(String, String)>,
    server_name: String,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .field("has_identity", &self.identity.is_some())
            .finish_non_exhaustive()
    }
}

impl ClientTls {
    /// Trusts `ca_pem` and expects the controller's certificate to name `server_name` (a DNS
    /// name or an IP address). Without an identity only `RequestCertificate` succeeds.
    pub fn new(ca_pem: &str, server_name: &str) -> Result<Self, TlsError> {
        Self::with_ca(ca_pem, "CA certificate", server_name)
    }

    fn with_ca(ca_pem: &str, ca_what: &str, server_name: &str) -> Result<Self, TlsError> {
        roots(pki::parse_certs(ca_pem, ca_what)?, ca_what)?;
        ServerName::try_from(server_name.to_owned()).map_err(|e| TlsError::ServerName {
            name: server_name.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(Self {
            ca_pem: ca_pem.to_owned(),
            identity: None,
            server_name: server_name.to_owned(),
        })
    }

    /// Adds the client certificate and key.
    pub fn with_identity(self, cert_pem: &str, key_pem: &str) -> Result<Self, TlsError> {
        self.with_identity_from((cert_pem, "client certificate"), (key_pem, "client key"))
    }

    fn with_identity_from(
        mut self,
        (cert_pem, cert_what): (&str, &str),
        (key_pem, key_what): (&str, &str),
    ) -> Result<Self, TlsError> {
        pki::parse_certs(cert_pem, cert_what)?;
        parse_private_key(key_pem, key_what)?;
        self.identity = Some((cert_pem.to_owned(), key_pem.to_owned()));
        Ok(self)
    }

    /// Reads the CA, certificate and key files; errors name the file at fault.
    pub fn load(files: &TlsFiles, server_name: &str) -> Result<Self, TlsError> {
        let cert = pki::read_file(&files.cert)?;
        let key = pki::read_file(&files.key)?;
        Self::load_ca(&files.ca_cert, server_name)?.with_identity_from(
            (&cert, &files.cert.display().to_string()),
            (&key, &files.key.display().to_string()),
        )
    }

    /// Reads only the CA file: the configuration for bootstrapping a node certificate.
    pub fn load_ca(ca_path: &Path, server_name: &str) -> Result<Self, TlsError> {
        let ca = pki::read_file(ca_path)?;
        Self::with_ca(&ca, &ca_path.display().to_string(), server_name)
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    pub fn has_identity(&self) -> bool {
        self.identity.is_some()
    }

    pub(crate) fn tonic_config(&self) -> tonic::transport::ClientTlsConfig {
        let config = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&self.ca_pem))
            .domain_name(self.server_name.clone())
            .timeout(HANDSHAKE_TIMEOUT);
        match &self.identity {
            Some((cert, key)) => config.identity(tonic::transport::Identity::from_pem(cert, key)),
            None => config,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::ClusterCa;

    #[test]
    fn missing_key_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_node_cert("n1").unwrap();
        let files = TlsFiles::in_dir(dir.path());
        std::fs::write(&files.ca_cert, ca.cert_pem()).unwrap();
        std::fs::write(&files.cert, &cert.cert_pem).unwrap();
        let err = ClientTls::load(&files, "localhost").unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
    }

    #[test]
    fn garbage_certificate_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_controller_cert(&["localhost"], &[]).unwrap();
        let files = TlsFiles::in_dir(dir.path());
        std::fs::write(&files.ca_cert, "this is not PEM").unwrap();
        cert.write(&files.cert, &files.key).unwrap();
        let err = ServerTls::load(&files).unwrap_err();
        assert!(err.to_string().contains("ca.crt"), "{err}");
        std::fs::write(&files.ca_cert, ca.cert_pem()).unwrap();
        std::fs::write(
            &files.key,
            "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
        )
        .unwrap();
        let err = ServerTls::load(&files).unwrap_err();
        assert!(err.to_string().contains("tls.key"), "{err}");
    }

    #[test]
    fn server_key_of_another_certificate_is_refused() {
        let ca = ClusterCa::generate("ca").unwrap();
        let a = ca.issue_controller_cert(&["a"], &[]).unwrap();
        let b = ca.issue_controller_cert(&["b"], &[]).unwrap();
        assert!(ServerTls::from_pem(ca.cert_pem(), &a.cert_pem, &b.key_pem).is_err());
        ServerTls::from_pem(ca.cert_pem(), &a.cert_pem, &a.key_pem).unwrap();
    }

    #[test]
    fn invalid_server_name_is_refused() {
        let ca = ClusterCa::generate("ca").unwrap();
        assert!(matches!(
            ClientTls::new(ca.cert_pem(), "not a name!"),
            Err(TlsError::ServerName { .. })
        ));
    }
}
