//! Booting a real Linux kernel on kiln (issue 9): the harness shared by `tests/linux_boot.rs`
//! (the slow end-to-end tier) and `benches/linux_boot.rs` (the milestone measurement).
//!
//! One boot: an ext4 root image made with `mkfs.ext4 -d` from a directory holding a marker
//! file, a network namespace with a TAP and dnsmasq serving DHCP on it, and kiln started in
//! that namespace from a config file (1 vCPU, 256 MiB, the image as the root drive over
//! virtio-blk, the TAP over virtio-net). The serial console is read line by line as it
//! arrives and every line is time-stamped from just before kiln was spawned.
//!
//! The guest's command line runs the marker file as init (`init=/kiln-marker`): it is not a
//! program, so the kernel's exec fails with ENOEXEC, which it can only say after reading the
//! file's first bytes from the mounted root (a missing file would give ENOENT). The kernel
//! then panics ("Requested init ... failed") and `panic=1 reboot=k` resets the machine through
//! the i8042, which ends kiln with status 0. User mode is never entered in this boot; the
//! user-space workload (workload.rs) is a boot of its own.
//!
//! `Options` can leave the DHCP server out and serve kiln's API instead of `--no-api`, sending
//! `SendCtrlAltDel` once a given console line has come (the i8042 test).
#![allow(dead_code, clippy::unwrap_used)]

use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Path of the guest kernel (an ELF vmlinux); unset, `guest-kernel/build.sh` provides it.
pub const KERNEL_ENV: &str = "KILN_LINUX_KERNEL";
/// Set to 1 to leave the slow tier out of a quick local run (never in CI).
pub const SKIP_ENV: &str = "KILN_SKIP_LINUX";

/// Guest memory and vCPUs of the boot.
pub const MEM_MIB: u64 = 256;
pub const VCPUS: u64 = 1;
/// Size of the root image.
pub const IMAGE_MIB: u64 = 16;
/// The marker file at the root of the image, run as init.
pub const MARKER: &str = "kiln-marker";
/// The DHCP exchange: the host's end of the TAP, the address dnsmasq hands out, the MAC.
pub const HOST_IP: &str = "10.0.2.1";
pub const GUEST_IP: &str = "10.0.2.15";
pub const GUEST_MAC: &str = "06:00:0a:00:02:0f";
pub const TAP: &str = "kiln-linux0";

/// kiln's default command line (src/config.rs DEFAULT_BOOT_ARGS) without `nomodule` (the
/// microVM kernel has no modules). `pci=off`: the kernel has PCI support only because Linux's
/// ACPI initialisation needs it, and kiln has no PCI bus to probe.
pub const BASE_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off i8042.noaux i8042.nomux i8042.dumbkbd";
/// What the emulated KVM of the development machines needs (guest-kernel/README.md): no
/// XSAVE, FSGSBASE or PCID; no CPU features whose instructions the emulator lacks (popcnt,
/// SMAP's clac/stac, SSSE3/SSE4.x/AES/PCLMUL/MOVBE, RDRAND/RDSEED, INVPCID, and cmpxchg16b —
/// 141, CX16 — which kiln leaves in the guest's CPUID); no timer checks or clocksource
/// watchdog that take seconds under emulation; `hlt` to idle. Hardware KVM needs none of it.
pub const EMULATION_ARGS: &str = "noxsave nofsgsbase nopcid mitigations=off no_timer_check \
     tsc=reliable idle=halt \
     clearcpuid=141,151,308,288,298,158,306,145,137,147,148,153,129,150";

/// The full command line of the boot (kiln appends the virtio-mmio devices and
/// `root=/dev/vda rw`).
pub fn boot_args() -> String {
    format!("{BASE_ARGS} {EMULATION_ARGS} ip=dhcp init=/{MARKER}")
}

/// The firmware tables Linux is expected to boot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// ACPI (the default): the MADT for the CPUs and IOAPIC, the DSDT for the devices.
    Acpi,
    /// `acpi=off` on the command line: the MP table only, devices from the command line.
    MpTable,
}

/// The milestones, in the order Linux reaches them, and the console line that marks each.
pub const MILESTONES: [(&str, &str); 5] = [
    ("first kernel line", "Linux version "),
    ("devices probed", "[vda] "),
    ("DHCP lease", "IP-Config: Got DHCP answer from "),
    ("root mounted", "VFS: Mounted root ("),
    ("init", "as init process"),
];

