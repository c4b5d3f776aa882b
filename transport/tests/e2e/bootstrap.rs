//! Certificate bootstrap with a token.

use std::{sync::Arc, time::Duration};

use tonic::Code;
use weir_api::NodeState;
use weir_transport::{
    Backoff, Bootstrap, ClientTls, ReviewedIdentity, StatePublisher, StaticTokenReviewer, TlsFiles,
    WatchLoop, bootstrap_node_certificate, connect, pki,
};

use crate::common::{Pki, RecordingSink, SERVER_NAME, TestServer, wait_for_version};

fn identity(node: &str) -> ReviewedIdentity {
    ReviewedIdentity {
        node_name: node.into(),
        service_account: "kube-system/weir-agent".into(),
        pod_name: Some(format!("weir-agent-{node}")),
    }
}

async fn serving_with_bootstrap() -> (Pki, StatePublisher, TestServer) {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let reviewer = StaticTokenReviewer::new([("token-of-a".to_owned(), identity("node-a"))]);
    let bootstrap = Bootstrap::new(pki.ca.clone(), Arc::new(reviewer));
    let server = TestServer::start(&publisher, &pki.server, Some(bootstrap)).await;
    (pki, publisher, server)
}

#[tokio::test]
async fn valid_token_yields_a_certificate_that_works_for_watch() {
    let (pki, publisher, server) = serving_with_bootstrap().await;
    let dir = tempfile::tempdir().unwrap();
    let files = TlsFiles::in_dir(dir.path());
    std::fs::write(&files.ca_cert, pki.ca.cert_pem()).unwrap();

    let tls = ClientTls::load_ca(&files.ca_cert, SERVER_NAME).unwrap();
    assert!(!tls.has_identity());
    let issued = bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
        .await
        .unwrap();
    issued.write(&files.cert, &files.key).unwrap();
    let der = rustls_pki_types::pem::PemObject::from_pem_slice(issued.cert_pem.as_bytes());
    let der: rustls_pki_types::CertificateDer<'_> = der.unwrap();
    assert_eq!(pki::node_identity(&der).unwrap(), "node-a");

    // The agent follows the controller with the files it just wrote.
    publisher
        .publish("node-a", 1, Arc::new(NodeState::default()))
        .unwrap();
    let (mut sink, mut view) = RecordingSink::new();
    let agent = WatchLoop::from_files(server.endpoint(), files, SERVER_NAME, "node-a")
        .with_backoff(Backoff {
            initial: Duration::from_millis(20),
            max: Duration::from_millis(200),
        });
    let task = tokio::spawn(async move {
        agent.run(&mut sink).await;
    });
    wait_for_version(&mut view, 1).await;
    task.abort();
}

#[tokio::test]
async fn token_of_one_node_cannot_obtain_another_nodes_certificate() {
    let (pki, _publisher, server) = serving_with_bootstrap().await;
    let err =
        bootstrap_node_certificate(&server.endpoint(), &pki.anonymous(), "node-b", "token-of-a")
            .await
            .unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
}

#[tokio::test]
async fn unknown_token_is_unauthenticated() {
    let (pki, _publisher, server) = serving_with_bootstrap().await;
    let err = bootstrap_node_certificate(&server.endpoint(), &pki.anonymous(), "node-a", "guess")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
}

#[tokio::test]
async fn malformed_or_foreign_requests_are_invalid_arguments() {
    let (pki, _publisher, server) = serving_with_bootstrap().await;
    let client = connect(&server.endpoint(), &pki.anonymous()).await.unwrap();
    let err = client
        .request_certificate("node-a", "not a CSR", "token-of-a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    // A well-formed request that asks for another identity in its subject.
    let key = pki::generate_key().unwrap();
    let csr = pki::node_csr_pem("node-b", &key).unwrap();
    let err = client
        .request_certificate("node-a", &csr, "token-of-a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");

    let err = client
        .request_certificate("Node/A", &csr, "token-of-a")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
}

#[tokio::test]
async fn bootstrap_is_unimplemented_unless_enabled() {
    let pki = Pki::new();
    let server = TestServer::start(&StatePublisher::new(), &pki.server, None).await;
    let err = bootstrap_node_certificate(&server.endpoint(), &pki.anonymous(), "node-a", "token")
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(Code::Unimplemented), "{err}");
}

/// A reviewer that counts the reviews it was asked for (each is a TokenReview in a cluster).
struct CountingReviewer {
    inner: StaticTokenReviewer,
    reviews: Arc<std::sync::atomic::AtomicU32>,
}

#[async_trait::async_trait]
impl weir_transport::TokenReviewer for CountingReviewer {
    async fn review(&self, token: &str) -> Result<ReviewedIdentity, weir_transport::ReviewError> {
        self.reviews
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        self.inner.review(token).await
    }
}

#[tokio::test]
async fn a_burst_beyond_the_limit_is_refused_before_any_review_and_later_requests_succeed() {
    use std::sync::atomic::Ordering;
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let reviews = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let reviewer = CountingReviewer {
        inner: StaticTokenReviewer::new([("token-of-a".to_owned(), identity("node-a"))]),
        reviews: reviews.clone(),
    };
    let bootstrap = Bootstrap::new(pki.ca.clone(), Arc::new(reviewer)).with_limits(
        weir_transport::BootstrapLimits {
            per_source_burst: 2,
            per_source_rate: 4.0,
            global_burst: 100,
            global_rate: 100.0,
        },
    );
    let server = TestServer::start(&publisher, &pki.server, Some(bootstrap.clone())).await;
    let tls = ClientTls::new(pki.ca.cert_pem(), SERVER_NAME).unwrap();

    // Two within the burst (one with a bad token: it is reviewed and rejected), then refused.
    bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
        .await
        .unwrap();
    let bad = bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "wrong")
        .await
        .unwrap_err();
    assert_eq!(bad.code(), Some(Code::Unauthenticated), "{bad}");
    assert_eq!(reviews.load(Ordering::SeqCst), 2);
    for _ in 0..5 {
        let refused = bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
            .await
            .unwrap_err();
        assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    }
    assert_eq!(
        reviews.load(Ordering::SeqCst),
        2,
        "refused requests cost no review"
    );
    assert_eq!(bootstrap.refused_requests(), 5);

    // The bucket refills (4 per second): a later request succeeds.
    tokio::time::sleep(Duration::from_millis(400)).await;
    bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
        .await
        .unwrap();
    assert_eq!(reviews.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn the_global_limit_applies_across_sources() {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    let reviewer = StaticTokenReviewer::new([("token-of-a".to_owned(), identity("node-a"))]);
    let bootstrap = Bootstrap::new(pki.ca.clone(), Arc::new(reviewer)).with_limits(
        weir_transport::BootstrapLimits {
            per_source_burst: 100,
            per_source_rate: 100.0,
            global_burst: 1,
            global_rate: 0.001,
        },
    );
    let server = TestServer::start(&publisher, &pki.server, Some(bootstrap.clone())).await;
    let tls = ClientTls::new(pki.ca.cert_pem(), SERVER_NAME).unwrap();
    bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
        .await
        .unwrap();
    let refused = bootstrap_node_certificate(&server.endpoint(), &tls, "node-a", "token-of-a")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Some(Code::ResourceExhausted), "{refused}");
    assert_eq!(bootstrap.refused_requests(), 1);
}
