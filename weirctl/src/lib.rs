//! weirctl: weir's command line. See `docs/operations.md` ("weirctl") for the commands and
//! their output.
//!
//! * [`target`]: which cluster (a local one, or Kubernetes) and how its agents and controller
//!   are reached;
//! * [`status`], [`flows`], [`trace`], [`policy`]: the commands, as functions over what the
//!   cluster answers, so that tests run them over fixed inputs;
//! * [`pinned`]: a node's policy tables read from its pinned maps;
//! * [`playground`]: manifests compiled offline by the controller's compiler.

pub mod flows;
pub mod live;
pub mod objects;
pub mod pinned;
pub mod playground;
pub mod policy;
pub mod promtext;
pub mod status;
pub mod target;
pub mod trace;
