//! Finding the controller through the API server: the ready endpoints of its Service, read
//! from the Service's EndpointSlices before every connection attempt.
//!
//! Agents normally dial the controller's ClusterIP. In a cluster without kube-proxy nothing
//! routes that ClusterIP before weir does — and weir translates Services only once its agent
//! has state from the controller — so a starting agent dials the endpoints themselves (the
//! leader's host-network address; the Service selects only the leader). The API server is
//! reached at the address the pod's environment names (`KUBERNETES_SERVICE_HOST`, which
//! the install sets to the API server's real address in such clusters).

use std::net::IpAddr;

use k8s_openapi::api::discovery::v1::EndpointSlice;
use kube::{Api, Client, api::ListParams};
use weir_transport::Endpoints;

/// `namespace/name` of a Service, parsed from the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceRef {
    pub namespace: String,
    pub name: String,
}

impl std::str::FromStr for ServiceRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.split_once('/') {
            Some((namespace, name))
                if !namespace.is_empty() && !name.is_empty() && !name.contains('/') =>
            {
                Ok(Self {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                })
            }
            _ => Err(format!("{s:?} is not NAMESPACE/NAME")),
        }
    }
}

impl std::fmt::Display for ServiceRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The `https://` endpoints of the ready addresses in `slices` on the port named `port`
/// (or the only port, when the slice's port has no name), in a stable order.
pub fn endpoints_of(slices: &[EndpointSlice], port: &str) -> Vec<String> {
    let mut found = Vec::new();
    for slice in slices {
        let ports = slice.ports.as_deref().unwrap_or_default();
        let number = ports
            .iter()
            .find(|p| p.name.as_deref() == Some(port))
            .or_else(|| match ports {
                [only] if only.name.as_deref().is_none_or(str::is_empty) => Some(only),
                _ => None,
            })
            .and_then(|p| p.port);
        let Some(number) = number.and_then(|n| u16::try_from(n).ok()) else {
            continue;
        };
        for endpoint in &slice.endpoints {
            // Unset means ready (the API's rule for consumers).
            let ready = endpoint
                .conditions
                .as_ref()
                .and_then(|c| c.ready)
                .unwrap_or(true);
            if !ready {
                continue;
            }
            for address in &endpoint.addresses {
                match address.parse::<IpAddr>() {
                    Ok(IpAddr::V4(ip)) => found.push(format!("https://{ip}:{number}")),
                    Ok(IpAddr::V6(ip)) => found.push(format!("https://[{ip}]:{number}")),
                    Err(_) => {}
                }
            }
        }
    }
    found.sort();
    found.dedup();
    found
}

/// Lists the Service's EndpointSlices.
pub async fn resolve(
    client: &Client,
    service: &ServiceRef,
    port: &str,
) -> Result<Vec<String>, String> {
    let api: Api<EndpointSlice> = Api::namespaced(client.clone(), &service.namespace);
    let params =
        ListParams::default().labels(&format!("kubernetes.io/service-name={}", service.name));
    let slices = api
        .list(&params)
        .await
        .map_err(|e| format!("listing the EndpointSlices of {service}: {e}"))?;
    Ok(endpoints_of(&slices.items, port))
}

/// The controller's endpoints, found anew before every connection attempt.
pub fn endpoints(client: Client, service: ServiceRef, port: String) -> Endpoints {
    Endpoints::resolved(format!("Service {service}"), move || {
        let (client, service, port) = (client.clone(), service.clone(), port.clone());
        async move { resolve(&client, &service, &port).await }
    })
}

#[cfg(test)]
mod tests {
    use http::{Request, Response};
    use kube::client::Body;
    use serde_json::json;
    use tower_test::mock;

    use super::*;

    fn slice(ports: serde_json::Value, endpoints: serde_json::Value) -> EndpointSlice {
        serde_json::from_value(json!({
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {"name": "weir-controller-abc", "namespace": "weir-system"},
            "addressType": "IPv4",
            "ports": ports,
            "endpoints": endpoints,
        }))
        .unwrap()
    }

    #[test]
    fn ready_addresses_on_the_named_port() {
        let slices = [
            slice(
                json!([{"name": "metrics", "port": 9963}, {"name": "grpc", "port": 7443}]),
                json!([
                    {"addresses": ["172.18.0.3"], "conditions": {"ready": true}},
                    {"addresses": ["172.18.0.4"], "conditions": {"ready": false}},
                    {"addresses": ["172.18.0.2"]},
                ]),
            ),
            slice(
                json!([{"name": "grpc", "port": 7443}]),
                json!([{"addresses": ["fd00::3"], "conditions": {"ready": true}}]),
            ),
            // No port of that name: nothing from this slice.
            slice(
                json!([{"name": "other", "port": 1}]),
                json!([{"addresses": ["172.18.0.9"]}]),
            ),
        ];
        assert_eq!(
            endpoints_of(&slices, "grpc"),
            [
                "https://172.18.0.2:7443",
                "https://172.18.0.3:7443",
                "https://[fd00::3]:7443"
            ]
        );
        // A slice whose only port has no name serves any port name.
        let unnamed = [slice(
            json!([{"port": 7443}]),
            json!([{"addresses": ["10.0.0.1"]}]),
        )];
        assert_eq!(endpoints_of(&unnamed, "grpc"), ["https://10.0.0.1:7443"]);
    }

    #[test]
    fn service_refs_parse() {
        let r: ServiceRef = "weir-system/weir-controller".parse().unwrap();
        assert_eq!(
            (r.namespace.as_str(), r.name.as_str()),
            ("weir-system", "weir-controller")
        );
        for bad in ["weir-controller", "/x", "x/", "a/b/c"] {
            assert!(bad.parse::<ServiceRef>().is_err(), "{bad}");
        }
    }

    #[tokio::test]
    async fn resolves_through_the_api_with_the_service_label() {
        let (service, mut handle) = mock::pair::<Request<Body>, Response<Body>>();
        let client = Client::new(service, "default");
        let server = tokio::spawn(async move {
            let (request, send) = handle.next_request().await.expect("a request");
            let uri = request.uri().to_string();
            let list = json!({
                "apiVersion": "discovery.k8s.io/v1",
                "kind": "EndpointSliceList",
                "metadata": {"resourceVersion": "7"},
                "items": [{
                    "apiVersion": "discovery.k8s.io/v1",
                    "kind": "EndpointSlice",
                    "metadata": {"name": "weir-controller-x", "namespace": "weir-system"},
                    "addressType": "IPv4",
                    "ports": [{"name": "grpc", "port": 7443}],
                    "endpoints": [{"addresses": ["172.18.0.3"], "conditions": {"ready": true}}],
                }],
            });
            send.send_response(
                Response::builder()
                    .status(200)
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&list).unwrap()))
                    .unwrap(),
            );
            uri
        });
        let endpoints = endpoints(
            client,
            "weir-system/weir-controller".parse().unwrap(),
            "grpc".into(),
        );
        assert_eq!(
            endpoints.current().await.unwrap(),
            ["https://172.18.0.3:7443"]
        );
        let uri = server.await.unwrap();
        assert!(
            uri.starts_with("/apis/discovery.k8s.io/v1/namespaces/weir-system/endpointslices?"),
            "{uri}"
        );
        assert!(
            uri.contains("labelSelector=kubernetes.io%2Fservice-name%3Dweir-controller"),
            "{uri}"
        );
    }
}
