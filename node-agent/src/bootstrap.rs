//! The agent's node certificate: obtained from the controller with a bootstrap token when
//! missing, and renewed before it expires.
//!
//! In the DaemonSet the agent gets a projected ServiceAccount token for the controller's
//! audience (`WEIR_BOOTSTRAP_TOKEN_FILE`), bound to its pod and so to its node, and the
//! controller's CA certificate from the ConfigMap `weir-ca` (`WEIR_CA_FILE`). The controller
//! asks the TokenReview API whose token it is and signs a certificate for that node only
//! (see `weir_transport::bootstrap`). The result is kept in `--tls-dir` (`ca.crt`,
//! `tls.crt`, `tls.key`, the names [`weir_transport::TlsFiles::in_dir`] reads) on the node's
//! disk, so a restarted agent reconnects without asking again.
//!
//! # When to ask
//!
//! [`assess`] decides, from the files alone: a certificate is requested when one of the
//! three files is missing or unreadable, the certificate names another node (a disk moved to
//! another machine), the key is not the certificate's (a write interrupted between two
//! renames), the CA the agent is told to trust differs from the one the certificate was
//! obtained under (the cluster CA was replaced), or two thirds of the certificate's lifetime
//! have passed. Renewing at two thirds (as the kubelet rotates its client certificate at 70 to
//! 90 %) leaves a third of the lifetime to reach the controller.
//!
//! # How
//!
//! Token and CA are read again before every attempt: the kubelet replaces the token well
//! before it expires, and the CA ConfigMap may appear only after the agent started (it is
//! mounted `optional`). Attempts are retried with backoff while the controller cannot be
//! reached or refuses (its token review may be unavailable). The files are replaced one by one,
//! each atomically (written under a temporary name, then renamed): `ca.crt`, `tls.key`, then
//! `tls.crt`. A reader between two renames sees a key that does not match its certificate,
//! which fails that one connection attempt; the watch loop reads the files again at its next
//! attempt, and [`assess`] repairs an agent that stopped between two renames.
//!
//! A connection that is up keeps its certificate: TLS checks it at the handshake only, so the
//! renewed files are used from the next reconnect on.

use std::{
    fs, io,
    os::unix::fs::DirBuilderExt,
    path::{Path, PathBuf},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use tracing::{info, warn};
use weir_transport::{
    Backoff, ClientTls, Endpoints, IssuedCert, TransportError, bootstrap_node_certificate, pki,
    tls::{CA_CERT_FILE, CERT_FILE, KEY_FILE},
};
use x509_parser::{pem::parse_x509_pem, prelude::FromDer};

use crate::install_cni::{InstallError, replace_file};

/// The longest the agent sleeps between two looks at its certificate: a deleted file or a new
/// CA is noticed within this time, whatever the certificate's lifetime.
pub const RECHECK_INTERVAL: Duration = Duration::from_secs(10 * 60);

#[derive(Debug, thiserror::Error)]
pub enum BootstrapError {
    #[error("reading the bootstrap token {}: {source}", path.display())]
    Token { path: PathBuf, source: io::Error },
    #[error("bootstrap token file {} is empty", path.display())]
    EmptyToken { path: PathBuf },
    #[error(
        "reading the controller's CA certificate {} (published by the controller; the \
         kubelet fills it in once it exists): {source}",
        path.display()
    )]
    Ca { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("creating {}: {source}", path.display())]
    TlsDir { path: PathBuf, source: io::Error },
    #[error(transparent)]
    Write(#[from] InstallError),
    #[error("the controller issued a certificate that is unusable at once: {0}")]
    Unusable(RenewReason),
}

/// Why the agent asks for a (new) certificate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RenewReason {
    #[error("no {0}")]
    Missing(&'static str),
    #[error("{file} is unusable: {reason}")]
    Unreadable { file: &'static str, reason: String },
    #[error("the certificate is for node {found}, not {node}")]
    OtherNode { found: String, node: String },
    #[error("the key is not the certificate's")]
    KeyMismatch,
    #[error("the CA to trust changed")]
    CaChanged,
    #[error("the certificate expired")]
    Expired,
    #[error("two thirds of the certificate's lifetime have passed")]
    Due,
}

/// What [`assess`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Assessment {
    /// Usable; look again at `renew_at` at the latest.
    Current {
        renew_at: SystemTime,
    },
    Renew(RenewReason),
}

