//! The messages of a `Watch` stream as Rust values, and the agent-side bookkeeping that turns
//! them back into a [`NodeState`].

use std::fmt;

use weir_api::{NodeState, NodeStateDiff};

use crate::{
    convert::ProtoError,
    pb::{self, node_update, snapshot},
};

/// Which state an agent holds: a version of one publisher epoch.
///
/// Versions are only comparable within an epoch. A controller that restarts (or a new leader)
/// starts a new epoch, so an agent whose `(epoch, version)` matches the controller's can trust
/// that it holds exactly the state the controller means, and anything else needs a resync.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct StateVersion {
    pub epoch: u64,
    pub version: u64,
}

impl fmt::Display for StateVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "version {} of epoch {:016x}", self.version, self.epoch)
    }
}

/// One message of a `Watch` stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NodeUpdate {
    /// The full state: the first message of a stream (unless [`NodeUpdate::Unchanged`]).
    Snapshot { at: StateVersion, state: NodeState },
    /// First message of a stream whose `WatchRequest` named the current epoch and version:
    /// the agent's state is current and nothing is resent.
    Unchanged { at: StateVersion },
    /// Changes from the version this stream sent last to a newer one. Intermediate versions
    /// the stream skipped (a slow reader) are folded into one diff.
    Diff(NodeStateDiff),
}

impl From<NodeUpdate> for pb::NodeUpdate {
    fn from(update: NodeUpdate) -> Self {
        let update = match update {
            NodeUpdate::Snapshot { at, state } => node_update::Update::Snapshot(pb::Snapshot {
                epoch: at.epoch,
                version: at.version,
                content: Some(snapshot::Content::State((&state).into())),
            }),
            NodeUpdate::Unchanged { at } => node_update::Update::Snapshot(pb::Snapshot {
                epoch: at.epoch,
                version: at.version,
                content: Some(snapshot::Content::Unchanged(pb::Unchanged {})),
            }),
            NodeUpdate::Diff(diff) => node_update::Update::Diff((&diff).into()),
        };
        Self {
            update: Some(update),
        }
    }
}

impl TryFrom<pb::NodeUpdate> for NodeUpdate {
    type Error = ProtoError;

    fn try_from(update: pb::NodeUpdate) -> Result<Self, ProtoError> {
        match update.update.ok_or(ProtoError::EmptyUpdate)? {
            node_update::Update::Snapshot(s) => {
                let at = StateVersion {
                    epoch: s.epoch,
                    version: s.version,
                };
                match s.content.ok_or(ProtoError::EmptySnapshot)? {
                    snapshot::Content::State(state) => Ok(Self::Snapshot {
                        at,
                        state: state.try_into()?,
                    }),
                    snapshot::Content::Unchanged(pb::Unchanged {}) => Ok(Self::Unchanged { at }),
                }
            }
            node_update::Update::Diff(diff) => Ok(Self::Diff(diff.try_into()?)),
        }
    }
}

/// An update that does not fit the state it should apply to: the stream and the agent
/// disagree, and only a fresh stream (which starts with a snapshot) can fix that.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SyncError {
    #[error("received a diff before any snapshot")]
    DiffBeforeSnapshot,
    #[error("received a diff from version {from_version} but hold {have}")]
    DiffFromOtherVersion {
        have: StateVersion,
        from_version: u64,
    },
    #[error("controller says {at} is unchanged, but this agent holds {have:?}")]
    UnchangedButNotHeld {
        at: StateVersion,
        have: Option<StateVersion>,
    },
}

/// What [`NodeStateTracker::apply`] changed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[expect(
    clippy::large_enum_variant,
    reason = "one value per received update, moved rather than copied; a Box buys nothing"
)]
pub enum Applied {
    /// The state was replaced as a whole.
    Snapshot,
    /// The state was already current.
    Unchanged,
    /// The state changed by this diff.
    Diff(NodeStateDiff),
}

/// The agent's copy of its node's state, kept in step with a `Watch` stream.
#[derive(Clone, Debug, Default)]
pub struct NodeStateTracker {
    have: Option<StateVersion>,
    state: NodeState,
}

