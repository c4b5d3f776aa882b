//! Fixtures: a PKI, a controller on a loopback port, an agent sink that records what it
//! applied, and a TCP proxy whose connections can be cut.

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use proptest::{
    strategy::{Strategy, ValueTree},
    test_runner::TestRunner,
};
use tokio::{
    net::{TcpListener, TcpStream},
    sync::{oneshot, watch},
    task::JoinHandle,
};
use weir_api::{NodeState, NodeStateDiff};
use weir_transport::{
    Applied, Bootstrap, ClientTls, ClusterCa, NodeStateServer, ServerTls, StatePublisher,
    StateSink, StateVersion, TransportError,
};

/// Generous bound for anything that should happen "soon" on a loaded 2-core machine.
pub const SOON: Duration = Duration::from_secs(20);

/// The name agents expect on the controller's certificate.
pub const SERVER_NAME: &str = "localhost";

pub async fn soon<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(SOON, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

pub struct Pki {
    pub ca: Arc<ClusterCa>,
    pub server: ServerTls,
}

impl Pki {
    pub fn new() -> Self {
        Self::with_ca_name("weir test CA")
    }

    pub fn with_ca_name(name: &str) -> Self {
        let ca = ClusterCa::generate(name).expect("generate CA");
        let cert = ca
            .issue_controller_cert(
                &[SERVER_NAME],
                &["127.0.0.1".parse().unwrap(), "::1".parse().unwrap()],
            )
            .expect("issue controller certificate");
        let server =
            ServerTls::from_pem(ca.cert_pem(), &cert.cert_pem, &cert.key_pem).expect("server TLS");
        Self {
            ca: Arc::new(ca),
            server,
        }
    }

    /// TLS for the agent of `node`, with a certificate issued by this CA.
    pub fn agent(&self, node: &str) -> ClientTls {
        let cert = self
            .ca
            .issue_node_cert(node)
            .expect("issue node certificate");
        self.anonymous()
            .with_identity(&cert.cert_pem, &cert.key_pem)
            .expect("client identity")
    }

    /// TLS that trusts this CA but presents no certificate.
    pub fn anonymous(&self) -> ClientTls {
        ClientTls::new(self.ca.cert_pem(), SERVER_NAME).expect("client TLS")
    }
}

pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), TransportError>>,
}

impl TestServer {
    pub async fn start(
        publisher: &StatePublisher,
        tls: &ServerTls,
        bootstrap: Option<Bootstrap>,
    ) -> Self {
        Self::start_on("127.0.0.1:0".parse().unwrap(), publisher, tls, bootstrap).await
    }

    pub async fn start_on(
        addr: SocketAddr,
        publisher: &StatePublisher,
        tls: &ServerTls,
        bootstrap: Option<Bootstrap>,
    ) -> Self {
        let listener = TcpListener::bind(addr).await.expect("bind loopback");
        let addr = listener.local_addr().unwrap();
        let mut server = NodeStateServer::new(publisher.clone());
        if let Some(bootstrap) = bootstrap {
            server = server.with_bootstrap(bootstrap);
        }
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(server.serve(listener, tls.clone(), async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Graceful stop: streams end, the listener closes.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let task = &mut self.task;
        soon("the server to stop", task)
            .await
            .expect("server task")
            .expect("server ends without error");
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// What the recording sink has applied so far.
#[derive(Clone, Debug, Default)]
pub struct AgentView {
    pub at: Option<StateVersion>,
    pub state: NodeState,
    pub snapshots: usize,
    pub diffs: Vec<NodeStateDiff>,
}

/// A [`StateSink`] that records into a watch channel, optionally failing on request.
pub struct RecordingSink {
    view: watch::Sender<AgentView>,
    pub fail_next: Arc<Mutex<Option<String>>>,
}

impl RecordingSink {
    pub fn new() -> (Self, watch::Receiver<AgentView>) {
        let (tx, rx) = watch::channel(AgentView::default());
        (
            Self {
                view: tx,
                fail_next: Arc::default(),
            },
            rx,
        )
    }
}

impl StateSink for RecordingSink {
    type Error = String;

    async fn apply(
        &mut self,
        at: StateVersion,
        change: &Applied,
        state: &NodeState,
    ) -> Result<(), String> {
        if let Some(reason) = self.fail_next.lock().unwrap().take() {
            return Err(reason);
        }
        self.view.send_modify(|view| {
            view.at = Some(at);
            view.state = state.clone();
            match change {
                Applied::Snapshot => view.snapshots += 1,
                Applied::Diff(diff) => view.diffs.push(diff.clone()),
                Applied::Unchanged => panic!("the loop never passes Unchanged to the sink"),
            }
        });
        Ok(())
    }
}

/// Waits until the agent view holds `version` and returns it.
pub async fn wait_for_version(view: &mut watch::Receiver<AgentView>, version: u64) -> AgentView {
    soon(&format!("the agent to apply version {version}"), async {
        view.wait_for(|v| v.at.is_some_and(|at| at.version == version))
            .await
            .expect("sink alive")
            .clone()
    })
    .await
}

/// `n` random node states, the same on every run.
pub fn random_states(n: usize) -> Vec<NodeState> {
    let mut runner = TestRunner::deterministic();
    let strategy = crate::arb::arb_node_state();
    (0..n)
        .map(|_| strategy.new_tree(&mut runner).expect("generate").current())
        .collect()
}

/// A TCP forwarder on loopback whose open connections can be cut, to break streams while
/// the controller stays up.
pub struct Proxy {
    pub addr: SocketAddr,
    connections: Arc<Mutex<Vec<JoinHandle<()>>>>,
    accept: JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().unwrap();
        let connections: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let conns = connections.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let conn = tokio::spawn(async move {
                    if let Ok(mut outbound) = TcpStream::connect(target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                conns.lock().unwrap().push(conn);
            }
        });
        Self {
            addr,
            connections,
            accept,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// Closes every connection forwarded so far (both sides see the socket close).
    pub fn cut_connections(&self) -> usize {
        let conns = std::mem::take(&mut *self.connections.lock().unwrap());
        for c in &conns {
            c.abort();
        }
        conns.len()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.accept.abort();
        self.cut_connections();
    }
}
