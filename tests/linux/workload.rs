//! The workload tier (issues 19 and 20): Linux with a user space on kiln, under the jailer
//! with kiln's default seccomp filters.
//!
//! The root image is the busybox image `guest-kernel/rootfs.sh` builds (and caches); a copy
//! is booted with `kiln.workload` on the command line, so its init runs
//! `guest-kernel/rootfs/workload.sh`, which prints one `kiln-wl: ok|fail <check>` line per
//! check and reboots. Besides the root (`/dev/vda`, writeback cache: flushes reach kiln) the
//! VM gets a data drive (`/dev/vdb`,
//! pseudo-random bytes), a read-only drive (`/dev/vdc`, other pseudo-random bytes) and a
//! TAP in the test's network namespace, where dnsmasq serves DHCP (the kernel's `ip=dhcp`)
//! and this test runs the guest's peers on the host's end (10.0.2.1): a TCP sink on port
//! 7001, an HTTP server on port 7080 and, once the guest says it listens, a TCP source to
//! the guest's port 7002. Everything the guest reports is checked against the host's own
//! view: hashes of the drives' regions and of the payloads, the bytes received, and after
//! the VM ended the root image (the files the guest wrote, `e2fsck -fn`) and the read-only
//! drive (unchanged).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use super::{
    BASE_ARGS, Console, Dnsmasq, EMULATION_ARGS, GUEST_IP, GUEST_MAC, HOST_IP, MEM_MIB, Scratch,
    TAP, drive_console, require_program,
};
use testkit::NetNs;

/// Path of a root image to use instead of `guest-kernel/rootfs.sh`'s.
pub const ROOTFS_ENV: &str = "KILN_LINUX_ROOTFS";
/// Sizes of the data and read-only drives.
pub const DATA_BYTES: usize = 1 << 20;
pub const RO_BYTES: usize = 256 << 10;
/// The data drive's regions workload.sh hashes, copies onto the root, and sends over TCP.
pub const HASHED: std::ops::Range<usize> = 256 << 10..512 << 10;
pub const COPY: std::ops::Range<usize> = 0..512 << 10;
pub const SENT: std::ops::Range<usize> = 512 << 10..768 << 10;
/// What the host sends the guest over TCP, and serves over HTTP.
pub const PAYLOAD_BYTES: usize = 256 << 10;
pub const BLOB_BYTES: usize = 256 << 10;
/// The ports of workload.sh.
pub const SINK_PORT: u16 = 7001;
pub const GUEST_PORT: u16 = 7002;
pub const HTTP_PORT: u16 = 7080;
/// The jailed kiln's ids (no such user on the host).
pub const UID: u32 = 40123;
pub const GID: u32 = 40100;
/// The checks workload.sh makes, in its order.
pub const CHECKS: [&str; 15] = [
    "fork-exec",
    "pipes",
    "exit-status",
    "signal-kill",
    "signal-trap",
    "threads",
    "root-write",
    "data-read",
    "file-copy",
    "ro-write",
    "ro-read",
    "ping",
    "tcp-out",
    "tcp-in",
    "http",
];
/// The milestones of a workload boot and the console line that marks each.
pub const MILESTONES: [(&str, &str); 4] = [
    ("kernel start", "Linux version "),
    ("root mounted", "VFS: Mounted root ("),
    ("first user line", "kiln-init: user space up"),
    ("workload done", "kiln-wl: done "),
];

/// The root image template: `KILN_LINUX_ROOTFS`, else what `guest-kernel/rootfs.sh` prints
/// (it builds the image once, in seconds, and caches it).
pub fn rootfs_template() -> PathBuf {
    if let Some(path) = std::env::var_os(ROOTFS_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{ROOTFS_ENV}={} is not a file",
            path.display()
        );
        return path;
    }
    super::cached_file_from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/guest-kernel/rootfs.sh"
    ))
}

