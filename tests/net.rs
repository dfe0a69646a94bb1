//! virtio-net end to end (issue 4, security-tests.md 20-22). Every test makes its own network
//! namespace with a TAP in it (10.0.0.1/24 on the host side) and runs kiln inside that
//! namespace (`ip netns exec`), with the test guest's network scenarios on the other end:
//!
//! - the guest ARPs for the host and pings it, and the host kernel's own stack answers (a
//!   peer nobody here wrote); the host pings the guest back with a raw ICMP socket (the
//!   guest's answers are checked byte for byte);
//! - malformed transmit chains come back, are counted, and the queue keeps working;
//! - frames larger than the receive buffers: whole with MRG_RXBUF, dropped and counted
//!   without, normal frames still arriving;
//! - the TAP deleted while the guest transmits and does block I/O: kiln neither exits nor
//!   spins, the block device keeps working, the errors are counted;
//! - the receive queue and the TAP both full, then drained: reception resumes;
//! - checksum offload both ways and TSO from the guest, against the host's stack.
//!
//! Guest lines are asserted where they are deterministic, plus host-side facts: the TAP's
//! statistics, kiln's counters (`--metrics-path`, written at exit) and the image file.
//! The namespace is removed when the test ends, pass or fail (a drop guard), after kiln.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use testkit::netns::inet_csum;

use common::{
    NetNs, Output, TempDir, assert_guest_passed, blk_pattern, counter, exit_code, guest, kiln,
    read_all, require_kvm, wait_until,
};
use serde_json::Value;
use testkit::LineReader;

const GUEST_MAC: &str = "aa:fc:00:00:00:01";
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// What kiln's virtio-net offers with a MAC configured (VERSION_1, EVENT_IDX, INDIRECT_DESC,
/// CSUM, GUEST_CSUM, MAC, GUEST_TSO4/6, HOST_TSO4/6, MRG_RXBUF).
const OFFERED: &str = "0x1300099a3";
const VERSION_1_MAC: &str = "0x100000020";
const VERSION_1_MAC_MRG_EVIDX: &str = "0x120008020";
/// Guest ports (tests/guest/scenarios/net.c).
const PORT_BIG: u16 = 7001;
const PORT_SMALL: u16 = 7002;
const PORT_END: u16 = 7003;
const PORT_FLOOD: u16 = 7004;
const PORT_FINAL: u16 = 7005;
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

// ---- the network namespace -----------------------------------------------------------------

#[derive(Clone, Copy)]
struct TapOpts {
    mtu: u32,
    txqueuelen: u32,
    /// A permanent neighbour entry for the guest (no ARP from the host side).
    static_neigh: bool,
}

impl Default for TapOpts {
    fn default() -> TapOpts {
        TapOpts {
            mtu: 1500,
            txqueuelen: 1000,
            static_neigh: false,
        }
    }
}

const TAP: &str = "tap0";

/// A network namespace holding one TAP (`tap0`, 10.0.0.1/24, up, IPv6 off so the host sends
/// no unsolicited frames), deleted on drop.
fn net_ns(opts: TapOpts) -> NetNs {
    require_kvm();
    let ns = NetNs::new("net").unwrap();
    ns.disable_ipv6().unwrap();
    ns.add_tap_with(
        TAP,
        "10.0.0.1/24",
        &[
            "mtu",
            &opts.mtu.to_string(),
            "txqueuelen",
            &opts.txqueuelen.to_string(),
        ],
    )
    .unwrap();
    if opts.static_neigh {
        ns.ip(&[
            "neigh",
            "replace",
            "10.0.0.2",
            "lladdr",
            GUEST_MAC,
            "dev",
            TAP,
            "nud",
            "permanent",
        ])
        .unwrap();
    }
    ns
}

/// The TAP's MAC address.
fn tap_mac(ns: &NetNs) -> String {
    ns.exec(&["cat", &format!("/sys/class/net/{TAP}/address")])
        .unwrap()
        .trim()
        .to_string()
}

/// One of the TAP's statistics (/sys/class/net/tap0/statistics).
fn tap_stat(ns: &NetNs, name: &str) -> u64 {
    ns.exec(&["cat", &format!("/sys/class/net/{TAP}/statistics/{name}")])
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A UDP socket bound to 10.0.0.1 in the namespace.
fn udp_socket(ns: &NetNs) -> UdpSocket {
    ns.run_in(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP, 0)).unwrap())
}

// ---- kiln in the namespace -----------------------------------------------------------------

/// A kiln process whose guest output is followed line by line; killed on drop.
struct Vm {
    child: Option<Child>,
    lines: Option<LineReader>,
    seen: Vec<String>,
    stderr: Option<JoinHandle<String>>,
    start: Instant,
    metrics: PathBuf,
}

struct Drive<'a> {
    path: &'a Path,
}