impl NodeStateTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The version held, None before the first snapshot or after [`Self::forget_version`].
    pub fn have(&self) -> Option<StateVersion> {
        self.have
    }

    pub fn state(&self) -> &NodeState {
        &self.state
    }

    /// Keeps the state but stops claiming a version, so the next stream starts with a full
    /// snapshot (used when applying the state to the dataplane failed half-way).
    pub fn forget_version(&mut self) {
        self.have = None;
    }

    /// Applies one stream message and returns the version now held. On error the tracker is
    /// unchanged.
    pub fn apply(&mut self, update: NodeUpdate) -> Result<(StateVersion, Applied), SyncError> {
        match update {
            NodeUpdate::Snapshot { at, state } => {
                self.have = Some(at);
                self.state = state;
                Ok((at, Applied::Snapshot))
            }
            NodeUpdate::Unchanged { at } => {
                if self.have == Some(at) {
                    Ok((at, Applied::Unchanged))
                } else {
                    Err(SyncError::UnchangedButNotHeld {
                        at,
                        have: self.have,
                    })
                }
            }
            NodeUpdate::Diff(diff) => {
                let have = self.have.ok_or(SyncError::DiffBeforeSnapshot)?;
                if diff.from_version != have.version {
                    return Err(SyncError::DiffFromOtherVersion {
                        have,
                        from_version: diff.from_version,
                    });
                }
                self.state.apply(&diff);
                let at = StateVersion {
                    epoch: have.epoch,
                    version: diff.to_version,
                };
                self.have = Some(at);
                Ok((at, Applied::Diff(diff)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use weir_api::{EndpointPolicy, PodKey};

    use super::*;

    fn state(pods: &[&str]) -> NodeState {
        let mut s = NodeState::default();
        for p in pods {
            s.endpoints.insert(
                PodKey::new("default", *p),
                EndpointPolicy {
                    ingress: 1,
                    egress: 0,
                },
            );
        }
        s
    }

    const EPOCH: u64 = 0xfeed;

    fn at(version: u64) -> StateVersion {
        StateVersion {
            epoch: EPOCH,
            version,
        }
    }

    #[test]
    fn snapshot_then_diff_reaches_the_new_state() {
        let mut t = NodeStateTracker::new();
        let (v1, v2) = (state(&["a", "b"]), state(&["b", "c"]));
        t.apply(NodeUpdate::Snapshot {
            at: at(1),
            state: v1.clone(),
        })
        .unwrap();
        let applied = t.apply(NodeUpdate::Diff(v1.diff(&v2, 1, 5))).unwrap();
        assert!(matches!(applied, (at, Applied::Diff(d)) if d.len() == 2 && at.version == 5));
        assert_eq!(t.state(), &v2);
        assert_eq!(t.have(), Some(at(5)));
    }

    #[test]
    fn diff_before_snapshot_is_refused() {
        let mut t = NodeStateTracker::new();
        let err = t
            .apply(NodeUpdate::Diff(NodeStateDiff::default()))
            .unwrap_err();
        assert_eq!(err, SyncError::DiffBeforeSnapshot);
    }

    #[test]
    fn diff_from_a_version_not_held_is_refused_and_changes_nothing() {
        let mut t = NodeStateTracker::new();
        t.apply(NodeUpdate::Snapshot {
            at: at(3),
            state: state(&["a"]),
        })
        .unwrap();
        let err = t
            .apply(NodeUpdate::Diff(state(&["a"]).diff(&state(&[]), 2, 4)))
            .unwrap_err();
        assert_eq!(
            err,
            SyncError::DiffFromOtherVersion {
                have: at(3),
                from_version: 2
            }
        );
        assert_eq!(t.state(), &state(&["a"]));
        assert_eq!(t.have(), Some(at(3)));
    }

    #[test]
    fn unchanged_marker_for_another_epoch_is_refused() {
        let mut t = NodeStateTracker::new();
        t.apply(NodeUpdate::Snapshot {
            at: at(3),
            state: state(&["a"]),
        })
        .unwrap();
        assert_eq!(
            t.apply(NodeUpdate::Unchanged { at: at(3) }).unwrap(),
            (at(3), Applied::Unchanged)
        );
        let other = StateVersion {
            epoch: EPOCH + 1,
            version: 3,
        };
        assert!(t.apply(NodeUpdate::Unchanged { at: other }).is_err());
        t.forget_version();
        assert!(t.apply(NodeUpdate::Unchanged { at: at(3) }).is_err());
    }

    #[test]
    fn updates_survive_the_wire() {
        let updates = [
            NodeUpdate::Snapshot {
                at: at(1),
                state: state(&["a"]),
            },
            NodeUpdate::Unchanged { at: at(9) },
            NodeUpdate::Diff(state(&["a"]).diff(&state(&["b"]), 1, 2)),
        ];
        for u in updates {
            let wire = pb::NodeUpdate::from(u.clone());
            assert_eq!(NodeUpdate::try_from(wire).unwrap(), u);
        }
    }

    #[test]
    fn empty_update_and_empty_snapshot_are_rejected() {
        assert_eq!(
            NodeUpdate::try_from(pb::NodeUpdate { update: None }).unwrap_err(),
            ProtoError::EmptyUpdate
        );
        let empty = pb::NodeUpdate {
            update: Some(node_update::Update::Snapshot(pb::Snapshot {
                epoch: 1,
                version: 1,
                content: None,
            })),
        };
        assert_eq!(
            NodeUpdate::try_from(empty).unwrap_err(),
            ProtoError::EmptySnapshot
        );
    }
}
