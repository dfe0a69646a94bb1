//! The serial console: input reaches the guest through the UART's receive interrupt, input
//! that the guest does not read stays outside kiln (bounded memory), output can go to a
//! file, and a stop signal ends the VM in order.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::{TempDir, guest, kiln, require_kvm, run_kiln_with, sigterm, wait_with_deadline};

#[test]
fn stdin_line_reaches_the_guest() {
    require_kvm();
    let k = guest("kiln-guest.elf");
    let out = run_kiln_with(
        &[
            "--no-api",
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "kiln.run=serial-echo",
        ],
        Some(b"hello from the host\n"),
        Duration::from_secs(60),
    );
    assert_eq!(out.status, 0, "{out}");
    assert_eq!(
        out.line("ok serial-echo"),
        "ok serial-echo \"hello from the host\""
    );
}

#[test]
fn serial_output_to_a_file() {
    require_kvm();
    let dir = TempDir::new("serial-out");
    let path = dir.path().join("console.log");
    let out = run_kiln_with(
        &[
            "--no-api",
            "--serial-out",
            path.to_str().unwrap(),
            "--cmdline",
            "kiln.run=hello",
        ],
        None,
        Duration::from_secs(60),
    );
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stdout.is_empty());
    let console = std::fs::read_to_string(&path).unwrap();
    assert_eq!(
        console,
        "kiln-guest: start variant=elf\nkiln-guest: hello\nkiln-guest: done ok=0 fail=0\n"
    );
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap()
        .parse()
        .unwrap()
}

/// Security case 23: 100 MB pushed into stdin while the guest never reads stays outside
/// kiln: the pipe fills, the writer blocks, kiln's memory does not grow. Then SIGTERM
/// stops the VM cleanly with status 128 + 15.
#[test]
fn unread_input_does_not_grow_memory_and_sigterm_stops_cleanly() {
    require_kvm();
    let k = guest("kiln-guest.elf");
    let mut child = Command::new(kiln())
        .args([
            "--no-api",
            "--kernel",
            k.to_str().unwrap(),
            "--cmdline",
            "kiln.run=idle",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let written = Arc::new(AtomicU64::new(0));
    let counter = written.clone();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 64 * 1024];
        for _ in 0..1600 {
            if stdin.write_all(&chunk).is_err() {
                return;
            }
            counter.fetch_add(chunk.len() as u64, Ordering::SeqCst);
        }
    });
    // Wait for the guest to be idle, then let the writer push as much as it can.
    let start = Instant::now();
    std::thread::sleep(Duration::from_millis(1500));
    let rss_before = rss_kib(pid);
    std::thread::sleep(Duration::from_millis(1500));
    let rss_after = rss_kib(pid);
    let pushed = written.load(Ordering::SeqCst);
    assert!(
        pushed < 4 * 1024 * 1024,
        "kiln consumed {pushed} bytes of input the guest never read"
    );
    assert!(
        rss_after <= rss_before + 1024,
        "RSS grew from {rss_before} KiB to {rss_after} KiB"
    );
    assert!(start.elapsed() < Duration::from_secs(30));
    sigterm(pid);
    let out = wait_with_deadline(child, Duration::from_secs(20));
    writer.join().unwrap();
    assert_eq!(out.status, 128 + 15, "{out}");
    assert!(out.stdout.contains("info idle"), "{out}");
    assert!(out.stderr.contains("stopped by signal 15"), "{out}");
}
