//! Leader election on a `coordination.k8s.io/v1` Lease, with client-go's semantics.
//!
//! Several controller replicas run at once; only the one holding the Lease serves agents (the
//! others keep their watches and compiled state warm, so a takeover is immediate). The
//! protocol is the one of client-go's `tools/leaderelection` with a `LeaseLock`
//! (<https://github.com/kubernetes/client-go/blob/master/tools/leaderelection/leaderelection.go>),
//! so the Lease reads the same as any other controller's (`kubectl get lease -o yaml`):
//!
//! * **Acquire.** Every `retry_period` (jittered up to ×2.2, as client-go's `JitterUntil` with
//!   factor 1.2, so candidates do not march in step), a candidate reads the Lease. It may
//!   take it when it does not exist (create), when it has no holder (released), or when its
//!   record has not changed for `leaseDurationSeconds` *as measured by this process's
//!   monotonic clock since it first saw that record* — never by comparing `renewTime` with
//!   the local wall clock, so clock skew between nodes cannot shorten a lease.
//! * **Optimistic concurrency.** Every write is an update carrying the `resourceVersion` that
//!   was read (or a create); a concurrent writer makes it fail with `409 Conflict`, so two
//!   candidates can never both believe they won.
//! * **Renew.** The holder rewrites `renewTime` every `retry_period`. If no renewal succeeds
//!   within `renew_deadline` of the last successful one, it steps down — before any other
//!   candidate may consider the lease expired (`lease_duration` > `renew_deadline`), so two
//!   leaders never overlap as long as clocks run at the same rate.
//! * **Losing is immediate.** A holder that reads the Lease and finds another holder, or
//!   whose renewal conflicts and whose re-read shows another holder, steps down at once
//!   (client-go would keep believing until the deadline). A conflict on a Lease that still
//!   names us (someone edited an annotation) is retried at once with the new version.
//! * **Release.** On shutdown the holder steps down first, then clears `holderIdentity` and
//!   sets `leaseDurationSeconds` to 1 (as client-go's `ReleaseOnCancel`), so a standby takes
//!   over within one retry period instead of a lease duration.
//!
//! Unlike client-go's default (exit on loss), a replica that loses leadership becomes a
//! candidate again.
//!
//! Why not a crate: `kube-lease-manager` (kube 5) uses server-side apply with a
//! duration/grace model rather than client-go's renew-deadline/retry-period semantics and
//! read-modify-write with `resourceVersion`; `kube-leader-election` targets kube 4. This
//! module is small and its behaviour is pinned by `tests/kube_leader.rs`.

use std::{future::Future, pin::pin, time::Duration};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{PostParams, ResourceExt},
};
use tokio::{
    sync::watch,
    time::{Instant, sleep, sleep_until, timeout_at},
};
use tracing::{debug, info, warn};

/// Errors of leader election.
#[derive(Debug, thiserror::Error)]
pub enum LeaderError {
    #[error(
        "invalid lease timing: lease duration {lease_duration:?} must exceed renew deadline \
         {renew_deadline:?}, which must exceed 1.2 × retry period {retry_period:?}"
    )]
    InvalidTiming {
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    },
    #[error("lease identity must not be empty")]
    EmptyIdentity,
}

/// Which Lease to compete for, as whom, and the timing (client-go's names and defaults).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    /// Unique per process (a restarted pod must not inherit its predecessor's lease).
    pub identity: String,
    /// How long others wait, after they last saw the record change, before taking over.
    pub lease_duration: Duration,
    /// How long the holder keeps trying to renew before it steps down.
    pub renew_deadline: Duration,
    /// Interval between attempts (acquire or renew).
    pub retry_period: Duration,
}

impl LeaseConfig {
    pub const DEFAULT_NAMESPACE: &str = "weir-system";
    pub const DEFAULT_NAME: &str = "weir-controller";
    pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
    pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
    pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);

    /// A configuration with client-go's default timing (15s / 10s / 2s).
    pub fn new(
        namespace: impl Into<String>,
        name: impl Into<String>,
        identity: impl Into<String>,
    ) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            identity: identity.into(),
            lease_duration: Self::DEFAULT_LEASE_DURATION,
            renew_deadline: Self::DEFAULT_RENEW_DEADLINE,
            retry_period: Self::DEFAULT_RETRY_PERIOD,
        }
    }

    /// Checks client-go's constraints: `lease_duration > renew_deadline > 1.2 × retry_period`.
    pub fn validate(&self) -> Result<(), LeaderError> {
        if self.identity.is_empty() {
            return Err(LeaderError::EmptyIdentity);
        }
        if self.lease_duration <= self.renew_deadline
            || self.renew_deadline <= self.retry_period.mul_f64(1.2)
        {
            return Err(LeaderError::InvalidTiming {
                lease_duration: self.lease_duration,
                renew_deadline: self.renew_deadline,
                retry_period: self.retry_period,
            });
        }
        Ok(())
    }
}