/// The files of a credentials directory, as read (None: absent).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct StoredCredentials {
    pub ca_pem: Option<String>,
    pub cert_pem: Option<String>,
    pub key_pem: Option<String>,
}

impl StoredCredentials {
    /// Reads `ca.crt`, `tls.crt` and `tls.key` from `dir`; a file that cannot be read counts
    /// as absent.
    pub fn read(dir: &Path) -> Self {
        let read = |name| fs::read_to_string(dir.join(name)).ok();
        Self {
            ca_pem: read(CA_CERT_FILE),
            cert_pem: read(CERT_FILE),
            key_pem: read(KEY_FILE),
        }
    }
}

/// Whether `stored` can be used by the agent of `node` at `now`, given the CA it is told to
/// trust (`trusted_ca`, None while unknown). Pure: the files and the clock are inputs.
pub fn assess(
    stored: &StoredCredentials,
    trusted_ca: Option<&str>,
    node: &str,
    now: SystemTime,
) -> Assessment {
    match check(stored, trusted_ca, node, now) {
        Ok(renew_at) => Assessment::Current { renew_at },
        Err(reason) => Assessment::Renew(reason),
    }
}

fn check(
    stored: &StoredCredentials,
    trusted_ca: Option<&str>,
    node: &str,
    now: SystemTime,
) -> Result<SystemTime, RenewReason> {
    let ca = stored
        .ca_pem
        .as_deref()
        .ok_or(RenewReason::Missing(CA_CERT_FILE))?;
    let cert_pem = stored
        .cert_pem
        .as_deref()
        .ok_or(RenewReason::Missing(CERT_FILE))?;
    let key_pem = stored
        .key_pem
        .as_deref()
        .ok_or(RenewReason::Missing(KEY_FILE))?;
    if trusted_ca.is_some_and(|t| t.trim() != ca.trim()) {
        return Err(RenewReason::CaChanged);
    }
    let unreadable = |file, reason: String| RenewReason::Unreadable { file, reason };
    let (_, pem) =
        parse_x509_pem(cert_pem.as_bytes()).map_err(|e| unreadable(CERT_FILE, e.to_string()))?;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(&pem.contents)
        .map_err(|e| unreadable(CERT_FILE, e.to_string()))?;
    let found =
        pki::node_identity(&pem.contents).map_err(|e| unreadable(CERT_FILE, e.to_string()))?;
    if found != node {
        return Err(RenewReason::OtherNode {
            found,
            node: node.to_owned(),
        });
    }
    let key = rcgen::KeyPair::from_pem(key_pem).map_err(|e| unreadable(KEY_FILE, e.to_string()))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(RenewReason::KeyMismatch);
    }
    let time = |t: x509_parser::time::ASN1Time| {
        UNIX_EPOCH + Duration::from_secs(u64::try_from(t.timestamp()).unwrap_or(0))
    };
    let not_before = time(cert.validity().not_before);
    let not_after = time(cert.validity().not_after);
    if now >= not_after {
        return Err(RenewReason::Expired);
    }
    let lifetime = not_after.duration_since(not_before).unwrap_or_default();
    let renew_at = not_before + lifetime * 2 / 3;
    if now >= renew_at {
        return Err(RenewReason::Due);
    }
    Ok(renew_at)
}

/// Writes the CA certificate, the node certificate and its key (mode 0600) into `dir`, each
/// file atomically; creates `dir` (mode 0700) if needed.
pub fn write_credentials(
    dir: &Path,
    ca_pem: &str,
    issued: &IssuedCert,
) -> Result<(), BootstrapError> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| BootstrapError::TlsDir {
            path: dir.to_owned(),
            source,
        })?;
    replace_file(dir, CA_CERT_FILE, ca_pem.as_bytes(), 0o644)?;
    replace_file(dir, KEY_FILE, issued.key_pem.as_bytes(), 0o600)?;
    replace_file(dir, CERT_FILE, issued.cert_pem.as_bytes(), 0o644)?;
    Ok(())
}

/// Where to get a certificate and where to keep it.
#[derive(Clone, Debug)]
pub struct BootstrapConfig {
    /// The controller.
    pub endpoints: Endpoints,
    /// The name the controller's certificate must carry.
    pub server_name: String,
    pub node: String,
    /// Where the credentials are kept (`--tls-dir`).
    pub tls_dir: PathBuf,
    /// The projected ServiceAccount token.
    pub token_file: PathBuf,
    /// The controller's CA certificate.
    pub ca_file: PathBuf,
    pub backoff: Backoff,
}

