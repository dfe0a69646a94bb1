//! Network benchmark (issue 4): `cargo bench --bench net`, as root, on a host with /dev/kvm.
//!
//! The benchmark makes a network namespace with a TAP (`tap0`, 10.0.0.1/24, a fixed MAC, a
//! permanent neighbour entry for the guest, IPv6 off), joins it (so do the kiln processes it
//! starts and every socket it opens), and measures, per shape, frames per second, MB/s and
//! **the CPU time of kiln's main thread** (the event loop where the virtio-net device runs)
//! per frame, from /proc/<pid>/task/*/schedstat sampled when the guest prints its `begin`,
//! `end` and `ok` lines (kiln.run=net-bench, tests/guest/scenarios/net_bench.c):
//!
//! - `tx <size> x<batch>`: the guest sends UDP frames of `size` bytes (Ethernet header
//!   included, virtio-net header not) to 10.0.0.1:9000 (a bound socket nobody reads), posting
//!   `batch` chains per notification and asking for one interrupt per batch. `x256` is the
//!   issue's "256 frames per notification" shape, `x1` its "notification cycle" (kick,
//!   process one frame, interrupt);
//! - `rx <size> x<batch>`: this process sends UDP frames of `size` bytes to 10.0.0.2:9001 in
//!   bursts of `batch`, and waits for the guest's 4-byte acknowledgement (one per burst:
//!   the guest consumes the burst after one interrupt, posts the buffers again with one kick
//!   and sends the ack, so kiln also transmits one frame per burst). With MRG_RXBUF and 256
//!   buffers of 2 KiB (Linux's usual set-up) unless marked `no-mrg`.
//!
//! Frames/s and MB/s come from the guest's TSC (first to last frame), converted with
//! KVM_GET_TSC_KHZ: they are bounded by the emulated guest here (~1.5 M instructions/s), not
//! by kiln. kiln's CPU per frame does not depend on that.
//!
//! Baselines in the same invocation, interleaved with the kiln runs, on the same TAP:
//! - `firecracker 1.12.1` (`benches/firecracker.sh` fetches and caches it; "baseline
//!   absent" without it): the same guest, scenario and TAP from a config file, its main
//!   thread (event loop and devices, as kiln's) measured the same way; kiln / Firecracker
//!   is the ratio of the two medians of the same run (goal <= 0.6);
//! - `floor: device loop`: a device thread as small as one can be, with kiln's syscalls and
//!   wake-ups: blocked in epoll_wait on the TAP and on a "queue" eventfd that a driver thread
//!   writes (as KVM's ioeventfd does for the vCPU); TX: eventfd read, one writev (virtio-net
//!   header + frame) per frame, one interrupt per batch (KVM_IRQ_LINE on a real VM's
//!   IOAPIC pin, up then down, as kiln raises its devices' lines); RX: readv until EAGAIN,
//!   one interrupt per pass, and per burst the ack frame on a driver kick (eventfd read,
//!   writev, interrupt). Its CPU per frame;
//! - `floor: syscalls`: the raw cost of the same TAP writes (TX) or reads (RX) from one
//!   thread, nothing else.
//!
//! Reported as medians [min-max] over runs, with kiln / floor ratios, kiln's interrupts per
//! frame (its metrics), and its vCPU thread's CPU per frame (on this machine mostly the host
//! kernel emulating the guest: not the device path).
//!
//! Environment: `KILN_BENCH_NET_RUNS` (runs per shape, default 5), `KILN_BENCH_NET_N_BATCH`
//! (frames per run for x256 shapes, default 8192), `KILN_BENCH_NET_N_SINGLE` (frames per run
//! for x1 shapes, default 1000), `KILN_BENCH_NET_ONLY` (`tx` or `rx`: one direction only).

mod common;

use std::error::Error;
use std::fs::{self, File};
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use testkit::NetNs;

use common::{
    CpuDelta, FloorVm, KILN, Lines, Result, Scratch, ThreadCpu, cell, env_usize, field, guest_elf,
    next_line, ratio, spawn_reader, stats, stop, this_thread_cpu_ns,
};