/// Deterministic pseudo-random bytes (xorshift64*), different for each seed.
pub fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// SHA-256 of `data` in hex, from the host's `sha256sum` (coreutils).
pub fn sha256(data: &[u8]) -> String {
    let mut child = Command::new("sha256sum")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("run sha256sum (coreutils)");
    let mut stdin = child.stdin.take().unwrap();
    let data = data.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// What the host's peers saw.
#[derive(Debug, Default)]
pub struct Peers {
    /// Bytes received on the sink.
    pub sink: Option<Vec<u8>>,
    /// The HTTP request line.
    pub http_request: Option<String>,
    /// Bytes sent to the guest's port, or why not.
    pub sent: Option<Result<usize, String>>,
}

/// A thread in the network namespace `ns` (its sockets live there).
fn spawn_in<T: Send + 'static>(
    ns: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = format!("/var/run/netns/{ns}");
    std::thread::spawn(move || {
        let file = std::fs::File::open(&path).unwrap();
        // SAFETY: setns with an open netns fd only changes this thread's namespace.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
}

/// Accepts one connection on `listener` unless `stop` is set first.
fn accept_one(listener: &TcpListener, stop: &AtomicBool) -> Option<TcpStream> {
    listener.set_nonblocking(true).unwrap();
    while !stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((s, _)) => {
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
                return Some(s);
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => panic!("accept: {e}"),
        }
    }
    None
}

/// The TCP sink: one connection, read to its end.
fn sink(ns: &str, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<Option<Vec<u8>>> {
    let addr: SocketAddr = format!("{HOST_IP}:{SINK_PORT}").parse().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = spawn_in(ns, move || {
        let listener = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let mut s = accept_one(&listener, &stop)?;
        let mut data = Vec::new();
        s.read_to_end(&mut data).ok()?;
        Some(data)
    });
    ready_rx.recv().unwrap();
    h
}

/// The HTTP server: one request, answered with `blob`.
fn http(
    ns: &str,
    stop: Arc<AtomicBool>,
    blob: Arc<Vec<u8>>,
) -> std::thread::JoinHandle<Option<String>> {
    let addr: SocketAddr = format!("{HOST_IP}:{HTTP_PORT}").parse().unwrap();
    let (ready_tx, ready_rx) = mpsc::channel();
    let h = spawn_in(ns, move || {
        let listener = TcpListener::bind(addr).unwrap();
        ready_tx.send(()).unwrap();
        let mut s = accept_one(&listener, &stop)?;
        let mut req = Vec::new();
        let mut byte = [0u8; 1];
        while !req.ends_with(b"\r\n\r\n") && req.len() < 8192 {
            if s.read(&mut byte).ok()? == 0 {
                break;
            }
            req.push(byte[0]);
        }
        let request = String::from_utf8_lossy(&req).to_string();
        let line = request.lines().next().unwrap_or("").to_string();
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            blob.len()
        );
        s.write_all(head.as_bytes()).ok()?;
        s.write_all(&blob).ok()?;
        let _ = s.shutdown(Shutdown::Write);
        // Until the guest closes its end.
        let _ = s.read_to_end(&mut Vec::new());
        Some(line)
    });
    ready_rx.recv().unwrap();
    h
}

/// The TCP source: connects to the guest's port (again and again until it listens, for up
/// to a minute) and sends `payload`.
fn source(ns: &str, payload: Arc<Vec<u8>>) -> std::thread::JoinHandle<Result<usize, String>> {
    let addr: SocketAddr = format!("{GUEST_IP}:{GUEST_PORT}").parse().unwrap();
    spawn_in(ns, move || {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut s = loop {
            match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => return Err(format!("connect to {addr}: {e}")),
            }
        };
        s.set_write_timeout(Some(Duration::from_secs(120))).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
        s.write_all(&payload).map_err(|e| format!("send: {e}"))?;
        s.shutdown(Shutdown::Write)
            .map_err(|e| format!("shutdown: {e}"))?;
        let _ = s.read_to_end(&mut Vec::new());
        Ok(payload.len())
    })
}

