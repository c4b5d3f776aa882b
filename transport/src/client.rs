//! The agent's side: one connection to the controller, and the calls on it.

use std::{pin::Pin, time::Duration};

use futures::{Stream, StreamExt};
use tonic::transport::{Channel, Endpoint};
use weir_api::MapCapacities;
use x509_parser::{certificate::X509Certificate, prelude::FromDer};

use crate::{
    TransportError,
    pb::{self, node_state_service_client::NodeStateServiceClient},
    pki::{self, IssuedCert},
    server::AgentReport,
    tls::ClientTls,
    update::{NodeUpdate, StateVersion},
};

/// Largest message an agent accepts. A snapshot carries the node's address → peer-class
/// table, which can name every pod of a large cluster (150k pods ≈ 5 MB on the wire), well
/// above gRPC's customary 4 MiB default.
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Pings keep NAT and conntrack entries alive and detect a vanished controller within
/// interval + timeout even while no update flows.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);
/// Unary calls (reports, certificate requests) give up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// The updates of one `Watch` stream, converted and checked.
pub type UpdateStream = Pin<Box<dyn Stream<Item = Result<NodeUpdate, TransportError>> + Send>>;

/// A connection to the controller. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct Client {
    inner: NodeStateServiceClient<Channel>,
}

/// Connects to `endpoint` (`https://host:port`) and completes the TLS handshake.
pub async fn connect(endpoint: &str, tls: &ClientTls) -> Result<Client, TransportError> {
    let invalid = |source| TransportError::Endpoint {
        endpoint: endpoint.to_owned(),
        source,
    };
    let channel = Endpoint::from_shared(endpoint.to_owned())
        .map_err(invalid)?
        .tls_config(tls.tonic_config())
        .map_err(invalid)?
        .connect_timeout(CONNECT_TIMEOUT)
        .http2_keep_alive_interval(KEEPALIVE_INTERVAL)
        .keep_alive_timeout(KEEPALIVE_TIMEOUT)
        .keep_alive_while_idle(true)
        .tcp_nodelay(true)
        .connect()
        .await
        .map_err(|source| TransportError::Connect {
            endpoint: endpoint.to_owned(),
            source,
        })?;
    Ok(Client {
        inner: NodeStateServiceClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
    })
}

fn with_timeout<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

impl Client {
    /// Opens a `Watch` stream for `node`. `have` is the state the agent already holds; if it is
    /// the controller's current one, the first message is [`NodeUpdate::Unchanged`].
    ///
    /// Fails with `UNAUTHENTICATED` without a client certificate and with `PERMISSION_DENIED`
    /// if the certificate names another node. The stream yields an error and ends when the
    /// connection breaks, the controller shuts down, the node is removed, or a message is
    /// malformed.
    pub async fn watch(
        &self,
        node: &str,
        have: Option<StateVersion>,
    ) -> Result<UpdateStream, TransportError> {
        self.watch_with(node, have, None).await
    }

    /// [`Self::watch`], telling the controller the sizes of the node's dataplane tables (it
    /// checks the node's state against them; without, against the compiled-in defaults).
    pub async fn watch_with(
        &self,
        node: &str,
        have: Option<StateVersion>,
        capacities: Option<&MapCapacities>,
    ) -> Result<UpdateStream, TransportError> {
        let request = pb::WatchRequest {
            node: node.to_owned(),
            have_version: have.map_or(0, |h| h.version),
            have_epoch: have.map_or(0, |h| h.epoch),
            capacities: capacities.map(pb::MapCapacities::from),
        };
        let stream = self
            .inner
            .clone()
            .watch(request)
            .await
            .map_err(|status| TransportError::Rpc {
                rpc: "Watch",
                status,
            })?
            .into_inner();
        let mut failed = false;
        let updates = stream
            .map(|item| {
                let update = item.map_err(|status| TransportError::Rpc {
                    rpc: "Watch",
                    status,
                })?;
                Ok(NodeUpdate::try_from(update)?)
            })
            // After an error the stream is out of step; end it there.
            .take_while(move |item| {
                let keep = !failed;
                failed |= item.is_err();
                futures::future::ready(keep)
            });
        Ok(Box::pin(updates))
    }

    /// Tells the controller what `node` enforces.
    pub async fn report(&self, node: &str, report: &AgentReport) -> Result<(), TransportError> {
        let status = pb::AgentStatus {
            node: node.to_owned(),
            epoch: report.applied.map_or(0, |a| a.epoch),
            applied_version: report.applied.map_or(0, |a| a.version),
            ready: report.ready,
            message: report.message.clone(),
        };
        self.inner
            .clone()
            .report_status(with_timeout(status))
            .await
            .map_err(|status| TransportError::Rpc {
                rpc: "ReportStatus",
                status,
            })?;
        Ok(())
    }

    /// Asks for a node certificate for the public key of `csr_pem`, vouched for by `token`.
    /// Returns the certificate and the CA certificate, both PEM.
    pub async fn request_certificate(
        &self,
        node: &str,
        csr_pem: &str,
        token: &str,
    ) -> Result<(String, String), TransportError> {
        let response = self
            .inner
            .clone()
            .request_certificate(with_timeout(pb::CertificateRequest {
                node: node.to_owned(),
                csr_pem: csr_pem.to_owned(),
                token: token.to_owned(),
            }))
            .await
            .map_err(|status| TransportError::Rpc {
                rpc: "RequestCertificate",
                status,
            })?
            .into_inner();
        Ok((response.certificate_pem, response.ca_pem))
    }
}

/// Obtains a node certificate for `node` with a bootstrap token: generates a key, sends a
/// request over `tls` (which needs no identity), and checks that the answer is a node
/// certificate for `node` and for the generated key. The caller stores the result (for
/// example with [`IssuedCert::write`]) and connects with it.
pub async fn bootstrap_node_certificate(
    endpoint: &str,
    tls: &ClientTls,
    node: &str,
    token: &str,
) -> Result<IssuedCert, TransportError> {
    let key = pki::generate_key()?;
    let csr = pki::node_csr_pem(node, &key)?;
    let client = connect(endpoint, tls).await?;
    let (cert_pem, _ca_pem) = client.request_certificate(node, &csr, token).await?;
    let cert = pki::parse_certs(&cert_pem, "issued certificate")?.swap_remove(0);
    let identity = pki::node_identity(&cert)?;
    if identity != node {
        return Err(TransportError::WrongCertificate {
            reason: format!("it names node {identity}, not {node}"),
        });
    }
    let (_, parsed) =
        X509Certificate::from_der(&cert).map_err(|e| TransportError::WrongCertificate {
            reason: e.to_string(),
        })?;
    if parsed.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(TransportError::WrongCertificate {
            reason: "it is for another key".into(),
        });
    }
    Ok(IssuedCert {
        cert_pem,
        key_pem: key.serialize_pem(),
    })
}
