//! [`TokenReviewer`] over the TokenReview API: agents bootstrap their node certificates with
//! their projected, audience-bound ServiceAccount token.
//!
//! The controller creates a `TokenReview`
//! (<https://kubernetes.io/docs/reference/kubernetes-api/authentication-resources/token-review-v1/>)
//! with the audience agents request for their token ([`TokenReviewConfig::audience`]) and
//! accepts the token only if
//!
//! 1. the API server authenticated it **for that audience** (`status.audiences` must contain
//!    it: the API docs require clients that set `spec.audiences` to check this);
//! 2. it belongs to the agents' ServiceAccount (`system:serviceaccount:<ns>:<name>`);
//! 3. it names a node: bound tokens of pods carry the node the pod runs on in
//!    `user.extra["authentication.kubernetes.io/node-name"]` (KEP-4193, feature
//!    `ServiceAccountTokenPodNodeInfo`, beta and on by default since Kubernetes 1.30, GA in
//!    1.32; keys defined in `k8s.io/apiserver/pkg/authentication/serviceaccount/util.go`).
//!    On older clusters the token still names its pod (`authentication.kubernetes.io/pod-name`
//!    and `pod-uid`): the pod is read, must have that uid (a recreated pod with the same name
//!    is another pod) and must be scheduled; its `spec.nodeName` is the node.
//!
//! Anything else is rejected (`UNAUTHENTICATED` for the agent); an unreachable API server is
//! `UNAVAILABLE`, so the agent retries.

use std::collections::BTreeMap;

use k8s_openapi::api::{
    authentication::v1::{TokenReview, TokenReviewSpec},
    core::v1::Pod,
};
use kube::{Api, Client, api::PostParams};
use tracing::{debug, warn};
use weir_transport::{ReviewError, ReviewedIdentity, TokenReviewer};

/// `user.extra` key of the node a pod-bound token's pod runs on.
pub const EXTRA_NODE_NAME: &str = "authentication.kubernetes.io/node-name";
/// `user.extra` key of the pod a token is bound to.
pub const EXTRA_POD_NAME: &str = "authentication.kubernetes.io/pod-name";
/// `user.extra` key of the uid of the pod a token is bound to.
pub const EXTRA_POD_UID: &str = "authentication.kubernetes.io/pod-uid";

/// Which tokens may obtain node certificates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenReviewConfig {
    /// The audience agents request for their projected token.
    pub audience: String,
    /// Namespace of the agents' ServiceAccount.
    pub namespace: String,
    /// Name of the agents' ServiceAccount.
    pub service_account: String,
}

impl Default for TokenReviewConfig {
    fn default() -> Self {
        Self {
            audience: "weir-controller".into(),
            namespace: "weir-system".into(),
            service_account: "weir-agent".into(),
        }
    }
}

impl TokenReviewConfig {
    /// The username the API server gives tokens of the agents' ServiceAccount.
    pub fn username(&self) -> String {
        format!(
            "system:serviceaccount:{}:{}",
            self.namespace, self.service_account
        )
    }
}

/// Reviews bootstrap tokens with the API server.
#[derive(Clone)]
pub struct KubeTokenReviewer {
    client: Client,
    config: TokenReviewConfig,
}

impl std::fmt::Debug for KubeTokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KubeTokenReviewer")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

fn rejected(reason: impl Into<String>) -> ReviewError {
    ReviewError::Rejected {
        reason: reason.into(),
    }
}

fn unavailable(what: &str, e: &kube::Error) -> ReviewError {
    ReviewError::Unavailable {
        reason: format!("{what}: {e}"),
    }
}

/// The single value of an `extra` key (an absent, empty or multi-valued key is no value).
fn single<'a>(extra: &'a BTreeMap<String, Vec<String>>, key: &str) -> Option<&'a str> {
    match extra.get(key).map(Vec::as_slice) {
        Some([value]) if !value.is_empty() => Some(value),
        _ => None,
    }
}

impl KubeTokenReviewer {
    pub fn new(client: Client, config: TokenReviewConfig) -> Self {
        Self { client, config }
    }

    async fn node_of_pod(&self, pod_name: &str, pod_uid: &str) -> Result<String, ReviewError> {
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let pod = pods
            .get_opt(pod_name)
            .await
            .map_err(|e| unavailable("reading the token's pod", &e))?
            .ok_or_else(|| rejected(format!("the token's pod {pod_name} does not exist")))?;
        if pod.metadata.uid.as_deref() != Some(pod_uid) {
            return Err(rejected(format!(
                "the token's pod {pod_name} (uid {pod_uid}) no longer exists"
            )));
        }
        pod.spec
            .and_then(|s| s.node_name)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| rejected(format!("the token's pod {pod_name} is not scheduled")))
    }
}

#[async_trait::async_trait]
impl TokenReviewer for KubeTokenReviewer {
    async fn review(&self, token: &str) -> Result<ReviewedIdentity, ReviewError> {
        if token.is_empty() {
            return Err(rejected("empty token"));
        }
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![self.config.audience.clone()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let reviewed = api
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| unavailable("creating a TokenReview", &e))?;
        let status = reviewed.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            debug!(reason = %why, "bootstrap token not authenticated");
            return Err(rejected(format!("token not authenticated: {why}")));
        }
        if !status
            .audiences
            .iter()
            .flatten()
            .any(|a| *a == self.config.audience)
        {
            return Err(rejected(format!(
                "token not valid for audience {}",
                self.config.audience
            )));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let expected = self.config.username();
        if username != expected {
            warn!(%username, "refusing a bootstrap token of another identity");
            return Err(rejected(format!(
                "{username} may not obtain node certificates (only {expected})"
            )));
        }
        let extra = user.extra.unwrap_or_default();
        let pod_name = single(&extra, EXTRA_POD_NAME).map(str::to_owned);
        let node_name = match single(&extra, EXTRA_NODE_NAME) {
            Some(node) => node.to_owned(),
            None => match (pod_name.as_deref(), single(&extra, EXTRA_POD_UID)) {
                (Some(pod), Some(uid)) => self.node_of_pod(pod, uid).await?,
                _ => {
                    return Err(rejected(
                        "the token is not bound to a pod (use a projected service account token)",
                    ));
                }
            },
        };
        Ok(ReviewedIdentity {
            node_name,
            service_account: format!("{}/{}", self.config.namespace, self.config.service_account),
            pod_name,
        })
    }
}
