//! Live migration end to end: the test guest's `workload` scenario (a memory pattern
//! checked and rewritten every step, a sector written and the previous one read back) is
//! moved between two kiln processes while it runs, and must carry on at the destination
//! from the next step with memory and disk intact — the guest itself is the oracle. Every
//! failure (a broken connection, a forged or corrupted message, a refusal, a guest that
//! dirties memory faster than the link) must leave the guest running on exactly one side.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::api::ApiKiln;
use common::snapshot::{STEPS, check_continuation, steps};
use common::{NetNs, TempDir, kiln, require_kvm};

fn api_kiln(dir: &Path, name: &str, extra: &[&str]) -> ApiKiln {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = Command::new(kiln());
    cmd.args(["--api-sock", sock.to_str().unwrap()]).args(extra);
    ApiKiln::spawn(cmd, &sock)
}

fn config(dir: &TempDir, disk: &Path, run: &str) -> PathBuf {
    config_with_tap(dir, disk, run, None)
}

fn config_with_tap(dir: &TempDir, disk: &Path, run: &str, tap: Option<&str>) -> PathBuf {
    let net = tap.map_or(String::new(), |t| {
        format!(
            r#", "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{t}", "guest_mac": "aa:fc:00:00:00:01"}}]"#
        )
    });
    let text = format!(
        r#"{{"boot-source": {{"kernel_image_path": "builtin:test-guest",
              "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run={run}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "drives": [{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false}}]{net}}}"#,
        disk.display()
    );
    dir.file("vm.json", text.as_bytes())
}

fn api_kiln_in(ns: &NetNs, dir: &Path, name: &str, extra: &[&str]) -> ApiKiln {
    let sock = dir.join(format!("{name}.sock"));
    let mut cmd = ns.command(kiln());
    cmd.args(["--api-sock", sock.to_str().unwrap()]).args(extra);
    ApiKiln::spawn(cmd, &sock)
}

/// Moves the workload with a TAP of the same name on both sides: `two_hosts` puts source
/// and destination in network namespaces of their own joined by a veth pair, the stream
/// over TCP; otherwise both share one namespace (and the one TAP) and a Unix socket.
fn migrate_with_tap(two_hosts: bool) {
    let dir = TempDir::new("mign");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    // The guest pings the TAP's host end every step (net=ok), re-ARPing once if an answer
    // is missing: on the destination the same address answers from another TAP (and, with
    // two hosts, from another namespace).
    let run = format!("workload:{STEPS}:blk:net kiln.net=ip:10.78.0.2,peer:10.78.0.1");
    let cfg = config_with_tap(&dir, &disk, &run, Some("kmig0"));
    let ns_a = NetNs::new("miga").unwrap();
    ns_a.add_tap("kmig0", "10.78.0.1/24").unwrap();
    let ns_b_own = if two_hosts {
        let ns_b = NetNs::new("migb").unwrap();
        ns_b.add_tap("kmig0", "10.78.0.1/24").unwrap();
        ns_a.ip(&[
            "link", "add", "vmiga", "type", "veth", "peer", "name", "vmigb", "netns", &ns_b.name,
        ])
        .unwrap();
        ns_a.ip(&["addr", "add", "10.79.0.1/30", "dev", "vmiga"])
            .unwrap();
        ns_a.ip(&["link", "set", "vmiga", "up"]).unwrap();
        ns_b.ip(&["addr", "add", "10.79.0.2/30", "dev", "vmigb"])
            .unwrap();
        ns_b.ip(&["link", "set", "vmigb", "up"]).unwrap();
        Some(ns_b)
    } else {
        None
    };
    let ns_b = ns_b_own.as_ref().unwrap_or(&ns_a);
    let src = api_kiln_in(
        &ns_a,
        dir.path(),
        "src",
        &["--config-file", cfg.to_str().unwrap()],
    );
    src.wait_line("info workload step=3 ", Duration::from_secs(60));
    let dst = api_kiln_in(ns_b, dir.path(), "dst", &[]);
    let listen = if two_hosts {
        "tcp:10.79.0.2:7777".to_string()
    } else {
        format!("unix:{}", dir.path().join("mig.sock").display())
    };
    let src_out = migrate(src, &dst, &listen);
    let (_, cfg) = dst.api("GET", "/vm/config", None);
    assert!(cfg.contains("kmig0"), "{cfg}");
    let out = dst.finish(Duration::from_secs(300));
    let before = steps(&src_out.stdout);
    check_continuation(&before, &out);
    // The network worked on both sides: every step before and after the move pinged.
    for text in [&src_out.stdout, &out.stdout] {
        assert!(
            text.lines()
                .filter(|l| l.starts_with("info workload step="))
                .all(|l| l.ends_with(" net=ok")),
            "a step without its ping:\n{text}"
        );
    }
    // The TAP was the destination's: the source let go of it, the destination held it.
    assert!(!out.stderr.contains("TAP"), "{out}");
}

