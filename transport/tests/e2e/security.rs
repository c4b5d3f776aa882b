//! Who may connect, and for which node.

use std::{sync::Arc, time::Duration};

use futures::StreamExt;
use tonic::Code;
use weir_api::NodeState;
use weir_transport::{
    AgentReport, ClientTls, ClusterCa, ServerTls, StatePublisher, StateVersion, TransportError,
    connect,
};

use crate::common::{Pki, SERVER_NAME, TestServer, soon};

/// Publishes a state for `node-a` and `node-b` and serves it.
async fn serving() -> (Pki, StatePublisher, TestServer) {
    let pki = Pki::new();
    let publisher = StatePublisher::new();
    for node in ["node-a", "node-b"] {
        publisher
            .publish(node, 1, Arc::new(NodeState::default()))
            .unwrap();
    }
    let server = TestServer::start(&publisher, &pki.server, None).await;
    (pki, publisher, server)
}

/// Tries to watch `node` and returns how it failed; panics if any update arrives.
async fn watch_refusal(endpoint: &str, tls: &ClientTls, node: &str) -> TransportError {
    let client = match soon("connecting", connect(endpoint, tls)).await {
        Ok(client) => client,
        Err(e) => return e,
    };
    let mut updates = match soon("the watch call", client.watch(node, None)).await {
        Ok(updates) => updates,
        Err(e) => return e,
    };
    match soon("the first update", updates.next()).await {
        Some(Err(e)) => e,
        Some(Ok(update)) => panic!("refused client received {update:?}"),
        None => panic!("stream ended without an error"),
    }
}

/// Checks that `e` is a refused TLS handshake for the given reason. A refusal surfaces as a
/// failed connect, or, since TLS 1.3 client authentication completes after the client's side
/// of the handshake, as a failed first call.
fn assert_tls_refusal(e: &TransportError, reason: &str) {
    let refused_at_tls = matches!(e, TransportError::Connect { .. })
        || matches!(e.code(), Some(Code::Unknown | Code::Unavailable));
    assert!(refused_at_tls, "not a TLS refusal: {e}");
    assert!(
        e.to_string().contains(reason),
        "expected {reason:?} in: {e}"
    );
}

#[tokio::test]
async fn client_without_certificate_is_unauthenticated() {
    let (pki, publisher, server) = serving().await;
    let err = watch_refusal(&server.endpoint(), &pki.anonymous(), "node-a").await;
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");

    let client = connect(&server.endpoint(), &pki.anonymous()).await.unwrap();
    let report = AgentReport {
        applied: None,
        ready: true,
        message: String::new(),
    };
    let err = client.report("node-a", &report).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::Unauthenticated), "{err}");
    assert!(publisher.applied().borrow().is_empty());
}

#[tokio::test]
async fn client_with_certificate_from_another_ca_is_refused() {
    let (pki, _publisher, server) = serving().await;
    let other_ca = ClusterCa::generate("impostor CA").unwrap();
    let forged = other_ca.issue_node_cert("node-a").unwrap();
    let tls = pki
        .anonymous()
        .with_identity(&forged.cert_pem, &forged.key_pem)
        .unwrap();
    let err = watch_refusal(&server.endpoint(), &tls, "node-a").await;
    // The server does not know the issuer and says so.
    assert_tls_refusal(&err, "UnknownCA");
}

#[tokio::test]
async fn node_certificate_cannot_watch_or_report_for_another_node() {
    let (pki, publisher, server) = serving().await;
    let tls = pki.agent("node-a");
    let err = watch_refusal(&server.endpoint(), &tls, "node-b").await;
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");

    let client = connect(&server.endpoint(), &tls).await.unwrap();
    let report = AgentReport {
        applied: Some(StateVersion {
            epoch: publisher.epoch(),
            version: 1,
        }),
        ready: true,
        message: String::new(),
    };
    let err = client.report("node-b", &report).await.unwrap_err();
    assert_eq!(err.code(), Some(Code::PermissionDenied), "{err}");
    assert!(!publisher.applied().borrow().contains_key("node-b"));

    // The same connection may act for its own node.
    let mut own = client.watch("node-a", None).await.unwrap();
    soon("own snapshot", own.next()).await.unwrap().unwrap();
}