const MEM_MIB: u64 = 128;
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const TAP: &str = "tap0";
const HOST_MAC: [u8; 6] = [0x02, 0x6b, 0x6c, 0x6e, 0x00, 0x01];
const GUEST_MAC: [u8; 6] = [0xaa, 0xfc, 0x00, 0x00, 0x00, 0x01];
const HOST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 1);
const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// Ports of tests/guest/scenarios/net_bench.c.
const PORT_TX: u16 = 9000;
const PORT_RX: u16 = 9001;
const PORT_ACK: u16 = 9002;
const VNET_HDR_LEN: usize = 12;
/// Longest wait for the guest's next line, or for an acknowledgement.
const LINE_TIMEOUT: Duration = Duration::from_secs(30);
const ACK_TIMEOUT: Duration = Duration::from_secs(2);

fn main() {
    common::run("net", "boots VMs and makes a network namespace", bench);
}

/// Which VMM a run starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Kiln,
    /// Firecracker 1.12.1, at this path.
    Firecracker(&'static std::path::Path),
}

fn mac_str(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

// ---- the shapes ----------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Dir {
    Tx,
    Rx,
}

#[derive(Clone, Copy, Debug)]
struct Shape {
    dir: Dir,
    size: usize,
    batch: u64,
    mrg: bool,
    n: u64,
}

impl Shape {
    fn name(&self) -> String {
        format!(
            "{} {}B x{}{}",
            if self.dir == Dir::Tx { "tx" } else { "rx" },
            self.size,
            self.batch,
            if self.dir == Dir::Rx && !self.mrg {
                " no-mrg"
            } else {
                ""
            }
        )
    }

    fn scenario(&self) -> String {
        format!(
            "net-bench:{}:{}:{}:{}{}",
            if self.dir == Dir::Tx { "tx" } else { "rx" },
            self.n,
            self.size,
            self.batch,
            if self.mrg { ":mrg" } else { "" }
        )
    }
}

// ---- the namespace -------------------------------------------------------------------------

/// The benchmark's network namespace with its TAP (10.0.0.1/24, a fixed MAC, a permanent
/// neighbour entry for the guest, IPv6 off), removed on drop. Joined by the main thread at
/// once: threads and processes started later inherit it.
fn net_ns() -> Result<NetNs> {
    let ns = NetNs::new("bench-net")?;
    ns.disable_ipv6()?;
    ns.add_tap_with(TAP, "10.0.0.1/24", &["address", &mac_str(&HOST_MAC)])?;
    ns.ip(&[
        "neigh",
        "replace",
        "10.0.0.2",
        "lladdr",
        &mac_str(&GUEST_MAC),
        "dev",
        TAP,
        "nud",
        "permanent",
    ])?;
    ns.enter()?;
    Ok(ns)
}

// ---- scratch files -------------------------------------------------------------------------

/// The VMM's config file (Firecracker's also has its drive list and logger).
impl Scratch {
    fn config(&self, shape: &Shape, vmm: Vmm) -> Result<PathBuf> {
        let path = self.path("vm.json");
        let extra = match vmm {
            Vmm::Kiln => String::new(),
            Vmm::Firecracker(_) => format!(
                ",\n  \"drives\": [],\n  {}",
                common::firecracker_logger(&self.path("fc.log"))?
            ),
        };
        let json = format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{BASE_ARGS} kiln.net=ip:{GUEST_IP},peer:{HOST_IP} kiln.run={},idle"
  }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {MEM_MIB} }},
  "network-interfaces": [{{ "iface_id": "eth0", "host_dev_name": "{TAP}", "guest_mac": "{}" }}]{extra}
}}
"#,
            guest_elf().display(),
            shape.scenario(),
            mac_str(&GUEST_MAC)
        );
        fs::write(&path, json)?;
        Ok(path)
    }
}

// ---- host-side traffic ---------------------------------------------------------------------

/// The host's sockets: a sink for the guest's TX frames (never read: no ICMP errors), and
/// the RX sender that also receives the guest's acknowledgements.
struct Sockets {
    _sink: UdpSocket,
    rx: UdpSocket,
}