fn vm_config(dir: &TempDir, run: &str, drive: Option<Drive>) -> PathBuf {
    let drives = match drive {
        Some(d) => format!(
            r#"[{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}]"#,
            d.path.display()
        ),
        None => "[]".into(),
    };
    let json = format!(
        r#"{{
          "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 kiln.net=ip:10.0.0.2,peer:10.0.0.1 kiln.run={run}"}},
          "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
          "drives": {drives},
          "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{TAP}", "guest_mac": "{GUEST_MAC}"}}]
        }}"#,
        guest("kiln-guest.elf").display()
    );
    dir.file("vm.json", json.as_bytes())
}

impl Vm {
    fn start(ns: &NetNs, dir: &TempDir, run: &str, drive: Option<Drive>) -> Vm {
        let cfg = vm_config(dir, run, drive);
        let metrics = dir.path().join("metrics.json");
        let mut child = ns
            .command(kiln())
            .args(["--no-api", "--config-file"])
            .arg(&cfg)
            .arg("--metrics-path")
            .arg(&metrics)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let lines = LineReader::spawn(child.stdout.take().unwrap());
        let stderr = read_all(child.stderr.take().unwrap());
        Vm {
            child: Some(child),
            lines: Some(lines),
            seen: Vec::new(),
            stderr: Some(stderr),
            start: Instant::now(),
            metrics,
        }
    }

    /// kiln's pid (`ip netns exec` execs it in place).
    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the next line starting with `prefix` (earlier lines are kept).
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.as_ref().unwrap().recv_timeout(left) {
                Ok(line) => {
                    let line = line.text;
                    self.seen.push(line.clone());
                    if line.starts_with(prefix) {
                        return line;
                    }
                }
                Err(_) => {
                    let seen = self.seen.join("\n");
                    drop(self.child.take().map(|mut c| {
                        let _ = c.kill();
                        c.wait()
                    }));
                    panic!("no `{prefix}` line within {LINE_TIMEOUT:?}; guest output:\n{seen}");
                }
            }
        }
    }

    /// Waits for kiln to exit; its whole output and status.
    fn finish(mut self) -> (Output, Value) {
        let mut child = self.child.take().unwrap();
        let Some(status) = wait_until(&mut child, self.start + RUN_TIMEOUT) else {
            panic!(
                "kiln did not exit within {RUN_TIMEOUT:?}; guest output:\n{}",
                self.seen.join("\n")
            );
        };
        let rest = self.lines.take().unwrap().rest();
        self.seen.extend(rest.into_iter().map(|l| l.text));
        let stderr = self.stderr.take().unwrap().join().unwrap();
        let out = Output {
            status: exit_code(status),
            stdout: self.seen.iter().map(|l| format!("{l}\n")).collect(),
            stderr,
            wall: self.start.elapsed(),
        };
        let metrics = last_metrics(&self.metrics, &out);
        (out, metrics)
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// The last metrics line kiln wrote (at exit).
fn last_metrics(path: &Path, out: &Output) -> Value {
    let text = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("metrics file {}: {e}\n{out}", path.display()));
    let line = text
        .lines()
        .last()
        .unwrap_or_else(|| panic!("empty metrics\n{out}"));
    serde_json::from_str(line).unwrap()
}

/// CPU time (ns) kiln's main thread (the event loop, where the devices run) has used.
fn main_thread_cpu_ns(pid: u32) -> u64 {
    testkit::procfs::thread_cpu_ns(pid, pid).unwrap()
}

/// Asserts the lines starting with `prefix`, in order, are exactly `want`.
fn assert_lines(out: &Output, prefix: &str, want: &[String]) {
    let got: Vec<&str> = out.lines_with(prefix);
    assert_eq!(got, want, "\n{out}");
}

// ---- host-side traffic ---------------------------------------------------------------------

/// Echo requests to the guest (`NetNs::ping`, 1 s each); returns how many came back right.
fn ping_guest(ns: &NetNs, count: u16, payload: usize) -> u16 {
    (1..=count)
        .filter(|&seq| {
            ns.ping(GUEST_IP, seq, payload, Duration::from_secs(1))
                .unwrap()
                .is_some()
        })
        .count() as u16
}

fn send_udp(sock: &UdpSocket, port: u16, payload: &[u8]) {
    sock.send_to(payload, SocketAddrV4::new(GUEST_IP, port))
        .unwrap();
}

// ---- what reached the TAP -------------------------------------------------------------------

/// One frame seen on the TAP: the packet type (`PACKET_HOST`, `PACKET_OUTGOING`, ...) and the
/// Ethernet frame.
struct Captured {
    pkttype: u8,
    frame: Vec<u8>,
}

/// Every frame crossing the TAP, recorded by an `AF_PACKET` socket bound to it in the
/// namespace: what kiln really wrote to the TAP (or the host sent), seen by the host kernel,
/// not by kiln's counters.
struct TapCapture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<JoinHandle<Vec<Captured>>>,
}

impl TapCapture {
    fn start(ns: &NetNs) -> TapCapture {
        Self::start_with(ns, false)
    }

