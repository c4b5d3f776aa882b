//! Controller → agent distribution of per-node dataplane state.
//!
//! # Wire protocol
//!
//! gRPC service `weir.v1.NodeStateService` (`proto/weir/v1/node_state.proto`), over TLS 1.3
//! with HTTP/2:
//! * `Watch(WatchRequest{node, have_version, have_epoch})` streams `NodeUpdate`s. The first is
//!   a `Snapshot{epoch, version, state}` — or `Snapshot{epoch, version, unchanged}` when the
//!   request named exactly the current epoch and version — and every later one a
//!   `NodeStateDiff{from_version, to_version, …}` from the version this stream sent last.
//!   Slow readers get fewer, larger diffs; nothing is queued per stream
//!   (see [`server`]). Every (re)connect starts a new stream and therefore a resync.
//! * `ReportStatus(AgentStatus{node, epoch, applied_version, ready, message})`: what the
//!   agent enforces; the controller sees it in [`StatePublisher::applied`].
//! * `RequestCertificate(CertificateRequest{node, csr_pem, token})`: certificate bootstrap
//!   (see [`bootstrap`]).
//!
//! Messages mirror [`weir_api::NodeState`] and [`weir_api::NodeStateDiff`] exactly; see
//! [`convert`] for what decoding checks.
//!
//! # Trust model
//!
//! See [`tls`] (who verifies what) and [`pki`] (how certificates name nodes). In short: one
//! cluster CA; the controller proves its name with a `serverAuth` certificate; each agent
//! proves its node with a `clientAuth` certificate, and may only watch and report for that
//! node (`PERMISSION_DENIED` otherwise).
//!
//! # Use
//!
//! Controller: create a [`StatePublisher`], [`StatePublisher::publish`] each node's state as
//! it changes, and run [`NodeStateServer::serve`]. Agent: run a [`WatchLoop`] with a
//! [`StateSink`] that writes into the dataplane; or use [`connect`] and [`Client`] directly.

pub mod bootstrap;
pub mod client;
pub mod convert;
pub mod endpoints;
pub mod follow;
pub mod pb;
pub mod pki;
pub mod server;
pub mod tls;
pub mod update;

#[cfg(test)]
#[path = "../tests/e2e/arb.rs"]
mod testing;

use std::net::SocketAddr;

pub use bootstrap::{
    Bootstrap, BootstrapLimits, ReviewError, ReviewedIdentity, StaticTokenReviewer, TokenReviewer,
};
pub use client::{Client, UpdateStream, bootstrap_node_certificate, connect};
pub use convert::ProtoError;
pub use endpoints::Endpoints;
pub use follow::{Backoff, StateSink, WatchLoop};
pub use pki::{ClusterCa, IssuedCert, PkiError};
pub use server::{AgentReport, NodeStateServer, PublishError, StatePublisher};
pub use tls::{ClientTls, ServerTls, TlsError, TlsFiles};
pub use update::{Applied, NodeStateTracker, NodeUpdate, StateVersion, SyncError};

/// Errors of the transport, on either side.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("invalid controller endpoint {endpoint:?}: {}", chain(source))]
    Endpoint {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("connecting to {endpoint}: {}", chain(source))]
    Connect {
        endpoint: String,
        source: tonic::transport::Error,
    },
    #[error("finding {what}: {reason}")]
    Resolve { what: String, reason: String },
    #[error("{rpc}: {status}")]
    Rpc {
        rpc: &'static str,
        status: tonic::Status,
    },
    #[error("malformed message from the controller: {0}")]
    Proto(#[from] ProtoError),
    #[error("stream out of step with the agent's state: {0}")]
    OutOfSync(#[from] SyncError),
    #[error("applying {at} to the dataplane: {message}")]
    Apply { at: StateVersion, message: String },
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Pki(#[from] PkiError),
    #[error("the controller issued an unusable certificate: {reason}")]
    WrongCertificate { reason: String },
    #[error("serving on {addr:?}: {}", chain(source))]
    Serve {
        addr: Option<SocketAddr>,
        source: tonic::transport::Error,
    },
}

/// An error and its sources, `outer: inner: innermost`: tonic's transport errors say only
/// "transport error" at the top, the reason (say, a certificate problem) is further down.
fn chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(e) = source {
        let next = e.to_string();
        if !text.ends_with(&next) {
            text.push_str(": ");
            text.push_str(&next);
        }
        source = e.source();
    }
    text
}

impl TransportError {
    /// The gRPC status code, if the controller answered a call with an error.
    pub fn code(&self) -> Option<tonic::Code> {
        match self {
            Self::Rpc { status, .. } => Some(status.code()),
            _ => None,
        }
    }
}
