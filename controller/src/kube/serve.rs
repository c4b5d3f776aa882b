//! Serving agents only while leading, and steering the Service to the leader.
//!
//! # How agents reach the leader
//!
//! Agents dial one Service, `weir-controller`. It has no selector: its only endpoints are
//! the ones of the EndpointSlice [`LEADER_SLICE`], which the leader writes with its own
//! address (labels `kubernetes.io/service-name` and `endpointslice.kubernetes.io/managed-by:`
//! [`SLICE_MANAGER`], so Kubernetes' EndpointSlice controller leaves it alone):
//!
//! * on becoming leader, a replica starts listening and writes the slice by server-side apply
//!   (forced, so it takes the fields over from a former leader), retrying with backoff for
//!   as long as its term lasts if the API server refuses;
//! * on losing the lease (or shutting down), it stops listening at once — open `Watch`
//!   streams end with `UNAVAILABLE`, and new connections are refused — and stops writing
//!   the slice. The slice keeps the former address until the next leader overwrites it;
//!   agents dialing it in between are refused and retry.
//!
//! The controller needs no write access to pods (the agents' pods are privileged; a
//! controller that may patch pods of its namespace could change them): only to this one
//! EndpointSlice. Agents reconnect with backoff and land on the new leader as soon as the
//! slice names it. Readiness does not reflect leadership, so followers are Ready and
//! rolling updates of the Deployment proceed normally.
//!
//! Without its own address (`--pod-ip`, when running outside the cluster) no slice is
//! written.

use std::{net::IpAddr, net::SocketAddr, time::Duration};

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
};
use tokio::net::TcpListener;
use tracing::{info, warn};
use weir_transport::{NodeStateServer, ServerTls};

use crate::leader::Leadership;

/// The EndpointSlice the leader writes: the agents' Service's only endpoints.
pub const LEADER_SLICE: &str = "weir-controller-leader";
/// `endpointslice.kubernetes.io/managed-by` of [`LEADER_SLICE`], and the field manager of
/// its server-side apply.
pub const SLICE_MANAGER: &str = "weir.dev/controller";

/// Where agents should connect while this replica leads: the EndpointSlice [`LEADER_SLICE`]
/// of a selectorless Service, holding this replica's address.
#[derive(Clone, Debug)]
pub struct LeaderEndpointSlice {
    slices: Api<EndpointSlice>,
    service: String,
    address: IpAddr,
    port: u16,
    port_name: String,
    pod: Option<String>,
    namespace: String,
}

impl LeaderEndpointSlice {
    /// The slice of `service` (in `namespace`) naming `address:port` under the port name
    /// `port_name` (the Service's port name).
    pub fn new(
        client: Client,
        namespace: &str,
        service: impl Into<String>,
        address: IpAddr,
        port: u16,
        port_name: impl Into<String>,
    ) -> Self {
        Self {
            slices: Api::namespaced(client, namespace),
            service: service.into(),
            address,
            port,
            port_name: port_name.into(),
            pod: None,
            namespace: namespace.to_owned(),
        }
    }

    /// Names this replica's pod as the endpoint's target (informational, for `kubectl`).
    pub fn with_pod(mut self, pod: impl Into<String>) -> Self {
        self.pod = Some(pod.into());
        self
    }

    /// The slice as this replica applies it.
    pub fn desired(&self) -> serde_json::Value {
        let address_type = if self.address.is_ipv4() {
            "IPv4"
        } else {
            "IPv6"
        };
        let mut endpoint = serde_json::json!({
            "addresses": [self.address.to_string()],
            "conditions": {"ready": true, "serving": true, "terminating": false},
        });
        if let Some(pod) = &self.pod {
            endpoint["targetRef"] = serde_json::json!({
                "kind": "Pod", "namespace": self.namespace, "name": pod,
            });
        }
        serde_json::json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": LEADER_SLICE,
                "labels": {
                    "kubernetes.io/service-name": self.service,
                    "endpointslice.kubernetes.io/managed-by": SLICE_MANAGER,
                },
            },
            "addressType": address_type,
            "endpoints": [endpoint],
            "ports": [{"name": self.port_name, "port": self.port, "protocol": "TCP"}],
        })
    }

    /// Writes the slice (server-side apply, forced: a former leader's fields are taken
    /// over). Creates it if it does not exist.
    pub async fn mark(&self) -> kube::Result<()> {
        self.slices
            .patch(
                LEADER_SLICE,
                &PatchParams::apply(SLICE_MANAGER).force(),
                &Patch::Apply(self.desired()),
            )
            .await
            .map(|_| ())
    }
}

/// What serving agents needs.
#[derive(Clone, Debug)]
pub struct AgentServing {
    pub listen: SocketAddr,
    pub server: NodeStateServer,
    pub tls: ServerTls,
    /// The slice that steers agents to the leader; none outside a cluster.
    pub endpoint: Option<LeaderEndpointSlice>,
}

/// Serves agents during every leadership term; returns when the elector is gone.
pub async fn serve_agents_while_leading(serving: AgentServing, mut leadership: Leadership) {
    loop {
        if !leadership.wait_for(true).await {
            return;
        }
        let listener = match TcpListener::bind(serving.listen).await {
            Ok(l) => l,
            Err(e) => {
                warn!(listen = %serving.listen, error = %e, "cannot listen for agents; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        info!(listen = %serving.listen, "leading: serving agents");
        // Agents reach this replica only once the slice names it: keep trying for as long as
        // the term lasts.
        let marking = serving
            .endpoint
            .clone()
            .map(|slice| tokio::spawn(mark_until_done(slice, leadership.clone())));
        let mut lost = leadership.clone();
        let stop = async move {
            lost.wait_for(false).await;
        };
        if let Err(e) = serving
            .server
            .clone()
            .serve(listener, serving.tls.clone(), stop)
            .await
        {
            warn!(error = %e, "agent server failed");
        }
        info!("not leading: stopped serving agents");
        if let Some(marking) = marking {
            marking.abort();
        }
        // The slice is left as it is: the next leader overwrites it.
        // A server that failed while still leading: do not spin.
        if leadership.is_leader() {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Writes the leader's EndpointSlice, retrying with backoff (200 ms doubling to 10 s) until
/// it succeeds or the term ends.
pub async fn mark_until_done(slice: LeaderEndpointSlice, mut leadership: Leadership) {
    let mut delay = Duration::from_millis(200);
    loop {
        if !leadership.is_leader() {
            return;
        }
        match slice.mark().await {
            Ok(()) => return,
            Err(e) => warn!(
                error = %e,
                retry_in = ?delay,
                "writing the leader's EndpointSlice (agents cannot reach this replica until it succeeds)"
            ),
        }
        tokio::select! {
            () = tokio::time::sleep(delay) => {}
            _ = leadership.wait_for(false) => return,
        }
        delay = (delay * 2).min(Duration::from_secs(10));
    }
}
