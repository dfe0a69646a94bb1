//! What kiln survives from its operator's side and from valid but heavy traffic (security
//! cases 26-30 of ../shared/docs/security-tests.md): allocation-heavy work on every thread
//! under the default seccomp filters, sinks and a console nobody reads, RLIMIT_FSIZE below
//! a guest write, clients that stall, and oversized or ill-typed operator files.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::process::Command;
use std::time::{Duration, Instant};

use common::api::{ApiKiln, request};
use common::{TempDir, exit_code, guest, kiln, require_kvm, run_kiln_with, sigterm};

const LONG: Duration = Duration::from_secs(60);

fn api_kiln(dir: &TempDir, extra: &[&str]) -> ApiKiln {
    let sock = dir.path().join("api.sock");
    let mut cmd = Command::new(kiln());
    cmd.args(["--api-sock", sock.to_str().unwrap()]).args(extra);
    ApiKiln::spawn(cmd, &sock)
}

/// Reads HTTP responses from `s` until `n` status lines have been seen (bodies are small
/// and carry no "HTTP/1.1 " of their own).
fn read_responses(s: &mut UnixStream, n: usize) -> Vec<u16> {
    let mut all = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let count = |all: &[u8]| all.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    while count(&all) < n {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(k) => all.extend_from_slice(&buf[..k]),
        }
    }
    String::from_utf8_lossy(&all)
        .split("HTTP/1.1 ")
        .skip(1)
        .filter_map(|r| r.get(..3).and_then(|c| c.parse().ok()))
        .collect()
}

/// The API traffic of security case 26, every piece answered: ten concurrent maximum-size
/// bodies, 16 KiB of pipelined GETs in one write, a client that pipelines and never
/// reads (returned, still open), a 50 KB `boot_args`, a body of 50 000 `[`.
fn allocation_heavy_api_traffic(sock: &std::path::Path, booted: bool) -> UnixStream {
    // Ten maximum-size (51200-byte) valid bodies at once.
    let threads: Vec<_> = (0..10)
        .map(|_| {
            let sock = sock.to_path_buf();
            std::thread::spawn(move || {
                let json = r#"{"vcpu_count": 1, "mem_size_mib": 64}"#;
                let body = format!("{json}{}", " ".repeat(51200 - json.len()));
                // A connection the test closed a moment ago may still hold a slot.
                for _ in 0..100 {
                    match request(&sock, "PUT", "/machine-config", Some(&body)).0 {
                        503 => std::thread::sleep(Duration::from_millis(20)),
                        status => return status,
                    }
                }
                503
            })
        })
        .collect();
    let want = if booted { 400 } else { 204 };
    for t in threads {
        assert_eq!(t.join().unwrap(), want);
    }
    // 16 KiB of pipelined GET /vm/config in one write.
    let one = "GET /vm/config HTTP/1.1\r\n\r\n";
    let n = 16 * 1024 / one.len();
    let mut s = UnixStream::connect(sock).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(one.repeat(n).as_bytes()).unwrap();
    let statuses = read_responses(&mut s, n);
    assert_eq!(statuses.len(), n);
    assert!(statuses.iter().all(|&c| c == 200), "{statuses:?}");
    // A client that pipelines and never reads.
    let mut silent = UnixStream::connect(sock).unwrap();
    silent.set_nonblocking(true).unwrap();
    let burst = "GET /vm/config HTTP/1.1\r\n\r\n".repeat(8000);
    let mut sent = 0;
    let start = Instant::now();
    while sent < burst.len() && start.elapsed() < Duration::from_secs(5) {
        match silent.write(&burst.as_bytes()[sent..]) {
            Ok(k) => sent += k,
            Err(_) => std::thread::sleep(Duration::from_millis(10)),
        }
    }
    // A 50 KB boot_args and a body of 50 000 '[' are refused, not fatal.
    let args = format!(
        r#"{{"kernel_image_path": "/nonexistent", "boot_args": "{}"}}"#,
        "a".repeat(50_000)
    );
    assert_eq!(request(sock, "PUT", "/boot-source", Some(&args)).0, 400);
    let brackets = "[".repeat(50_000);
    assert_eq!(request(sock, "PUT", "/drives/x", Some(&brackets)).0, 400);
    silent
}

