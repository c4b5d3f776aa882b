//! The agent's loop: stay connected to the controller, apply what it sends, report back.
//!
//! While the controller is unreachable the agent keeps enforcing the last state it applied;
//! nothing is torn down. Every reconnect starts a new stream, which begins with a snapshot
//! (or the `Unchanged` marker when the agent is current), so a restarted controller and an
//! agent that missed updates converge without further bookkeeping.

use std::{convert::Infallible, future::Future, time::Duration};

use futures::StreamExt;
use weir_api::{MapCapacities, NodeState};

use crate::{
    TransportError,
    client::Client,
    endpoints::Endpoints,
    server::AgentReport,
    tls::{ClientTls, TlsFiles},
    update::{Applied, NodeStateTracker, StateVersion},
};

/// Where the loop's dataplane lives: the agent writes what it is given into its maps.
pub trait StateSink: Send {
    type Error: std::fmt::Display + Send;

    /// Makes the dataplane enforce `state` (version `at`). `change` tells how `state` differs
    /// from the state of the previous successful call: [`Applied::Snapshot`] means anything
    /// may differ (reconcile everything), [`Applied::Diff`] lists the changes. Never called
    /// with [`Applied::Unchanged`].
    ///
    /// On error the loop reports the failure to the controller and reconnects, which brings a
    /// full snapshot, so a half-applied diff is repaired by the next call.
    fn apply(
        &mut self,
        at: StateVersion,
        change: &Applied,
        state: &NodeState,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// Exponential reconnect delays with jitter, so agents restarted together do not reconnect
/// in lockstep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Upper bound of the delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            initial: Duration::from_millis(250),
            max: Duration::from_secs(30),
        }
    }
}

impl Backoff {
    /// The delay after `failures` consecutive failed attempts: `initial · 2^failures`, capped
    /// at `max`, of which a random half is waived.
    pub fn delay(&self, failures: u32) -> Duration {
        let full = self
            .initial
            .saturating_mul(2u32.saturating_pow(failures.min(20)))
            .min(self.max);
        let half = full / 2;
        let mut bytes = [0u8; 8];
        let jitter =
            match ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes) {
                Ok(()) => u64::from_le_bytes(bytes),
                Err(_) => 0,
            };
        let nanos = u64::try_from(half.as_nanos()).unwrap_or(u64::MAX);
        half + Duration::from_nanos(jitter.checked_rem(nanos.saturating_add(1)).unwrap_or(0))
    }
}

#[derive(Clone, Debug)]
enum TlsSource {
    Fixed(ClientTls),
    /// Read again before every connection attempt, so rotated credentials (a Secret update)
    /// take effect at the next reconnect.
    Files {
        files: TlsFiles,
        server_name: String,
    },
}

/// Follows the controller for one node.
#[derive(Clone, Debug)]
pub struct WatchLoop {
    endpoints: Endpoints,
    tls: TlsSource,
    node: String,
    backoff: Backoff,
    capacities: Option<MapCapacities>,
}

impl WatchLoop {
    pub fn new(endpoints: impl Into<Endpoints>, tls: ClientTls, node: impl Into<String>) -> Self {
        Self {
            endpoints: endpoints.into(),
            tls: TlsSource::Fixed(tls),
            node: node.into(),
            backoff: Backoff::default(),
            capacities: None,
        }
    }

    /// Like [`Self::new`], reading the credentials from `files` at every connection attempt.
    pub fn from_files(
        endpoints: impl Into<Endpoints>,
        files: TlsFiles,
        server_name: impl Into<String>,
        node: impl Into<String>,
    ) -> Self {
        Self {
            endpoints: endpoints.into(),
            tls: TlsSource::Files {
                files,
                server_name: server_name.into(),
            },
            node: node.into(),
            backoff: Backoff::default(),
            capacities: None,
        }
    }

    pub fn with_backoff(mut self, backoff: Backoff) -> Self {
        self.backoff = backoff;
        self
    }

    /// Reports these dataplane table sizes on every stream, so the controller checks the
    /// node's state against them.
    pub fn with_capacities(mut self, capacities: MapCapacities) -> Self {
        self.capacities = Some(capacities);
        self
    }