impl Sockets {
    fn new() -> Result<Sockets> {
        let sink = UdpSocket::bind(SocketAddrV4::new(HOST_IP, PORT_TX))?;
        let rx = UdpSocket::bind(SocketAddrV4::new(HOST_IP, PORT_ACK))?;
        rx.set_read_timeout(Some(ACK_TIMEOUT))?;
        Ok(Sockets { _sink: sink, rx })
    }

    /// Drops acknowledgements left from an earlier run.
    fn drain(&self) -> Result<()> {
        self.rx.set_nonblocking(true)?;
        let mut buf = [0u8; 64];
        while self.rx.recv(&mut buf).is_ok() {}
        self.rx.set_nonblocking(false)?;
        Ok(())
    }
}

/// Sends `n` datagrams of `size`-byte frames to the guest in bursts of `batch`, each
/// followed by a wait for the acknowledgement of everything sent. Returns the frames the
/// guest acknowledged.
fn drive_rx(sock: &UdpSocket, n: u64, size: usize, batch: u64) -> Result<u64> {
    let payload = vec![0x5au8; size - 42];
    let to = SocketAddrV4::new(GUEST_IP, PORT_RX);
    let (mut sent, mut acked) = (0u64, 0u64);
    let mut buf = [0u8; 64];
    while sent < n {
        let k = batch.min(n - sent);
        for _ in 0..k {
            sock.send_to(&payload, to)?;
        }
        sent += k;
        while acked < sent {
            match sock.recv(&mut buf) {
                Ok(4) => {
                    acked = acked.max(u64::from(u32::from_be_bytes([
                        buf[0], buf[1], buf[2], buf[3],
                    ])))
                }
                Ok(_) => {}
                // Lost frames: the guest acknowledges what it got after its idle timeout.
                Err(_) => return Ok(acked),
            }
        }
    }
    Ok(acked)
}

// ---- one kiln run --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct RunSample {
    n: u64,
    bytes: u64,
    tsc: u64,
    window: CpuDelta,
    idle: CpuDelta,
    interrupts: u64,
}

fn kiln_run(scratch: &Scratch, shape: &Shape, socks: &Sockets, vmm: Vmm) -> Result<RunSample> {
    socks.drain()?;
    let config = scratch.config(shape, vmm)?;
    let metrics = scratch.path("metrics.json");
    let _ = fs::remove_file(&metrics);
    let stderr = scratch.path("stderr");
    let mut cmd = match vmm {
        Vmm::Kiln => {
            let mut c = Command::new(KILN);
            c.arg("--metrics-path").arg(&metrics);
            c
        }
        Vmm::Firecracker(bin) => Command::new(bin),
    };
    cmd.arg("--no-api")
        .arg("--config-file")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(&stderr)?));
    let mut child = cmd.spawn()?;
    let result = spawn_reader(&mut child, "net-bench").and_then(|rx| follow_run(&rx, shape, socks));
    stop(&mut child)?;
    let mut sample = result.map_err(|e| {
        let err = fs::read_to_string(&stderr).unwrap_or_default();
        let m = fs::read_to_string(&metrics).unwrap_or_default();
        format!(
            "{} ({vmm:?}): {e}\n--- stderr\n{err}--- metrics\n{m}",
            shape.name()
        )
    })?;
    if vmm != Vmm::Kiln {
        // The guest counted its frames (follow_run checks them); Firecracker's metrics are
        // not read.
        return Ok(sample);
    }
    let text = fs::read_to_string(&metrics)?;
    let last: serde_json::Value = serde_json::from_str(text.lines().last().ok_or("no metrics")?)?;
    sample.interrupts = last["net_eth0"]["interrupts"].as_u64().unwrap_or(0);
    let tx_frames = last["net_eth0"]["tx_frames"].as_u64().unwrap_or(0);
    let rx_frames = last["net_eth0"]["rx_frames"].as_u64().unwrap_or(0);
    let moved = if shape.dir == Dir::Tx {
        tx_frames
    } else {
        rx_frames
    };
    if moved < shape.n {
        return Err(format!("{}: kiln moved only {moved} frames: {last}", shape.name()).into());
    }
    Ok(sample)
}