/// Security case 26: before and after boot, allocation-heavy API traffic (API thread), a
/// VM with many drives and a 2 KiB command line whose config is read back and flushed as
/// metrics again and again (VMM thread), and a guest that floods the serial console, storms
/// a virtio-blk device's registers and rings and exits on a port in a tight loop (vCPU
/// threads) — all under the default filters: kiln never dies with 148.
#[test]
fn allocation_heavy_work_on_every_thread_stays_inside_its_filter() {
    require_kvm();
    let dir = TempDir::new("alloc");
    let metrics = dir.path().join("metrics.json");
    let k = api_kiln(&dir, &["--metrics-path", metrics.to_str().unwrap()]);
    let _silent_before = allocation_heavy_api_traffic(&k.sock, false);

    let kernel = guest("kiln-guest.elf");
    let padding = "x".repeat(1400);
    let boot = serde_json::json!({
        "kernel_image_path": kernel,
        "boot_args": format!(
            "console=ttyS0 kiln.pad={padding} \
             kiln.run=serial-flood:131072,blk-fuzz:7:4:16,pio-bench:20000,idle"
        ),
    });
    assert_eq!(k.api("PUT", "/boot-source", Some(&boot.to_string())).0, 204);
    assert_eq!(
        k.api(
            "PUT",
            "/machine-config",
            Some(r#"{"vcpu_count": 2, "mem_size_mib": 64}"#)
        )
        .0,
        204
    );
    for i in 0..8 {
        let image = dir.file(&format!("d{i}.img"), &vec![0u8; 1 << 20]);
        let drive = serde_json::json!({
            "drive_id": format!("drive{i}"),
            "path_on_host": image,
            "is_root_device": i == 0,
            "is_read_only": false,
        });
        let path = format!("/drives/drive{i}");
        assert_eq!(k.api("PUT", &path, Some(&drive.to_string())).0, 204);
    }
    let start = r#"{"action_type": "InstanceStart"}"#;
    assert_eq!(k.api("PUT", "/actions", Some(start)).0, 204);

    let _silent_after = allocation_heavy_api_traffic(&k.sock, true);
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    for _ in 0..20 {
        assert_eq!(k.api("GET", "/vm/config", None).0, 200);
        assert_eq!(k.api("PUT", "/actions", Some(flush)).0, 204);
    }
    k.wait_line("info serial-flood bytes=131072", LONG);
    k.wait_line("ok blk-fuzz done", LONG);
    k.wait_line("bench pio", LONG);
    k.wait_line("info idle", LONG);
    // Freed memory is given back (heaps shrink) after the traffic: give it a moment.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(k.api("GET", "/", None).0, 200);
    sigterm(k.pid());
    let out = k.finish(LONG);
    assert_eq!(out.status, 128 + 15, "{out}");
    assert!(!out.stderr.contains("seccomp"), "{out}");
}

/// Security case 30: an operator file over the 1 MiB limit, as the config file or the
/// seccomp filter, is refused at start with exit code 2 and a message naming it.
#[test]
fn oversized_operator_files_are_refused_naming_the_file() {
    let dir = TempDir::new("bigfile");
    let big = dir.file("big.json", &vec![b' '; 2 << 20]);
    let big = big.to_str().unwrap();
    for flag in ["--config-file", "--seccomp-filter"] {
        let out = run_kiln_with(&["--no-api", flag, big], None, Duration::from_secs(20));
        assert_eq!(out.status, 2, "{flag}:\n{out}");
        assert!(out.stderr.contains(big), "{flag}:\n{out}");
        assert!(
            out.stderr.contains("larger than 1048576 bytes"),
            "{flag}:\n{out}"
        );
        assert!(out.stdout.is_empty(), "{flag}: nothing may boot:\n{out}");
    }
}

/// Security case 30: `/dev/zero` as the config file or the seccomp filter is refused
/// after reading at most the limit, not read until memory runs out.
#[test]
fn endless_operator_files_are_refused() {
    for flag in ["--config-file", "--seccomp-filter"] {
        let out = run_kiln_with(
            &["--no-api", flag, "/dev/zero"],
            None,
            Duration::from_secs(20),
        );
        assert_eq!(out.status, 2, "{flag}:\n{out}");
        assert!(
            out.stderr.contains("/dev/zero: larger than 1048576 bytes"),
            "{flag}:\n{out}"
        );
    }
}

/// Security case 30: the built-in filters with KVM_RUN's request number widened past 32
/// bits in its `dword` condition are refused at start (exit 2) instead of killing the VM
/// with 148 at its first KVM_RUN.
#[test]
fn a_dword_value_wider_than_32_bits_is_refused_at_start() {
    require_kvm();
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/seccomp-filters/x86_64.json"
    ))
    .unwrap();
    let mut doc: serde_json::Value = serde_json::from_str(&text).unwrap();
    let rules = doc["vcpu"]["filter"].as_array_mut().unwrap();
    let kvm_run = rules
        .iter_mut()
        .flat_map(|r| r["args"].as_array_mut().into_iter().flatten())
        .find(|a| a["val"] == 44672)
        .unwrap();
    kvm_run["val"] = serde_json::json!(44672_u64 + (1 << 32));
    let dir = TempDir::new("dword");
    let file = dir.file("wide.json", doc.to_string().as_bytes());
    let out = run_kiln_with(
        &["--no-api", "--seccomp-filter", file.to_str().unwrap()],
        None,
        LONG,
    );
    assert_eq!(out.status, 2, "{out}");
    assert!(
        out.stderr
            .contains("`vcpu`, syscall `ioctl`: argument 1 is a dword"),
        "{out}"
    );
    assert!(out.stdout.is_empty(), "nothing may boot:\n{out}");
}