    /// Runs until dropped: connect, watch, apply, report; on any failure wait and start over.
    pub async fn run<S: StateSink>(self, sink: &mut S) -> Infallible {
        let mut tracker = NodeStateTracker::new();
        // What the dataplane enforces, which lags `tracker` when applying failed.
        let mut enforced: Option<StateVersion> = None;
        let mut failures = 0u32;
        loop {
            match self.session(&mut tracker, &mut enforced, sink).await {
                Ok(progressed) => {
                    tracing::info!(node = self.node, "controller stream ended");
                    if progressed {
                        failures = 0;
                    }
                }
                Err(SessionError { progressed, error }) => {
                    tracing::warn!(node = self.node, %error, "following the controller failed");
                    if progressed {
                        failures = 0;
                    }
                }
            }
            let delay = self.backoff.delay(failures);
            failures = failures.saturating_add(1);
            tokio::time::sleep(delay).await;
        }
    }

    fn client_tls(&self) -> Result<ClientTls, TransportError> {
        match &self.tls {
            TlsSource::Fixed(tls) => Ok(tls.clone()),
            TlsSource::Files { files, server_name } => Ok(ClientTls::load(files, server_name)?),
        }
    }

    /// One connection. Ok(progressed) when the stream ended cleanly; progressed tells whether
    /// at least one update arrived (which resets the backoff).
    async fn session<S: StateSink>(
        &self,
        tracker: &mut NodeStateTracker,
        enforced: &mut Option<StateVersion>,
        sink: &mut S,
    ) -> Result<bool, SessionError> {
        let mut progressed = false;
        let fail = |progressed, error| SessionError { progressed, error };
        let tls = self.client_tls().map_err(|e| fail(false, e))?;
        let (endpoint, client) = self
            .endpoints
            .connect(&tls)
            .await
            .map_err(|e| fail(false, e))?;
        let mut updates = client
            .watch_with(&self.node, tracker.have(), self.capacities.as_ref())
            .await
            .map_err(|e| fail(false, e))?;
        tracing::info!(node = self.node, endpoint, "following the controller");
        while let Some(update) = updates.next().await {
            let update = update.map_err(|e| fail(progressed, e))?;
            progressed = true;
            let (at, applied) = match tracker.apply(update) {
                Ok(applied) => applied,
                Err(e) => {
                    tracker.forget_version();
                    return Err(fail(progressed, TransportError::OutOfSync(e)));
                }
            };
            let change = match applied {
                Applied::Unchanged if *enforced == Some(at) => None,
                // The marker matched the tracker but the dataplane never got this state.
                Applied::Unchanged => Some(Applied::Snapshot),
                change => Some(change),
            };
            let report = match change {
                None => AgentReport {
                    applied: Some(at),
                    ready: true,
                    message: String::new(),
                },
                Some(change) => match sink.apply(at, &change, tracker.state()).await {
                    Ok(()) => {
                        *enforced = Some(at);
                        AgentReport {
                            applied: Some(at),
                            ready: true,
                            message: String::new(),
                        }
                    }
                    Err(e) => {
                        tracker.forget_version();
                        let report = AgentReport {
                            applied: *enforced,
                            ready: false,
                            message: format!("applying {at}: {e}"),
                        };
                        self.report(&client, &report).await;
                        return Err(fail(
                            progressed,
                            TransportError::Apply {
                                at,
                                message: e.to_string(),
                            },
                        ));
                    }
                },
            };
            self.report(&client, &report).await;
        }
        Ok(progressed)
    }

    /// Reports without failing the session: a lost report is repeated after the next update
    /// or reconnect, and the stream matters more.
    async fn report(&self, client: &Client, report: &AgentReport) {
        if let Err(e) = client.report(&self.node, report).await {
            tracing::warn!(node = self.node, error = %e, "reporting status failed");
        }
    }
}

struct SessionError {
    progressed: bool,
    error: TransportError,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_cap_and_keeps_at_least_half() {
        let b = Backoff {
            initial: Duration::from_millis(100),
            max: Duration::from_secs(2),
        };
        for (failures, full) in [(0, 100), (1, 200), (3, 800), (5, 2000), (40, 2000)] {
            let full = Duration::from_millis(full);
            for _ in 0..20 {
                let d = b.delay(failures);
                assert!(d >= full / 2 && d <= full, "{failures}: {d:?} vs {full:?}");
            }
        }
    }
}