    /// With `vnet_hdr`, every frame comes with the 10-byte `virtio_net_hdr` the host kernel
    /// derives from its packet (PACKET_VNET_HDR): checksum and segmentation offload state as
    /// the host stack holds it.
    fn start_with(ns: &NetNs, vnet_hdr: bool) -> TapCapture {
        let proto = (libc::ETH_P_ALL as u16).to_be();
        let fd = ns.run_in(move || {
            // SAFETY: plain socket creation; the fd is owned right away.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    i32::from(proto),
                )
            };
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            // SAFETY: fd is a fresh, valid descriptor.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            let name = std::ffi::CString::new(TAP).unwrap();
            // SAFETY: a NUL-terminated name.
            let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
            assert_ne!(ifindex, 0, "no {TAP} in the namespace");
            // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
            let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            sll.sll_family = libc::AF_PACKET as u16;
            sll.sll_protocol = proto;
            sll.sll_ifindex = i32::try_from(ifindex).unwrap();
            // SAFETY: binds a valid socket to a valid sockaddr_ll of the size given.
            let rc = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    std::ptr::from_ref(&sll).cast::<libc::sockaddr>(),
                    size_of::<libc::sockaddr_ll>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "bind to {TAP}: {}", std::io::Error::last_os_error());
            let rcvbuf: libc::c_int = 8 << 20;
            // SAFETY: SO_RCVBUFFORCE with a c_int value of the size given (we are root).
            let rc = unsafe {
                libc::setsockopt(
                    fd.as_raw_fd(),
                    libc::SOL_SOCKET,
                    libc::SO_RCVBUFFORCE,
                    std::ptr::from_ref(&rcvbuf).cast::<libc::c_void>(),
                    size_of::<libc::c_int>() as libc::socklen_t,
                )
            };
            assert_eq!(rc, 0, "SO_RCVBUFFORCE: {}", std::io::Error::last_os_error());
            if vnet_hdr {
                let on: libc::c_int = 1;
                // SAFETY: PACKET_VNET_HDR with a c_int value of the size given.
                let rc = unsafe {
                    libc::setsockopt(
                        fd.as_raw_fd(),
                        libc::SOL_PACKET,
                        libc::PACKET_VNET_HDR,
                        std::ptr::from_ref(&on).cast::<libc::c_void>(),
                        size_of::<libc::c_int>() as libc::socklen_t,
                    )
                };
                assert_eq!(
                    rc,
                    0,
                    "PACKET_VNET_HDR: {}",
                    std::io::Error::last_os_error()
                );
            }
            fd
        });
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut frames = Vec::new();
            let mut buf = vec![0u8; 128 * 1024];
            loop {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                // SAFETY: one valid pollfd.
                let ready = unsafe { libc::poll(&mut pfd, 1, 100) };
                if ready <= 0 {
                    // Nothing queued: stop once asked to (everything sent before is read).
                    if flag.load(std::sync::atomic::Ordering::SeqCst) {
                        return frames;
                    }
                    continue;
                }
                // SAFETY: sockaddr_ll is plain data; all zeroes is a valid value.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = size_of::<libc::sockaddr_ll>() as libc::socklen_t;
                // SAFETY: buf and from are valid for the lengths given.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        buf.as_mut_ptr().cast::<libc::c_void>(),
                        buf.len(),
                        libc::MSG_TRUNC,
                        std::ptr::from_mut(&mut from).cast::<libc::sockaddr>(),
                        &mut from_len,
                    )
                };
                let n = usize::try_from(n).expect("recvfrom on the TAP capture");
                assert!(n <= buf.len(), "a {n}-byte frame on the TAP");
                frames.push(Captured {
                    pkttype: from.sll_pkttype,
                    frame: buf[..n].to_vec(),
                });
            }
        });
        TapCapture {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the capture once no frame has come for 100 ms; what it saw.
    fn finish(mut self) -> Vec<Captured> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.take().unwrap().join().unwrap()
    }
}

