//! kiln-specific helpers of the end-to-end tests: running the kiln binary with a deadline
//! and reading the test guest's report; `api` drives kiln's API socket. The generic helpers
//! (temporary directories, the KVM check, network namespaces, waiting for children) are
//! testkit's, re-exported here.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

// Each user takes part of it.
#[allow(unused_imports)]
pub use testkit::{NetNs, TempDir, exit_code, read_all, require_kvm, wait_until};

/// The kiln binary under test.
pub fn kiln() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// A test guest build output (`kiln-guest.elf`, `kiln-guest-pvh.elf`, `kiln-guest.bzImage`).
pub fn guest(name: &str) -> PathBuf {
    Path::new(env!("KILN_TEST_GUEST_DIR")).join(name)
}

/// What a kiln run produced.
#[derive(Debug)]
pub struct Output {
    pub status: i32,
    pub stdout: String,
    pub stderr: String,
    pub wall: Duration,
}

impl Output {
    /// The guest's report lines (stdout, line by line).
    pub fn lines(&self) -> Vec<&str> {
        self.stdout.lines().collect()
    }

    /// Lines starting with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    /// The single line starting with `prefix`.
    pub fn line(&self, prefix: &str) -> &str {
        let found = self.lines_with(prefix);
        assert_eq!(found.len(), 1, "expected one `{prefix}` line in:\n{self}");
        found[0]
    }
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- status {} after {:?}\n--- stdout\n{}--- stderr\n{}",
            self.status, self.wall, self.stdout, self.stderr
        )
    }
}

/// Waits for `child` up to `timeout`, killing it (and failing the test) past the deadline.
pub fn wait_with_deadline(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    let out = read_all(child.stdout.take().unwrap());
    let err = read_all(child.stderr.take().unwrap());
    let Some(status) = wait_until(&mut child, start + timeout) else {
        let stdout = out.join().unwrap();
        let stderr = err.join().unwrap();
        panic!("kiln did not exit within {timeout:?}\n--- stdout\n{stdout}--- stderr\n{stderr}");
    };
    let wall = start.elapsed();
    Output {
        status: exit_code(status),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        wall,
    }
}

/// Sends SIGTERM to `pid`.
pub fn sigterm(pid: u32) {
    testkit::signal(pid, libc::SIGTERM).unwrap();
}

/// Runs kiln with `args`, feeding `stdin` (or /dev/null), with a deadline.
pub fn run_kiln_with(args: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Output {
    let mut cmd = Command::new(kiln());
    cmd.args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    let mut child = cmd.spawn().unwrap();
    if let Some(input) = stdin {
        let mut pipe = child.stdin.take().unwrap();
        let input = input.to_vec();
        std::thread::spawn(move || {
            let _ = pipe.write_all(&input);
        });
    }
    wait_with_deadline(child, timeout)
}

/// Runs kiln with `args` and no input, allowing 60 s (guests are emulated here).
pub fn run_kiln(args: &[&str]) -> Output {
    run_kiln_with(args, None, Duration::from_secs(60))
}

/// Boots `kernel` with the given command line, vCPUs and memory, in --no-api mode.
pub fn boot(kernel: &Path, cmdline: &str, vcpus: u32, mem_mib: u64, extra: &[&str]) -> Output {
    require_kvm();
    let kernel = kernel.to_str().unwrap().to_string();
    let vcpus = vcpus.to_string();
    let mem = mem_mib.to_string();
    let mut args = vec![
        "--no-api",
        "--kernel",
        &kernel,
        "--cmdline",
        cmdline,
        "--vcpus",
        &vcpus,
        "--mem-mib",
        &mem,
    ];
    args.extend_from_slice(extra);
    run_kiln(&args)
}

/// Asserts the guest reported no failure and finished.
pub fn assert_guest_passed(out: &Output) {
    assert!(
        out.lines_with("fail").is_empty(),
        "the guest reported failures:\n{out}"
    );
    let done = out.line("kiln-guest: done");
    assert!(done.ends_with(" fail=0"), "{done}\n{out}");
    assert_eq!(out.status, 0, "{out}");
}

/// The counter `section.name` of a kiln metrics line.
pub fn counter(metrics: &serde_json::Value, section: &str, name: &str) -> u64 {
    metrics[section][name]
        .as_u64()
        .unwrap_or_else(|| panic!("no {section}.{name} in {metrics}"))
}

/// The bytes the test guest writes to `count` sectors from `sector` (tests/guest
/// include/virtio_blk.h, blk_pattern_byte).
pub fn blk_pattern(sector: u64, count: u64) -> Vec<u8> {
    let mut v = Vec::with_capacity(count as usize * 512);
    for s in sector..sector + count {
        let base = (s as u32).wrapping_mul(2_654_435_761);
        for off in 0..512u32 {
            let h = base.wrapping_add(off.wrapping_mul(40503));
            v.push((h ^ (h >> 16)) as u8);
        }
    }
    v
}

/// 32-bit FNV-1a, as the guest computes over the initrd.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

pub mod api;
pub mod snapshot;

/// Each thread of process `pid`: its name and its `Seccomp:` mode from
/// /proc/<pid>/task/<tid>/status ("2": filtered), sorted.
pub fn seccomp_modes(pid: u32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let name = std::fs::read_to_string(task.join("comm")).unwrap_or_default();
        let mode = status
            .lines()
            .find(|l| l.starts_with("Seccomp:"))
            .map(|l| l.split_whitespace().nth(1).unwrap_or("").to_string())
            .unwrap_or_default();
        out.push((name.trim().to_string(), mode));
    }
    out.sort();
    out
}
