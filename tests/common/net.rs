//! A private network namespace per test, for kiln's TAP devices.

use std::os::fd::AsRawFd;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

/// A network namespace made for one test, deleted (with everything in it) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    /// Creates namespace `kiln-<tag>-<pid>-<n>` (`n` counts the namespaces of this process,
    /// so tests running in parallel get their own) with loopback up.
    pub fn new(tag: &str) -> NetNs {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "kiln-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        );
        let _ = Command::new("ip")
            .args(["netns", "del", &name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cannot create network namespace {name} (run the tests as root): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // From here on the guard removes it, whatever fails next.
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// Runs `args` (a program and its arguments) inside the namespace, asserts it succeeds
    /// and returns its stdout.
    pub fn exec(&self, args: &[&str]) -> String {
        let out = self.command(args[0]).args(&args[1..]).output().unwrap();
        assert!(
            out.status.success(),
            "{args:?} failed in {}: {}{}",
            self.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Runs `ip ARGS` inside the namespace and asserts it succeeds.
    pub fn ip(&self, args: &[&str]) {
        let mut all = vec!["ip"];
        all.extend_from_slice(args);
        self.exec(&all);
    }

    /// Creates TAP `name` in the namespace with address `cidr`, up.
    pub fn add_tap(&self, name: &str, cidr: &str) {
        self.add_tap_with(name, cidr, &[]);
    }

    /// Creates TAP `name` in the namespace with address `cidr`, then sets `link` (`ip link
    /// set` arguments such as `mtu 9000`) and brings it up in one command.
    pub fn add_tap_with(&self, name: &str, cidr: &str, link: &[&str]) {
        self.ip(&["tuntap", "add", name, "mode", "tap"]);
        self.ip(&["addr", "add", cidr, "dev", name]);
        let mut set = vec!["link", "set", name];
        set.extend_from_slice(link);
        set.push("up");
        self.ip(&set);
    }

    /// A command that runs `program` inside the namespace (`ip netns exec` execs it in
    /// place: the child's pid is the program's).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }

    /// Runs `f` on a thread that joined the namespace: sockets it creates live there.
    pub fn run_in<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> T {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            let file = std::fs::File::open(&path).unwrap();
            // SAFETY: setns with an open netns fd only changes this thread's namespace.
            let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
            f()
        })
        .join()
        .unwrap()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}
