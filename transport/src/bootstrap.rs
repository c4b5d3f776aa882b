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
    pub(crate) limiter: Arc<RequestLimiter>,
}

impl std::fmt::Debug for Bootstrap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bootstrap").finish_non_exhaustive()
    }
}

impl Bootstrap {
    /// Bootstrap with the default [`BootstrapLimits`].
    pub fn new(ca: Arc<ClusterCa>, reviewer: Arc<dyn TokenReviewer>) -> Self {
        Self {
            ca,
            reviewer,
            limiter: Arc::new(RequestLimiter::new(BootstrapLimits::default())),
        }
    }

    /// Replaces the request limits (and restarts their buckets full).
    pub fn with_limits(mut self, limits: BootstrapLimits) -> Self {
        self.limiter = Arc::new(RequestLimiter::new(limits));
        self
    }

    /// Certificate requests refused for exceeding the limits so far.
    pub fn refused_requests(&self) -> u64 {
        self.limiter.refused()
    }
}

/// How many certificate requests are answered: a token bucket per source address and one for
/// all sources, checked before the token is reviewed (each review is a TokenReview, a request
/// to the API server). A request over either limit is refused with `RESOURCE_EXHAUSTED`.
///
/// A hand-written bucket rather than a rate-limiting crate: two buckets under one mutex, with
/// a cleanup of idle per-source buckets, is all this needs, and the dependency it would
/// replace (`governor`, with its own clock and keyed-store abstractions) is larger than it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BootstrapLimits {
    /// Requests one source address may make at once.
    pub per_source_burst: u32,
    /// Requests per second one source address regains.
    pub per_source_rate: f64,
    /// Requests all sources together may make at once.
    pub global_burst: u32,
    /// Requests per second all sources together regain.
    pub global_rate: f64,
}

impl Default for BootstrapLimits {
    /// A node asks once per agent start (and once a year on renewal); 5 at once and one per
    /// 10 s per source, 50 at once and 5 per second overall, let a whole cluster of agents
    /// restart within minutes while a misbehaving client costs at most 5 TokenReviews a second.
    fn default() -> Self {
        Self {
            per_source_burst: 5,
            per_source_rate: 0.1,
            global_burst: 50,
            global_rate: 5.0,
        }
    }
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: std::time::Instant,
}

impl Bucket {
    fn full(burst: u32, now: std::time::Instant) -> Self {
        Self {
            tokens: f64::from(burst),
            at: now,
        }
    }

    /// Refills for the time since the last look; true if a token is left to take.
    fn refill(&mut self, burst: u32, rate: f64, now: std::time::Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.tokens = (self.tokens + elapsed * rate).min(f64::from(burst));
        self.at = now;
        self.tokens >= 1.0
    }
}

/// Per-source buckets kept before idle (full) ones are dropped.
const MAX_TRACKED_SOURCES: usize = 4096;

/// The state behind [`BootstrapLimits`]; shared by clones.
#[derive(Debug)]
pub(crate) struct RequestLimiter {
    limits: BootstrapLimits,
    state: std::sync::Mutex<LimiterState>,
    refused: std::sync::atomic::AtomicU64,
}

#[derive(Debug)]
struct LimiterState {
    global: Bucket,
    sources: HashMap<std::net::IpAddr, Bucket>,
}

impl RequestLimiter {
    pub(crate) fn new(limits: BootstrapLimits) -> Self {
        let now = std::time::Instant::now();
        Self {
            limits,
            state: std::sync::Mutex::new(LimiterState {
                global: Bucket::full(limits.global_burst, now),
                sources: HashMap::new(),
            }),
            refused: std::sync::atomic::AtomicU64::new(0),
        }
    }

    /// Takes a token from the source's bucket and the global one, or neither. `None`: the
    /// source address is unknown, only the global bucket applies.
    pub(crate) fn admit(&self, source: Option<std::net::IpAddr>) -> Result<(), &'static str> {
        let l = self.limits;
        let now = std::time::Instant::now();
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if state.sources.len() >= MAX_TRACKED_SOURCES {
            // A full bucket is the same as no bucket: forget those.
            state.sources.retain(|_, b| {
                b.refill(l.per_source_burst, l.per_source_rate, now);
                b.tokens < f64::from(l.per_source_burst)
            });
        }
        let LimiterState { global, sources } = &mut *state;
        let mut source_bucket = source.map(|ip| {
            sources
                .entry(ip)
                .or_insert_with(|| Bucket::full(l.per_source_burst, now))
        });
        let source_ok = source_bucket
            .as_deref_mut()
            .is_none_or(|b| b.refill(l.per_source_burst, l.per_source_rate, now));
        let verdict = if !source_ok {
            Err("too many certificate requests from this address")
        } else if !global.refill(l.global_burst, l.global_rate, now) {
            Err("too many certificate requests")
        } else {
            if let Some(b) = source_bucket {
                b.tokens -= 1.0;
            }
            global.tokens -= 1.0;
            Ok(())
        };
        if verdict.is_err() {
            self.refused
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        verdict
    }

    pub(crate) fn refused(&self) -> u64 {
        self.refused.load(std::sync::atomic::Ordering::Relaxed)
    }
}

#[cfg(test)]
mod limiter_tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::{BootstrapLimits, MAX_TRACKED_SOURCES, RequestLimiter};

    fn ip(n: u32) -> Option<IpAddr> {
        Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n)))
    }

    #[test]
    fn one_source_cannot_use_up_another_ones_tokens() {
        let limiter = RequestLimiter::new(BootstrapLimits {
            per_source_burst: 1,
            per_source_rate: 1e-6,
            global_burst: 10,
            global_rate: 1e-6,
        });
        assert!(limiter.admit(ip(1)).is_ok());
        assert!(limiter.admit(ip(1)).is_err());
        assert!(
            limiter.admit(ip(2)).is_ok(),
            "another source has its own bucket"
        );
        assert_eq!(limiter.refused(), 1);
    }

    #[test]
    fn idle_sources_are_forgotten_so_the_table_stays_bounded() {
        // Buckets refill at once: every one is full again at the next look.
        let limiter = RequestLimiter::new(BootstrapLimits {
            per_source_burst: 1,
            per_source_rate: 1e12,
            global_burst: u32::MAX,
            global_rate: 1e12,
        });
        for n in 0..=u32::try_from(MAX_TRACKED_SOURCES).unwrap() {
            assert!(limiter.admit(ip(n)).is_ok());
        }
        let tracked = limiter.state.lock().unwrap().sources.len();
        assert!(tracked < MAX_TRACKED_SOURCES, "{tracked} sources tracked");
    }
}
