//! The playground: a directory of manifests compiled by the controller's compiler, traced
//! offline. Every pair of pods, on several protocols and ports, must get the verdict of the
//! controller's reference evaluator (written from the specification, independent of the
//! compiler), and the steps must name the deciding policy rule.

mod support;

use std::{fs, path::Path, process::Command};

use support::{MANIFESTS, POLICIES};

use weir_api::PodKey;
use weir_compiler::oracle::{self, Endpoint};
use weirctl::{
    playground,
    trace::{self, Request, Spec},
};

fn write_dir(dir: &Path) {
    fs::write(dir.join("objects.yaml"), MANIFESTS).unwrap();
    fs::create_dir_all(dir.join("policies")).unwrap();
    fs::write(dir.join("policies/shop.yaml"), POLICIES).unwrap();
}

#[test]
fn every_pair_agrees_with_the_reference_evaluator() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path());
    let p = playground::compile(dir.path()).unwrap();
    assert!(p.diagnostics.is_empty(), "{:?}", p.diagnostics);
    let pods = ["shop/web", "shop/db", "ops/probe"];
    let mut denied = 0;
    let mut allowed = 0;
    for from in pods {
        for to in pods {
            for (proto, port) in [(6u8, 5432u16), (6, 8080), (6, 80), (17, 53), (132, 5432)] {
                let key = |s: &str| {
                    let (ns, name) = s.split_once('/').unwrap();
                    PodKey::new(ns, name)
                };
                let req = Request {
                    from: Spec::Pod(key(from)),
                    to: Spec::Pod(key(to)),
                    proto,
                    port,
                };
                let t = trace::trace(&p.views, &p.pods, &req).unwrap();
                if from == to {
                    // A pod reaching its own address never leaves it: no policy applies.
                    let text = trace::render(&t);
                    assert!(t.allowed, "{text}");
                    assert!(text.contains("reaches its own address"), "{text}");
                    continue;
                }
                let want = oracle::allowed(
                    &p.cluster,
                    &Endpoint::Pod(key(from)),
                    &Endpoint::Pod(key(to)),
                    proto,
                    port,
                )
                .unwrap();
                assert_eq!(
                    t.allowed,
                    want,
                    "{from} -> {to} proto {proto} port {port}:\n{}",
                    trace::render(&t)
                );
                if want {
                    allowed += 1;
                } else {
                    denied += 1;
                }
            }
        }
    }
    assert!(
        allowed > 5 && denied > 5,
        "{allowed} allowed, {denied} denied"
    );
}

#[test]
fn steps_name_the_rule_sets_classes_and_rules() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path());
    let p = playground::compile(dir.path()).unwrap();
    let req = |from: &str, to: &str, proto, port| Request {
        from: from.parse().unwrap(),
        to: to.parse().unwrap(),
        proto,
        port,
    };
    // web -> db:5432: egress allowed by web-in's first egress rule on n1, ingress by
    // db-from-web on n2.
    let t = trace::trace(&p.views, &p.pods, &req("shop/web", "shop/db", 6, 5432)).unwrap();
    assert!(t.allowed);
    let path = &t.paths[0];
    let egress = path.egress.as_ref().unwrap();
    assert_eq!(egress.node, "n1");
    assert_eq!(egress.policies, vec!["NetworkPolicy/shop/web-in"]);
    assert_eq!(
        egress.rule.as_deref(),
        Some("NetworkPolicy/shop/web-in egress #0")
    );
    assert_eq!(egress.class_prefix.as_deref(), Some("10.244.2.2/32"));
    let ingress = path.ingress.as_ref().unwrap();
    assert_eq!(ingress.node, "n2");
    assert_eq!(
        ingress.rule.as_deref(),
        Some("NetworkPolicy/shop/db-from-web ingress #0")
    );
    let text = trace::render(&t);
    assert!(text.contains("verdict ALLOWED"), "{text}");
    assert!(text.contains("egress   on n1: shop/web rule set"), "{text}");

    // probe -> db:5432: probe's egress is not isolated; db's ingress has no entry for
    // probe's class.
    let t = trace::trace(&p.views, &p.pods, &req("ops/probe", "shop/db", 6, 5432)).unwrap();
    assert!(!t.allowed);
    let path = &t.paths[0];
    assert!(path.egress.as_ref().unwrap().allowed);
    assert_eq!(path.egress.as_ref().unwrap().node, "playground");
    let ingress = path.ingress.as_ref().unwrap();
    assert!(!ingress.allowed);
    assert!(
        ingress.reason.contains("NetworkPolicy/shop/db-from-web"),
        "{}",
        ingress.reason
    );
    assert!(trace::render(&t).contains("verdict DENIED"));

    // An address outside the cluster: only web's egress is checked.
    let t = trace::trace(&p.views, &p.pods, &req("shop/web", "10.244.3.9", 17, 53)).unwrap();
    assert!(t.allowed, "{}", trace::render(&t));
    assert!(t.paths[0].ingress.is_none());
    assert_eq!(
        t.paths[0].egress.as_ref().unwrap().rule.as_deref(),
        Some("NetworkPolicy/shop/web-in egress #1")
    );
    assert!(trace::trace(&p.views, &p.pods, &req("shop/nope", "shop/db", 6, 1)).is_err());
}

