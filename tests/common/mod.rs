//! Helpers shared by kiln's end-to-end tests: running the kiln binary with a deadline and
//! reading the test guest's report; `api` drives kiln's API socket, `net` makes network
//! namespaces with TAPs.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The kiln binary under test.
pub fn kiln() -> &'static str {
    env!("CARGO_BIN_EXE_kiln")
}

/// A test guest build output (`kiln-guest.elf`, `kiln-guest-pvh.elf`, `kiln-guest.bzImage`).
pub fn guest(name: &str) -> PathBuf {
    Path::new(env!("KILN_TEST_GUEST_DIR")).join(name)
}

/// End-to-end tests need KVM: on a machine without it they fail, they never skip.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: kiln's end-to-end tests need KVM (run them as root on a host with KVM)"
    );
    assert!(
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok(),
        "/dev/kvm cannot be opened: run the tests as root"
    );
}

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "kiln-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    pub fn file(&self, name: &str, contents: &[u8]) -> PathBuf {
        let p = self.0.join(name);
        std::fs::write(&p, contents).unwrap();
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
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

fn reader(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` to exit until `deadline`; past it, kills and reaps it and returns None.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits for `child` up to `timeout`, killing it (and failing the test) past the deadline.
pub fn wait_with_deadline(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
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

/// A process's exit status as a shell reports it: the exit code, or 128 + the signal that
/// killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Sends SIGTERM to `pid` (through kill(1), which keeps the tests free of unsafe).
pub fn sigterm(pid: u32) {
    Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
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
pub mod net;
