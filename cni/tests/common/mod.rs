//! A fake agent for the integration tests: `weir_cni::server::serve` on a socket in a
//! fresh temporary directory, with a handler that records every request.
#![allow(dead_code, reason = "each test binary uses a different subset")]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::UnixListener;
use tokio::task::JoinHandle;
use weir_cni::protocol::{AddRequest, CheckRequest, DelRequest, GcRequest, Request, StatusRequest};
use weir_cni::server::{CniHandler, serve};
use weir_cni::spec::{CniError, CniResult, Dns, Interface, IpConfig, Route};

/// The container id for which the fake agent panics in `ADD`.
pub const PANICKING_CONTAINER: &str = "panic-in-add";
/// The container id for which the fake agent takes [`SLOW_ADD`] in `ADD`.
pub const SLOW_CONTAINER: &str = "slow-add";
/// How long a slow `ADD` takes.
pub const SLOW_ADD: Duration = Duration::from_millis(1500);
/// The container id for which the fake agent answers `DEL` with code 3.
pub const VANISHED_CONTAINER: &str = "vanished";
/// The error code the fake agent uses when `CHECK` finds a mismatch.
pub const CHECK_MISMATCH: u32 = 101;

/// Records requests and keeps the attachments it added, like a tiny agent would.
#[derive(Default)]
pub struct RecordingAgent {
    pub requests: Mutex<Vec<Request>>,
    pub attachments: Mutex<HashMap<(String, String), CniResult>>,
    /// What `STATUS` answers; `Ok` when unset.
    pub status_error: Mutex<Option<CniError>>,
    pub completed_adds: AtomicUsize,
    next_host: AtomicUsize,
}

impl RecordingAgent {
    pub fn requests(&self) -> Vec<Request> {
        self.requests.lock().unwrap().clone()
    }

    pub fn attachment_keys(&self) -> Vec<(String, String)> {
        let mut keys: Vec<_> = self.attachments.lock().unwrap().keys().cloned().collect();
        keys.sort();
        keys
    }

    fn record(&self, request: Request) {
        self.requests.lock().unwrap().push(request);
    }

    fn result_for(&self, request: &AddRequest) -> CniResult {
        let host = self.next_host.fetch_add(1, Ordering::SeqCst) + 2;
        CniResult {
            interfaces: vec![
                Interface {
                    name: format!("weir{host}"),
                    mac: Some("0a:58:0a:f4:01:01".into()),
                    mtu: Some(1450),
                    ..Interface::default()
                },
                Interface {
                    name: request.ifname.clone(),
                    mac: Some("0a:58:0a:f4:01:02".into()),
                    mtu: Some(1450),
                    sandbox: Some(request.netns.display().to_string()),
                    ..Interface::default()
                },
            ],
            ips: vec![
                IpConfig {
                    address: format!("10.244.1.{host}/24").parse().unwrap(),
                    gateway: Some("169.254.1.1".parse().unwrap()),
                    interface: Some(1),
                },
                IpConfig {
                    address: format!("fd00:10:244:1::{host:x}/80").parse().unwrap(),
                    gateway: None,
                    interface: Some(1),
                },
            ],
            routes: vec![Route {
                mtu: Some(1450),
                ..Route::new("0.0.0.0/0".parse().unwrap(), "169.254.1.1".parse().ok())
            }],
            dns: Dns {
                nameservers: vec!["10.96.0.10".into()],
                search: vec!["default.svc.cluster.local".into()],
                ..Dns::default()
            },
        }
    }
}

impl CniHandler for RecordingAgent {
    async fn add(&self, request: AddRequest) -> Result<CniResult, CniError> {
        self.record(Request::Add(request.clone()));
        if request.container_id == PANICKING_CONTAINER {
            panic!("veth setup exploded for {}", request.container_id);
        }
        if request.container_id == SLOW_CONTAINER {
            tokio::time::sleep(SLOW_ADD).await;
        }
        let result = self.result_for(&request);
        self.attachments
            .lock()
            .unwrap()
            .insert((request.container_id, request.ifname), result.clone());
        self.completed_adds.fetch_add(1, Ordering::SeqCst);
        Ok(result)
    }

    async fn del(&self, request: DelRequest) -> Result<(), CniError> {
        self.record(Request::Del(request.clone()));
        if request.container_id == VANISHED_CONTAINER {
            return Err(CniError::unknown_container("no such container"));
        }
        // Unknown attachments are fine: DEL is idempotent.
        self.attachments
            .lock()
            .unwrap()
            .remove(&(request.container_id, request.ifname));
        Ok(())
    }

    async fn check(&self, request: CheckRequest) -> Result<(), CniError> {
        self.record(Request::Check(request.clone()));
        let attachments = self.attachments.lock().unwrap();
        match attachments.get(&(request.container_id.clone(), request.ifname.clone())) {
            Some(added) if added.ips == request.prev_result.ips => Ok(()),
            Some(_) => Err(CniError::new(
                CHECK_MISMATCH,
                "addresses differ from prevResult",
            )),
            None => Err(CniError::unknown_container(format!(
                "{} is not attached",
                request.container_id
            ))),
        }
    }

    async fn status(&self, request: StatusRequest) -> Result<(), CniError> {
        self.record(Request::Status(request));
        match self.status_error.lock().unwrap().clone() {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        self.record(Request::Gc(request.clone()));
        let valid: Vec<(String, String)> = request
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        self.attachments
            .lock()
            .unwrap()
            .retain(|key, _| valid.contains(key));
        Ok(())
    }
}

/// A running fake agent; stops serving when dropped.
pub struct FakeAgent {
    pub handler: Arc<RecordingAgent>,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
    task: JoinHandle<()>,
}

impl FakeAgent {
    pub async fn start() -> FakeAgent {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("cni.sock");
        let listener = UnixListener::bind(&socket).unwrap();
        let handler = Arc::new(RecordingAgent::default());
        let task = tokio::spawn({
            let handler = Arc::clone(&handler);
            async move {
                let _stopped = serve(listener, handler).await;
            }
        });
        FakeAgent {
            handler,
            socket,
            _dir: dir,
            task,
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for FakeAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Asserts a CNI error code with a readable failure message.
pub fn assert_code(error: &CniError, expected: u32) {
    assert_eq!(error.code, expected, "unexpected error: {error}");
}
