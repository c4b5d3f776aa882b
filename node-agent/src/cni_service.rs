//! The agent's side of the CNI plugin protocol: each command becomes a call on the
//! [`Agent`], and every failure a CNI error with a code the runtime understands.

use std::{net::IpAddr, sync::Arc, time::Duration};

use ipnet::IpNet;
use tokio::sync::Mutex;
use tracing::warn;
use weir_api::PodKey;
use weir_cni::{
    protocol::{AddRequest, CheckRequest, DelRequest, GcRequest, StatusRequest},
    server::CniHandler,
    spec::{CniError, CniResult, Interface, IpConfig, Route},
};

use crate::agent::{Agent, AgentError, Attach, PendingPodPolicy};

pub struct CniService {
    agent: Arc<Mutex<Agent>>,
    policy_wait: Duration,
}

impl CniService {
    pub fn new(agent: Arc<Mutex<Agent>>) -> Self {
        Self {
            agent,
            policy_wait: Duration::ZERO,
        }
    }

    /// ADD returns once the controller's state names the new pod's policies, or after `wait`:
    /// the pod's containers start only after ADD, so in the common case they never run
    /// before the policies selecting them are enforced. After `wait` (the controller away or
    /// behind) the pod starts with the node's pending pod policy (denied both ways, or
    /// unisolated) and gets its policies when the state arrives, as kubelet would otherwise
    /// retry the sandbox forever. Zero: no wait (no controller).
    pub fn with_policy_wait(mut self, wait: Duration) -> Self {
        self.policy_wait = wait;
        self
    }

    async fn wait_for_policy(&self, pod: &PodKey) {
        let mut updates = self.agent.lock().await.policy_updates();
        let deadline = tokio::time::Instant::now() + self.policy_wait;
        loop {
            updates.borrow_and_update();
            if self.agent.lock().await.has_policy_for(pod) {
                return;
            }
            match tokio::time::timeout_at(deadline, updates.changed()).await {
                Ok(Ok(())) => {}
                _ => {
                    let mut agent = self.agent.lock().await;
                    agent.count_pod_started_before_policy();
                    match agent.config().pending_pod_policy {
                        PendingPodPolicy::Deny => warn!(
                            %pod,
                            waited = ?self.policy_wait,
                            "the controller has not sent this pod's policies: it starts with \
                             every new flow to and from it denied, until they arrive"
                        ),
                        PendingPodPolicy::Allow => warn!(
                            %pod,
                            waited = ?self.policy_wait,
                            "the controller has not sent this pod's policies: it starts \
                             unisolated and is isolated as soon as they arrive"
                        ),
                    }
                    return;
                }
            }
        }
    }
}

/// The error and its causes, outermost first: the `details` of a CNI error.
fn chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        out.push_str(": ");
        out.push_str(&c.to_string());
        cur = c.source();
    }
    out
}

fn to_cni(e: AgentError) -> CniError {
    let details = chain(&e);
    match e {
        AgentError::NoNetns(path) => CniError::new(
            weir_cni::spec::code::INVALID_NETNS,
            format!("network namespace {path} does not exist"),
        ),
        AgentError::Ipam(_) => CniError::internal("no pod address could be allocated on this node"),
        AgentError::NoPodCidr => CniError::try_again_later("this node has no pod CIDR yet"),
        AgentError::HostPort(ref e) => CniError::internal(e.to_string()),
        _ => CniError::internal("the weir agent could not complete the request"),
    }
    .with_details(details)
}

fn pod_of(args: &weir_cni::spec::CniArgs) -> Option<PodKey> {
    match (&args.k8s_pod_namespace, &args.k8s_pod_name) {
        (Some(ns), Some(name)) => Some(PodKey::new(ns.clone(), name.clone())),
        _ => None,
    }
}

fn host_prefix(ip: IpAddr) -> IpNet {
    IpNet::new(ip, if ip.is_ipv4() { 32 } else { 128 }).expect("full-length prefix is valid")
}

/// The CNI result's addresses (each with its family's gateway, on the pod's interface) and
/// one default route per family, in the order of the pod's addresses.
fn addresses_and_routes(pod_ips: &[IpAddr]) -> (Vec<IpConfig>, Vec<Route>) {
    let ips = pod_ips
        .iter()
        .map(|ip| IpConfig {
            address: host_prefix(*ip),
            gateway: Some(crate::podnet::gateway_for(*ip)),
            interface: Some(1),
        })
        .collect();
    let mut routes: Vec<Route> = Vec::new();
    for ip in pod_ips {
        let dst = crate::podnet::default_route_for(*ip);
        if !routes.iter().any(|r| r.dst == dst) {
            routes.push(Route::new(dst, Some(crate::podnet::gateway_for(*ip))));
        }
    }
    (ips, routes)
}

fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

