//! A private network namespace, for kiln's TAP devices.

use std::ffi::OsStr;
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

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
            std::net::UdpSocket::bind("10.99.0.1:0")
                .map(|s| s.local_addr().map(|a| a.ip().to_string()))
        });
        assert_eq!(addr.ok().and_then(Result::ok).as_deref(), Some("10.99.0.1"));
        let path = ns.path();
        assert!(path.exists());
        drop(ns);
        assert!(!path.exists());
    }
}
