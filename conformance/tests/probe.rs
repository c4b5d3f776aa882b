//! Probes and servers over real network namespaces. Needs root (CAP_NET_ADMIN and
//! CAP_NET_RAW): every test creates two namespaces joined by a veth pair, addressed from
//! TEST-NET-1 (192.0.2.0/24) and the documentation prefix 2001:db8::/64, which are never
//! routed. Nothing is added to the namespace the tests run in.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use weir_conformance::Protocol;
use weir_conformance::netns::NamedNetns;
use weir_conformance::probe::{ProbeOutcome, ProbeRequest, Servers, probe, probe_many};

/// The tests share the process's file descriptor table (the leak check reads it), so they
/// run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

const CLIENT_V4: &str = "192.0.2.1";
const SERVER_V4: &str = "192.0.2.2";
const CLIENT_V6: &str = "2001:db8::1";
const SERVER_V6: &str = "2001:db8::2";
const SERVED: [u16; 2] = [80, 81];
const UNSERVED: u16 = 82;
const TIMEOUT: Duration = Duration::from_secs(1);

/// A client and a server namespace joined by a veth pair; both deleted on drop (the veth
/// pair goes with them).
struct Pair {
    client: NamedNetns,
    server: NamedNetns,
}

fn require_root() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "these tests create network namespaces and raw sockets: run them as root"
    );
}

impl Pair {
    fn new() -> Pair {
        require_root();
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let id = format!(
            "wct-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let client = NamedNetns::create(&format!("{id}-c")).expect("create client namespace");
        let server = NamedNetns::create(&format!("{id}-s")).expect("create server namespace");
        client
            .ip(&[
                "link",
                "add",
                "veth0",
                "type",
                "veth",
                "peer",
                "name",
                "veth1",
                "netns",
                server.name(),
            ])
            .expect("create veth pair");
        for (netns, device, v4, v6) in [
            (&client, "veth0", CLIENT_V4, CLIENT_V6),
            (&server, "veth1", SERVER_V4, SERVER_V6),
        ] {
            // Link up first: an IPv6 address added to a down link stays unanswerable for
            // about a second after the link comes up, even with `nodad`.
            netns
                .ip(&["link", "set", device, "up"])
                .expect("set link up");
            netns
                .ip(&["addr", "add", &format!("{v4}/24"), "dev", device])
                .expect("add IPv4 address");
            netns
                .ip(&[
                    "-6",
                    "addr",
                    "add",
                    &format!("{v6}/64"),
                    "dev",
                    device,
                    "nodad",
                ])
                .expect("add IPv6 address");
        }
        Pair { client, server }
    }

    fn client_path(&self) -> PathBuf {
        self.client.path()
    }

    fn server_path(&self) -> PathBuf {
        self.server.path()
    }
}

fn target(ip: &str, port: u16) -> SocketAddr {
    SocketAddr::new(ip.parse::<IpAddr>().expect("test address"), port)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("read /proc/self/fd")
        .count()
}

fn lock() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

#[test]
fn served_ports_connect_on_every_protocol_over_ipv4_and_ipv6() {
    let _serial = lock();
    let pair = Pair::new();
    let _servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    runtime().block_on(async {
        for server in [SERVER_V4, SERVER_V6] {
            for port in SERVED {
                for protocol in Protocol::ALL {
                    let outcome =
                        probe(&pair.client_path(), target(server, port), protocol, TIMEOUT).await;
                    assert_eq!(
                        outcome,
                        ProbeOutcome::Connected,
                        "{protocol} to {server} port {port}"
                    );
                }
            }
        }
    });
}

#[test]
fn a_pod_reaches_its_own_address_while_serving() {
    let _serial = lock();
    let pair = Pair::new();
    let _servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    runtime().block_on(async {
        for server in [SERVER_V4, SERVER_V6] {
            for protocol in Protocol::ALL {
                let outcome =
                    probe(&pair.server_path(), target(server, 80), protocol, TIMEOUT).await;
                assert_eq!(
                    outcome,
                    ProbeOutcome::Connected,
                    "{protocol} to own {server}"
                );
            }
        }
    });
}

#[test]
fn unserved_port_is_refused_on_every_protocol() {
    let _serial = lock();
    let pair = Pair::new();
    let _servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    runtime().block_on(async {
        for server in [SERVER_V4, SERVER_V6] {
            for protocol in Protocol::ALL {
                let started = Instant::now();
                let outcome = probe(
                    &pair.client_path(),
                    target(server, UNSERVED),
                    protocol,
                    TIMEOUT,
                )
                .await;
                assert_eq!(
                    outcome,
                    ProbeOutcome::Refused,
                    "{protocol} to {server} port {UNSERVED}"
                );
                assert!(started.elapsed() < TIMEOUT, "a refusal is immediate");
            }
        }
    });
}

#[test]
fn sctp_without_any_responder_is_refused_by_the_kernel() {
    // No raw SCTP socket in the server namespace and no SCTP in the kernel: the kernel
    // answers ICMP protocol unreachable, which the probe reports as refused.
    let _serial = lock();
    let pair = Pair::new();
    let _servers = Servers::start(&pair.server_path(), &SERVED, &[Protocol::Tcp]).expect("servers");
    runtime().block_on(async {
        for server in [SERVER_V4, SERVER_V6] {
            let outcome = probe(
                &pair.client_path(),
                target(server, 80),
                Protocol::Sctp,
                TIMEOUT,
            )
            .await;
            assert_eq!(outcome, ProbeOutcome::Refused, "SCTP to {server}");
        }
        let outcome = probe(
            &pair.client_path(),
            target(SERVER_V4, 80),
            Protocol::Tcp,
            TIMEOUT,
        )
        .await;
        assert_eq!(outcome, ProbeOutcome::Connected);
    });
}

#[test]
fn dropped_packets_time_out_on_every_protocol() {
    let _serial = lock();
    let pair = Pair::new();
    let _servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    // Drop everything arriving in the server namespace except on loopback.
    pair.server
        .exec("nft", &["add table inet probe_test"])
        .and_then(|()| {
            pair.server.exec(
                "nft",
                &["add chain inet probe_test input { type filter hook input priority 0 ; policy drop ; }"],
            )
        })
        .and_then(|()| pair.server.exec("nft", &["add rule inet probe_test input iif lo accept"]))
        .expect("install the nftables drop");
    let client = pair.client_path();
    runtime().block_on(async {
        let mut probes = Vec::new();
        for server in [SERVER_V4, SERVER_V6] {
            for protocol in Protocol::ALL {
                let client = &client;
                probes.push(async move {
                    let started = Instant::now();
                    let outcome = probe(client, target(server, 80), protocol, TIMEOUT).await;
                    (outcome, started.elapsed())
                });
            }
        }
        let results = futures::future::join_all(probes).await;
        for (index, (outcome, elapsed)) in results.into_iter().enumerate() {
            assert_eq!(outcome, ProbeOutcome::TimedOut, "probe {index}");
            assert!(elapsed >= TIMEOUT, "timed out early after {elapsed:?}");
            assert!(elapsed < TIMEOUT * 2, "timed out late after {elapsed:?}");
        }
    });
}

#[test]
fn hundreds_of_concurrent_probes_all_connect_and_leak_no_descriptors() {
    let _serial = lock();
    let pair = Pair::new();
    let servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    let runtime = runtime();
    // Warm the runtime up so that its own descriptors are counted before.
    runtime.block_on(async { tokio::time::sleep(Duration::from_millis(10)).await });
    let before = open_fds();
    let mut requests = Vec::new();
    for round in 0..50 {
        for server in [SERVER_V4, SERVER_V6] {
            for port in SERVED {
                for protocol in Protocol::ALL {
                    // Every fifth round probes from the server's own namespace too, so client
                    // and responder raw sockets share a namespace under load.
                    let netns = if round % 5 == 0 {
                        pair.server_path()
                    } else {
                        pair.client_path()
                    };
                    requests.push(ProbeRequest {
                        netns,
                        target: target(server, port),
                        protocol,
                        timeout: Duration::from_secs(2),
                    });
                }
            }
        }
    }
    assert_eq!(requests.len(), 600);
    let started = Instant::now();
    let outcomes = runtime.block_on(probe_many(&requests));
    let elapsed = started.elapsed();
    assert_eq!(outcomes.len(), requests.len());
    let failures: Vec<_> = requests
        .iter()
        .zip(&outcomes)
        .filter(|(_, outcome)| !outcome.is_connected())
        .map(|(request, outcome)| format!("{} {}: {outcome:?}", request.protocol, request.target))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {failures:?}",
        failures.len()
    );
    assert!(
        elapsed < Duration::from_secs(2),
        "600 probes took {elapsed:?}"
    );
    assert_eq!(open_fds(), before, "probes leaked descriptors");
    drop(servers);
    drop(runtime);
}