/// Security case 28: under RLIMIT_FSIZE (as the jailer's `--resource-limit fsize=` sets
/// it) a guest write at an offset past the limit gets IOERR, counted in the drive's
/// `io_errors`; kiln is not killed by SIGXFSZ and the guest goes on to read and finish.
#[test]
fn a_write_past_rlimit_fsize_is_an_ioerr_not_a_kill() {
    require_kvm();
    let dir = TempDir::new("fsize");
    let image = dir.file("disk.img", b"");
    std::fs::File::options()
        .write(true)
        .open(&image)
        .unwrap()
        .set_len(1 << 20)
        .unwrap();
    let metrics = dir.path().join("metrics.json");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("kiln-guest.elf"),
            "boot_args": "console=ttyS0 kiln.run=blk-write:0:0:8,blk-write:0:256:8:expect-ioerr,blk-read:0:0:8",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
        "drives": [{"drive_id": "rootfs", "path_on_host": image, "is_root_device": true, "is_read_only": false}],
    });
    let cfg = dir.file("vm.json", config.to_string().as_bytes());
    // 64 KiB: sectors 0-7 fit, sector 256 (128 KiB) is past the limit.
    let mut cmd = Command::new("prlimit");
    cmd.args(["--fsize=65536", "--", kiln(), "--no-api"])
        .args(["--config-file", cfg.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let out = common::wait_with_deadline(cmd.spawn().unwrap(), LONG);
    assert_eq!(out.status, 0, "{out}");
    out.line("ok blk-write dev=0 sector=0 count=8 status=ok");
    out.line("ok blk-write dev=0 sector=256 count=8 status=ioerr");
    out.line("ok blk-read dev=0 sector=0 count=8");
    common::assert_guest_passed(&out);
    let text = std::fs::read_to_string(&metrics).unwrap();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        common::counter(&last, "block_rootfs", "io_errors") >= 1,
        "{last}"
    );
}