/// A process identity for the Lease: the pod name (or host name) plus a random suffix, as
/// client-go's `hostname_<uuid>`, so a restarted pod with the same name is a new candidate.
pub fn unique_identity(base: &str) -> Result<String, getrandom::Error> {
    Ok(format!("{base}_{:016x}", getrandom::u64()?))
}

/// Whether this process currently leads; cheap to clone.
#[derive(Clone, Debug)]
pub struct Leadership {
    rx: watch::Receiver<bool>,
}

impl Leadership {
    /// A fixed answer, for running without election (tests, a single replica).
    pub fn fixed(leader: bool) -> Self {
        let (tx, rx) = watch::channel(leader);
        // Keep the value readable forever: a closed channel still holds its last value.
        drop(tx);
        Self { rx }
    }

    pub fn is_leader(&self) -> bool {
        *self.rx.borrow()
    }

    /// Waits until leadership is `leader`. Returns false if the elector is gone while the
    /// state differs (it will never change again).
    pub async fn wait_for(&mut self, leader: bool) -> bool {
        self.rx.wait_for(|l| *l == leader).await.is_ok()
    }

    /// Waits for the next change; false if the elector is gone.
    pub async fn changed(&mut self) -> bool {
        self.rx.changed().await.is_ok()
    }
}

/// What one read-modify-write of the Lease found.
#[derive(Debug, PartialEq, Eq)]
enum Attempt {
    /// We hold the lease now (acquired or renewed).
    Holding,
    /// Another candidate holds a valid lease.
    HeldBy(String),
    /// Our write lost a race (`409`); read again.
    Conflict,
}

/// The record last read, and when (monotonic) it was first seen in this form.
struct Observed {
    spec: LeaseSpec,
    since: Instant,
}