#[test]
fn dropping_servers_closes_their_sockets() {
    let _serial = lock();
    let pair = Pair::new();
    let before = open_fds();
    let servers = Servers::start(&pair.server_path(), &SERVED, &Protocol::ALL).expect("servers");
    assert!(open_fds() > before);
    drop(servers);
    assert_eq!(open_fds(), before, "servers leaked descriptors");
    runtime().block_on(async {
        let outcome = probe(
            &pair.client_path(),
            target(SERVER_V4, 80),
            Protocol::Tcp,
            TIMEOUT,
        )
        .await;
        assert_eq!(outcome, ProbeOutcome::Refused);
    });
}

#[test]
fn probe_from_a_missing_namespace_is_an_error_not_a_denial() {
    let _serial = lock();
    require_root();
    runtime().block_on(async {
        let outcome = probe(
            &PathBuf::from("/run/netns/wct-does-not-exist"),
            target(SERVER_V4, 80),
            Protocol::Tcp,
            TIMEOUT,
        )
        .await;
        assert!(matches!(outcome, ProbeOutcome::Error(_)), "{outcome:?}");
    });
}

#[test]
fn servers_in_a_missing_namespace_fail_to_start() {
    let _serial = lock();
    require_root();
    let error = Servers::start(
        &PathBuf::from("/run/netns/wct-does-not-exist"),
        &SERVED,
        &Protocol::ALL,
    )
    .expect_err("started in a missing namespace");
    assert!(error.to_string().contains("wct-does-not-exist"), "{error}");
}
