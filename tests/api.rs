//! The control API end to end: a VM configured and booted entirely through the socket, the
//! run-time actions (pause, resume, Ctrl+Alt+Del, drive swap, metrics), Firecracker's
//! pre-/post-boot rules, hostile clients (security case 24), and GET /vm/config round-tripped
//! into a config file that boots the same VM.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use common::api::{ApiKiln, parse_response, request};
use common::{NetNs, TempDir, counter, guest, kiln, require_kvm, run_kiln, sigterm};

const LONG: Duration = Duration::from_secs(60);

fn api_kiln(dir: &TempDir, netns: Option<&NetNs>, extra: &[&str]) -> ApiKiln {
    let sock = dir.path().join("api.sock");
    let mut cmd = match netns {
        Some(ns) => ns.command(kiln()),
        None => Command::new(kiln()),
    };
    cmd.args(["--api-sock", sock.to_str().unwrap()]).args(extra);
    ApiKiln::spawn(cmd, &sock)
}

#[test]
fn configure_boot_and_drive_a_vm_through_the_api() {
    require_kvm();
    let dir = TempDir::new("api");
    let ns = NetNs::new("api").unwrap();
    ns.add_tap("kilnapi0", "10.77.0.1/24").unwrap();
    let disk = dir.file("disk.img", &vec![0u8; 2 << 20]);
    let metrics = dir.path().join("metrics.json");
    let k = api_kiln(&dir, Some(&ns), &["--id", "api-test-vm"]);

    let (s, b) = k.api("GET", "/", None);
    assert_eq!(s, 200);
    let info: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "api-test-vm");
    // Post-boot-only requests are refused before boot.
    let (s, b) = k.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!((s, b.contains("before starting")), (400, true), "{b}");
    let (s, _) = k.api(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
    );
    assert_eq!(s, 400, "no kernel yet");

    let boot = r#"{"kernel_image_path": "builtin:test-guest", "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=blk,ctrl-alt-del"}"#;
    assert_eq!(k.api("PUT", "/boot-source", Some(boot)).0, 204);
    let mc = r#"{"vcpu_count": 2, "mem_size_mib": 128}"#;
    assert_eq!(k.api("PUT", "/machine-config", Some(mc)).0, 204);
    assert_eq!(
        k.api("PATCH", "/machine-config", Some(r#"{"mem_size_mib": 192}"#))
            .0,
        204
    );
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false, "cache_type": "Writeback"}}"#,
        disk.display()
    );
    assert_eq!(k.api("PUT", "/drives/rootfs", Some(&drive)).0, 204);
    let net =
        r#"{"iface_id": "eth0", "host_dev_name": "kilnapi0", "guest_mac": "aa:fc:00:00:00:01"}"#;
    assert_eq!(k.api("PUT", "/network-interfaces/eth0", Some(net)).0, 204);
    let m = format!(r#"{{"metrics_path": "{}"}}"#, metrics.display());
    assert_eq!(k.api("PUT", "/metrics", Some(&m)).0, 204);
    let (s, b) = k.api("GET", "/machine-config", None);
    assert_eq!(s, 200);
    let mc: serde_json::Value = serde_json::from_str(&b).unwrap();
    assert_eq!(
        (mc["vcpu_count"].as_u64(), mc["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );

    assert_eq!(
        k.api(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "InstanceStart"}"#)
        )
        .0,
        204
    );
    k.wait_line("info ctrl-alt-del waiting", LONG);
    let (s, b) = k.api("GET", "/", None);
    assert_eq!((s, b.contains(r#""state":"Running""#)), (200, true), "{b}");

    // Pre-boot-only requests are refused after boot.
    for (method, path, body) in [
        ("PUT", "/machine-config", mc.to_string()),
        ("PUT", "/boot-source", boot.to_string()),
        ("PUT", "/drives/rootfs", drive.clone()),
        (
            "PUT",
            "/actions",
            r#"{"action_type": "InstanceStart"}"#.to_string(),
        ),
    ] {
        let (s, b) = k.api(method, path, Some(&body));
        assert_eq!(s, 400, "{method} {path}");
        assert!(b.contains("after starting the microVM"), "{b}");
    }

    // Pause: every vCPU thread parks (out of KVM_RUN, waiting in futex); resume: back in
    // KVM_RUN (ioctl; the guest waits in hlt, inside KVM_RUN).
    assert_eq!(vcpu_syscalls(k.pid()).len(), 2, "two vCPU threads");
    assert_eq!(k.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let (_, b) = k.api("GET", "/", None);
    assert!(b.contains(r#""state":"Paused""#), "{b}");
    wait_vcpus_in(k.pid(), libc::SYS_futex, "parked");
    assert_eq!(
        k.api("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    let (_, b) = k.api("GET", "/", None);
    assert!(b.contains(r#""state":"Running""#), "{b}");
    wait_vcpus_in(k.pid(), libc::SYS_ioctl, "back in KVM_RUN");

    // Metrics agree with what the guest did: the `blk` scenario made 4 reads (sector 0,
    // before, read-back, last sector), 1 write, 1 flush, 1 GET_ID.
    assert_eq!(
        k.api(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#)
        )
        .0,
        204
    );
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(counter(&last, "block_rootfs", "read_count"), 4, "{last}");
    assert_eq!(counter(&last, "block_rootfs", "write_count"), 1);
    assert_eq!(counter(&last, "block_rootfs", "flush_count"), 1);
    assert_eq!(counter(&last, "block_rootfs", "get_id_count"), 1);
    assert_eq!(counter(&last, "block_rootfs", "invalid_requests"), 0);
    assert!(counter(&last, "vcpu", "exit_io_out") > 100);
    assert!(counter(&last, "uart", "tx_bytes") > 100);
    assert!(counter(&last, "api_server", "requests") >= 20, "{last}");
    assert!(last["net_eth0"].is_object(), "{last}");

    // Ctrl+Alt+Del reaches the guest through the i8042; it then resets, kiln exits 0.
    assert_eq!(
        k.api(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#)
        )
        .0,
        204
    );
    let out = k.finish(LONG);
    assert_eq!(out.status, 0, "{out}");
    let report = out.lines();
    assert!(
        report.contains(&"ok ctrl-alt-del scancodes=14 11 e0 71 e0 f0 71 f0 11 f0 14"),
        "{out}"
    );
    assert!(report.contains(&"ok blk get-id id=\"rootfs\""), "{out}");
    assert!(out.lines_with("fail").is_empty(), "{out}");
    // The final flush at exit counts the reset.
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(counter(&last, "i8042", "reset_count"), 1, "{last}");
}

#[test]
fn drive_swap_after_boot_updates_the_capacity() {
    require_kvm();
    let dir = TempDir::new("api-swap");
    let small = dir.file("small.img", &vec![1u8; 64 << 10]);
    let big_bytes: Vec<u8> = (0..256u32 << 10).map(|i| (i % 251) as u8).collect();
    let big = dir.file("big.img", &big_bytes);
    let cfg = format!(
        r#"{{"boot-source": {{"kernel_image_path": "builtin:test-guest", "boot_args": "kiln.run=blk-resize"}},
            "drives": [{{"drive_id": "data", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}]}}"#,
        small.display()
    );
    let cfg = dir.file("vm.json", cfg.as_bytes());
    let k = api_kiln(&dir, None, &["--config-file", cfg.to_str().unwrap()]);
    k.wait_line("info blk-resize capacity=128 waiting", LONG);
    let (s, b) = k.api(
        "PATCH",
        "/drives/data",
        Some(&format!(
            r#"{{"drive_id": "data", "path_on_host": "{}"}}"#,
            big.display()
        )),
    );
    assert_eq!(s, 204, "{b}");
    let line = k.wait_line("ok blk-resize", LONG);
    assert_eq!(
        line,
        format!(
            "ok blk-resize capacity=512 fnv1a=0x{:08x}",
            common::fnv1a(&big_bytes[..512])
        )
    );
    // A missing file is refused and the drive keeps working.
    let out = k.finish(LONG);
    assert_eq!(out.status, 0, "{out}");
}

#[test]
fn hostile_clients_get_errors_and_the_vmm_keeps_serving() {
    require_kvm();
    let dir = TempDir::new("api-hostile");
    let cfg = dir.file(
        "vm.json",
        br#"{"boot-source": {"kernel_image_path": "builtin:test-guest", "boot_args": "kiln.run=idle"}}"#,
    );
    let k = api_kiln(&dir, None, &["--config-file", cfg.to_str().unwrap()]);
    k.wait_line("info idle", LONG);

    // A 51201-byte body; truncated JSON; an unknown field; path id ≠ body id; a pre-boot
    // request after boot; a wrong method.
    let big = format!(
        r#"{{"vcpu_count": 1, "mem_size_mib": 128, "x": "{}"}}"#,
        "a".repeat(51201)
    );
    assert_eq!(k.api("PUT", "/machine-config", Some(&big)).0, 413);
    assert_eq!(k.api("PATCH", "/vm", Some(r#"{"state": "Pau"#)).0, 400);
    let (s, b) = k.api("PATCH", "/vm", Some(r#"{"state": "Paused", "colour": 1}"#));
    assert_eq!(s, 400);
    assert!(b.contains("fault_message") && b.contains("colour"), "{b}");
    let (s, b) = k.api(
        "PATCH",
        "/drives/a",
        Some(r#"{"drive_id": "b", "path_on_host": "/tmp/x"}"#),
    );
    assert_eq!(s, 400, "{b}");
    assert_eq!(
        k.api(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        )
        .0,
        400
    );
    assert_eq!(k.api("DELETE", "/", None).0, 400);

    // Ten clients that send half a request and stall; an eleventh is refused; the stalled
    // ones do not block anyone once a slot frees up.
    let mut stalled: Vec<UnixStream> = (0..10)
        .map(|_| {
            let mut s = UnixStream::connect(&k.sock).unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut eleventh = UnixStream::connect(&k.sock).unwrap();
    eleventh
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    // kiln answers 503 at accept and closes, so the write may find the socket closed already
    // (and the close, with the request unread, may end the read with ECONNRESET after the
    // answer); the answer must be there to read, whole. A client left hanging is a failure:
    // the read must end, not time out.
    let _ = eleventh.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut resp = Vec::new();
    let mut buf = [0u8; 1024];
    loop {
        match eleventh.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!(
                "the 11th connection was left hanging ({e}); read so far: {:?}",
                String::from_utf8_lossy(&resp)
            ),
        }
    }
    let resp = String::from_utf8(resp).unwrap();
    assert!(resp.starts_with("HTTP/1.1 503 "), "{resp:?}");
    let (status, body) = parse_response(&resp);
    assert_eq!(status, 503, "{resp}");
    let length: usize = resp
        .lines()
        .find_map(|l| l.strip_prefix("Content-Length: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Content-Length: {resp:?}"));
    assert_eq!(body.len(), length, "a truncated answer: {resp:?}");
    assert!(body.contains("Too many open connections"), "{resp}");
    drop(stalled.pop());
    std::thread::sleep(Duration::from_millis(200));
    let (s, b) = request(&k.sock, "GET", "/", None);
    assert_eq!(s, 200, "{b}");

    // Keep-alive with pipelined requests on one connection.
    let mut c = UnixStream::connect(&k.sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut both = String::new();
    c.read_to_string(&mut both).unwrap();
    assert_eq!(both.matches("HTTP/1.1 200").count(), 2, "{both}");
    assert!(
        both.contains("firecracker_version") && both.contains("Running"),
        "{both}"
    );
    drop(stalled);

    // The guest never noticed: it is still idle, and said nothing else.
    sigterm(k.pid());
    let out = k.finish(LONG);
    assert_eq!(out.status, 128 + 15, "{out}");
    assert_eq!(out.lines().last(), Some(&"info idle"), "{out}");
    assert!(out.lines_with("fail").is_empty(), "{out}");
}

/// The system call each vCPU thread (`kiln_vcpu<n>`) of `pid` is in (/proc/.../syscall).
fn vcpu_syscalls(pid: u32) -> Vec<(String, i64)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let dir = task.unwrap().path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if !comm.starts_with("kiln_vcpu") {
            continue;
        }
        let call = std::fs::read_to_string(dir.join("syscall")).unwrap_or_default();
        let nr = call
            .split_whitespace()
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(-1);
        out.push((comm.trim().to_string(), nr));
    }
    out.sort();
    out
}

/// Waits (up to 5 s) until every vCPU thread of `pid` sits in system call `nr`.
fn wait_vcpus_in(pid: u32, nr: i64, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let calls = vcpu_syscalls(pid);
        if !calls.is_empty() && calls.iter().all(|(_, n)| *n == nr) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "vCPU threads not {what} (system call {nr}): {calls:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

use std::process::Command;

#[test]
fn vm_config_round_trips_into_a_config_file() {
    require_kvm();
    let dir = TempDir::new("api-roundtrip");
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let k = api_kiln(&dir, None, &[]);
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 kiln.run=boot,blk"}}"#,
        guest("kiln-guest.elf").display()
    );
    assert_eq!(k.api("PUT", "/boot-source", Some(&boot)).0, 204);
    assert_eq!(
        k.api(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 96}"#)
        )
        .0,
        204
    );
    let drive = format!(
        r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        disk.display()
    );
    assert_eq!(k.api("PUT", "/drives/rootfs", Some(&drive)).0, 204);
    let (s, config) = k.api("GET", "/vm/config", None);
    assert_eq!(s, 200);
    drop(k);
    let file = dir.file("roundtrip.json", config.as_bytes());
    let out = run_kiln(&["--config-file", file.to_str().unwrap(), "--no-api"]);
    assert_eq!(out.status, 0, "{out}");
    assert!(out.lines_with("fail").is_empty(), "{out}");
    assert!(out.stdout.contains("ok smp started=1/1"), "{out}");
    assert!(out.stdout.contains("ok blk get-id id=\"rootfs\""), "{out}");
    assert!(
        out.stdout.contains("ok e820 entries=3 ram_kib=97919"),
        "{out}"
    );
}

#[test]
fn api_socket_stale_replaced_live_refused() {
    require_kvm();
    let dir = TempDir::new("api-sock");
    let sock = dir.path().join("api.sock");
    // A stale socket file: bound once, nobody listening.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    let k = ApiKiln::spawn(
        {
            let mut c = Command::new(kiln());
            c.args(["--api-sock", sock.to_str().unwrap()]);
            c
        },
        &sock,
    );
    // A second kiln on the live socket refuses to start.
    let out = run_kiln(&["--api-sock", sock.to_str().unwrap()]);
    assert_eq!(out.status, 1, "{out}");
    assert!(out.stderr.contains("--api-sock"), "{out}");
    assert_eq!(k.api("GET", "/", None).0, 200);
}