/// One workload boot.
pub struct Run {
    pub vcpus: u32,
    pub console: Console,
    pub dnsmasq_log: String,
    pub metrics: Option<serde_json::Value>,
    pub peers: Peers,
    /// The host's data: the data drive, the read-only drive, the payload, the HTTP blob.
    pub data: Vec<u8>,
    pub ro: Vec<u8>,
    pub payload: Vec<u8>,
    pub blob: Vec<u8>,
    /// The read-only drive and the root image, read back after the VM ended.
    pub ro_after: Vec<u8>,
    /// `/kiln-written` and `/kiln-copy` from the root image (debugfs), `e2fsck -fn`'s
    /// status and output.
    pub written: Option<Vec<u8>>,
    pub copied: Option<Vec<u8>>,
    pub fsck: (i32, String),
}

impl Run {
    /// The serial log with time stamps, for failure messages.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for (t, line) in &self.console.serial {
            s.push_str(&format!("[{:8.3}] {line}\n", t.as_secs_f64()));
        }
        s
    }

    /// The first console line containing `needle`.
    pub fn line(&self, needle: &str) -> Option<&str> {
        self.console
            .serial
            .iter()
            .map(|(_, l)| l.as_str())
            .find(|l| l.contains(needle))
    }

    /// When the first line containing `needle` came.
    pub fn when(&self, needle: &str) -> Option<Duration> {
        self.console
            .serial
            .iter()
            .find(|(_, l)| l.contains(needle))
            .map(|(t, _)| *t)
    }

    /// The milestones of `MILESTONES`.
    pub fn milestones(&self) -> Vec<Option<Duration>> {
        MILESTONES.iter().map(|(_, n)| self.when(n)).collect()
    }

    /// The `key=value` pairs of check `name`'s `ok` line.
    pub fn check(&self, name: &str) -> Option<Vec<(String, String)>> {
        let prefix = format!("kiln-wl: ok {name}");
        let line = self.console.serial.iter().map(|(_, l)| l).find(|l| {
            l.strip_prefix(&prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(' '))
        })?;
        Some(
            line[prefix.len()..]
                .split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    /// Value `key` of check `name`.
    pub fn value(&self, name: &str, key: &str) -> Option<String> {
        self.check(name)?
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// A counter of `section` in kiln's final metrics.
    pub fn metric(&self, section: &str, name: &str) -> Option<u64> {
        self.metrics.as_ref()?.get(section)?.get(name)?.as_u64()
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- kiln (jailed, {} vCPUs) status {} after {:.1} s\n--- serial\n{}--- kiln stderr\n{}\n\
             --- dnsmasq log\n{}--- peers\nsink {:?} bytes, http {:?}, sent {:?}\n--- e2fsck\n{}\n--- metrics\n{:?}\n",
            self.vcpus,
            self.console.status,
            self.console.end.as_secs_f64(),
            self.log(),
            self.console.stderr,
            self.dnsmasq_log,
            self.peers.sink.as_ref().map(Vec::len),
            self.peers.http_request,
            self.peers.sent,
            self.fsck.1,
            self.metrics
        )
    }
}

/// The kernel command line of a workload boot (kiln appends the devices and `root=`).
pub fn boot_args() -> String {
    format!("{BASE_ARGS} {EMULATION_ARGS} ip=dhcp kiln.workload")
}

/// Hard link (or copy) `from` to `to`.
fn link_or_copy(from: &Path, to: &Path) {
    if std::fs::hard_link(from, to).is_err() {
        std::fs::copy(from, to).unwrap();
    }
}

fn chown(path: &Path) {
    std::os::unix::fs::chown(path, Some(UID), Some(GID)).unwrap();
}

/// Reads file `name` of the ext4 image with debugfs (None if it is not there).
fn debugfs_cat(image: &Path, name: &str) -> Option<Vec<u8>> {
    let debugfs = require_program("debugfs", "e2fsprogs");
    let out = Command::new(debugfs)
        .arg("-R")
        .arg(format!("cat {name}"))
        .arg(image)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (out.status.success() && !out.stdout.is_empty()).then_some(out.stdout)
}

/// Boots the workload once: kiln under the jailer (default seccomp filters), `vcpus` vCPUs.
pub fn run(kernel: &Path, vcpus: u32, timeout: Duration, echo: bool) -> Run {
    let _one = super::ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let template = rootfs_template();
    let jailer_bin = Path::new(env!("CARGO_BIN_EXE_kiln")).with_file_name("jailer");
    assert!(
        jailer_bin.is_file(),
        "{} is missing: build the workspace (cargo test --workspace builds the jailer)",
        jailer_bin.display()
    );
    let e2fsck = require_program("e2fsck", "e2fsprogs");

    // The jail: <base>/kiln/<id>/root holds everything kiln opens, owned by UID:GID.
    let base = Scratch::new("jail");
    let id = format!("linux-wl-{}-{vcpus}", std::process::id());
    let root = base.path().join("kiln").join(&id).join("root");
    std::fs::create_dir_all(&root).unwrap();
    link_or_copy(kernel, &root.join("vmlinux"));
    let rootfs = root.join("rootfs.ext4");
    let cp = Command::new("cp")
        .arg("--sparse=always")
        .arg(&template)
        .arg(&rootfs)
        .status()
        .unwrap();
    assert!(cp.success(), "cannot copy {}", template.display());
    let data = pseudo_random(1, DATA_BYTES);
    let ro = pseudo_random(2, RO_BYTES);
    let payload = Arc::new(pseudo_random(3, PAYLOAD_BYTES));
    let blob = Arc::new(pseudo_random(4, BLOB_BYTES));
    std::fs::write(root.join("data.img"), &data).unwrap();
    std::fs::write(root.join("ro.img"), &ro).unwrap();
    let metrics = root.join("metrics.json");
    std::fs::write(&metrics, b"").unwrap();
    for f in ["rootfs.ext4", "data.img", "ro.img", "metrics.json"] {
        chown(&root.join(f));
    }
    let config = serde_json::json!({
        "boot-source": { "kernel_image_path": "/vmlinux", "boot_args": boot_args() },
        "machine-config": { "vcpu_count": vcpus, "mem_size_mib": MEM_MIB },
        "drives": [
            // Writeback: the guest's flushes (sync) reach kiln, which counts them.
            { "drive_id": "rootfs", "path_on_host": "/rootfs.ext4",
              "is_root_device": true, "is_read_only": false, "cache_type": "Writeback" },
            { "drive_id": "data", "path_on_host": "/data.img",
              "is_root_device": false, "is_read_only": false },
            { "drive_id": "ro", "path_on_host": "/ro.img",
              "is_root_device": false, "is_read_only": true },
        ],
        "network-interfaces": [
            { "iface_id": "eth0", "host_dev_name": TAP, "guest_mac": GUEST_MAC },
        ],
    });
    std::fs::write(root.join("vm.json"), config.to_string()).unwrap();

    // The network: a TAP the jailed uid may attach to, dnsmasq, the peers.
    let ns = NetNs::new("linux-wl").unwrap();
    ns.ip(&[
        "tuntap",
        "add",
        TAP,
        "mode",
        "tap",
        "user",
        &UID.to_string(),
    ])
    .unwrap();
    ns.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP])
        .unwrap();
    ns.ip(&["link", "set", TAP, "up"]).unwrap();
    let dnsmasq = Dnsmasq::start(&ns, base.path());
    let stop = Arc::new(AtomicBool::new(false));
    let sink = sink(&ns.name, stop.clone());
    let http = http(&ns.name, stop.clone(), blob.clone());
    let mut source = None;

    let start = Instant::now();
    let child = Command::new(&jailer_bin)
        .arg("--id")
        .arg(&id)
        .arg("--exec-file")
        .arg(env!("CARGO_BIN_EXE_kiln"))
        .arg("--uid")
        .arg(UID.to_string())
        .arg("--gid")
        .arg(GID.to_string())
        .arg("--chroot-base-dir")
        .arg(base.path())
        .arg("--netns")
        .arg(format!("/var/run/netns/{}", ns.name))
        .args(["--", "--config-file", "/vm.json", "--no-api"])
        .args(["--metrics-path", "/metrics.json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let listening = format!("kiln-wl: listening {GUEST_PORT}");
    let console = drive_console(child, start, timeout, echo, &mut |_, line| {
        if source.is_none() && line.is_some_and(|l| l.contains(&listening)) {
            source = Some(super::workload::source(&ns.name, payload.clone()));
        }
    });

    stop.store(true, Ordering::SeqCst);
    let peers = Peers {
        sink: sink.join().unwrap(),
        http_request: http.join().unwrap(),
        sent: source.map(|h| h.join().unwrap()),
    };
    let dnsmasq_log = dnsmasq.log_text();
    drop(dnsmasq);
    drop(ns);

    let metrics = std::fs::read_to_string(&metrics)
        .ok()
        .and_then(|s| s.lines().last().map(str::to_string))
        .and_then(|l| serde_json::from_str(&l).ok());
    let fsck = Command::new(e2fsck)
        .args(["-f", "-n"])
        .arg(&rootfs)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let run = Run {
        vcpus,
        dnsmasq_log,
        metrics,
        peers,
        data,
        ro,
        payload: payload.to_vec(),
        blob: blob.to_vec(),
        ro_after: std::fs::read(root.join("ro.img")).unwrap(),
        written: debugfs_cat(&rootfs, "/kiln-written"),
        copied: debugfs_cat(&rootfs, "/kiln-copy"),
        fsck: (
            fsck.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&fsck.stdout),
                String::from_utf8_lossy(&fsck.stderr)
            ),
        ),
        console,
    };
    assert!(
        !run.console.timed_out,
        "kiln did not end within {timeout:?}\n{run}"
    );
    run
}