/// Makes a FIFO at `path` (through mkfifo(1), which keeps the tests free of unsafe).
fn mkfifo(path: &std::path::Path) {
    let status = Command::new("mkfifo").arg(path).status().unwrap();
    assert!(status.success());
}

/// A running VM (the test guest idling) from a config file, serving the API.
fn idle_vm(dir: &TempDir, extra: &[&str]) -> ApiKiln {
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("kiln-guest.elf"),
            "boot_args": "console=ttyS0 kiln.run=idle",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let cfg = dir.file("vm.json", config.to_string().as_bytes());
    let mut args = vec!["--config-file", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let k = api_kiln(dir, &args);
    k.wait_line("info idle", LONG);
    k
}

/// Security case 27: log and metrics FIFOs nobody reads never block kiln: hundreds of
/// FlushMetrics and of logged requests are all answered, the dropped lines are counted,
/// and SIGTERM ends kiln promptly.
#[test]
fn log_and_metrics_fifos_nobody_reads_never_block() {
    require_kvm();
    let dir = TempDir::new("fifos");
    let log = dir.path().join("log.fifo");
    let metrics = dir.path().join("metrics.fifo");
    mkfifo(&log);
    mkfifo(&metrics);
    let k = idle_vm(
        &dir,
        &[
            "--level",
            "Debug",
            "--log-path",
            log.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
        ],
    );
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    for i in 0..200 {
        assert_eq!(k.api("PUT", "/actions", Some(flush)).0, 204, "flush {i}");
    }
    for i in 0..1000 {
        assert_eq!(k.api("GET", "/machine-config", None).0, 200, "request {i}");
    }
    // A reader comes at last: every line it gets is whole, and the drops were counted.
    let mut reader = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(&metrics)
        .unwrap();
    let mut text = Vec::new();
    let mut drain = |text: &mut Vec<u8>| {
        let mut buf = vec![0u8; 1 << 16];
        while let Ok(n @ 1..) = reader.read(&mut buf) {
            text.extend_from_slice(&buf[..n]);
        }
    };
    drain(&mut text);
    let before = text.iter().filter(|b| **b == b'\n').count();
    assert!(before > 0);
    assert_eq!(k.api("PUT", "/actions", Some(flush)).0, 204);
    let waited = Instant::now();
    while text.iter().filter(|b| **b == b'\n').count() == before {
        assert!(waited.elapsed() < Duration::from_secs(10), "no new line");
        std::thread::sleep(Duration::from_millis(10));
        drain(&mut text);
    }
    let text = String::from_utf8(text).unwrap();
    assert!(text.ends_with('\n'));
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).unwrap();
    }
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert!(
        common::counter(&last, "logger", "missed_metrics_count") > 0,
        "{last}"
    );
    assert!(
        common::counter(&last, "logger", "missed_log_count") > 0,
        "{last}"
    );
    let start = Instant::now();
    sigterm(k.pid());
    let out = k.finish(Duration::from_secs(10));
    assert_eq!(out.status, 128 + 15, "{out}");
    assert!(start.elapsed() < Duration::from_secs(5), "{out}");
}