/// Competes for the Lease and publishes the outcome to its [`Leadership`] handles.
pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
    observed: Option<Observed>,
    tx: watch::Sender<bool>,
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Result<(Self, Leadership), LeaderError> {
        config.validate()?;
        let (tx, rx) = watch::channel(false);
        let elector = Self {
            api: Api::namespaced(client, &config.namespace),
            config,
            observed: None,
            tx,
        };
        Ok((elector, Leadership { rx }))
    }

    /// Competes until `shutdown` completes; then steps down and releases the lease if held.
    /// Leadership is false when this returns.
    pub async fn run(mut self, shutdown: impl Future<Output = ()>) {
        let mut shutdown = pin!(shutdown);
        tokio::select! {
            _ = &mut shutdown => {}
            () = self.compete() => {}
        }
        if self.tx.send_replace(false) {
            info!(lease = %self.config.name, "stepping down: shutting down");
            self.release().await;
        }
    }

    /// Loops forever: acquire, then renew until lost.
    async fn compete(&mut self) {
        loop {
            self.acquire().await;
            info!(
                lease = %self.config.name,
                identity = %self.config.identity,
                "became leader"
            );
            self.tx.send_replace(true);
            let why = self.renew().await;
            self.tx.send_replace(false);
            warn!(lease = %self.config.name, reason = %why, "lost leadership; standing by");
        }
    }

    /// Returns once the lease is ours.
    async fn acquire(&mut self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(Attempt::Holding) => return,
                Ok(Attempt::Conflict) => {
                    debug!(lease = %self.config.name, "lost a race for the lease; retrying")
                }
                Ok(Attempt::HeldBy(holder)) => {
                    debug!(lease = %self.config.name, %holder, "lease held by another candidate")
                }
                Err(e) => warn!(lease = %self.config.name, error = %e, "reading the lease"),
            }
            sleep(self.jittered_retry()).await;
        }
    }

    /// Renews every retry period; returns why leadership ended.
    async fn renew(&mut self) -> String {
        let mut last_renewal = Instant::now();
        loop {
            sleep(self.config.retry_period).await;
            let deadline = last_renewal + self.config.renew_deadline;
            let mut conflicts = 0u32;
            loop {
                match timeout_at(deadline, self.try_acquire_or_renew()).await {
                    Ok(Ok(Attempt::Holding)) => {
                        last_renewal = Instant::now();
                        break;
                    }
                    Ok(Ok(Attempt::HeldBy(holder))) => {
                        return format!("the lease is now held by {holder}");
                    }
                    // Read again at once: if the lease still names us, the next write uses
                    // the new version; if not, we step down without waiting.
                    Ok(Ok(Attempt::Conflict)) => {
                        conflicts += 1;
                        if conflicts > 3 {
                            // Someone keeps writing the lease: do not spin.
                            sleep(self.config.retry_period).await;
                        }
                    }
                    Ok(Err(e)) => {
                        warn!(lease = %self.config.name, error = %e, "renewing the lease");
                        let next = Instant::now() + self.config.retry_period;
                        if next >= deadline {
                            sleep_until(deadline).await;
                            return format!(
                                "no renewal succeeded within the renew deadline ({:?})",
                                self.config.renew_deadline
                            );
                        }
                        sleep_until(next).await;
                    }
                    Err(_) => {
                        return format!(
                            "no renewal succeeded within the renew deadline ({:?})",
                            self.config.renew_deadline
                        );
                    }
                }
            }
        }
    }

    /// client-go's `tryAcquireOrRenew`: read, decide, write with the read `resourceVersion`.
    async fn try_acquire_or_renew(&mut self) -> Result<Attempt, kube::Error> {
        let now = Timestamp::now();
        let Some(lease) = self.api.get_opt(&self.config.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(self.config.name.clone()),
                    namespace: Some(self.config.namespace.clone()),
                    ..ObjectMeta::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.config.identity.clone()),
                    lease_duration_seconds: Some(self.lease_seconds()),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..LeaseSpec::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(created) => {
                    self.observe(&created);
                    Ok(Attempt::Holding)
                }
                Err(kube::Error::Api(s)) if s.is_already_exists() => Ok(Attempt::Conflict),
                Err(e) => Err(e),
            };
        };
        self.observe(&lease);
        let old = lease.spec.clone().unwrap_or_default();
        let holder = old.holder_identity.clone().filter(|h| !h.is_empty());
        let ours = holder.as_deref() == Some(self.config.identity.as_str());
        if let Some(holder) = holder.clone()
            && !ours
            && self.observed_lease_valid()
        {
            return Ok(Attempt::HeldBy(holder));
        }
        let mut spec = old.clone();
        spec.holder_identity = Some(self.config.identity.clone());
        spec.lease_duration_seconds = Some(self.lease_seconds());
        spec.renew_time = Some(MicroTime(now));
        if !ours {
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(old.lease_transitions.unwrap_or(0).saturating_add(1));
            info!(
                lease = %self.config.name,
                previous = holder.as_deref().unwrap_or("nobody"),
                "taking over the lease"
            );
        }
        let mut updated = lease;
        updated.spec = Some(spec);
        // `replace` sends metadata.resourceVersion as read: the API server refuses the write
        // with 409 if anyone wrote in between.
        let name = updated.name_any();
        match self
            .api
            .replace(&name, &PostParams::default(), &updated)
            .await
        {
            Ok(written) => {
                self.observe(&written);
                Ok(Attempt::Holding)
            }
            Err(kube::Error::Api(s)) if s.is_conflict() => Ok(Attempt::Conflict),
            Err(e) => Err(e),
        }
    }

    /// Records the lease's record; the expiry clock restarts only when the record changed.
    fn observe(&mut self, lease: &Lease) {
        let spec = lease.spec.clone().unwrap_or_default();
        match &self.observed {
            Some(o) if o.spec == spec => {}
            _ => {
                self.observed = Some(Observed {
                    spec,
                    since: Instant::now(),
                })
            }
        }
    }

    /// True while the observed record's `leaseDurationSeconds` has not elapsed since we first
    /// saw it (client-go's `isLeaseValid`).
    fn observed_lease_valid(&self) -> bool {
        self.observed.as_ref().is_some_and(|o| {
            let seconds = o
                .spec
                .lease_duration_seconds
                .and_then(|s| u64::try_from(s).ok())
                .unwrap_or(self.config.lease_duration.as_secs());
            o.since + Duration::from_secs(seconds) > Instant::now()
        })
    }

    fn lease_seconds(&self) -> i32 {
        i32::try_from(self.config.lease_duration.as_secs().max(1)).unwrap_or(i32::MAX)
    }

    /// `retry_period × (1 + 1.2 × r)`, r uniform in [0, 1).
    fn jittered_retry(&self) -> Duration {
        self.config
            .retry_period
            .mul_f64(1.0 + 1.2 * fastrand::f64())
    }

    /// Clears the holder if it is still us (client-go's `release`). Best effort, bounded by
    /// the renew deadline: a failure only means a standby waits for the lease to expire.
    async fn release(&mut self) {
        let attempt = async {
            let Some(mut lease) = self.api.get_opt(&self.config.name).await? else {
                return Ok::<_, kube::Error>(());
            };
            let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
            if spec.holder_identity.as_deref() != Some(self.config.identity.as_str()) {
                return Ok(());
            }
            let now = MicroTime(Timestamp::now());
            spec.holder_identity = None;
            spec.lease_duration_seconds = Some(1);
            spec.acquire_time = Some(now.clone());
            spec.renew_time = Some(now);
            let name = lease.name_any();
            self.api
                .replace(&name, &PostParams::default(), &lease)
                .await
                .map(|_| ())
        };
        match tokio::time::timeout(self.config.renew_deadline, attempt).await {
            Ok(Ok(())) => info!(lease = %self.config.name, "released the lease"),
            Ok(Err(e)) => warn!(lease = %self.config.name, error = %e, "releasing the lease"),
            Err(_) => warn!(lease = %self.config.name, "releasing the lease timed out"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_keep_the_name_and_differ_between_processes_of_that_name() {
        let first = unique_identity("weir-controller-0").unwrap();
        let second = unique_identity("weir-controller-0").unwrap();
        assert_ne!(first, second);
        let suffix = first.strip_prefix("weir-controller-0_").unwrap();
        assert_eq!(suffix.len(), 16);
        assert!(suffix.bytes().all(|b| b.is_ascii_hexdigit()));
    }
}