#[test]
fn the_tap_is_handed_over_by_name_in_one_namespace() {
    require_kvm();
    migrate_with_tap(false);
}

#[test]
fn the_guest_moves_over_tcp_between_two_namespaces_each_with_its_own_tap() {
    require_kvm();
    migrate_with_tap(true);
}

/// The source: the workload guest (with a scratch drive) running in a kiln with an API
/// socket, past progress step `step`.
fn running_source(dir: &TempDir, step: u64) -> ApiKiln {
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let cfg = config(dir, &disk, &format!("workload:{STEPS}:blk"));
    let src = api_kiln(dir.path(), "src", &["--config-file", cfg.to_str().unwrap()]);
    src.wait_line(
        &format!("info workload step={step} "),
        Duration::from_secs(60),
    );
    src
}

/// A destination kiln listening on `unix:<dir>/mig.sock`.
fn destination(dir: &TempDir, extra: &[&str]) -> (ApiKiln, String) {
    let k = api_kiln(dir.path(), "dst", extra);
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    let (status, text) = k.api(
        "PUT",
        "/migration/receive",
        Some(&format!(r#"{{"listen": "{listen}"}}"#)),
    );
    assert_eq!(status, 204, "{text}");
    (k, listen)
}

fn send(k: &ApiKiln, destination: &str, extra: &str) -> (u16, String) {
    k.api(
        "PUT",
        "/migration/send",
        Some(&format!(r#"{{"destination": "{destination}"{extra}}}"#)),
    )
}

/// Has `dst` receive on `listen` and `src` send there: both must succeed, and the source
/// end with exit 0. The source's output.
fn migrate(src: ApiKiln, dst: &ApiKiln, listen: &str) -> common::Output {
    let (status, text) = dst.api(
        "PUT",
        "/migration/receive",
        Some(&format!(r#"{{"listen": "{listen}"}}"#)),
    );
    assert_eq!(status, 204, "{text}");
    let (status, body) = send(&src, listen, "");
    if status != 200 {
        panic!(
            "{status} {body}; the source: {}",
            src.finish(Duration::from_secs(10))
        );
    }
    let src_out = src.finish(Duration::from_secs(10));
    assert_eq!(src_out.status, 0, "{src_out}");
    src_out
}

fn stat(body: &str, name: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(body).unwrap();
    v[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[test]
fn the_running_workload_moves_to_a_new_process_and_carries_on() {
    require_kvm();
    let dir = TempDir::new("mig");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let cfg = config(&dir, &disk, &format!("workload:{STEPS}:blk"));
    let src = api_kiln(
        dir.path(),
        "src",
        &["--config-file", cfg.to_str().unwrap(), "--level", "Info"],
    );
    src.wait_line("info workload step=3 ", Duration::from_secs(60));
    let (dst, listen) = destination(&dir, &[]);

    let (status, body) = send(&src, &listen, r#", "max_downtime_ms": 100"#);
    assert_eq!(status, 200, "{body}");
    // Untouched memory is never sent: the guest touched a few MiB of its 128.
    assert!(stat(&body, "bytes_sent") < 16 << 20, "{body}");
    assert!(stat(&body, "rounds") >= 1, "{body}");
    let src_out = src.finish(Duration::from_secs(10));
    assert_eq!(src_out.status, 0, "{src_out}");
    eprintln!("{body}\n{}", src_out.stderr);
    let before = steps(&src_out.stdout);
    assert!(before.len() >= 4, "{before:?}");

    let (_, info) = dst.api("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{info}");
    let (_, cfg) = dst.api("GET", "/vm/config", None);
    assert!(cfg.contains("disk.img"), "{cfg}");
    let out = dst.finish(Duration::from_secs(300));
    check_continuation(&before, &out);
}

/// What the man in the middle does to a message from the source.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fault {
    /// Close both connections instead of forwarding the first `Pages` message after this
    /// many bytes (the pre-copy rounds).
    CutDuringRounds(u64),
    /// Close both connections instead of forwarding the `State` message.
    CutAtState,
    /// Forward everything from the source, drop the destination's `Resumed` and close.
    CutAfterResume,
    /// Flip one byte in the payload of the first `Pages` message.
    Corrupt,
    /// Forward everything, at most this many bytes a second from the source (a slow link).
    Throttle(u64),
    /// Rewrite the (unkeyed) state so that the guest saw every CPU feature of CPUID leaf 7
    /// and 0x80000001, sealing it again as a source would.
    ForgeCpu,
}

/// The state message with every feature bit of leaves 7.0 EBX and 0x80000001 EDX set in
/// each vCPU's CPUID, its snapshot digest and message tag recomputed (no key).
fn forge_cpu(msg: &[u8]) -> Vec<u8> {
    let payload = &msg[16..msg.len() - 32];
    let mut state: serde_json::Value = serde_json::from_slice(&payload[56..]).unwrap();
    let mut forged = 0;
    for vcpu in state["vcpus"].as_array_mut().unwrap() {
        for entry in vcpu["cpuid"].as_array_mut().unwrap() {
            let bytes = entry.as_array_mut().unwrap();
            let word = |b: &[serde_json::Value], at: usize| {
                (0..4).fold(0u32, |w, i| {
                    w | (b[at + i].as_u64().unwrap() as u32) << (8 * i)
                })
            };
            let (function, index) = (word(bytes, 0), word(bytes, 4));
            let at = match (function, index) {
                (7, 0) => 16,           // ebx
                (0x8000_0001, _) => 24, // edx
                _ => continue,
            };
            for b in &mut bytes[at..at + 4] {
                *b = serde_json::json!(255);
            }
            forged += 1;
        }
    }
    assert!(forged > 0, "no CPUID leaf to forge");
    let json = serde_json::to_vec(&state).unwrap();
    let mut file = payload[..24].to_vec();
    file[16..24].copy_from_slice(&(json.len() as u64).to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&file);
    h.update(&json);
    file.extend_from_slice(h.finalize().as_bytes());
    file.extend_from_slice(&json);
    let mut out = msg[..16].to_vec();
    out[12..16].copy_from_slice(&(file.len() as u32).to_le_bytes());
    let mut h = blake3::Hasher::new();
    h.update(&out);
    h.update(&file);
    out.extend_from_slice(&file);
    out.extend_from_slice(h.finalize().as_bytes());
    out
}

const KIND_PAGES: u8 = 2;
const KIND_STATE: u8 = 3;
const KIND_RESUMED: u8 = 4;

fn read_message(r: &mut impl std::io::Read) -> Option<Vec<u8>> {
    let mut header = [0u8; 16];
    r.read_exact(&mut header).ok()?;
    let len = u32::from_le_bytes(header[12..16].try_into().unwrap()) as usize;
    let mut msg = header.to_vec();
    msg.resize(16 + len + 32, 0);
    r.read_exact(&mut msg[16..]).ok()?;
    Some(msg)
}

/// A proxy between `listen` (where the source connects) and `upstream` (the destination),
/// reading the stream's framing and applying `fault` once.
fn proxy(listen: &Path, upstream: PathBuf, fault: Fault) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    use std::os::unix::net::{UnixListener, UnixStream};
    let listener = UnixListener::bind(listen).unwrap();
    std::thread::spawn(move || {
        let (mut from_src, _) = listener.accept().unwrap();
        let mut to_dst = UnixStream::connect(&upstream).unwrap();
        let mut from_dst = to_dst.try_clone().unwrap();
        let mut to_src = from_src.try_clone().unwrap();
        let back = std::thread::spawn(move || {
            while let Some(msg) = read_message(&mut from_dst) {
                if fault == Fault::CutAfterResume && msg[6] == KIND_RESUMED {
                    break;
                }
                if to_src.write_all(&msg).is_err() {
                    break;
                }
            }
            let _ = to_src.shutdown(std::net::Shutdown::Both);
        });
        let mut bytes = 0u64;
        let mut pages_msgs = 0;
        while let Some(mut msg) = read_message(&mut from_src) {
            let kind = msg[6];
            bytes += msg.len() as u64;
            if kind == KIND_PAGES {
                pages_msgs += 1;
            }
            match fault {
                Fault::CutDuringRounds(after) if kind == KIND_PAGES && bytes > after => break,
                Fault::CutAtState if kind == KIND_STATE => break,
                Fault::ForgeCpu if kind == KIND_STATE => msg = forge_cpu(&msg),
                Fault::Corrupt if kind == KIND_PAGES && pages_msgs == 1 => {
                    let at = msg.len() / 2;
                    msg[at] ^= 0x40;
                }
                Fault::Throttle(rate) => {
                    std::thread::sleep(Duration::from_micros(msg.len() as u64 * 1_000_000 / rate))
                }
                _ => {}
            }
            if to_dst.write_all(&msg).is_err() {
                break;
            }
        }
        let _ = to_dst.shutdown(std::net::Shutdown::Both);
        let _ = from_src.shutdown(std::net::Shutdown::Both);
        let _ = back.join();
    })
}

/// The guest must run to its end on the source, undamaged, and the destination must end
/// without running it. Returns the destination's output.
fn guest_stays_on_the_source(src: ApiKiln, dst: ApiKiln, what: &str) -> common::Output {
    let (_, info) = src.api("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{what}: {info}");
    let dst_out = dst.finish(Duration::from_secs(30));
    assert_ne!(
        dst_out.status, 0,
        "{what}: the destination claims success: {dst_out}"
    );
    assert!(
        steps(&dst_out.stdout).is_empty(),
        "{what}: the guest ran on the destination too: {dst_out}"
    );
    let out = src.finish(Duration::from_secs(300));
    assert_eq!(out.status, 0, "{what}: {out}");
    assert!(!out.stdout.contains("fail "), "{what}: damage:\n{out}");
    assert!(!out.stderr.contains("cannot take"), "{what}: {out}");
    assert!(
        out.stdout.contains(&format!("ok workload steps={STEPS}")),
        "{what}: {out}"
    );
    let all = steps(&out.stdout);
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "{what}: a step ran twice: {all:?}"
    );
    dst_out
}

fn faulty_migration(fault: Fault, expect: &str) -> common::Output {
    let dir = TempDir::new("migf");
    let src = running_source(&dir, 2);
    let (dst, listen) = destination(&dir, &[]);
    let upstream = PathBuf::from(listen.strip_prefix("unix:").unwrap());
    let proxy_sock = dir.path().join("proxy.sock");
    let mitm = proxy(&proxy_sock, upstream, fault);
    let (status, body) = send(&src, &format!("unix:{}", proxy_sock.display()), "");
    if status != 400 {
        let out = src.finish(Duration::from_secs(10));
        panic!("{fault:?}: {status} {body}; the source: {out}");
    }
    assert!(body.contains(expect), "{fault:?}: {body}");
    mitm.join().unwrap();
    guest_stays_on_the_source(src, dst, &format!("{fault:?}"))
}

#[test]
fn a_connection_broken_during_the_rounds_leaves_the_guest_running_on_the_source() {
    require_kvm();
    faulty_migration(Fault::CutDuringRounds(0), "Migration error");
}

#[test]
fn a_connection_broken_at_the_final_state_leaves_the_guest_running_on_the_source() {
    require_kvm();
    faulty_migration(Fault::CutAtState, "Migration error");
}

#[test]
fn a_destination_lacking_the_guests_cpu_features_refuses_and_the_guest_stays_on_the_source() {
    require_kvm();
    let dst = faulty_migration(Fault::ForgeCpu, "refused");
    assert!(dst.stderr.contains("lacks CPU features"), "{dst}");
}

#[test]
fn a_corrupted_message_is_refused_and_the_guest_stays_on_the_source() {
    require_kvm();
    let dst = faulty_migration(Fault::Corrupt, "Migration error");
    // Refused at the message itself, before its pages are written.
    assert!(dst.stderr.contains("does not match its MAC"), "{dst}");
}

#[test]
fn a_connection_broken_after_the_destination_resumed_leaves_the_guest_there_only() {
    require_kvm();
    let dir = TempDir::new("migr");
    let src = running_source(&dir, 3);
    let (dst, listen) = destination(&dir, &[]);
    let upstream = PathBuf::from(listen.strip_prefix("unix:").unwrap());
    let proxy_sock = dir.path().join("proxy.sock");
    let mitm = proxy(&proxy_sock, upstream, Fault::CutAfterResume);
    let (status, body) = send(&src, &format!("unix:{}", proxy_sock.display()), "");
    mitm.join().unwrap();
    // The source cannot know whether the destination runs the guest: it keeps it paused.
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("may be running the guest"), "{body}");
    let (_, info) = src.api("GET", "/", None);
    assert!(info.contains(r#""state":"Paused""#), "{info}");
    // The destination runs it to the end.
    let out = dst.finish(Duration::from_secs(300));
    // The source never ran another step: stop it.
    Command::new("kill")
        .args(["-TERM", &src.pid().to_string()])
        .status()
        .unwrap();
    let src_out = src.finish(Duration::from_secs(10));
    let before = steps(&src_out.stdout);
    check_continuation(&before, &out);
}

#[test]
fn a_stream_forged_without_the_key_is_refused_and_the_guest_stays_on_the_source() {
    require_kvm();
    let dir = TempDir::new("migk");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let key_a = dir.file("a.key", &[1u8; 32]);
    let key_b = dir.file("b.key", &[2u8; 32]);
    let cfg = config(&dir, &disk, &format!("workload:{STEPS}:blk"));
    let src = api_kiln(
        dir.path(),
        "src",
        &[
            "--config-file",
            cfg.to_str().unwrap(),
            "--snapshot-key-file",
            key_a.to_str().unwrap(),
        ],
    );
    src.wait_line("info workload step=2 ", Duration::from_secs(60));
    let (dst, listen) = destination(&dir, &["--snapshot-key-file", key_b.to_str().unwrap()]);
    let (status, body) = send(&src, &listen, "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("Migration error"), "{body}");
    let dst = guest_stays_on_the_source(src, dst, "another key");
    // Refused at the first message, not later at the state's own MAC.
    assert!(dst.stderr.contains("does not match its MAC"), "{dst}");
}

#[test]
fn a_guest_dirtying_faster_than_the_link_gives_up_at_the_round_limit_and_keeps_running() {
    require_kvm();
    let dir = TempDir::new("migc");
    let src = running_source(&dir, 2);
    let (dst, listen) = destination(&dir, &[]);
    let upstream = PathBuf::from(listen.strip_prefix("unix:").unwrap());
    let proxy_sock = dir.path().join("proxy.sock");
    // 128 KiB/s: the guest rewrites 64 KiB every ~100 ms step, faster than that.
    let mitm = proxy(&proxy_sock, upstream, Fault::Throttle(128 << 10));
    let (status, body) = send(
        &src,
        &format!("unix:{}", proxy_sock.display()),
        r#", "max_downtime_ms": 10, "max_rounds": 2"#,
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("did not converge"), "{body}");
    mitm.join().unwrap();
    let _ = guest_stays_on_the_source(src, dst, "no convergence");
}

#[test]
fn bad_migration_requests_are_refused_naming_the_field() {
    require_kvm();
    let dir = TempDir::new("migb");
    let src = running_source(&dir, 1);
    let (status, body) = send(&src, "ftp:somewhere", "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("destination"), "{body}");
    let (status, body) = send(
        &src,
        &format!("unix:{}", dir.path().join("nobody").display()),
        "",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("cannot connect"), "{body}");
    // Receiving is for a fresh process only.
    let (status, body) = src.api(
        "PUT",
        "/migration/receive",
        Some(r#"{"listen": "unix:/x"}"#),
    );
    assert_eq!(status, 400, "{body}");
    let (_, info) = src.api("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{info}");
    let dst = api_kiln(dir.path(), "dst", &[]);
    assert_eq!(
        dst.api(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 1, "mem_size_mib": 64}"#)
        )
        .0,
        204
    );
    let (status, body) = dst.api(
        "PUT",
        "/migration/receive",
        Some(r#"{"listen": "unix:/x"}"#),
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("after configuring"), "{body}");
    let (status, body) = dst.api(
        "PUT",
        "/migration/send",
        Some(r#"{"destination": "unix:/x"}"#),
    );
    assert_eq!(status, 400, "{body}");
    let out = src.finish(Duration::from_secs(300));
    assert_eq!(out.status, 0, "{out}");
}

#[test]
fn over_a_slow_link_the_pages_dirtied_meanwhile_follow_and_the_budget_holds() {
    require_kvm();
    let dir = TempDir::new("migs");
    let src = running_source(&dir, 3);
    let (dst, listen) = destination(&dir, &[]);
    let upstream = PathBuf::from(listen.strip_prefix("unix:").unwrap());
    let proxy_sock = dir.path().join("proxy.sock");
    // 512 KiB/s: the first pass takes over half a second, several workload steps rewrite
    // their pattern meanwhile, and only the dirty log can bring those pages over.
    let mitm = proxy(&proxy_sock, upstream, Fault::Throttle(512 << 10));
    let (status, body) = send(
        &src,
        &format!("unix:{}", proxy_sock.display()),
        r#", "max_downtime_ms": 400"#,
    );
    assert_eq!(status, 200, "{body}");
    assert!(stat(&body, "downtime_ms") <= 400, "{body}");
    mitm.join().unwrap();
    let src_out = src.finish(Duration::from_secs(10));
    assert_eq!(src_out.status, 0, "{src_out}");
    let before = steps(&src_out.stdout);
    let out = dst.finish(Duration::from_secs(300));
    check_continuation(&before, &out);
}

#[test]
fn a_destination_that_fails_after_the_hand_over_gives_the_tap_and_drive_back() {
    require_kvm();
    let dir = TempDir::new("migt");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let cfg = config_with_tap(&dir, &disk, &format!("workload:{STEPS}:blk"), Some("kmig1"));
    let ns = NetNs::new("migt").unwrap();
    ns.add_tap("kmig1", "10.78.1.1/24").unwrap();
    let src = api_kiln_in(
        &ns,
        dir.path(),
        "src",
        &["--config-file", cfg.to_str().unwrap()],
    );
    src.wait_line("info workload step=2 ", Duration::from_secs(60));
    let dst = api_kiln_in(&ns, dir.path(), "dst", &[]);
    // The destination accepts the state, then cannot open the drive it is told to use.
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    let body = format!(
        r#"{{"listen": "{listen}", "drive_overrides": [{{"drive_id": "scratch", "path_on_host": "{}"}}]}}"#,
        dir.path().join("missing.img").display()
    );
    let (status, text) = dst.api("PUT", "/migration/receive", Some(&body));
    assert_eq!(status, 204, "{text}");
    let (status, body) = send(&src, &listen, "");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("refused"), "{body}");
    // The source holds its drive's lock again.
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&disk)
        .unwrap();
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a file this test opened.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    assert_ne!(r, 0, "the source did not take its drive's lock back");
    let dst_out = guest_stays_on_the_source(src, dst, "refused after Go");
    assert!(dst_out.stderr.contains("missing.img"), "{dst_out}");
}

/// The ids a jailed kiln runs as (no such user on the host).
const JAIL_UID: u32 = 40124;
const JAIL_GID: u32 = 40101;

/// A jail (`<base>/kiln/<id>/root`) holding `files` (hard links, so both jails share the
/// drive's inode as two hosts share storage).
struct Jail {
    base: TempDir,
    id: String,
    root: PathBuf,
}

impl Jail {
    fn new(tag: &str, files: &[(&Path, &str)]) -> Jail {
        let base = TempDir::new(tag);
        let id = testkit::unique(tag);
        let root = base.path().join("kiln").join(&id).join("root");
        std::fs::create_dir_all(&root).unwrap();
        for (from, name) in files {
            std::fs::hard_link(from, root.join(name)).unwrap();
        }
        Jail { base, id, root }
    }

    fn kiln(&self, ns: &NetNs, extra: &[&str]) -> ApiKiln {
        let jailer = Path::new(kiln()).with_file_name("jailer");
        assert!(
            jailer.is_file(),
            "{} is missing: build the workspace",
            jailer.display()
        );
        let mut cmd = Command::new(jailer);
        cmd.args(["--id", &self.id, "--exec-file", kiln()])
            .args([
                "--uid",
                &JAIL_UID.to_string(),
                "--gid",
                &JAIL_GID.to_string(),
            ])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .arg("--netns")
            .arg(ns.path())
            .args(["--", "--api-sock", "/run/kiln.sock"])
            .args(extra);
        ApiKiln::spawn(cmd, &self.root.join("run/kiln.sock"))
    }
}

#[test]
fn both_ends_work_inside_jails() {
    require_kvm();
    let dir = TempDir::new("migj");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    std::os::unix::fs::chown(&disk, Some(JAIL_UID), Some(JAIL_GID)).unwrap();
    let text = format!(
        r#"{{"boot-source": {{"kernel_image_path": "builtin:test-guest",
              "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=workload:{STEPS}:blk"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
            "drives": [{{"drive_id": "scratch", "path_on_host": "/disk.img", "is_root_device": false}}],
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "kjmig0", "guest_mac": "aa:fc:00:00:00:01"}}]}}"#
    );
    let cfg = dir.file("vm.json", text.as_bytes());
    let ns = NetNs::new("migj").unwrap();
    ns.ip(&[
        "tuntap",
        "add",
        "kjmig0",
        "mode",
        "tap",
        "user",
        &JAIL_UID.to_string(),
    ])
    .unwrap();
    ns.ip(&["link", "set", "kjmig0", "up"]).unwrap();
    let src_jail = Jail::new("migjsrc", &[(&disk, "disk.img"), (&cfg, "vm.json")]);
    let dst_jail = Jail::new("migjdst", &[(&disk, "disk.img")]);
    let src = src_jail.kiln(&ns, &["--config-file", "/vm.json"]);
    src.wait_line("info workload step=3 ", Duration::from_secs(60));
    let dst = dst_jail.kiln(&ns, &[]);
    let listen = "tcp:127.0.0.1:7791";
    let src_out = migrate(src, &dst, listen);
    let out = dst.finish(Duration::from_secs(300));
    check_continuation(&steps(&src_out.stdout), &out);
    assert!(!out.stderr.contains("seccomp"), "{out}");
}
