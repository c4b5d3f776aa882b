//! The controller's CA and serving certificate in a cluster: from the mounted files, or
//! generated once into a Secret and shared by every replica.

mod kube_support;

use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube_support::*;
use serde_json::Value;
use weir_controller::kube::ca::{CaSource, load_controller_tls};
use weir_transport::ClusterCa;

const SECRET: &str = "/api/v1/namespaces/weir-system/secrets";
const CONFIG_MAP: &str = "/api/v1/namespaces/weir-system/configmaps";

fn source() -> CaSource {
    CaSource {
        secret: Some(("weir-system".into(), "weir-ca".into())),
        config_map: Some(("weir-system".into(), "weir-ca".into())),
    }
}

fn names() -> Vec<String> {
    vec!["weir-controller.weir-system.svc".into()]
}

/// A namespace with these Secrets and ConfigMaps (by name); creates are stored; a create
/// of an existing object answers 409. Returns the log of requests.
fn api(
    secrets: Vec<(&'static str, Value)>,
    creates_conflict: Option<Value>,
) -> (kube::Client, Arc<Mutex<Vec<Seen>>>) {
    let store: Arc<Mutex<Vec<(String, Value)>>> = Arc::new(Mutex::new(
        secrets
            .into_iter()
            .map(|(n, v)| (format!("{SECRET}/{n}"), v))
            .collect(),
    ));
    let log = Arc::new(Mutex::new(Vec::new()));
    let seen_log = log.clone();
    let (client, _task) = handler_client(move |seen| {
        seen_log.lock().unwrap().push(seen.clone());
        let mut store = store.lock().unwrap();
        match seen.method.as_str() {
            "GET" => Some(match store.iter().find(|(p, _)| *p == seen.path) {
                Some((_, v)) => json_response(200, v),
                None => json_response(404, &status(404, "NotFound", "not found")),
            }),
            "POST" => {
                let body = seen.body.clone().unwrap();
                let path = format!(
                    "{}/{}",
                    seen.path,
                    body["metadata"]["name"].as_str().unwrap()
                );
                if seen.path == SECRET
                    && let Some(winner) = &creates_conflict
                {
                    // Another replica created it a moment ago.
                    store.push((path, winner.clone()));
                    return Some(json_response(409, &status(409, "AlreadyExists", "exists")));
                }
                store.push((path, body.clone()));
                Some(json_response(201, &body))
            }
            _ => Some(json_response(405, &status(405, "MethodNotAllowed", "no"))),
        }
    });
    (client, log)
}

fn created(log: &[Seen], path: &str) -> Option<Value> {
    log.iter()
        .find(|s| s.method == "POST" && s.path == path)
        .and_then(|s| s.body.clone())
}

#[tokio::test]
async fn without_ca_files_a_ca_is_generated_into_a_secret_and_its_certificate_published() {
    let dir = tempfile::tempdir().unwrap();
    let (client, log) = api(vec![], None);
    let tls = load_controller_tls(&client, dir.path(), &source(), &names())
        .await
        .unwrap();
    let ca = tls.ca.expect("bootstrap is possible");
    let log = log.lock().unwrap().clone();

    let secret: Secret = serde_json::from_value(created(&log, SECRET).unwrap()).unwrap();
    let data = secret.data.unwrap();
    let stored_cert = String::from_utf8(data["ca.crt"].0.clone()).unwrap();
    let stored_key = String::from_utf8(data["ca.key"].0.clone()).unwrap();
    assert_eq!(stored_cert, ca.cert_pem());
    ClusterCa::from_pem(&stored_cert, &stored_key).expect("the stored key is the CA's key");

    let cm: ConfigMap = serde_json::from_value(created(&log, CONFIG_MAP).unwrap()).unwrap();
    let published = cm.data.unwrap();
    assert_eq!(
        published.get("ca.crt").map(String::as_str),
        Some(ca.cert_pem())
    );
    assert!(
        !published.contains_key("ca.key"),
        "the key stays in the Secret"
    );
}

#[tokio::test]
async fn a_replica_that_loses_the_creation_race_uses_the_winners_ca() {
    let dir = tempfile::tempdir().unwrap();
    let winner = ClusterCa::generate("winner").unwrap();
    let winner_secret = serde_json::json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "weir-ca", "namespace": "weir-system"},
        "data": {
            "ca.crt": k8s_openapi::ByteString(winner.cert_pem().as_bytes().to_vec()),
            "ca.key": k8s_openapi::ByteString(winner.key_pem().into_bytes()),
        },
    });
    let (client, _) = api(vec![], Some(winner_secret));
    let tls = load_controller_tls(&client, dir.path(), &source(), &names())
        .await
        .unwrap();
    assert_eq!(tls.ca.unwrap().cert_pem(), winner.cert_pem());
}

#[tokio::test]
async fn mounted_files_win_and_without_the_ca_key_there_is_no_bootstrap() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("mounted").unwrap();
    let cert = ca.issue_controller_cert(&["weir-controller"], &[]).unwrap();
    std::fs::write(dir.path().join("ca.crt"), ca.cert_pem()).unwrap();
    std::fs::write(dir.path().join("tls.crt"), &cert.cert_pem).unwrap();
    std::fs::write(dir.path().join("tls.key"), &cert.key_pem).unwrap();
    let (client, log) = api(vec![], None);
    let tls = load_controller_tls(&client, dir.path(), &source(), &names())
        .await
        .unwrap();
    assert!(tls.ca.is_none(), "no ca.key: no certificate bootstrap");
    assert!(
        log.lock().unwrap().is_empty(),
        "the Secret is not consulted"
    );

    // With the key, the mounted CA is used and its certificate published.
    std::fs::write(dir.path().join("ca.key"), ca.key_pem()).unwrap();
    let tls = load_controller_tls(&client, dir.path(), &source(), &names())
        .await
        .unwrap();
    assert_eq!(tls.ca.unwrap().cert_pem(), ca.cert_pem());
    let log = log.lock().unwrap().clone();
    assert!(log.iter().all(|s| !s.path.starts_with(SECRET)));
    assert!(created(&log, CONFIG_MAP).is_some());
}