/// Where the guest kernel is, or why the Linux tier does not run.
pub enum KernelChoice {
    /// Boot this vmlinux.
    Kernel(PathBuf),
    /// `KILN_SKIP_LINUX=1`: the user left the tier out.
    Skipped,
}

/// The kernel named by `KILN_LINUX_KERNEL`, else the one `guest-kernel/build.sh` prints: it
/// builds the kernel on the first run (minutes; it installs its build dependencies with apt)
/// and answers from its cache after that. `KILN_SKIP_LINUX=1` leaves the tier out.
pub fn choose_kernel() -> KernelChoice {
    if std::env::var(SKIP_ENV).is_ok_and(|v| v == "1") {
        return KernelChoice::Skipped;
    }
    if let Some(path) = std::env::var_os(KERNEL_ENV).filter(|p| !p.is_empty()) {
        let path = PathBuf::from(path);
        assert!(
            path.is_file(),
            "{KERNEL_ENV}={} does not name a file (build one with guest-kernel/build.sh)",
            path.display()
        );
        return KernelChoice::Kernel(path);
    }
    KernelChoice::Kernel(build_kernel())
}

/// Runs `guest-kernel/build.sh` (one build at a time: the script holds a lock) and returns
/// the vmlinux it prints.
pub fn build_kernel() -> PathBuf {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/guest-kernel/build.sh");
    eprintln!("{KERNEL_ENV} is not set: asking {script} for the kernel (built once, then cached)");
    cached_file_from(script)
}

/// Runs `script`, which prints the path of a file it built (or found cached), and returns it.
pub fn cached_file_from(script: &str) -> PathBuf {
    let out = Command::new(script)
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {script}: {e}"));
    assert!(out.status.success(), "{script} failed ({})", out.status);
    let path = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        path.is_file(),
        "{script} printed {}, not a file",
        path.display()
    );
    path
}

