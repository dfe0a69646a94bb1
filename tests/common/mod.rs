//! Helpers shared by kiln's end-to-end tests: running the kiln binary with a deadline and
//! reading the test guest's report.
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
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

/// Waits for `child` up to `timeout`, killing it (and failing the test) past the deadline.
pub fn wait_with_deadline(mut child: Child, timeout: Duration) -> Output {
    let start = Instant::now();
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stdout = out.join().unwrap();
            let stderr = err.join().unwrap();
            panic!(
                "kiln did not exit within {timeout:?}\n--- stdout\n{stdout}--- stderr\n{stderr}"
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    let wall = start.elapsed();
    use std::os::unix::process::ExitStatusExt;
    Output {
        status: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
        wall,
    }
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

/// 32-bit FNV-1a, as the guest computes over the initrd.
pub fn fnv1a(data: &[u8]) -> u32 {
    data.iter().fold(0x811c_9dc5u32, |h, b| {
        (h ^ u32::from(*b)).wrapping_mul(0x0100_0193)
    })
}

pub mod api;

/// A network namespace made for one test, deleted (with everything in it) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates namespace `kiln-<tag>-<pid>` with loopback up.
    pub fn new(tag: &str) -> NetNs {
        let name = format!("kiln-{tag}-{}", std::process::id());
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let ok = Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(
            ok,
            "cannot create network namespace {name} (run the tests as root)"
        );
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `ip ARGS` inside the namespace and asserts it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.name, "ip"])
            .args(args)
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip {args:?} failed in {}", self.name);
    }

    /// Creates TAP `name` in the namespace with address `cidr`, up.
    pub fn add_tap(&self, name: &str, cidr: &str) {
        self.ip(&["tuntap", "add", name, "mode", "tap"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        self.ip(&["link", "set", name, "up"]);
    }

    /// A command that runs `program` inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name, program]);
        c
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