/// Keeps a usable node certificate in the credentials directory.
#[derive(Clone, Debug)]
pub struct CertificateKeeper {
    cfg: BootstrapConfig,
}

impl CertificateKeeper {
    pub fn new(cfg: BootstrapConfig) -> Self {
        Self { cfg }
    }

    /// What the credentials directory holds now.
    pub fn assess_now(&self) -> Assessment {
        let trusted = fs::read_to_string(&self.cfg.ca_file).ok();
        assess(
            &StoredCredentials::read(&self.cfg.tls_dir),
            trusted.as_deref(),
            &self.cfg.node,
            SystemTime::now(),
        )
    }

    /// Returns once the directory holds a usable certificate, requesting one (again and
    /// again, with backoff) if it does not. Returns when it is due for renewal.
    pub async fn ensure_current(&self) -> SystemTime {
        let mut failures = 0u32;
        loop {
            let reason = match self.assess_now() {
                Assessment::Current { renew_at } => return renew_at,
                Assessment::Renew(reason) => reason,
            };
            info!(node = %self.cfg.node, %reason, "requesting a node certificate from the controller");
            let error = match self.request().await {
                Ok(()) => match self.assess_now() {
                    Assessment::Current { renew_at } => {
                        info!(node = %self.cfg.node, dir = %self.cfg.tls_dir.display(), "node certificate written");
                        return renew_at;
                    }
                    // Not asked again at once: a clock far off would make that a busy loop.
                    Assessment::Renew(reason) => BootstrapError::Unusable(reason),
                },
                Err(e) => e,
            };
            let delay = self.cfg.backoff.delay(failures);
            warn!(node = %self.cfg.node, %error, retry_in = ?delay, "no node certificate yet");
            failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    /// Keeps the certificate current forever, starting with one due at `renew_at`.
    pub async fn keep_current(&self, mut renew_at: SystemTime) {
        loop {
            let wait = renew_at
                .duration_since(SystemTime::now())
                .unwrap_or_default()
                .min(RECHECK_INTERVAL);
            tokio::time::sleep(wait).await;
            renew_at = self.ensure_current().await;
        }
    }

    /// One request with the token and CA as they are now; writes the result.
    async fn request(&self) -> Result<(), BootstrapError> {
        let token =
            fs::read_to_string(&self.cfg.token_file).map_err(|source| BootstrapError::Token {
                path: self.cfg.token_file.clone(),
                source,
            })?;
        let token = token.trim();
        if token.is_empty() {
            return Err(BootstrapError::EmptyToken {
                path: self.cfg.token_file.clone(),
            });
        }
        let ca = fs::read_to_string(&self.cfg.ca_file).map_err(|source| BootstrapError::Ca {
            path: self.cfg.ca_file.clone(),
            source,
        })?;
        let tls = ClientTls::new(&ca, &self.cfg.server_name).map_err(TransportError::from)?;
        // Every endpoint in turn; the error is the last one's.
        let mut last = None;
        for endpoint in self.cfg.endpoints.current().await? {
            match bootstrap_node_certificate(&endpoint, &tls, &self.cfg.node, token).await {
                Ok(issued) => return write_credentials(&self.cfg.tls_dir, &ca, &issued),
                Err(e) => last = Some(e),
            }
        }
        Err(last.expect("current() is never empty").into())
    }
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::PermissionsExt, sync::Arc};

    use weir_transport::{
        Bootstrap, ClusterCa, NodeStateServer, ReviewedIdentity, ServerTls, StatePublisher,
        StaticTokenReviewer, TlsFiles, connect,
    };

    use super::*;

    fn stored(ca: &ClusterCa, cert: &IssuedCert) -> StoredCredentials {
        StoredCredentials {
            ca_pem: Some(ca.cert_pem().to_owned()),
            cert_pem: Some(cert.cert_pem.clone()),
            key_pem: Some(cert.key_pem.clone()),
        }
    }

    fn now() -> SystemTime {
        SystemTime::now()
    }

    const DAY: Duration = Duration::from_secs(24 * 3600);

    #[test]
    fn a_fresh_certificate_is_renewed_at_two_thirds_of_its_lifetime() {
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_node_cert("n1").unwrap();
        let Assessment::Current { renew_at } = assess(&stored(&ca, &cert), None, "n1", now())
        else {
            panic!("a fresh certificate is current");
        };
        // A year, issued just now (backdated by a few minutes): due in about eight months.
        let due_in = renew_at.duration_since(now()).unwrap();
        let expected = pki::LEAF_VALIDITY * 2 / 3;
        assert!(
            due_in <= expected && due_in > expected - DAY,
            "{due_in:?} vs {expected:?}"
        );
        assert_eq!(
            assess(&stored(&ca, &cert), None, "n1", renew_at),
            Assessment::Renew(RenewReason::Due)
        );
        assert_eq!(
            assess(&stored(&ca, &cert), None, "n1", now() + pki::LEAF_VALIDITY),
            Assessment::Renew(RenewReason::Expired)
        );
    }

    #[test]
    fn missing_foreign_or_mismatched_credentials_are_replaced() {
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_node_cert("n1").unwrap();
        let other = ca.issue_node_cert("n1").unwrap();
        let mut s = stored(&ca, &cert);
        s.key_pem = None;
        assert_eq!(
            assess(&s, None, "n1", now()),
            Assessment::Renew(RenewReason::Missing("tls.key"))
        );
        assert_eq!(
            assess(&StoredCredentials::default(), None, "n1", now()),
            Assessment::Renew(RenewReason::Missing("ca.crt"))
        );
        assert_eq!(
            assess(&stored(&ca, &cert), None, "n2", now()),
            Assessment::Renew(RenewReason::OtherNode {
                found: "n1".into(),
                node: "n2".into()
            })
        );
        let mut s = stored(&ca, &cert);
        s.key_pem = Some(other.key_pem.clone());
        assert_eq!(
            assess(&s, None, "n1", now()),
            Assessment::Renew(RenewReason::KeyMismatch)
        );
        let mut s = stored(&ca, &cert);
        s.cert_pem = Some("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n".into());
        assert!(matches!(
            assess(&s, None, "n1", now()),
            Assessment::Renew(RenewReason::Unreadable {
                file: "tls.crt",
                ..
            })
        ));
        // The controller's own certificate is no node identity.
        let mut s = stored(&ca, &cert);
        s.cert_pem = Some(
            ca.issue_controller_cert(&["weir-controller"], &[])
                .unwrap()
                .cert_pem,
        );
        assert!(matches!(
            assess(&s, None, "n1", now()),
            Assessment::Renew(RenewReason::Unreadable { .. })
        ));
    }

    #[test]
    fn a_new_ca_to_trust_means_a_new_certificate() {
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_node_cert("n1").unwrap();
        let s = stored(&ca, &cert);
        let same = format!("{}\n", ca.cert_pem());
        assert!(matches!(
            assess(&s, Some(&same), "n1", now()),
            Assessment::Current { .. }
        ));
        let other = ClusterCa::generate("ca").unwrap();
        assert_eq!(
            assess(&s, Some(other.cert_pem()), "n1", now()),
            Assessment::Renew(RenewReason::CaChanged)
        );
    }

    #[test]
    fn credentials_are_written_where_tls_files_are_read_with_a_private_key() {
        let dir = tempfile::tempdir().unwrap();
        let tls_dir = dir.path().join("var/lib/weir/tls");
        let ca = ClusterCa::generate("ca").unwrap();
        let cert = ca.issue_node_cert("n1").unwrap();
        write_credentials(&tls_dir, ca.cert_pem(), &cert).unwrap();
        let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&tls_dir), 0o700);
        let files = TlsFiles::in_dir(&tls_dir);
        assert_eq!(mode(&files.key), 0o600);
        assert_eq!(fs::read_to_string(&files.cert).unwrap(), cert.cert_pem);
        ClientTls::load(&files, "weir-controller").unwrap();
        assert!(matches!(
            assess(&StoredCredentials::read(&tls_dir), None, "n1", now()),
            Assessment::Current { .. }
        ));
        let leftovers: Vec<_> = fs::read_dir(&tls_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .filter(|n| n.to_string_lossy().starts_with('.'))
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    /// A controller on loopback that signs node certificates for one token.
    struct Controller {
        endpoint: String,
        ca: Arc<ClusterCa>,
        publisher: StatePublisher,
    }

    impl Controller {
        async fn start(token: &str, node: &str) -> Self {
            let ca = Arc::new(ClusterCa::generate("cluster CA").unwrap());
            let cert = ca
                .issue_controller_cert(&["weir-controller"], &["127.0.0.1".parse().unwrap()])
                .unwrap();
            let tls = ServerTls::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem).unwrap();
            let reviewer = StaticTokenReviewer::new([(
                token.to_owned(),
                ReviewedIdentity {
                    node_name: node.to_owned(),
                    service_account: "weir-system/weir-agent".into(),
                    pod_name: Some("weir-agent-x".into()),
                },
            )]);
            let publisher = StatePublisher::new();
            let server = NodeStateServer::new(publisher.clone())
                .with_bootstrap(Bootstrap::new(ca.clone(), Arc::new(reviewer)));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let endpoint = format!("https://{}", listener.local_addr().unwrap());
            tokio::spawn(server.serve(listener, tls, std::future::pending()));
            Self {
                endpoint,
                ca,
                publisher,
            }
        }
    }

