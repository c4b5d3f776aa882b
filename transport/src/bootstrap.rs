//! Certificate bootstrap: an agent on a new node trades a token for a node certificate.
//!
//! The agent generates its key locally and sends a certificate signing request with a bearer
//! token over TLS that authenticates the controller (the agent knows the CA certificate, for
//! example from a ConfigMap) but not yet the agent. The controller asks a [`TokenReviewer`]
//! who the token belongs to and signs only if the reviewed node is the requested node; the
//! certificate's subject and names are set by the controller ([`ClusterCa::sign_node_csr`]).
//!
//! In Kubernetes the reviewer is the TokenReview API: a projected, audience-bound
//! service-account token of a pod carries the name of the node the pod runs on
//! (`authentication.kubernetes.io/node-name` in the review's `extra`; KEP-4193, feature
//! `ServiceAccountTokenPodNodeInfo`, on by default since Kubernetes 1.30,
//! <https://kubernetes.io/docs/reference/access-authn-authz/service-accounts-admin/#bound-service-account-tokens>).
//! The reviewer also decides which service accounts may obtain node certificates at all.

use std::{collections::HashMap, sync::Arc};

use crate::pki::ClusterCa;

/// Who a token belongs to, as established by a [`TokenReviewer`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReviewedIdentity {
    /// The node the token's holder runs on.
    pub node_name: String,
    /// `namespace/name` of the service account the token was issued to.
    pub service_account: String,
    /// The pod the token is bound to, if the token is pod-bound.
    pub pod_name: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReviewError {
    /// The token is invalid, expired, for another audience, or its holder may not have a node
    /// certificate. Answered with `UNAUTHENTICATED`.
    #[error("token rejected: {reason}")]
    Rejected { reason: String },
    /// The reviewer could not decide (API server unreachable). Answered with `UNAVAILABLE`,
    /// so the agent retries.
    #[error("token review unavailable: {reason}")]
    Unavailable { reason: String },
}

/// Decides who a bootstrap token belongs to.
#[async_trait::async_trait]
pub trait TokenReviewer: Send + Sync + 'static {
    async fn review(&self, token: &str) -> Result<ReviewedIdentity, ReviewError>;
}

/// A reviewer with a fixed table of tokens, for tests and for clusters without an API server
/// (the local netns cluster).
#[derive(Clone, Debug, Default)]
pub struct StaticTokenReviewer {
    tokens: HashMap<String, ReviewedIdentity>,
}

impl StaticTokenReviewer {
    pub fn new(tokens: impl IntoIterator<Item = (String, ReviewedIdentity)>) -> Self {
        Self {
            tokens: tokens.into_iter().collect(),
        }
    }
}

#[async_trait::async_trait]
impl TokenReviewer for StaticTokenReviewer {
    async fn review(&self, token: &str) -> Result<ReviewedIdentity, ReviewError> {
        self.tokens
            .get(token)
            .cloned()
            .ok_or_else(|| ReviewError::Rejected {
                reason: "unknown token".into(),
            })
    }
}

/// What the controller needs to serve `RequestCertificate`: the CA that signs and the
/// reviewer that vouches for tokens.
#[derive(Clone)]
pub struct Bootstrap {
    pub(crate) ca: Arc<ClusterCa>,
    pub(crate) reviewer: Arc<dyn TokenReviewer>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap").finish_non_exhaustive()
    }
}

impl Bootstrap {
    pub fn new(ca: Arc<ClusterCa>, reviewer: Arc<dyn TokenReviewer>) -> Self {
        Self { ca, reviewer }
    }
}