/// Every check of the workload, against the host's view.
pub fn check(r: &Run) {
    // The guest side: every check passed, in one run to the end.
    let fails: Vec<&str> = r
        .console
        .serial
        .iter()
        .map(|(_, l)| l.as_str())
        .filter(|l| l.starts_with("kiln-wl: fail "))
        .collect();
    assert!(fails.is_empty(), "failed in the guest: {fails:#?}\n{r}");
    for name in CHECKS {
        assert!(r.check(name).is_some(), "no `kiln-wl: ok {name}`\n{r}");
    }
    let done = r
        .line("kiln-wl: done ")
        .unwrap_or_else(|| panic!("the workload did not finish\n{r}"));
    assert!(
        done.contains(&format!("ok={} fail=0", CHECKS.len())),
        "{done}\n{r}"
    );
    // The kernel completed system calls through the guest-kernel patch, and saw the vCPUs.
    assert!(
        r.line("kiln: completing SYSCALLs").is_some(),
        "the kernel lacks guest-kernel/emulated-syscall.patch\n{r}"
    );
    let start = r.line("kiln-wl: start ").unwrap();
    assert!(
        start.contains(&format!(", {} CPUs", r.vcpus)),
        "the guest does not run {} CPUs: `{start}`\n{r}",
        r.vcpus
    );
    if r.vcpus > 1 {
        assert!(
            r.line(&format!("smp: Brought up 1 node, {} CPUs", r.vcpus))
                .is_some(),
            "Linux did not bring up the application processors\n{r}"
        );
    }
    let lease = r.line("IP-Config: Got DHCP answer from ").unwrap_or("");
    assert!(
        lease.contains(&format!("my address is {GUEST_IP}")),
        "no DHCP lease\n{r}"
    );

    // The root file system, from the host.
    let mut seq = String::new();
    for i in 1..=20000 {
        seq.push_str(&format!("{i}\n"));
    }
    assert_eq!(
        r.value("root-write", "sha256").as_deref(),
        Some(sha256(seq.as_bytes()).as_str()),
        "the guest read back other bytes than it wrote\n{r}"
    );
    assert!(
        r.written.as_deref() == Some(seq.as_bytes()),
        "/kiln-written on the image is not `seq 1 20000` ({:?} bytes)\n{r}",
        r.written.as_ref().map(Vec::len)
    );
    assert!(
        r.copied.as_deref() == Some(&r.data[..COPY.end]),
        "/kiln-copy on the image is not the data drive's first {} KiB ({:?} bytes)\n{r}",
        COPY.end >> 10,
        r.copied.as_ref().map(Vec::len)
    );
    assert_eq!(r.fsck.0, 0, "e2fsck -fn found problems\n{r}");

    // The data and read-only drives.
    assert_eq!(
        r.value("data-read", "sha256").as_deref(),
        Some(sha256(&r.data[HASHED]).as_str()),
        "the guest read other bytes from the data drive\n{r}"
    );
    assert_eq!(
        r.value("file-copy", "sha256").as_deref(),
        Some(sha256(&r.data[COPY]).as_str()),
        "{r}"
    );
    assert_eq!(
        r.value("ro-write", "ro").as_deref(),
        Some("1"),
        "Linux does not see the read-only drive as read-only\n{r}"
    );
    assert_eq!(
        r.value("ro-read", "sha256").as_deref(),
        Some(sha256(&r.ro).as_str()),
        "{r}"
    );
    assert!(r.ro_after == r.ro, "the read-only drive changed\n{r}");

    // The network.
    assert!(
        r.peers.sink.as_deref() == Some(&r.data[SENT]),
        "the TCP sink did not get the data drive's bytes {SENT:?} ({:?} bytes)\n{r}",
        r.peers.sink.as_ref().map(Vec::len)
    );
    assert_eq!(r.peers.sent, Some(Ok(PAYLOAD_BYTES)), "{r}");
    assert_eq!(
        r.value("tcp-in", "sha256").as_deref(),
        Some(sha256(&r.payload).as_str()),
        "the guest received other bytes\n{r}"
    );
    assert_eq!(
        r.peers
            .http_request
            .as_deref()
            .map(|l| l.starts_with("GET /blob ")),
        Some(true),
        "{r}"
    );
    assert_eq!(
        r.value("http", "sha256").as_deref(),
        Some(sha256(&r.blob).as_str()),
        "the guest downloaded other bytes\n{r}"
    );

    // kiln's side: a clean end by the guest's reboot, the writes and flushes it served.
    assert_eq!(r.console.status, 0, "kiln did not end cleanly\n{r}");
    assert_eq!(r.metric("vcpu", "failures"), Some(0), "{r}");
    assert_eq!(r.metric("i8042", "reset_count"), Some(1), "{r}");
    for (section, counter) in [
        ("block_rootfs", "write_count"),
        ("block_rootfs", "flush_count"),
        ("block_data", "read_count"),
        ("block_ro", "read_count"),
        ("net_eth0", "rx_frames"),
        ("net_eth0", "tx_frames"),
    ] {
        assert!(
            r.metric(section, counter).is_some_and(|n| n > 0),
            "kiln's metrics show no {section}.{counter}\n{r}"
        );
    }
}

/// Prints the milestones and the guest's own timings.
pub fn report(r: &Run) {
    eprintln!(
        "linux workload ({} vCPUs, jailed): wall time from the jailer's start",
        r.vcpus
    );
    for ((name, _), t) in MILESTONES.iter().zip(r.milestones()) {
        eprintln!(
            "  {name:<18} {:>7}",
            t.map_or("-".into(), |t| format!("{:.1} s", t.as_secs_f64()))
        );
    }
    eprintln!(
        "  {:<18} {:>5.1} s",
        "kiln exit",
        r.console.end.as_secs_f64()
    );
    for (name, what) in [
        ("file-copy", "file copy 512 KiB"),
        ("tcp-out", "TCP out 256 KiB"),
        ("tcp-in", "TCP in 256 KiB"),
        ("http", "HTTP 256 KiB"),
    ] {
        eprintln!(
            "  {what:<18} {:>7} ms (guest)",
            r.value(name, "ms").unwrap_or_else(|| "-".into())
        );
    }
}