    fn config(dir: &Path, endpoint: &str) -> BootstrapConfig {
        BootstrapConfig {
            endpoints: Endpoints::fixed(endpoint),
            server_name: "weir-controller".into(),
            node: "n1".into(),
            tls_dir: dir.join("tls"),
            token_file: dir.join("bootstrap/token"),
            ca_file: dir.join("bootstrap/ca.crt"),
            backoff: Backoff {
                initial: Duration::from_millis(20),
                max: Duration::from_millis(100),
            },
        }
    }

    #[tokio::test]
    async fn an_agent_without_certificate_obtains_one_once_token_and_ca_are_right() {
        let controller = Controller::start("good-token", "n1").await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &controller.endpoint);
        fs::create_dir_all(cfg.token_file.parent().unwrap()).unwrap();
        // The kubelet's first token is not one the controller accepts, and the CA ConfigMap
        // is not published yet.
        fs::write(&cfg.token_file, "stale-token\n").unwrap();
        let keeper = CertificateKeeper::new(cfg.clone());
        let ensure = tokio::spawn(async move { keeper.ensure_current().await });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ensure.is_finished(), "no CA yet: still trying");
        fs::write(&cfg.ca_file, controller.ca.cert_pem()).unwrap();
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!ensure.is_finished(), "token refused: still trying");
        assert!(!cfg.tls_dir.join("tls.crt").exists());
        // The kubelet rotates the token.
        fs::write(&cfg.token_file, "good-token\n").unwrap();
        let renew_at = tokio::time::timeout(Duration::from_secs(10), ensure)
            .await
            .expect("obtained within the backoff")
            .unwrap();
        assert!(renew_at > SystemTime::now() + 100 * DAY);

        // The files are what the watch loop reads, and the controller accepts them.
        controller
            .publisher
            .publish("n1", 1, Arc::new(weir_api::NodeState::default()))
            .unwrap();
        let tls = ClientTls::load(&TlsFiles::in_dir(&cfg.tls_dir), "weir-controller").unwrap();
        let client = connect(&controller.endpoint, &tls).await.unwrap();
        let mut updates = client.watch("n1", None).await.unwrap();
        let first = futures::StreamExt::next(&mut updates).await;
        assert!(
            matches!(first, Some(Ok(weir_transport::NodeUpdate::Snapshot { .. }))),
            "{first:?}"
        );

        // A second look changes nothing: the certificate is current.
        let before = fs::read_to_string(cfg.tls_dir.join("tls.crt")).unwrap();
        CertificateKeeper::new(cfg.clone()).ensure_current().await;
        assert_eq!(
            fs::read_to_string(cfg.tls_dir.join("tls.crt")).unwrap(),
            before
        );
    }

    #[tokio::test]
    async fn a_certificate_of_another_node_is_replaced() {
        let controller = Controller::start("token", "n1").await;
        let dir = tempfile::tempdir().unwrap();
        let cfg = config(dir.path(), &controller.endpoint);
        fs::create_dir_all(cfg.token_file.parent().unwrap()).unwrap();
        fs::write(&cfg.token_file, "token").unwrap();
        fs::write(&cfg.ca_file, controller.ca.cert_pem()).unwrap();
        let foreign = controller.ca.issue_node_cert("n9").unwrap();
        write_credentials(&cfg.tls_dir, controller.ca.cert_pem(), &foreign).unwrap();

        let keeper = CertificateKeeper::new(cfg.clone());
        tokio::time::timeout(Duration::from_secs(10), keeper.ensure_current())
            .await
            .unwrap();
        let der = pki_der(&fs::read_to_string(cfg.tls_dir.join("tls.crt")).unwrap());
        assert_eq!(pki::node_identity(&der).unwrap(), "n1");
    }

    fn pki_der(pem: &str) -> Vec<u8> {
        parse_x509_pem(pem.as_bytes()).unwrap().1.contents
    }
}