impl Drop for TapCapture {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The guest MAC as bytes.
fn guest_mac_bytes() -> [u8; 6] {
    let mut mac = [0u8; 6];
    for (b, part) in mac.iter_mut().zip(GUEST_MAC.split(':')) {
        *b = u8::from_str_radix(part, 16).unwrap();
    }
    mac
}

/// The frames the guest sent (source MAC the guest's, coming in from the TAP's wire side).
fn from_guest(frames: &[Captured]) -> Vec<&[u8]> {
    let mac = guest_mac_bytes();
    frames
        .iter()
        .filter(|c| {
            c.pkttype != libc::PACKET_OUTGOING && c.frame.len() >= 14 && c.frame[6..12] == mac
        })
        .map(|c| c.frame.as_slice())
        .collect()
}

/// EtherType of a frame.
fn ethertype(frame: &[u8]) -> u16 {
    u16::from_be_bytes([frame[12], frame[13]])
}

// ---- the tests -----------------------------------------------------------------------------

fn init_line(check: &str, acked: &str, bufs: &str) -> String {
    format!(
        "ok {check} init dev=0 features={OFFERED} acked={acked} mac={GUEST_MAC} rx-buffers={bufs}"
    )
}

const COUNTERS_OK: &str = "counters rx-bad=0 rx-no-irq=0 tx-bad-used=0 tx-no-irq=0";

/// The guest ARPs for the host and pings it (the host kernel answers), in both receive
/// modes (one buffer per frame through kiln's bounce buffer; merged 512-byte buffers read
/// straight into guest memory), then answers the host's pings.
#[test]
fn guest_and_host_ping_each_other() {
    let ns = net_ns(TapOpts::default());
    let host_mac = tap_mac(&ns);
    let dir = TempDir::new("net-ping");
    let mut vm = Vm::start(&ns, &dir, "net,net:mrg:evidx:bufsize=512:listen=3", None);
    vm.wait_line("info net listen echo=3");
    let answered = ping_guest(&ns, 3, 56);
    let (out, m) = vm.finish();
    assert_eq!(answered, 3, "the guest answered {answered}/3 pings\n{out}");
    assert_guest_passed(&out);

    let pings = |mrg: bool| -> Vec<String> {
        let mut v = vec![
            init_line(
                "net",
                if mrg {
                    VERSION_1_MAC_MRG_EVIDX
                } else {
                    VERSION_1_MAC
                },
                if mrg { "256x512" } else { "256x2048" },
            ),
            format!("ok net arp peer=10.0.0.1 mac={host_mac}"),
        ];
        for seq in 1..=3 {
            v.push(format!("ok net ping seq={seq} bytes=56"));
        }
        v.push("ok net ping seq=4 bytes=1472".into());
        v
    };
    let mut want = pings(false);
    want.push(format!("ok net {COUNTERS_OK}"));
    want.extend(pings(true));
    want.push("ok net listen echo-replies=3".into());
    want.push(format!("ok net {COUNTERS_OK}"));
    assert_lines(&out, "ok net", &want);
    assert_eq!(
        out.lines_with("info net config"),
        ["info net config ip=10.0.0.2 peer=10.0.0.1"; 2],
        "{out}"
    );

    // Both receive paths were taken, nothing was dropped, no merged frame was lost.
    let net = "net_eth0";
    assert!(counter(&m, net, "rx_bounced") >= 5, "{m}");
    assert!(counter(&m, net, "rx_zero_copy") >= 5, "{m}");
    for zero in [
        "rx_dropped",
        "rx_errors",
        "rx_bad_chains",
        "tx_dropped",
        "tx_errors",
    ] {
        assert_eq!(counter(&m, net, zero), 0, "{zero}: {m}");
    }
    // 2 ARP requests + 8 echo requests + 3 echo replies (+ ARP replies the host asked for).
    let tx = counter(&m, net, "tx_frames");
    assert!((13..=16).contains(&tx), "tx_frames={tx}: {m}");
    let merged: Vec<&str> = out.lines_with("info net stats");
    assert!(
        merged[1].contains("rx-merged=") && !merged[1].contains("rx-merged=0 "),
        "the 1514-byte reply spans 512-byte buffers: {out}"
    );
}

/// security-tests.md 20: oversized, undersized, empty and header-only frames, device-writable
/// buffers, offloads that were not negotiated: every chain comes back (length 0, with its
/// interrupt), kiln counts it, and a normal ping works after each one.
#[test]
fn hostile_transmit_chains() {
    let ns = net_ns(TapOpts::default());
    let dir = TempDir::new("net-hostile");
    let capture = TapCapture::start(&ns);
    let vm = Vm::start(&ns, &dir, "net-hostile:all", None);
    let (out, m) = vm.finish();
    let frames = capture.finish();
    assert_guest_passed(&out);
    let cases = [
        ("tx-too-long", ""),
        ("tx-max", ""),
        ("tx-short", ""),
        ("tx-zero", ""),
        ("tx-hdr-only", ""),
        ("tx-split", " reply=ok"),
        ("tx-writable", ""),
        ("tx-gso-unneg", ""),
        ("tx-csum-unneg", ""),
    ];
    let mut want = Vec::new();
    for (case, extra) in cases {
        want.push(format!("ok net-hostile {case} used-len=0{extra}"));
        want.push(format!("ok net-hostile {case} recovered"));
    }
    assert_lines(&out, "ok net-hostile", &want);
    assert_eq!(
        out.line("info net-hostile"),
        format!("info net-hostile dev=0 acked={VERSION_1_MAC} cases=9")
    );
    let net = "net_eth0";
    // Dropped by kiln: 65563 bytes, 11 bytes, two 0-byte buffers, device-writable, GSO and
    // NEEDS_CSUM without the features.
    assert_eq!(counter(&m, net, "tx_dropped"), 6, "{m}");
    // The header-only chain is a 0-byte frame: the TAP refuses it (EINVAL), kiln counts it.
    assert_eq!(counter(&m, net, "tx_errors"), 1, "{m}");
    // Sent: the ARP request, 9 recovery pings, the 65562-byte frame, the split ping.
    assert_eq!(counter(&m, net, "tx_frames"), 12, "{m}");
    assert!(counter(&m, net, "tx_bytes") >= 65550, "{m}");
    assert_eq!(counter(&m, net, "queue_errors"), 0, "{m}");

    // What reached the TAP, seen by the host: the hostile frames (the guest's filler frames,
    // EtherType 0x88b5, all zeroes) did not arrive, except the one of exactly the maximum
    // size (65562 bytes with the 12-byte header), which did, whole; the good frames did.
    let sent = from_guest(&frames);
    let fillers: Vec<usize> = sent
        .iter()
        .filter(|f| ethertype(f) == 0x88b5)
        .map(|f| f.len())
        .collect();
    assert_eq!(
        fillers,
        [65562 - 12],
        "filler frames on the TAP (the too-long, device-writable, GSO and NEEDS_CSUM ones \
         must not be there; the maximum-size one must)"
    );
    let max = sent.iter().find(|f| ethertype(f) == 0x88b5).unwrap();
    assert!(
        max[14..].iter().all(|&b| b == 0),
        "the maximum-size frame was altered"
    );
    // Nothing shorter than an Ethernet header (the 11-byte, 0-byte and header-only chains).
    let runts = frames.iter().filter(|c| c.frame.len() < 14).count();
    assert_eq!(runts, 0, "runt frames on the TAP");
    // 10 echo requests (9 recovery pings and the split one) reached the host, each answered.
    let echo =
        |f: &&[u8], ty: u8| ethertype(f) == 0x0800 && f.len() > 34 && f[23] == 1 && f[34] == ty;
    assert_eq!(
        sent.iter().filter(|f| echo(f, 8)).count(),
        10,
        "echo requests on the TAP"
    );
    // And nothing else: the ARP request, 10 echo requests, the maximum-size frame.
    let arps = sent.iter().filter(|f| ethertype(f) == 0x0806).count();
    assert_eq!(arps, 1, "ARP frames from the guest on the TAP");
    assert_eq!(sent.len(), 12, "frames from the guest on the TAP");
}

/// Sends the rx-big burst: `n` datagrams of `size` bytes to PORT_BIG (bytes 0-3 = k, then
/// (k + i) & 0xff), each followed by a 16-byte one to PORT_SMALL; then one to PORT_END.
fn send_big_burst(sock: &UdpSocket, n: u32, size: usize) {
    for k in 0..n {
        let mut big = k.to_be_bytes().to_vec();
        big.extend((4..size).map(|i| (k as usize + i) as u8));
        send_udp(sock, PORT_BIG, &big);
        let mut small = k.to_be_bytes().to_vec();
        small.extend([0u8; 12]);
        send_udp(sock, PORT_SMALL, &small);
    }
    send_udp(sock, PORT_END, b"end");
}

/// A burst of 3000-byte frames (and small ones between them) at a guest whose receive
/// buffers are 256 bytes: without MRG_RXBUF they are dropped and counted while the small
/// ones arrive; with it they arrive whole (12 buffers each, 32 of them: more than the ring
/// holds at once, so kiln has to wait for the guest to post buffers again mid-burst). The
/// third run holds the guest off for 1 s while the whole burst waits in the ring and the
/// TAP: kiln must wait for buffers without burning CPU.
#[test]
fn frames_larger_than_the_receive_buffers() {
    let ns = net_ns(TapOpts {
        mtu: 9000,
        static_neigh: true,
        ..TapOpts::default()
    });
    let sock = udp_socket(&ns);
    let dir = TempDir::new("net-rx-big");
    let mut vm = Vm::start(
        &ns,
        &dir,
        "net-rx-big,net-rx-big:mrg,net-rx-big:mrg:hold=1000",
        None,
    );
    vm.wait_line("info net-rx-big ready big=32 size=3000 mrg=0");
    send_big_burst(&sock, 32, 3000);
    vm.wait_line("info net-rx-big ready big=32 size=3000 mrg=1");
    send_big_burst(&sock, 32, 3000);
    vm.wait_line("info net-rx-big ready big=32 size=3000 mrg=1 hold=1000");
    let cpu0 = main_thread_cpu_ns(vm.pid());
    let t0 = Instant::now();
    send_big_burst(&sock, 32, 3000);
    vm.wait_line("info net-rx-big consuming");
    let (cpu, wall) = (main_thread_cpu_ns(vm.pid()) - cpu0, t0.elapsed());
    let (out, m) = vm.finish();
    // Waiting for receive buffers is not a busy loop.
    assert!(
        cpu < wall.as_nanos() as u64 / 4,
        "kiln's event loop used {} ms of CPU in the {wall:?} the guest held its buffers\n{out}",
        cpu / 1_000_000
    );
    let mrg = [
        init_line(
            "net-rx-big",
            "0x100008020", // VERSION_1 | MAC | MRG_RXBUF
            "256x256",
        ),
        "ok net-rx-big big=32/32 small=32/32".into(),
        "ok net-rx-big end".into(),
        format!("ok net-rx-big {COUNTERS_OK}"),
    ];
    let mut want = vec![
        init_line("net-rx-big", VERSION_1_MAC, "256x256"),
        "ok net-rx-big big=0/32 small=32/32".into(),
        "ok net-rx-big end".into(),
        format!("ok net-rx-big {COUNTERS_OK}"),
    ];
    want.extend(mrg.clone());
    want.extend(mrg);
    assert_lines(&out, "ok net-rx-big", &want);
    assert_guest_passed(&out);
    let net = "net_eth0";
    // Without MRG_RXBUF each big frame was dropped and counted, nothing else.
    assert_eq!(counter(&m, net, "rx_dropped"), 32, "{m}");
    assert_eq!(counter(&m, net, "rx_frames"), 33 + 2 * 65, "{m}");
    assert_eq!(counter(&m, net, "rx_errors"), 0, "{m}");
}

/// security-tests.md 21: the TAP is deleted while the guest sends a frame and writes and
/// reads a sector per iteration: kiln keeps running (no exit, no busy loop), every transmit
/// chain still comes back, the block device keeps working and the guest finishes normally;
/// the TAP's failure and the lost frames are counted.
#[test]
fn tap_deleted_while_the_guest_runs() {
    let ns = net_ns(TapOpts::default());
    let host_mac = tap_mac(&ns);
    let dir = TempDir::new("net-tap-gone");
    let image = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let mut vm = Vm::start(
        &ns,
        &dir,
        "net-tap-gone:n=40:idle=1000",
        Some(Drive { path: &image }),
    );
    vm.wait_line("info net-tap-gone progress i=10");
    ns.ip(&["link", "del", TAP]).unwrap();
    vm.wait_line("info net-tap-gone idle ms=1000");
    let pid = vm.pid();
    let (cpu0, t0) = (main_thread_cpu_ns(pid), Instant::now());
    vm.wait_line("info net-tap-gone awake");
    let (idle_cpu, idle_wall) = (main_thread_cpu_ns(pid) - cpu0, t0.elapsed());
    let (out, m) = vm.finish();
    assert_guest_passed(&out);
    assert_lines(
        &out,
        "ok net-tap-gone",
        &[
            init_line("net-tap-gone", VERSION_1_MAC, "256x2048").replace("dev=0", "dev=1"),
            format!("ok net-tap-gone arp peer=10.0.0.1 mac={host_mac}"),
            "ok net-tap-gone tx-completed=40/40".into(),
            "ok net-tap-gone blk=40/40".into(),
        ],
    );
    assert!(
        idle_cpu < 100_000_000,
        "kiln's event loop used {} ms of CPU over {idle_wall:?} of guest idling after the TAP \
         went away",
        idle_cpu / 1_000_000
    );
    let net = "net_eth0";
    assert!(counter(&m, net, "tap_failures") >= 1, "{m}");
    let (sent, errors) = (counter(&m, net, "tx_frames"), counter(&m, net, "tx_errors"));
    // 1 ARP request + 40 datagrams, each either sent or counted as lost.
    assert_eq!(sent + errors + counter(&m, net, "tx_dropped"), 41, "{m}");
    assert!(errors >= 20, "{m}");
    assert_eq!(counter(&m, "block_root", "write_count"), 40, "{m}");
    assert_eq!(counter(&m, "block_root", "read_count"), 40, "{m}");
    // The sectors hold what the guest wrote last (the test guest's pattern).
    let img = std::fs::read(&image).unwrap();
    for s in 8..16u64 {
        let at = s as usize * 512;
        assert_eq!(&img[at..at + 512], &blk_pattern(s, 1)[..], "sector {s}");
    }
}

/// security-tests.md 22: the guest stops taking frames (32 buffers posted, none posted
/// again), the host floods until the TAP (txqueuelen 64) drops; then the guest drains the
/// ring and posts buffers again: kiln must resume reading the TAP (frames queued there
/// arrive, in order) and a later frame must still get through (no lost wake-up). With and
/// without EVENT_IDX.
#[test]
fn receive_queue_and_tap_full_then_drained() {
    let ns = net_ns(TapOpts {
        txqueuelen: 64,
        static_neigh: true,
        ..TapOpts::default()
    });
    let sock = udp_socket(&ns);
    let dir = TempDir::new("net-rx-stall");
    let mut vm = Vm::start(
        &ns,
        &dir,
        "net-rx-stall:pause=2000,net-rx-stall:mrg:evidx:pause=2000",
        None,
    );
    let mut dropped = Vec::new();
    for _ in 0..2 {
        vm.wait_line("info net-rx-stall paused buffers=32 ms=2000");
        let before = tap_stat(&ns, "tx_dropped");
        let flood = |k: u32| {
            let mut p = k.to_be_bytes().to_vec();
            p.extend([0u8; 60]);
            send_udp(&sock, PORT_FLOOD, &p);
        };
        // The ring's 32 first, and only once kiln has read them off the TAP (the TAP's
        // tx_packets counts what its reader took) the rest: kiln then reads no more, the
        // TAP queues 64 and drops the others at its tail. Sent in one burst, kiln could
        // still be filling the ring while the TAP overflowed, which frees room mid-burst
        // and leaves a gap.
        let read_before = tap_stat(&ns, "tx_packets");
        (1..=32).for_each(flood);
        let deadline = Instant::now() + Duration::from_secs(10);
        while tap_stat(&ns, "tx_packets") - read_before < 32 {
            assert!(
                Instant::now() < deadline,
                "kiln never read the ring's 32 frames"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        (33..=400).for_each(flood);
        dropped.push(tap_stat(&ns, "tx_dropped") - before);
        vm.wait_line("info net-rx-stall send-final");
        send_udp(&sock, PORT_FINAL, b"final");
    }
    let (out, m) = vm.finish();
    assert_guest_passed(&out);
    for d in &dropped {
        assert!(*d > 0, "the TAP never overflowed ({dropped:?})\n{out}");
    }
    let resumed = out.lines_with("ok net-rx-stall resumed after-ring=");
    assert_eq!(resumed.len(), 2, "{out}");
    let mut after = 0;
    for line in &resumed {
        let n: u64 = line.rsplit('=').next().unwrap().parse().unwrap();
        assert!((1..=64).contains(&n), "{line}\n{out}");
        after += n;
    }
    let drop_lines: Vec<String> = out
        .lines_with("ok net-rx-stall")
        .into_iter()
        .filter(|l| !l.contains("resumed"))
        .map(String::from)
        .collect();
    assert_eq!(
        drop_lines,
        [
            init_line("net-rx-stall", VERSION_1_MAC, "32x2048"),
            "ok net-rx-stall ring-full frames=32".into(),
            "ok net-rx-stall final".into(),
            format!("ok net-rx-stall {COUNTERS_OK}"),
            init_line("net-rx-stall", VERSION_1_MAC_MRG_EVIDX, "32x2048"),
            "ok net-rx-stall ring-full frames=32".into(),
            "ok net-rx-stall final".into(),
            format!("ok net-rx-stall {COUNTERS_OK}"),
        ]
    );
    // "Frames queued there arrive": the ring's 32, then every frame the TAP held, without a
    // gap (the TAP drops only at its tail, so the frames after the ring are consecutive).
    let seqs = out.lines_with("info net-rx-stall seq");
    assert_eq!(seqs.len(), 2, "{out}");
    for (seq, resumed) in seqs.iter().zip(&resumed) {
        assert!(
            seq.starts_with("info net-rx-stall seq ring-last=32 after-first=33 "),
            "{seq}"
        );
        let last: u64 = seq.rsplit("after-last=").next().unwrap().parse().unwrap();
        let n: u64 = resumed.rsplit('=').next().unwrap().parse().unwrap();
        assert_eq!(
            last,
            33 + n - 1,
            "a gap in the frames after the ring: {seq}, {resumed}"
        );
    }
    let net = "net_eth0";
    // kiln lost nothing it read: every frame went to the guest.
    assert_eq!(counter(&m, net, "rx_dropped"), 0, "{m}");
    assert_eq!(counter(&m, net, "rx_errors"), 0, "{m}");
    assert_eq!(counter(&m, net, "rx_frames"), 2 * (32 + 1) + after, "{m}");
}

/// Issue 20 item 5: the offloads kiln offers, against the host's stack. The guest negotiates
/// CSUM, HOST_TSO4 and GUEST_CSUM and sends a UDP datagram whose checksum it leaves to the
/// host (NEEDS_CSUM) and one 4000-byte TCPv4 segment for the host to segment (GSO_TCPV4,
/// gso_size 1448) to a closed port; the host receives the datagram on its socket, and its TCP
/// answers the segment with RST|ACK acknowledging all 4000 bytes. A capture on the TAP
/// (with the kernel's view of the offload state) shows kiln handed both over with their
/// offload metadata intact and a checksum that completes correctly. Then the host sends a
/// datagram to the guest, which finds its checksum left to it (NEEDS_CSUM), completes and
/// verifies it.
#[test]
fn checksum_and_tso_offloads_against_the_host_stack() {
    let ns = net_ns(TapOpts {
        static_neigh: true,
        ..TapOpts::default()
    });
    let sock = ns.run_in(|| UdpSocket::bind(SocketAddrV4::new(HOST_IP, 7010)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let capture = TapCapture::start_with(&ns, true);
    let dir = TempDir::new("net-offload");
    let mut vm = Vm::start(&ns, &dir, "net-offload", None);
    let mut got = [0u8; 2048];
    let (n, from) = sock
        .recv_from(&mut got)
        .expect("the NEEDS_CSUM datagram never arrived");
    assert_eq!(
        from,
        std::net::SocketAddr::from(SocketAddrV4::new(GUEST_IP, 7010))
    );
    let want: Vec<u8> = (0..1000u32).map(|i| (i * 13 + 5) as u8).collect();
    assert_eq!(&got[..n], &want[..], "the datagram's payload");
    vm.wait_line("info net-offload listen port=7011");
    let payload: Vec<u8> = (0..600u32).map(|i| (i * 7 + 3) as u8).collect();
    send_udp(&sock, 7011, &payload);
    let (out, m) = vm.finish();
    let frames = capture.finish();
    assert_guest_passed(&out);
    assert_lines(
        &out,
        "ok net-offload",
        &[
            "ok net-offload tx-csum sent len=1042".into(),
            "ok net-offload tx-tso4 rst-acked=4000".into(),
            "ok net-offload rx-csum needs-csum=1 len=600".into(),
        ],
    );
    let net = "net_eth0";
    assert_eq!(counter(&m, net, "tx_dropped"), 0, "{m}");
    assert_eq!(counter(&m, net, "tx_errors"), 0, "{m}");

    // The host kernel's view of what kiln wrote to the TAP: virtio_net_hdr (10 bytes), frame.
    let mac = guest_mac_bytes();
    let sent: Vec<&[u8]> = frames
        .iter()
        .filter(|c| c.pkttype != libc::PACKET_OUTGOING && c.frame.len() > 24)
        .map(|c| c.frame.as_slice())
        .filter(|f| f[10 + 6..10 + 12] == mac)
        .collect();
    let field = |f: &[u8], at: usize| u16::from_le_bytes([f[at], f[at + 1]]);
    let l4 = |f: &[u8], proto: u8, port: u16| {
        let e = &f[10..];
        ethertype(e) == 0x0800 && e[23] == proto && e[36..38] == port.to_be_bytes()
    };
    let udp = sent
        .iter()
        .find(|f| l4(f, 17, 7010))
        .expect("the NEEDS_CSUM datagram on the TAP");
    assert_eq!(udp[0] & 1, 1, "NEEDS_CSUM lost on the way to the host");
    assert_eq!(
        (field(udp, 6), field(udp, 8)),
        (34, 6),
        "csum_start, csum_offset"
    );
    assert_eq!(udp.len() - 10, 1042);
    assert_eq!(
        complete_and_verify(&udp[10..], 17),
        0,
        "the datagram's checksum, completed as the header says, is wrong"
    );
    let tso = sent
        .iter()
        .find(|f| l4(f, 6, 7012))
        .expect("the TSO segment on the TAP");
    assert_eq!(
        tso.len() - 10,
        14 + 20 + 20 + 4000,
        "the segment arrived whole"
    );
    assert_eq!(tso[0] & 1, 1, "NEEDS_CSUM of the TSO segment");
    assert_eq!(tso[1] & 0x7f, 1, "gso_type TCPV4");
    assert_eq!(field(tso, 4), 1448, "gso_size");
    assert_eq!(
        (field(tso, 6), field(tso, 8)),
        (34, 16),
        "csum_start, csum_offset"
    );
    assert_eq!(
        complete_and_verify(&tso[10..], 6),
        0,
        "the segment's checksum"
    );
    let data: Vec<u8> = (0..4000u32).map(|i| (i * 7 + 1) as u8).collect();
    assert_eq!(&tso[10 + 54..], &data[..], "the segment's payload");
}

/// Completes the transport checksum of an IPv4 frame whose checksum field holds the
/// pseudo-header sum (as NEEDS_CSUM leaves it), then returns the checksum of the whole
/// transport segment with its pseudo-header: 0 when correct.
fn complete_and_verify(frame: &[u8], proto: u8) -> u16 {
    let mut f = frame.to_vec();
    let l4 = 34;
    let at = l4 + if proto == 6 { 16 } else { 6 };
    let c = inet_csum(&f[l4..]);
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
    let mut ph = Vec::new();
    ph.extend_from_slice(&f[26..34]);
    ph.extend_from_slice(&[0, proto]);
    ph.extend_from_slice(&((f.len() - l4) as u16).to_be_bytes());
    ph.extend_from_slice(&f[l4..]);
    inet_csum(&ph)
}

/// Issue 20 item 5, the receive side of TSO: the guest negotiates GUEST_CSUM, GUEST_TSO4 and
/// MRG_RXBUF, opens a TCP connection to the host's listener (MSS 1448) and the host writes
/// 12000 bytes: the host's stack hands the TAP segments larger than the MSS, which kiln must
/// deliver whole, with their GSO_TCPV4 header; the guest completes and verifies each
/// segment's checksum and its bytes at their sequence offsets.
#[test]
fn tso_segments_from_the_host_arrive_whole() {
    let ns = net_ns(TapOpts {
        static_neigh: true,
        ..TapOpts::default()
    });
    let listener =
        ns.run_in(|| std::net::TcpListener::bind(SocketAddrV4::new(HOST_IP, 7013)).unwrap());
    let server = std::thread::spawn(move || {
        let (mut conn, _) = listener.accept().unwrap();
        let data: Vec<u8> = (0..12000u32).map(|i| (i * 11 + 7) as u8).collect();
        std::io::Write::write_all(&mut conn, &data).unwrap();
        // Held open until the guest is done (it never acknowledges the data).
        std::thread::sleep(Duration::from_secs(20));
    });
    let dir = TempDir::new("net-rx-tso");
    let vm = Vm::start(&ns, &dir, "net-offload:rx-tso", None);
    let (out, m) = vm.finish();
    assert_guest_passed(&out);
    assert_lines(
        &out,
        "ok net-offload",
        &["ok net-offload rx-tso4 bytes=12000 gso-frames>0 gso_size=1448".into()],
    );
    let net = "net_eth0";
    assert_eq!(counter(&m, net, "rx_dropped"), 0, "{m}");
    drop(server);
}