fn follow_run(rx: &Lines, shape: &Shape, socks: &Sockets) -> Result<RunSample> {
    let mut output = String::new();
    let mut begin = None;
    let mut end: Option<(ThreadCpu, u64, u64, u64)> = None;
    let mut ok = None;
    loop {
        let line = next_line(rx, LINE_TIMEOUT, &mut output)?;
        match (line.cpu, line.text.as_str()) {
            (Some(cpu), t) if t.starts_with("info net-bench begin") => {
                begin = Some(cpu);
                if shape.dir == Dir::Rx {
                    let acked = drive_rx(&socks.rx, shape.n, shape.size, shape.batch)?;
                    if acked < shape.n {
                        std::thread::sleep(Duration::from_millis(500));
                        for l in rx.try_iter() {
                            output.push_str(&l.text);
                            output.push('\n');
                        }
                        return Err(format!(
                            "the guest acknowledged {acked}/{}:\n{output}",
                            shape.n
                        )
                        .into());
                    }
                }
            }
            (Some(cpu), t) if t.starts_with("bench net-bench end") => {
                let (Some(n), Some(bytes), Some(tsc)) =
                    (field(t, "n"), field(t, "bytes"), field(t, "tsc"))
                else {
                    return Err(format!("bad line {t:?}").into());
                };
                end = Some((cpu, n, bytes, tsc));
            }
            (Some(cpu), _) => ok = Some(cpu),
            (None, "info idle") => break,
            _ => {}
        }
    }
    let (Some(c0), Some((c1, n, bytes, tsc)), Some(c2)) = (begin, end, ok) else {
        return Err(format!("missing net-bench lines in:\n{output}").into());
    };
    if n != shape.n {
        return Err(format!("unexpected result:\n{output}").into());
    }
    Ok(RunSample {
        n,
        bytes,
        tsc,
        window: CpuDelta::between(&c0, &c1),
        idle: CpuDelta::between(&c1, &c2),
        interrupts: 0,
    })
}

// ---- the floors ----------------------------------------------------------------------------

/// This process's own end of the TAP (only while no kiln runs): IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR, a 12-byte header, non-blocking, as kiln opens it.
struct Tap {
    fd: OwnedFd,
}

