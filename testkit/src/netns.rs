//! A private network namespace, for kiln's TAP devices.

use std::ffi::OsStr;
use std::io;
use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::{error, unique};

/// A named network namespace (`ip netns add`), deleted with everything in it on drop.
#[derive(Debug)]
pub struct NetNs {
    /// `kiln-<tag>-<pid>-<n>`.
    pub name: String,
}

impl NetNs {
    /// Creates namespace `kiln-<tag>-<pid>-<n>` (tests running in parallel get their own)
    /// with loopback up. Needs root.
    pub fn new(tag: &str) -> io::Result<NetNs> {
        let name = unique(&format!("kiln-{tag}"));
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip").args(["netns", "add", &name]).output()?;
        if !out.status.success() {
            return Err(error(format!(
                "cannot create network namespace {name} (run as root): {}",
                String::from_utf8_lossy(&out.stderr).trim_end()
            )));
        }
        // From here on the guard removes it, whatever fails next.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The namespace's handle, `/var/run/netns/<name>` (what `--netns` and setns take).
    pub fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it in
    /// place: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Turns IPv6 off in the namespace, so that the host side sends no unsolicited frames
    /// (router solicitations, neighbour discovery) to a guest.
    pub fn disable_ipv6(&self) -> io::Result<()> {
        self.exec(&[
            "sysctl",
            "-qw",
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ])
        .map(drop)
    }

    /// Runs `args` (a program and its arguments) inside the namespace; its stdout if it
    /// succeeds, else an error with its output.
    pub fn exec(&self, args: &[&str]) -> io::Result<String> {
        let (program, rest) = args
            .split_first()
            .ok_or_else(|| error("exec: no program"))?;
        let out = self.command(program).args(rest).output()?;
        if !out.status.success() {
            return Err(error(format!(
                "{args:?} failed in {}: {}{}",
                self.name,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Runs `ip ARGS` inside the namespace.
    pub fn ip(&self, args: &[&str]) -> io::Result<()> {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        self.exec(&all).map(drop)
    }

    /// Creates TAP `name` in the namespace with address `cidr`, up.
    pub fn add_tap(&self, name: &str, cidr: &str) -> io::Result<()> {
        self.add_tap_with(name, cidr, &[])
    }

    /// Creates TAP `name` in the namespace with address `cidr`, then sets `link` (`ip link
    /// set` arguments such as `mtu 9000` or `address <mac>`) and brings it up in one command.
    pub fn add_tap_with(&self, name: &str, cidr: &str, link: &[&str]) -> io::Result<()> {
        self.ip(&["tuntap", "add", name, "mode", "tap"])?;
        self.ip(&["addr", "add", cidr, "dev", name])?;
        let mut set = vec!["link", "set", name];
        set.extend_from_slice(link);
        set.push("up");
        self.ip(&set)
    }

    /// Moves the calling thread into the namespace: sockets it creates from then on, and
    /// threads and processes it starts, live there.
    pub fn enter(&self) -> io::Result<()> {
        setns(&self.path())
    }

    /// Runs `f` on a thread that joined the namespace: sockets it creates live there.
    /// Panics if the thread cannot join it (or `f` panics).
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = self.path();
        std::thread::spawn(move || {
            if let Err(e) = setns(&path) {
                panic!("cannot join {}: {e}", path.display());
            }
            f()
        })
        .join()
        .unwrap_or_else(|e| std::panic::resume_unwind(e))
    }
}

impl NetNs {
    /// One ICMP echo request to `dst` from a raw socket in the namespace (the `ping` tool is
    /// not installed everywhere): identifier 0x4b4e, sequence `seq`, `payload` bytes
    /// (byte i = `i * 3 + seq`). Waits up to `wait` for the matching reply (same id, seq and
    /// payload, from `dst`, valid checksum) and returns how long it took, or `None`.
    pub fn ping(
        &self,
        dst: Ipv4Addr,
        seq: u16,
        payload: usize,
        wait: Duration,
    ) -> io::Result<Option<Duration>> {
        self.run_in(move || echo(dst, seq, payload, wait))
    }
}

fn echo(dst: Ipv4Addr, seq: u16, payload: usize, wait: Duration) -> io::Result<Option<Duration>> {
    // SAFETY: plain socket creation; the fd is owned right away.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_ICMP) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // sendto/recvfrom and timeouts on the raw socket through std's wrapper.
    let sock = UdpSocket::from(fd);
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let id: u16 = 0x4b4e;
    let mut msg = vec![8u8, 0, 0, 0];
    msg.extend_from_slice(&id.to_be_bytes());
    msg.extend_from_slice(&seq.to_be_bytes());
    msg.extend((0..payload).map(|i| (i as u8).wrapping_mul(3).wrapping_add(seq as u8)));
    let csum = inet_csum(&msg);
    msg[2..4].copy_from_slice(&csum.to_be_bytes());
    let sent = Instant::now();
    sock.send_to(&msg, SocketAddrV4::new(dst, 0))?;
    let mut buf = [0u8; 2048];
    while sent.elapsed() < wait {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            continue;
        };
        // Raw sockets see the IPv4 header.
        let ihl = usize::from(buf[0] & 0xf) * 4;
        if n < ihl + 8 || from.ip() != std::net::IpAddr::V4(dst) {
            continue;
        }
        let icmp = &buf[ihl..n];
        if icmp[0] == 0
            && icmp[4..6] == id.to_be_bytes()
            && icmp[6..8] == seq.to_be_bytes()
            && icmp[8..] == msg[8..]
            && inet_csum(icmp) == 0
        {
            return Ok(Some(sent.elapsed()));
        }
    }
    Ok(None)
}

/// The Internet checksum (RFC 1071) of `data`.
pub fn inet_csum(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(c[0]) << 8 | u32::from(*c.get(1).unwrap_or(&0)))
        .sum();
    while sum >> 16 != 0 {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Moves the calling thread into the network namespace whose handle is `path`.
fn setns(path: &Path) -> io::Result<()> {
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns with an open netns fd only changes this thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_namespace_with_a_tap_gone_on_drop() {
        crate::require_root();
        let ns = NetNs::new("testkit").expect("a network namespace");
        ns.add_tap_with("tk0", "10.99.0.1/24", &["mtu", "1400"])
            .expect("a TAP");
        let mtu = ns
            .exec(&["cat", "/sys/class/net/tk0/mtu"])
            .expect("read the MTU");
        assert_eq!(mtu.trim(), "1400");
        assert!(ns.ip(&["link", "set", "nonexistent0", "up"]).is_err());
        let addr = ns.run_in(|| {
            UdpSocket::bind("10.99.0.1:0").map(|s| s.local_addr().map(|a| a.ip().to_string()))
        });
        assert_eq!(addr.ok().and_then(Result::ok).as_deref(), Some("10.99.0.1"));
        let path = ns.path();
        assert!(path.exists());
        drop(ns);
        assert!(!path.exists());
    }
}