/// Fails unless `program` can be found on PATH (or in /usr/sbin, /sbin).
pub fn require_program(program: &str, package: &str) -> PathBuf {
    let path = std::env::var("PATH").unwrap_or_default();
    path.split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .map(|d| Path::new(d).join(program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| {
            panic!("{program} is missing: install the Debian package {package} (.ci/run does)")
        })
}

/// A fresh directory, removed on drop (testkit's).
pub use testkit::TempDir as Scratch;

fn run_ok(cmd: &mut Command) {
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Builds the root image in `dir`: `mkfs.ext4 -d` of a directory holding the marker file
/// (and `/dev`, where the kernel mounts devtmpfs).
pub fn make_root_image(dir: &Path) -> PathBuf {
    let mkfs = require_program("mkfs.ext4", "e2fsprogs");
    let root = dir.join("rootdir");
    std::fs::create_dir_all(root.join("dev")).unwrap();
    let marker = root.join(MARKER);
    std::fs::write(
        &marker,
        "kiln linux boot test: this file is on the root image\n",
    )
    .unwrap();
    std::fs::set_permissions(&marker, std::fs::Permissions::from_mode(0o755)).unwrap();
    let image = dir.join("rootfs.ext4");
    let file = std::fs::File::create(&image).unwrap();
    file.set_len(IMAGE_MIB << 20).unwrap();
    drop(file);
    run_ok(
        Command::new(mkfs)
            .args(["-q", "-F", "-L", "kilnroot", "-d"])
            .arg(&root)
            .arg(&image),
    );
    image
}

pub mod workload;

use testkit::NetNs;

/// A network namespace with a TAP at `HOST_IP/24`, deleted (TAP and all) on drop.
fn netns_with_tap() -> NetNs {
    let ns = NetNs::new("linux").unwrap();
    ns.add_tap(TAP, &format!("{HOST_IP}/24")).unwrap();
    ns
}

/// dnsmasq serving DHCP (only) on the namespace's TAP; killed on drop.
pub struct Dnsmasq {
    child: Child,
    pub log: PathBuf,
    pub leases: PathBuf,
}

impl Dnsmasq {
    pub fn start(ns: &NetNs, dir: &Path) -> Dnsmasq {
        let dnsmasq = require_program("dnsmasq", "dnsmasq-base");
        let log = dir.join("dnsmasq.log");
        let leases = dir.join("dnsmasq.leases");
        let child = ns
            .command(&dnsmasq)
            .arg("--keep-in-foreground")
            .arg("--conf-file=/dev/null")
            .arg("--port=0")
            .arg("--no-resolv")
            .arg("--no-hosts")
            .arg("--user=root")
            .arg("--group=root")
            .arg(format!("--interface={TAP}"))
            .arg("--bind-interfaces")
            .arg(format!(
                "--dhcp-range={GUEST_IP},{GUEST_IP},255.255.255.0,1h"
            ))
            .arg(format!("--dhcp-host={GUEST_MAC},{GUEST_IP}"))
            .arg("--no-ping")
            .arg("--log-dhcp")
            .arg(format!("--log-facility={}", log.display()))
            .arg(format!("--dhcp-leasefile={}", leases.display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut d = Dnsmasq { child, log, leases };
        // Ready once it has logged its DHCP range.
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if d.log_text().contains("DHCP, IP range") {
                break;
            }
            if let Some(status) = d.child.try_wait().unwrap() {
                let mut err = String::new();
                let _ = d.child.stderr.take().unwrap().read_to_string(&mut err);
                panic!("dnsmasq exited ({status}) at start:\n{err}{}", d.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "dnsmasq did not start:\n{}",
                d.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed (and reaped) when dropped, however the test ends.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        // After a successful wait() std knows the child is gone and signals nothing.
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What one boot produced.
#[derive(Debug)]
pub struct Boot {
    /// kiln's exit status (128 + N for signal N).
    pub status: i32,
    /// Serial console lines (without line ends), with the time since kiln's spawn.
    pub serial: Vec<(Duration, String)>,
    /// kiln's stderr.
    pub stderr: String,
    /// When each of `MILESTONES` was first seen.
    pub milestones: Vec<Option<Duration>>,
    /// From spawn to kiln's exit.
    pub end: Duration,
    /// The server side of DHCP.
    pub dnsmasq_log: String,
    pub dnsmasq_leases: String,
    /// The last metrics line kiln wrote (when the VM ended).
    pub metrics: Option<serde_json::Value>,
    /// Size of the root image in 512-byte sectors.
    pub image_sectors: u64,
    /// The API's answer to `SendCtrlAltDel`, if it was sent.
    pub ctrl_alt_del: Option<String>,
}

impl Boot {
    /// The serial log with time stamps, for failure messages.
    pub fn log(&self) -> String {
        let mut s = String::new();
        for (t, line) in &self.serial {
            s.push_str(&format!("[{:8.3}] {line}\n", t.as_secs_f64()));
        }
        s
    }

    /// The first serial line containing `needle`.
    pub fn line(&self, needle: &str) -> Option<&str> {
        self.serial
            .iter()
            .map(|(_, l)| l.as_str())
            .find(|l| l.contains(needle))
    }

    /// A counter of `section` in the final metrics.
    pub fn metric(&self, section: &str, name: &str) -> Option<u64> {
        self.metrics.as_ref()?.get(section)?.get(name)?.as_u64()
    }

    /// A `vcpu` counter from the final metrics.
    pub fn vcpu_metric(&self, name: &str) -> Option<u64> {
        self.metric("vcpu", name)
    }
}

impl std::fmt::Display for Boot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "--- kiln status {} after {:.1} s\n--- serial\n{}--- kiln stderr\n{}\n--- dnsmasq log\n{}--- metrics\n{:?}\n",
            self.status,
            self.end.as_secs_f64(),
            self.log(),
            self.stderr,
            self.dnsmasq_log,
            self.metrics
        )
    }
}

/// How to boot.
#[derive(Clone, Debug)]
pub struct Options<'a> {
    /// More arguments for kiln (e.g. `--no-seccomp`).
    pub extra: &'a [&'a str],
    /// Run the DHCP server.
    pub dhcp_server: bool,
    /// Serve kiln's API on a socket and send `SendCtrlAltDel` through it once a console line
    /// contains this.
    pub ctrl_alt_del_on: Option<&'a str>,
    /// Once a console line contains this: pause the VM, snapshot it through the API, kill
    /// kiln, and restore the snapshot in a new kiln that finishes the boot.
    pub snapshot_on: Option<&'a str>,
    /// Once a console line contains this: live-migrate the running VM to a new kiln in the
    /// same namespace (`PUT /migration/receive` there, `PUT /migration/send` here), which
    /// finishes the boot.
    pub migrate_on: Option<&'a str>,
    /// Kill kiln and fail past this.
    pub timeout: Duration,
    /// Print serial lines to stderr as they arrive.
    pub echo: bool,
    /// Appended to the kernel command line (e.g. `acpi=off`).
    pub cmdline_extra: &'a str,
}

impl Default for Options<'_> {
    fn default() -> Self {
        Options {
            cmdline_extra: "",
            extra: &[],
            dhcp_server: true,
            ctrl_alt_del_on: None,
            snapshot_on: None,
            migrate_on: None,
            timeout: Duration::from_secs(15 * 60),
            echo: false,
        }
    }
}

/// One PUT on kiln's API socket; returns the status line.
fn api_put(sock: &Path, path: &str, body: &str) -> String {
    api_request(sock, "PUT", path, body)
}

/// One HTTP request on kiln's API socket; returns the status line.
fn api_request(sock: &Path, method: &str, path: &str, body: &str) -> String {
    use std::io::Write;
    let mut s = match std::os::unix::net::UnixStream::connect(sock) {
        Ok(s) => s,
        // kiln may be gone already (a repeated Ctrl+Alt+Del racing the reset).
        Err(e) => return format!("cannot connect to {}: {e}", sock.display()),
    };
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    resp.lines().next().unwrap_or("").to_string()
}

/// kiln in the test's network namespace with `args`, its metrics to `metrics`, its console
/// and log piped.
fn spawn_kiln(ns: &NetNs, args: &[std::ffi::OsString], metrics: &Path, extra: &[&str]) -> Child {
    ns.command(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .arg("--metrics-path")
        .arg(metrics)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// [`spawn_kiln`] serving the API on `sock` and nothing else, once the socket answers; `who`
/// names the process in the failure.
fn spawn_api_kiln(ns: &NetNs, sock: &Path, metrics: &Path, extra: &[&str], who: &str) -> Child {
    let child = spawn_kiln(ns, &["--api-sock".into(), sock.into()], metrics, extra);
    let ready = Instant::now();
    while std::os::unix::net::UnixStream::connect(sock).is_err() {
        assert!(
            ready.elapsed() < Duration::from_secs(30),
            "the {who} kiln never served its socket"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    child
}

/// How often, and how far apart, `SendCtrlAltDel` is sent until Linux restarts.
const CTRL_ALT_DEL_TRIES: u32 = 5;
const CTRL_ALT_DEL_AGAIN: Duration = Duration::from_secs(3);

/// Boots run one at a time (each keeps a host core busy for its vCPU).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Boots `kernel` once (see the module documentation) with default options but these.
pub fn boot(kernel: &Path, extra: &[&str], timeout: Duration, echo: bool) -> Boot {
    boot_with(
        kernel,
        &Options {
            extra,
            timeout,
            echo,
            ..Options::default()
        },
    )
}

/// Boots `kernel` once (see the module documentation).
pub fn boot_with(kernel: &Path, opts: &Options) -> Boot {
    let _one = ONE_AT_A_TIME
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let echo = opts.echo;
    let timeout = opts.timeout;
    let dir = Scratch::new("boot");
    let image = make_root_image(dir.path());
    let image_sectors = std::fs::metadata(&image).unwrap().len() / 512;
    let ns = netns_with_tap();
    let dnsmasq = opts.dhcp_server.then(|| Dnsmasq::start(&ns, dir.path()));

    let config = serde_json::json!({
        "boot-source": {
            "kernel_image_path": kernel,
            "boot_args": format!("{} {}", boot_args(), opts.cmdline_extra).trim_end(),
        },
        "machine-config": { "vcpu_count": VCPUS, "mem_size_mib": MEM_MIB },
        "drives": [{
            "drive_id": "rootfs",
            "path_on_host": image,
            "is_root_device": true,
            "is_read_only": false,
        }],
        "network-interfaces": [{
            "iface_id": "eth0",
            "host_dev_name": TAP,
            "guest_mac": GUEST_MAC,
        }],
    });
    let config_path = dir.path().join("vm.json");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let metrics_path = dir.path().join("metrics.json");
    let api_sock = dir.path().join("kiln.sock");
    let mut api_args: Vec<std::ffi::OsString> = vec!["--no-api".into()];
    if opts.ctrl_alt_del_on.is_some() || opts.snapshot_on.is_some() || opts.migrate_on.is_some() {
        api_args = vec!["--api-sock".into(), api_sock.clone().into()];
    }
    let snapshot_state = dir.path().join("vm.state");
    let snapshot_mem = dir.path().join("vm.mem");
    let snapshotted = std::cell::RefCell::new(None::<String>);
    let migrated = std::cell::RefCell::new(None::<(String, Child)>);
    let dest_sock = dir.path().join("dest.sock");
    let mut ctrl_alt_del_sent = None;

    let start = Instant::now();
    let mut args: Vec<std::ffi::OsString> = vec!["--config-file".into(), config_path.into()];
    args.extend(api_args);
    let child = spawn_kiln(&ns, &args, &metrics_path, opts.extra);
    let first_pid = child.id();

    let mut milestones = vec![None; MILESTONES.len()];
    // Ctrl+Alt+Del is sent again every few seconds until the kernel restarts: keys that
    // arrive while Linux's AT keyboard driver still waits for the acknowledgements of its
    // first commands (LEDs, typematic rate) are dropped by the driver.
    let mut ctrl_alt_del_last: Option<Instant> = None;
    let mut ctrl_alt_del_count = 0;
    let mut restarting = false;
    let mut on_line = |t: Duration, line: Option<&str>| {
        let Some(line) = line else {
            if let Some(last) = ctrl_alt_del_last
                && !restarting
                && ctrl_alt_del_count < CTRL_ALT_DEL_TRIES
                && last.elapsed() >= CTRL_ALT_DEL_AGAIN
            {
                let status = api_put(
                    &api_sock,
                    "/actions",
                    r#"{"action_type": "SendCtrlAltDel"}"#,
                );
                if echo {
                    eprintln!(">>> SendCtrlAltDel again: {status}");
                }
                ctrl_alt_del_last = Some(Instant::now());
                ctrl_alt_del_count += 1;
            }
            return;
        };
        restarting |= line.contains("reboot: Restarting system");
        for (i, (name, needle)) in MILESTONES.iter().enumerate() {
            if milestones[i].is_none() && line.contains(needle) {
                milestones[i] = Some(t);
                if echo {
                    eprintln!(">>> {name} at {:.1} s", t.as_secs_f64());
                }
            }
        }
        if let Some(needle) = opts.ctrl_alt_del_on
            && ctrl_alt_del_sent.is_none()
            && line.contains(needle)
        {
            let status = api_put(
                &api_sock,
                "/actions",
                r#"{"action_type": "SendCtrlAltDel"}"#,
            );
            if echo {
                eprintln!(">>> SendCtrlAltDel: {status}");
            }
            ctrl_alt_del_sent = Some(status);
            ctrl_alt_del_last = Some(Instant::now());
            ctrl_alt_del_count = 1;
        }
        if let Some(needle) = opts.snapshot_on
            && snapshotted.borrow().is_none()
            && line.contains(needle)
        {
            let paused = api_request(&api_sock, "PATCH", "/vm", r#"{"state": "Paused"}"#);
            let created = api_put(
                &api_sock,
                "/snapshot/create",
                &format!(
                    r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
                    snapshot_state.display(),
                    snapshot_mem.display()
                ),
            );
            if echo {
                eprintln!(">>> pause: {paused}; snapshot: {created}; killing kiln");
            }
            // The snapshot is whole on disk before the answer: kill the VMM outright.
            // SAFETY: kill(2) on the kiln process this function spawned.
            unsafe { libc::kill(first_pid as libc::pid_t, libc::SIGKILL) };
            *snapshotted.borrow_mut() = Some(format!("{paused} / {created}"));
        }
        if let Some(needle) = opts.migrate_on
            && migrated.borrow().is_none()
            && line.contains(needle)
        {
            let dest = spawn_api_kiln(&ns, &dest_sock, &metrics_path, opts.extra, "destination");
            let listen = format!("unix:{}", dir.path().join("mig.sock").display());
            let received = api_put(
                &dest_sock,
                "/migration/receive",
                &format!(r#"{{"listen": "{listen}"}}"#),
            );
            assert!(received.contains("204"), "migration receive: {received}");
            let sent = api_request(
                &api_sock,
                "PUT",
                "/migration/send",
                &format!(r#"{{"destination": "{listen}"}}"#),
            );
            if echo {
                eprintln!(">>> migration: {sent}");
            }
            *migrated.borrow_mut() = Some((sent, dest));
        }
    };
    let mut console = drive_console(child, start, timeout, echo, &mut on_line);
    let moved = migrated.borrow_mut().take();
    if let Some((answer, child)) = moved {
        assert!(
            answer.contains("200"),
            "migration failed: {answer}\n{}",
            console.stderr
        );
        let second = drive_console(child, start, timeout, echo, &mut on_line);
        let mut serial = console.serial;
        serial.extend(second.serial);
        console = Console {
            status: second.status,
            serial,
            stderr: format!(
                "{}\n--- the destination kiln\n{}",
                console.stderr, second.stderr
            ),
            end: second.end,
            timed_out: console.timed_out || second.timed_out,
        };
    }
    let answers = snapshotted.borrow().clone();
    if let Some(answers) = answers {
        assert!(
            answers.contains("204") && !answers.contains("400"),
            "pause or snapshot failed: {answers}"
        );
        // A new kiln, in the same namespace (the TAP and the DHCP server are still there),
        // restores the snapshot and carries on with the boot.
        let sock = dir.path().join("restored.sock");
        let child = spawn_api_kiln(&ns, &sock, &metrics_path, opts.extra, "restoring");
        let loaded = api_put(
            &sock,
            "/snapshot/load",
            &format!(
                r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
                snapshot_state.display(),
                snapshot_mem.display()
            ),
        );
        assert!(loaded.contains("204"), "snapshot load: {loaded}");
        let second = drive_console(child, start, timeout, echo, &mut on_line);
        let mut serial = console.serial;
        serial.extend(second.serial);
        console = Console {
            status: second.status,
            serial,
            stderr: format!(
                "{}\n--- the restored kiln\n{}",
                console.stderr, second.stderr
            ),
            end: second.end,
            timed_out: console.timed_out || second.timed_out,
        };
    }
    let Console {
        status,
        serial,
        stderr,
        end,
        timed_out,
    } = console;

    let metrics = std::fs::read_to_string(&metrics_path)
        .ok()
        .and_then(|s| s.lines().last().map(str::to_string))
        .and_then(|l| serde_json::from_str(&l).ok());
    let boot = Boot {
        status,
        serial,
        stderr,
        milestones,
        end,
        dnsmasq_log: dnsmasq.as_ref().map(Dnsmasq::log_text).unwrap_or_default(),
        dnsmasq_leases: dnsmasq
            .as_ref()
            .and_then(|d| std::fs::read_to_string(&d.leases).ok())
            .unwrap_or_default(),
        metrics,
        image_sectors,
        ctrl_alt_del: ctrl_alt_del_sent,
    };
    drop(dnsmasq);
    drop(ns);
    assert!(!timed_out, "kiln did not end within {timeout:?}\n{boot}");
    boot
}

/// What a VMM run printed, and how it ended.
pub struct Console {
    /// Exit status (128 + N for signal N).
    pub status: i32,
    /// Serial console lines (without line ends), with the time since the spawn.
    pub serial: Vec<(Duration, String)>,
    pub stderr: String,
    /// From the spawn to the exit.
    pub end: Duration,
    /// The run was killed at the deadline.
    pub timed_out: bool,
}

/// Reads `child`'s stdout (the serial console) line by line until it closes or `timeout`
/// (from `start`) passes, then kills it; each line is time-stamped from `start`, echoed to
/// stderr if `echo`, and given to `on_line` as it arrives; `on_line` also gets `None` when a
/// second passes without a line.
pub fn drive_console(
    child: Child,
    start: Instant,
    timeout: Duration,
    echo: bool,
    on_line: &mut dyn FnMut(Duration, Option<&str>),
) -> Console {
    let mut child = KillOnDrop(child);
    let (tx, rx) = mpsc::channel::<(Duration, String)>();
    let stdout = child.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut r = BufReader::new(stdout);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let t = start.elapsed();
                    let line = String::from_utf8_lossy(&buf)
                        .trim_end_matches(['\r', '\n'])
                        .to_string();
                    if tx.send((t, line)).is_err() {
                        break;
                    }
                }
            }
        }
    });
    let mut stderr_pipe = child.0.stderr.take().unwrap();
    let stderr_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr_pipe.read_to_string(&mut s);
        s
    });

    let mut serial = Vec::new();
    let deadline = start + timeout;
    let mut timed_out = false;
    loop {
        let now = Instant::now();
        if now >= deadline {
            timed_out = true;
            let _ = child.0.kill();
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok((t, line)) => {
                if echo {
                    eprintln!("[{:8.3}] {line}", t.as_secs_f64());
                }
                on_line(t, Some(&line));
                serial.push((t, line));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => on_line(start.elapsed(), None),
            // stdout closed: the VMM is ending.
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let status = child.0.wait().unwrap();
    let end = start.elapsed();
    let _ = reader.join();
    let stderr = stderr_reader.join().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let status = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Console {
        status,
        serial,
        stderr,
        end,
        timed_out,
    }
}

/// Which firmware tables Linux used: with ACPI, the RSDP kiln put at 0xe0000, its tables,
/// the MADT for the CPUs and the IOAPIC, and no ACPI error; with `acpi=off`, no ACPI at all
/// and the MP table at 0x9fc00.
pub fn check_firmware(b: &Boot, firmware: Firmware) {
    let rsdp = b.line("ACPI: RSDP ");
    match firmware {
        Firmware::Acpi => {
            let rsdp = rsdp.unwrap_or_else(|| panic!("Linux found no ACPI RSDP\n{b}"));
            assert!(
                rsdp.contains("ACPI: RSDP 0x00000000000E0000 000024 (v02 KILN  )"),
                "unexpected RSDP line `{rsdp}`\n{b}"
            );
            for table in ["XSDT", "FACP", "DSDT", "APIC"] {
                assert!(
                    b.line(&format!("ACPI: {table} 0x")).is_some(),
                    "Linux did not list the {table}\n{b}"
                );
            }
            assert!(
                b.line("ACPI: Using ACPI (MADT) for SMP configuration information")
                    .is_some(),
                "Linux did not take its CPUs from the MADT\n{b}"
            );
            assert!(
                b.line("IOAPIC[0]: apic_id 0, version ")
                    .is_some_and(|l| l.contains("address 0xfec00000, GSI 0-23")),
                "Linux did not take the IOAPIC from the MADT\n{b}"
            );
            for bad in ["ACPI Error", "ACPI BIOS Error", "ACPI Warning"] {
                assert!(b.line(bad).is_none(), "`{bad}` on the console\n{b}");
            }
            assert!(
                b.line("Intel MultiProcessor Specification").is_none(),
                "Linux configured its CPUs from the MP table despite ACPI\n{b}"
            );
            // The DSDT and the command line name the same devices (as Firecracker's do):
            // the second registration of each window finds it taken, so every device is
            // driven once.
            assert!(
                b.line("[vdb]").is_none() && b.line("eth1").is_none(),
                "a device was driven twice\n{b}"
            );
        }
        Firmware::MpTable => {
            assert!(rsdp.is_none(), "ACPI in use despite acpi=off\n{b}");
            assert!(
                b.line("ACPI: Interpreter disabled").is_some(),
                "ACPI was not disabled\n{b}"
            );
            assert!(
                b.line("found SMP MP-table at [mem 0x0009fc00-0x0009fc0f]")
                    .is_some()
                    && b.line("Intel MultiProcessor Specification v1.4").is_some(),
                "Linux did not configure its CPUs from the MP table\n{b}"
            );
            // The MP table numbers the IOAPIC after the vCPUs (the MADT numbers it 0).
            assert!(
                b.line("IOAPIC[0]: apic_id ")
                    .is_some_and(|l| l.contains(&format!(
                        "apic_id {}, version 17, address 0xfec00000, GSI 0-23",
                        VCPUS + 1
                    ))),
                "Linux did not take the IOAPIC from the MP table\n{b}"
            );
        }
    }
}

/// The checks of the end-to-end test: the block device with the image's capacity, the ext4
/// root mounted, the DHCP lease (and the server agrees), init reached on the mounted root,
/// and kiln ended cleanly after the panic's reset.
pub fn check_boot(b: &Boot) {
    for (i, (name, needle)) in MILESTONES.iter().enumerate() {
        assert!(
            b.milestones[i].is_some(),
            "milestone `{name}` (a console line with `{needle}`) never came\n{b}"
        );
    }

    // virtio-blk: "virtio_blk virtio0: [vda] 32768 512-byte logical blocks (16.8 MB/16.0 MiB)"
    let vda = b.line("[vda] ").unwrap();
    let sectors: u64 = vda
        .split("[vda] ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("cannot read the capacity in `{vda}`\n{b}"));
    assert!(
        vda.contains("512-byte logical blocks"),
        "unexpected vda line `{vda}`\n{b}"
    );
    assert_eq!(
        sectors, b.image_sectors,
        "Linux saw a capacity other than the image's\n{b}"
    );

    // The root file system.
    let mounted = b.line("VFS: Mounted root (").unwrap();
    assert!(
        mounted.contains("(ext4 filesystem)"),
        "root is not the ext4 image: `{mounted}`\n{b}"
    );
    assert!(
        b.line("EXT4-fs (vda): mounted filesystem").is_some(),
        "no ext4 mount message for vda\n{b}"
    );
    // devtmpfs goes onto the image's /dev: the root's directories are there.
    assert!(
        b.line("devtmpfs: mounted").is_some(),
        "devtmpfs was not mounted on the root's /dev\n{b}"
    );

    // DHCP, guest side...
    let lease = b.line("IP-Config: Got DHCP answer from ").unwrap();
    assert!(
        lease.contains(&format!("from {HOST_IP}, my address is {GUEST_IP}")),
        "unexpected lease `{lease}`\n{b}"
    );
    assert!(
        b.line("IP-Config: Complete:").is_some(),
        "IP autoconfiguration did not complete\n{b}"
    );
    assert!(
        b.serial
            .iter()
            .any(|(_, l)| l.contains(&format!("hwaddr={GUEST_MAC}"))
                && l.contains(&format!("ipaddr={GUEST_IP}"))),
        "IP-Config does not show eth0 with {GUEST_MAC} / {GUEST_IP}\n{b}"
    );
    // ... and server side.
    assert!(
        b.dnsmasq_log
            .lines()
            .any(|l| l.contains(&format!("DHCPACK({TAP}) {GUEST_IP} {GUEST_MAC}"))),
        "dnsmasq did not acknowledge {GUEST_IP} for {GUEST_MAC}\n{b}"
    );
    assert!(
        b.dnsmasq_leases.contains(GUEST_MAC) && b.dnsmasq_leases.contains(GUEST_IP),
        "dnsmasq's lease file has no lease for the guest: {:?}\n{b}",
        b.dnsmasq_leases
    );

    // init: the marker file was found on the root and read (ENOEXEC, not ENOENT).
    assert!(
        b.line(&format!("Run /{MARKER} as init process")).is_some(),
        "Linux did not start /{MARKER} as init\n{b}"
    );
    assert!(
        b.line(&format!("Requested init /{MARKER} failed (error -8)"))
            .is_some(),
        "the marker file was not found and read on the root (expected ENOEXEC)\n{b}"
    );

    // kiln ended cleanly: the guest's reset (panic=1, reboot=k) is exit status 0 (a system
    // call outside kiln's seccomp filters would have been 148).
    assert_eq!(b.status, 0, "kiln did not end cleanly\n{b}");
    let failures = b.vcpu_metric("failures");
    assert_eq!(failures, Some(0), "vCPU failures in the metrics\n{b}");
    // kiln's side of the same story.
    for (section, counter) in [
        ("block_rootfs", "read_count"),
        ("net_eth0", "tx_frames"),
        ("net_eth0", "rx_frames"),
    ] {
        assert!(
            b.metric(section, counter).is_some_and(|n| n > 0),
            "kiln's metrics show no {section}.{counter}\n{b}"
        );
    }
    assert_eq!(
        b.metric("i8042", "reset_count"),
        Some(1),
        "kiln did not see one reset through the i8042\n{b}"
    );
}