impl Tap {
    fn open() -> Result<Tap> {
        let path = c"/dev/net/tun";
        // SAFETY: open(2) on a NUL-terminated path; the fd is owned right away.
        let raw = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NONBLOCK | libc::O_CLOEXEC,
            )
        };
        if raw < 0 {
            return Err(format!("/dev/net/tun: {}", std::io::Error::last_os_error()).into());
        }
        // SAFETY: `raw` is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut ifreq = [0u8; 40];
        ifreq[..TAP.len()].copy_from_slice(TAP.as_bytes());
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a struct ifreq (40 bytes here).
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(format!("TUNSETIFF: {}", std::io::Error::last_os_error()).into());
        }
        let hdr = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int.
        if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr) } < 0 {
            return Err(format!("TUNSETVNETHDRSZ: {}", std::io::Error::last_os_error()).into());
        }
        // The host transmits through the TAP only once the link watcher has seen the
        // carrier come up (until then its qdisc drops): wait for operstate UP.
        let deadline = Instant::now() + Duration::from_secs(3);
        loop {
            let out = Command::new("ip")
                .args(["-o", "link", "show", TAP])
                .output()?;
            if String::from_utf8_lossy(&out.stdout).contains("state UP") {
                break;
            }
            if Instant::now() > deadline {
                return Err(format!("{TAP} did not come up").into());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(Tap { fd })
    }

    fn raw(&self) -> RawFd {
        self.fd.as_raw_fd()
    }

    /// One frame, header and frame in one buffer (as the guest's one descriptor).
    fn write(&self, buf: &[u8]) -> std::io::Result<()> {
        let iov = libc::iovec {
            iov_base: buf.as_ptr() as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, readable for the call.
        if unsafe { libc::writev(self.raw(), &iov, 1) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// One frame into `buf`; None when the TAP is empty.
    fn read(&self, buf: &mut [u8]) -> std::io::Result<Option<usize>> {
        let iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        // SAFETY: the iovec describes `buf`, writable for the call.
        let n = unsafe { libc::readv(self.raw(), &iov, 1) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(e)
            };
        }
        Ok(Some(n as usize))
    }
}

fn ip_checksum(h: &[u8]) -> u16 {
    let mut sum: u32 = h
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(c[1]))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A virtio-net header (zero) + a UDP/IPv4 frame of `size` bytes from the guest to the host.
fn guest_frame(size: usize, sport: u16, dport: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN + size];
    let e = &mut f[VNET_HDR_LEN..];
    e[..6].copy_from_slice(&HOST_MAC);
    e[6..12].copy_from_slice(&GUEST_MAC);
    e[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (size - 14) as u16;
    e[14] = 0x45;
    e[16..18].copy_from_slice(&ip_len.to_be_bytes());
    e[20..22].copy_from_slice(&0x4000u16.to_be_bytes());
    e[22] = 64;
    e[23] = 17;
    e[26..30].copy_from_slice(&GUEST_IP.octets());
    e[30..34].copy_from_slice(&HOST_IP.octets());
    let csum = ip_checksum(&e[14..34]);
    e[24..26].copy_from_slice(&csum.to_be_bytes());
    e[34..36].copy_from_slice(&sport.to_be_bytes());
    e[36..38].copy_from_slice(&dport.to_be_bytes());
    e[38..40].copy_from_slice(&(ip_len - 20).to_be_bytes());
    e[42..42 + payload.len()].copy_from_slice(payload);
    f
}

/// Waits (spinning, yielding) until `cond` holds or 5 s pass.
fn spin_until(cond: impl Fn() -> bool) -> bool {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !cond() {
        if Instant::now() > deadline {
            return false;
        }
        std::thread::yield_now();
    }
    true
}

/// The floor device loop for `shape`: the device thread's CPU ns per frame.
fn floor_device_loop(tap: &Tap, vm: &FloorVm, shape: &Shape, socks: &Sockets) -> Result<f64> {
    socks.drain()?;
    let kick = EventFd::new(libc::EFD_NONBLOCK)?;
    // TX: frames the driver asks for; RX: the ack value to send (0: none).
    let pending = AtomicU64::new(0);
    // TX: frames written; RX: bench frames read.
    let done = AtomicU64::new(0);
    let stop = AtomicBool::new(false);
    let frame = guest_frame(shape.size, PORT_TX, PORT_TX, &[]);
    let n = shape.n;
    std::thread::scope(|s| -> Result<f64> {
        let device = s.spawn(|| -> std::result::Result<f64, String> {
            let run = || -> Result<f64> {
                let epoll = Epoll::new()?;
                epoll.ctl(
                    ControlOperation::Add,
                    kick.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )?;
                if shape.dir == Dir::Rx {
                    epoll.ctl(
                        ControlOperation::Add,
                        tap.raw(),
                        EpollEvent::new(EventSet::IN, 1),
                    )?;
                }
                let mut events = [EpollEvent::default(); 4];
                let mut buf = vec![0u8; 65600];
                let t0 = this_thread_cpu_ns();
                while !stop.load(Ordering::Acquire) {
                    let got = epoll.wait(100, &mut events)?;
                    for ev in &events[..got] {
                        if ev.data() == 0 {
                            let _ = kick.read();
                            let k = pending.swap(0, Ordering::AcqRel);
                            if shape.dir == Dir::Tx {
                                for _ in 0..k {
                                    tap.write(&frame)?;
                                }
                                vm.pulse()?;
                                done.fetch_add(k, Ordering::AcqRel);
                            } else if k > 0 {
                                let ack =
                                    guest_frame(46, PORT_RX, PORT_ACK, &(k as u32).to_be_bytes());
                                tap.write(&ack)?;
                                vm.pulse()?;
                            }
                        } else {
                            let mut count = 0;
                            while let Some(len) = tap.read(&mut buf)? {
                                if len == VNET_HDR_LEN + shape.size {
                                    count += 1;
                                }
                            }
                            vm.pulse()?;
                            done.fetch_add(count, Ordering::AcqRel);
                        }
                    }
                }
                Ok((this_thread_cpu_ns() - t0) as f64 / n as f64)
            };
            let result = run().map_err(|e| e.to_string());
            done.store(u64::MAX / 2, Ordering::Release);
            result
        });
        let driven = s.spawn(|| -> bool {
            // The "guest": kicks per batch and waits for the device.
            let mut moved = 0u64;
            while moved < n {
                let k = shape.batch.min(n - moved);
                if shape.dir == Dir::Tx {
                    pending.store(k, Ordering::Release);
                    let _ = kick.write(1);
                    if !spin_until(|| done.load(Ordering::Acquire) >= moved + k) {
                        return false;
                    }
                } else {
                    if !spin_until(|| done.load(Ordering::Acquire) >= moved + k) {
                        return false;
                    }
                    pending.store(moved + k, Ordering::Release);
                    let _ = kick.write(1);
                }
                moved += k;
            }
            true
        });
        let mut ok = true;
        if shape.dir == Dir::Rx {
            ok = drive_rx(&socks.rx, n, shape.size, shape.batch)? == n;
        }
        ok &= driven.join().unwrap_or(false);
        // Let the last completion land before stopping.
        std::thread::sleep(Duration::from_millis(20));
        stop.store(true, Ordering::Release);
        let per_frame = match device.join() {
            Ok(r) => r.map_err(|e| -> Box<dyn Error> { e.into() })?,
            Err(_) => return Err("the floor's device thread panicked".into()),
        };
        if !ok {
            return Err(format!(
                "floor device loop {}: frames lost (device counted {})",
                shape.name(),
                done.load(Ordering::Acquire)
            )
            .into());
        }
        Ok(per_frame)
    })
}

/// The raw TAP syscalls for `shape`, on this thread: CPU ns per frame of the writes, or of
/// the reads (the host's sends, in bursts of at most 256, are not counted).
fn floor_syscalls(tap: &Tap, shape: &Shape, socks: &Sockets) -> Result<f64> {
    if shape.dir == Dir::Tx {
        let frame = guest_frame(shape.size, PORT_TX, PORT_TX, &[]);
        let t0 = this_thread_cpu_ns();
        for _ in 0..shape.n {
            tap.write(&frame)?;
        }
        return Ok((this_thread_cpu_ns() - t0) as f64 / shape.n as f64);
    }
    let payload = vec![0x5au8; shape.size - 42];
    let to = SocketAddrV4::new(GUEST_IP, PORT_RX);
    let mut buf = vec![0u8; 65600];
    let (mut read, mut spent) = (0u64, 0u64);
    while read < shape.n {
        let k = 256.min(shape.n - read);
        for _ in 0..k {
            socks.rx.send_to(&payload, to)?;
        }
        let t0 = this_thread_cpu_ns();
        let mut got = 0;
        while got < k {
            match tap.read(&mut buf)? {
                Some(len) if len == VNET_HDR_LEN + shape.size => got += 1,
                Some(_) => {}
                None => break,
            }
        }
        spent += this_thread_cpu_ns() - t0;
        if got < k {
            return Err(format!("floor syscalls: {got}/{k} frames came through the TAP").into());
        }
        read += k;
    }
    Ok(spent as f64 / shape.n as f64)
}

// ---- the benchmark -------------------------------------------------------------------------

#[derive(Default)]
struct ShapeResults {
    runs: Vec<RunSample>,
    fc: Vec<RunSample>,
    /// Firecracker runs that failed (frames lost: the guest did not get them all).
    fc_failed: usize,
    floor_loop: Vec<f64>,
    floor_syscalls: Vec<f64>,
}

fn bench() -> Result<()> {
    let runs = env_usize("KILN_BENCH_NET_RUNS", 5);
    let n_batch = env_usize("KILN_BENCH_NET_N_BATCH", 8192) as u64;
    let n_single = env_usize("KILN_BENCH_NET_N_SINGLE", 1000) as u64;
    let started = Instant::now();
    let fc: Option<&'static std::path::Path> =
        common::firecracker().map(|p| &*Box::leak(p.into_boxed_path()));
    let _ns = net_ns()?;
    let scratch = Scratch::new("net")?;
    let socks = Sockets::new()?;
    let vm = FloorVm::new()?;
    let tsc_khz = match vm.tsc_khz {
        0 => return Err("KVM_GET_TSC_KHZ failed".into()),
        k => f64::from(k),
    };
    let mut shapes = Vec::new();
    for dir in [Dir::Tx, Dir::Rx] {
        for size in [64, 1500] {
            for batch in [256, 1] {
                let n = if batch == 1 { n_single } else { n_batch };
                shapes.push(Shape {
                    dir,
                    size,
                    batch,
                    mrg: dir == Dir::Rx,
                    n,
                });
            }
        }
    }
    shapes.push(Shape {
        dir: Dir::Rx,
        size: 64,
        batch: 256,
        mrg: false,
        n: n_batch,
    });

    println!("kiln network benchmark (issue 4)");
    println!("   kiln:  {KILN}");
    println!(
        "   guest: {} kiln.run=net-bench:<tx|rx>:<n>:<size>:<batch>[:mrg], 1 vCPU, {MEM_MIB} MiB, \
         EVENT_IDX; guest TSC {tsc_khz:.0} kHz",
        guest_elf().display()
    );
    println!(
        "   host:  {TAP} in network namespace {} (10.0.0.1/24); UDP 10.0.0.2 <-> 10.0.0.1",
        _ns.name
    );

    let only = std::env::var("KILN_BENCH_NET_ONLY").unwrap_or_default();
    let dirs: Vec<Dir> = [Dir::Tx, Dir::Rx]
        .into_iter()
        .filter(|d| only.is_empty() || (only == "tx") == (*d == Dir::Tx))
        .collect();
    shapes.retain(|s| dirs.contains(&s.dir));
    // Warm-up: one short run of each direction, one floor of each kind.
    for &dir in &dirs {
        let warm = Shape {
            dir,
            size: 64,
            batch: 256,
            mrg: dir == Dir::Rx,
            n: 512,
        };
        kiln_run(&scratch, &warm, &socks, Vmm::Kiln)?;
        if let Some(bin) = fc
            && let Err(e) = kiln_run(&scratch, &warm, &socks, Vmm::Firecracker(bin))
        {
            eprintln!("firecracker warm-up failed (not counted): {e}");
        }
        let tap = Tap::open()?;
        floor_device_loop(&tap, &vm, &warm, &socks)?;
        floor_syscalls(&tap, &warm, &socks)?;
    }

    let mut results: Vec<ShapeResults> = shapes.iter().map(|_| ShapeResults::default()).collect();
    let steps = shapes.len() * 4;
    for round in 0..runs {
        for k in 0..steps {
            let step = (round + k) % steps;
            let (si, what) = (step / 4, step % 4);
            let shape = &shapes[si];
            let r = &mut results[si];
            match what {
                0 => r.runs.push(kiln_run(&scratch, shape, &socks, Vmm::Kiln)?),
                3 => {
                    if let Some(bin) = fc {
                        // A baseline run that loses frames is counted and left out, not
                        // fatal: the table says how many.
                        match kiln_run(&scratch, shape, &socks, Vmm::Firecracker(bin)) {
                            Ok(sample) => r.fc.push(sample),
                            Err(e) => {
                                eprintln!("\nfirecracker run failed (left out): {e}");
                                r.fc_failed += 1;
                            }
                        }
                    }
                }
                1 => {
                    let tap = Tap::open()?;
                    r.floor_loop
                        .push(floor_device_loop(&tap, &vm, shape, &socks)?);
                }
                _ => {
                    let tap = Tap::open()?;
                    r.floor_syscalls.push(floor_syscalls(&tap, shape, &socks)?);
                }
            }
        }
        eprint!("\rround {}/{runs} done", round + 1);
    }
    eprintln!();

    println!();
    println!(
        "{runs} runs per shape, interleaved; cells: median [min-max]; µs = CPU microseconds per \
         frame; kiln main = the event-loop thread (the device), vCPU = its vCPU thread"
    );
    println!(
        "{:<18} {:>20} {:>16} {:>20} {:>20} {:>9} {:>20} {:>20} {:>9} {:>9} {:>10} {:>16}",
        "shape",
        "frames/s",
        "MB/s",
        "kiln main µs",
        "firecracker main µs",
        "/fc",
        "floor loop µs",
        "floor syscalls µs",
        "/loop",
        "/syscalls",
        "irqs/frame",
        "vCPU µs"
    );
    let mut medians = Vec::new();
    for (shape, r) in shapes.iter().zip(&results) {
        let col = |f: &dyn Fn(&RunSample) -> f64| stats(&r.runs.iter().map(f).collect::<Vec<_>>());
        let secs = |x: &RunSample| x.tsc as f64 / (tsc_khz * 1e3);
        let main = col(&|x| x.window.main as f64 / x.n as f64 / 1e3);
        let fl = stats(&r.floor_loop.iter().map(|ns| ns / 1e3).collect::<Vec<_>>());
        let fs = stats(
            &r.floor_syscalls
                .iter()
                .map(|ns| ns / 1e3)
                .collect::<Vec<_>>(),
        );
        let fc_main = stats(
            &r.fc
                .iter()
                .map(|x| x.window.main as f64 / x.n as f64 / 1e3)
                .collect::<Vec<_>>(),
        );
        let (fc_cell, fc_ratio) = if r.fc.is_empty() && r.fc_failed > 0 {
            ("baseline failed".to_string(), "-".to_string())
        } else if r.fc.is_empty() {
            ("baseline absent".to_string(), "-".to_string())
        } else {
            (cell(fc_main, 2), ratio(main.median, fc_main.median))
        };
        println!(
            "{:<18} {:>20} {:>16} {:>20} {:>20} {:>9} {:>20} {:>20} {:>9} {:>9} {:>10.3} {:>16}",
            shape.name(),
            cell(col(&|x| x.n as f64 / secs(x)), 0),
            cell(col(&|x| x.bytes as f64 / secs(x) / 1e6), 2),
            cell(main, 2),
            fc_cell,
            fc_ratio,
            cell(fl, 2),
            cell(fs, 2),
            ratio(main.median, fl.median),
            ratio(main.median, fs.median),
            col(&|x| x.interrupts as f64 / x.n as f64).median,
            cell(col(&|x| x.window.vcpu as f64 / x.n as f64 / 1e3), 1),
        );
        medians.push((main.median, fc_main.median));
        let idle = col(&|x| x.idle.main as f64 / 1e3).median;
        let slices = col(&|x| x.window.main_slices as f64 / x.n as f64).median;
        println!(
            "{:<18} main thread switched in {slices:.3} times per frame; its CPU in the 100 ms idle \
             after the end line: {idle:.0} µs{}",
            "",
            if r.fc_failed > 0 {
                format!("; {} Firecracker run(s) lost frames, left out", r.fc_failed)
            } else {
                String::new()
            }
        );
    }
    println!();
    let find = |dir: Dir, size: usize, batch: u64| {
        shapes
            .iter()
            .position(|s| {
                s.dir == dir && s.size == size && s.batch == batch && s.mrg == (dir == Dir::Rx)
            })
            .map(|i| medians[i].0)
            .unwrap_or(f64::NAN)
    };
    let per_frame = find(Dir::Tx, 64, 256);
    let per_cycle = find(Dir::Tx, 64, 1);
    if fc.is_none() {
        println!("kiln / firecracker 1.12.1: baseline absent");
    } else {
        println!(
            "/fc = kiln / firecracker 1.12.1, device (main) thread CPU per frame, medians of this \
             run (goal <= 0.6)"
        );
    }
    println!(
        "kiln, 1 frame per notification / 256 per notification (tx 64B): {}",
        ratio(per_cycle, per_frame)
    );
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