impl CniHandler for CniService {
    async fn add(&self, request: AddRequest) -> Result<CniResult, CniError> {
        let attach = Attach {
            container_id: request.container_id.clone(),
            ifname: request.ifname.clone(),
            netns: request.netns.clone(),
            pod: pod_of(&request.args),
            port_mappings: request.port_mappings.clone(),
        };
        let pod = attach.pod.clone();
        let attached = self.agent.lock().await.add(attach).await.map_err(to_cni)?;
        if let Some(pod) = &pod
            && !self.policy_wait.is_zero()
        {
            self.wait_for_policy(pod).await;
        }
        let ep = &attached.endpoint;
        let interfaces = vec![
            Interface {
                name: ep.interface.host_ifname.clone(),
                mac: Some(mac_string(ep.interface.host_mac)),
                ..Interface::default()
            },
            Interface {
                name: ep.ifname.clone(),
                mac: Some(mac_string(ep.interface.pod_mac)),
                mtu: Some(ep.mtu),
                sandbox: Some(ep.netns.display().to_string()),
                ..Interface::default()
            },
        ];
        let (ips, routes) = addresses_and_routes(&ep.ips);
        Ok(CniResult {
            interfaces,
            ips,
            routes,
            ..CniResult::default()
        })
    }

    async fn del(&self, request: DelRequest) -> Result<(), CniError> {
        self.agent
            .lock()
            .await
            .del(&request.container_id, &request.ifname)
            .await
            .map_err(to_cni)
    }

    async fn check(&self, request: CheckRequest) -> Result<(), CniError> {
        let ep = self
            .agent
            .lock()
            .await
            .check(&request.container_id, &request.ifname, &request.netns)
            .await
            .map_err(|e| match e {
                AgentError::Check(msg) if msg.starts_with("no attachment") => {
                    CniError::unknown_container(msg)
                }
                AgentError::Check(msg) => {
                    CniError::internal("the pod's network is not as ADD left it").with_details(msg)
                }
                other => to_cni(other),
            })?;
        // The runtime's record of ADD must match what the agent built.
        let expected: Vec<IpAddr> = request
            .prev_result
            .ips
            .iter()
            .map(|c| c.address.addr())
            .collect();
        for ip in &expected {
            if !ep.ips.contains(ip) {
                return Err(
                    CniError::internal("prevResult does not match the attachment")
                        .with_details(format!("prevResult has {ip}, the pod has {:?}", ep.ips)),
                );
            }
        }
        Ok(())
    }

    async fn status(&self, _request: StatusRequest) -> Result<(), CniError> {
        // The socket is only served once the dataplane is loaded and pods re-adopted; ADD can
        // be served once the node's pod CIDR is known.
        if self.agent.lock().await.ready() {
            Ok(())
        } else {
            Err(CniError::plugin_not_available(
                "the weir agent is waiting for this node's pod CIDR from the controller",
            ))
        }
    }

    async fn gc(&self, request: GcRequest) -> Result<(), CniError> {
        let valid: Vec<(String, String)> = request
            .valid_attachments
            .iter()
            .map(|a| (a.container_id.clone(), a.ifname.clone()))
            .collect();
        self.agent
            .lock()
            .await
            .gc(&valid)
            .await
            .map(|_| ())
            .map_err(to_cni)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(pod_ips: &[&str]) -> serde_json::Value {
        let ips: Vec<IpAddr> = pod_ips.iter().map(|i| i.parse().unwrap()).collect();
        let (ips, routes) = addresses_and_routes(&ips);
        serde_json::to_value(CniResult {
            ips,
            routes,
            ..CniResult::default()
        })
        .unwrap()
    }

    #[test]
    fn a_dual_stack_result_has_both_addresses_and_both_default_routes() {
        let r = render(&["10.244.0.5", "fd00:10:244::5"]);
        assert_eq!(
            r["ips"],
            serde_json::json!([
                {"address": "10.244.0.5/32", "gateway": "169.254.1.1", "interface": 1},
                {"address": "fd00:10:244::5/128", "gateway": "fe80::1", "interface": 1},
            ])
        );
        assert_eq!(
            r["routes"],
            serde_json::json!([
                {"dst": "0.0.0.0/0", "gw": "169.254.1.1"},
                {"dst": "::/0", "gw": "fe80::1"},
            ])
        );
    }

    #[test]
    fn single_family_results_have_that_family_only() {
        let v6 = render(&["fd00:10:244::5"]);
        assert_eq!(
            v6["routes"],
            serde_json::json!([{"dst": "::/0", "gw": "fe80::1"}])
        );
        assert_eq!(v6["ips"].as_array().unwrap().len(), 1);
        let v4 = render(&["10.244.0.5"]);
        assert_eq!(
            v4["routes"],
            serde_json::json!([{"dst": "0.0.0.0/0", "gw": "169.254.1.1"}])
        );
    }
}