#[test]
fn the_policy_listing_names_policies_and_effective_rules() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path());
    let p = playground::compile(dir.path()).unwrap();
    let r = weirctl::policy::report(&p.views, &p.pods, &PodKey::new("shop", "web")).unwrap();
    assert_eq!(r.node, "n1");
    let ingress = &r.directions[0];
    assert_eq!(ingress.policies, vec!["NetworkPolicy/shop/web-in"]);
    assert!(
        ingress.rules.iter().any(|e| e.action == "allow"
            && e.ports == "8080"
            && e.rule.as_deref() == Some("NetworkPolicy/shop/web-in ingress #0")),
        "{ingress:#?}"
    );
    let egress = &r.directions[1];
    assert!(
        egress.rules.iter().any(|e| e.protocol == "UDP"
            && e.ports == "53"
            && e.peers
                .iter()
                .any(|p| p == "10.244.3.0/24" || p.contains("ops/probe"))),
        "{egress:#?}"
    );
    let text = weirctl::policy::render(&r);
    assert!(text.contains("ingress: rule set"), "{text}");
    let probe = weirctl::policy::report(&p.views, &p.pods, &PodKey::new("ops", "probe")).unwrap();
    assert!(weirctl::policy::render(&probe).contains("ingress: no policy selects it"));
}

#[test]
fn the_binary_exits_0_when_allowed_1_when_denied_2_on_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path());
    let weirctl = env!("CARGO_BIN_EXE_weirctl");
    let run = |args: &[&str]| {
        let out = Command::new(weirctl)
            .args(args)
            .arg("--manifests")
            .arg(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out, _) = run(&["trace", "--from", "shop/web", "--to", "shop/db:5432"]);
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("verdict ALLOWED"), "{out}");
    let (code, out, _) = run(&[
        "trace",
        "--from",
        "ops/probe",
        "--to",
        "shop/db",
        "--port",
        "5432",
    ]);
    assert_eq!(code, Some(1), "{out}");
    let (code, out, _) = run(&[
        "trace",
        "--from",
        "ops/probe",
        "--to",
        "shop/db:5432",
        "-o",
        "json",
    ]);
    assert_eq!(code, Some(1));
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(json["allowed"], false);
    assert_eq!(json["paths"][0]["ingress"]["direction"], "ingress");
    let (code, _, err) = run(&["trace", "--from", "shop/ghost", "--to", "shop/db:5432"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("no pod shop/ghost"), "{err}");
    let (code, out, _) = run(&["policy", "shop/db"]);
    assert_eq!(code, Some(0));
    assert!(out.contains("NetworkPolicy/shop/db-from-web"), "{out}");
    // A manifest that does not parse is an error, not a silent omission.
    fs::write(dir.path().join("broken.yaml"), "kind: Pod\nmetadata: [").unwrap();
    let (code, _, err) = run(&["trace", "--from", "shop/web", "--to", "shop/db:5432"]);
    assert_eq!(code, Some(2));
    assert!(err.contains("do not parse"), "{err}");
}