/// Security case 27: a console (stdout) nobody reads never blocks a vCPU: the guest
/// floods the serial port, what does not fit is dropped and counted (`uart.tx_lost_bytes`),
/// the VM pauses at once when asked, the API answers, and SIGTERM ends kiln promptly.
#[test]
fn a_console_nobody_reads_never_blocks_a_vcpu() {
    require_kvm();
    let dir = TempDir::new("console");
    let metrics = dir.path().join("metrics.json");
    let sock = dir.path().join("api.sock");
    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": guest("kiln-guest.elf"),
            "boot_args": "console=ttyS0 kiln.run=serial-flood:1048576,idle",
        },
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64},
    });
    let cfg = dir.file("vm.json", config.to_string().as_bytes());
    let mut child = Command::new(kiln())
        .args(["--api-sock", sock.to_str().unwrap()])
        .args(["--config-file", cfg.to_str().unwrap()])
        .args(["--metrics-path", metrics.to_str().unwrap()])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Nobody reads the console; the pipe stays open.
    let _console = child.stdout.take().unwrap();
    let start = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(start.elapsed() < LONG, "the API socket never accepted");
        std::thread::sleep(Duration::from_millis(10));
    }
    let flush = r#"{"action_type": "FlushMetrics"}"#;
    let lost = || {
        assert_eq!(request(&sock, "PUT", "/actions", Some(flush)).0, 204);
        let text = std::fs::read_to_string(&metrics).unwrap();
        let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
        common::counter(&last, "uart", "tx_lost_bytes")
    };
    let waited = Instant::now();
    while lost() == 0 {
        assert!(
            waited.elapsed() < LONG,
            "the guest's output was never dropped"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // kiln wrote through a description of its own: the one it shares with this test (its
    // fd 1) keeps its blocking mode.
    let fdinfo = std::fs::read_to_string(format!("/proc/{}/fdinfo/1", child.id())).unwrap();
    let flags = fdinfo
        .lines()
        .find_map(|l| l.strip_prefix("flags:"))
        .and_then(|f| u32::from_str_radix(f.trim(), 8).ok())
        .unwrap();
    assert_eq!(flags & 0o4000, 0, "kiln's fd 1 was made O_NONBLOCK");
    // The vCPU is not stuck in a write: it pauses, and the API keeps answering.
    let paused = Instant::now();
    let patch = r#"{"state": "Paused"}"#;
    assert_eq!(request(&sock, "PATCH", "/vm", Some(patch)).0, 204);
    assert!(paused.elapsed() < Duration::from_secs(5));
    let (status, body) = request(&sock, "GET", "/", None);
    assert_eq!(status, 200);
    assert!(body.contains("Paused"), "{body}");
    let before = lost();
    assert_eq!(lost(), before, "a paused guest wrote");
    let stop = Instant::now();
    sigterm(child.id());
    let status = common::wait_until(&mut child, stop + Duration::from_secs(10))
        .expect("SIGTERM did not end kiln within 10 s");
    assert_eq!(exit_code(status), 128 + 15);
    assert!(stop.elapsed() < Duration::from_secs(5));
}

/// Security case 29: ten clients that each send half a request and stall lock nobody out:
/// after 2 s a fresh client takes the place of the oldest, and after 10 s without progress
/// the others are answered 408 and closed (under the default filters).
#[test]
fn stalled_clients_never_lock_a_fresh_client_out() {
    let dir = TempDir::new("stalled");
    let k = api_kiln(&dir, &[]);
    // The start-up probe's connection is closed, not counted among the ten.
    assert_eq!(k.api("GET", "/", None).0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let half = b"PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{";
    let mut stalled: Vec<UnixStream> = (0..10)
        .map(|_| {
            let mut s = UnixStream::connect(&k.sock).unwrap();
            s.write_all(half).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            s
        })
        .collect();
    std::thread::sleep(Duration::from_millis(2500));
    let (status, body) = k.api("GET", "/", None);
    assert_eq!(status, 200, "{body}");
    // The others time out: 408, then end of stream.
    let mut answered = 0;
    for s in &mut stalled {
        let mut text = String::new();
        let _ = s.read_to_string(&mut text);
        if !text.is_empty() {
            assert!(text.starts_with("HTTP/1.1 408 "), "{text}");
            answered += 1;
        }
    }
    assert_eq!(answered, 9);
    assert_eq!(k.api("GET", "/", None).0, 200);
}
