//! The soak test: a guest doing block and network traffic (the test guest's `soak`
//! scenario: write, read back and compare 8 sectors, ping the host, sleep 100 ms, again)
//! while a bounded set of clients hammers the API with valid and invalid requests, all on
//! the local Unix socket and in the test's own network namespace. kiln must never exit,
//! its RSS must stay bounded, and every request must get an answer.
//!
//! It runs for 60 s in the default `cargo test` (light on CPU: the guest sleeps between
//! rounds, the clients pause between requests); `KILN_SOAK_SECS=600` makes it the 10-minute
//! soak of issue 13.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::NetNs;
use common::api::{ApiKiln, parse_response, request};
use common::{TempDir, guest, kiln, require_kvm, sigterm};

const TAP: &str = "kiln-soak0";
const GUEST_MAC: &str = "06:00:0a:00:00:02";
/// API clients at once (fewer than the 10 connections kiln serves).
const CLIENTS: usize = 4;
/// Pause of each client between two requests.
const CLIENT_PAUSE: Duration = Duration::from_millis(50);

fn soak_duration() -> Duration {
    let secs = std::env::var("KILN_SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    Duration::from_secs(secs)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One request on its own connection, the raw bytes given; the status answered (0: none).
fn raw(sock: &Path, bytes: &[u8]) -> u16 {
    let Ok(mut s) = UnixStream::connect(sock) else {
        return 0;
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let _ = s.write_all(bytes);
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n @ 1..) = s.read(&mut buf) {
        resp.extend_from_slice(&buf[..n]);
    }
    parse_response(&String::from_utf8_lossy(&resp)).0
}

/// The requests a client cycles through, valid and not: (what, status expected).
fn one_request(sock: &Path, i: u64) -> (&'static str, u16, u16) {
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    match i % 10 {
        0 => ("GET /", request(sock, "GET", "/", None).0, 200),
        1 => (
            "GET /vm/config",
            request(sock, "GET", "/vm/config", None).0,
            200,
        ),
        2 => (
            "FlushMetrics",
            request(sock, "PUT", "/actions", Some(flush)).0,
            204,
        ),
        3 => (
            "bad JSON",
            request(sock, "PUT", "/actions", Some("{\"action_type\": ")).0,
            400,
        ),
        4 => (
            "unknown path",
            request(sock, "GET", "/no/such/path", None).0,
            400,
        ),
        5 => (
            "pre-boot only",
            request(
                sock,
                "PUT",
                "/machine-config",
                Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#),
            )
            .0,
            400,
        ),
        6 => {
            let big = format!("{{\"x\": \"{}\"}}", "a".repeat(51200));
            (
                "51201+ bytes",
                request(sock, "PUT", "/actions", Some(&big)).0,
                413,
            )
        }
        7 => (
            "garbage",
            raw(sock, b"\x00\x01 NOT HTTP AT ALL\r\n\r\n"),
            400,
        ),
        8 => {
            // Ten pipelined requests: the last answer's status counts.
            let mut s = UnixStream::connect(sock).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            let batch = "GET /machine-config HTTP/1.1\r\n\r\n".repeat(9)
                + "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n";
            s.write_all(batch.as_bytes()).unwrap();
            let mut text = String::new();
            let _ = s.read_to_string(&mut text);
            let answers = text.matches("HTTP/1.1 200").count();
            ("pipelined", if answers == 10 { 200 } else { 0 }, 200)
        }
        _ => {
            // Half a request, then gone: answered by nothing, counted by nothing; the next
            // request on a new connection must still be served.
            if let Ok(mut s) = UnixStream::connect(sock) {
                let _ = s.write_all(b"PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{");
            }
            (
                "after a half request",
                request(sock, "GET", "/", None).0,
                200,
            )
        }
    }
}

fn soak_config(dir: &TempDir, image: &Path) -> PathBuf {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("kiln-guest.elf"),
            "boot_args": "console=ttyS0 kiln.run=soak:0:100",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true,
                    "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": TAP,
                                "guest_mac": GUEST_MAC}],
    });
    dir.file("vm.json", config.to_string().as_bytes())
}

#[test]
fn soak_block_and_net_traffic_under_api_load() {
    require_kvm();
    let duration = soak_duration();
    let dir = TempDir::new("soak");
    let ns = NetNs::new("soak").unwrap();
    ns.add_tap(TAP, "10.0.0.1/24").unwrap();
    let image = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let cfg = soak_config(&dir, &image);
    let metrics = dir.path().join("metrics.json");
    let sock = dir.path().join("api.sock");
    let mut cmd = ns.command(kiln());
    cmd.args(["--api-sock", sock.to_str().unwrap()])
        .args(["--config-file", cfg.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap()]);
    let k = ApiKiln::spawn(cmd, &sock);
    k.wait_line("info soak begin", Duration::from_secs(60));
    let pid = k.pid();

    let stop = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let clients: Vec<_> = (0..CLIENTS as u64)
        .map(|c| {
            let (sock, stop, answered) = (sock.clone(), stop.clone(), answered.clone());
            std::thread::spawn(move || {
                let mut i = c * 3;
                while !stop.load(Ordering::Relaxed) {
                    let (what, status, want) = one_request(&sock, i);
                    assert_eq!(status, want, "client {c}: {what} (request {i})");
                    answered.fetch_add(1, Ordering::Relaxed);
                    i += 1;
                    std::thread::sleep(CLIENT_PAUSE);
                }
            })
        })
        .collect();

    // RSS after a warm-up, then its highest value; kiln must stay up throughout.
    let start = Instant::now();
    let warm_up = Duration::from_secs(10).min(duration / 3);
    std::thread::sleep(warm_up);
    let baseline = rss_kib(pid);
    let mut peak = baseline;
    while start.elapsed() < duration {
        std::thread::sleep(Duration::from_secs(1));
        assert!(
            Path::new(&format!("/proc/{pid}")).exists(),
            "kiln exited during the soak"
        );
        peak = peak.max(rss_kib(pid));
        if clients.iter().any(|c| c.is_finished()) {
            break;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().expect("a client saw a wrong or missing answer");
    }
    let rounds_seen = k.wait_line("info soak round=", Duration::from_secs(1));
    sigterm(pid);
    let out = k.finish(Duration::from_secs(20));
    assert_eq!(out.status, 128 + 15, "{out}");
    assert!(out.lines_with("fail").is_empty(), "{out}");
    assert!(!rounds_seen.is_empty());
    let last_round: u64 = out
        .lines_with("info soak round=")
        .last()
        .and_then(|l| l.rsplit('=').next()?.parse().ok())
        .unwrap_or(0);
    let requests = answered.load(Ordering::Relaxed);
    eprintln!(
        "soak: {:?}, {requests} requests answered, {last_round} guest rounds, \
         RSS {baseline} KiB after warm-up, peak {peak} KiB",
        duration
    );
    assert!(
        requests >= duration.as_secs() * 10,
        "{requests} requests answered"
    );
    assert!(last_round >= 16, "{out}");
    assert!(
        peak <= baseline + 16 * 1024,
        "RSS grew from {baseline} KiB to {peak} KiB"
    );
}