#[tokio::test]
async fn controller_certificate_is_not_an_agent_identity() {
    let (pki, _publisher, server) = serving().await;
    let controller = pki.ca.issue_controller_cert(&[SERVER_NAME], &[]).unwrap();
    let tls = pki
        .anonymous()
        .with_identity(&controller.cert_pem, &controller.key_pem)
        .unwrap();
    let err = watch_refusal(&server.endpoint(), &tls, "node-a").await;
    // Refused by the TLS layer (no clientAuth usage) before any identity check.
    assert_tls_refusal(&err, "UnsupportedCertificate");
}

#[tokio::test]
async fn agent_certificate_cannot_serve_as_the_controller() {
    let pki = Pki::new();
    // An agent's key and certificate (clientAuth only, no DNS name): the server refuses to
    // start with it, naming what agents would object to.
    let stolen = pki.ca.issue_node_cert("node-b").unwrap();
    let err = ServerTls::from_pem(pki.ca.cert_pem(), &stolen.cert_pem, &stolen.key_pem)
        .expect_err("an agent certificate cannot serve");
    assert!(
        err.to_string().contains("not valid under the CA")
            && format!("{err:?}").contains("ServerAuth"),
        "{err}"
    );
    // A rogue server that skips that check is refused by the agents themselves.
    let rogue = rogue_tls_server(&stolen.cert_pem, &stolen.key_pem).await;
    let err = watch_refusal(&rogue, &pki.agent("node-a"), "node-a").await;
    assert_tls_refusal(&err, "extended key usage");
}

/// A bare TLS 1.3 server (not weir's) presenting `cert_pem`: what an impostor holding that
/// certificate and key could run. Returns its `https://` endpoint.
async fn rogue_tls_server(cert_pem: &str, key_pem: &str) -> String {
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(chain, key)
    .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("https://{}", listener.local_addr().unwrap());
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = acceptor.accept(tcp).await;
            });
        }
    });
    endpoint
}

#[tokio::test]
async fn a_serving_certificate_of_another_ca_is_refused_at_start() {
    let pki = Pki::new();
    let other = Pki::with_ca_name("another CA");
    let cert = other
        .ca
        .issue_controller_cert(&["weir-controller.weir-system.svc"], &[])
        .unwrap();
    let err = ServerTls::from_pem(pki.ca.cert_pem(), &cert.cert_pem, &cert.key_pem)
        .expect_err("a certificate the agents' CA did not sign");
    assert!(
        err.to_string().contains("not valid under the CA")
            && format!("{err:?}").contains("UnknownIssuer"),
        "{err}"
    );
}

#[tokio::test]
async fn agent_refuses_a_controller_certificate_for_another_name() {
    let (pki, _publisher, server) = serving().await;
    let cert = pki.ca.issue_node_cert("node-a").unwrap();
    let tls = ClientTls::new(pki.ca.cert_pem(), "weir-controller.kube-system.svc")
        .unwrap()
        .with_identity(&cert.cert_pem, &cert.key_pem)
        .unwrap();
    let err = watch_refusal(&server.endpoint(), &tls, "node-a").await;
    assert_tls_refusal(&err, "not valid for name");
}

#[tokio::test]
async fn agent_refuses_a_controller_signed_by_another_ca() {
    let (pki, _publisher, _server) = serving().await;
    let other = Pki::with_ca_name("impostor CA");
    let publisher = StatePublisher::new();
    let impostor = TestServer::start(&publisher, &other.server, None).await;
    let err = watch_refusal(&impostor.endpoint(), &pki.agent("node-a"), "node-a").await;
    assert_tls_refusal(&err, "UnknownIssuer");
}

#[tokio::test]
async fn refused_handshakes_do_not_stall_the_server() {
    let (pki, _publisher, server) = serving().await;
    // A client that opens TCP and never speaks TLS.
    let _idle = tokio::net::TcpStream::connect(server.addr).await.unwrap();
    let client = connect(&server.endpoint(), &pki.agent("node-a"))
        .await
        .unwrap();
    let mut updates = client.watch("node-a", None).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), updates.next())
        .await
        .expect("served despite an idle handshake")
        .unwrap()
        .unwrap();
}
