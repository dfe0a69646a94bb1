//! Shared by the jailer's integration tests (and meant for kiln's end-to-end
//! tests through the jailer): run the jailer, as root, in a throwaway chroot
//! base, under a reaper, and clean up whatever it leaves on the host.
//!
//! ```ignore
//! let jailer = Jailer::new(KILN).arg("--netns").arg(netns.path())
//!     .exec_args(["--config-file", "vm.json", "--no-api"]);
//! std::fs::create_dir_all(jailer.jail_root()) ...   // put the VM's files in the jail
//! let mut run = jailer.spawn();
//! let line = run.recv_line(Duration::from_secs(60));
//! let done = run.finish();
//! ```
//!
//! Every run goes through `jailer-inspector --reap`, a child subreaper: the
//! processes that `--daemonize` and `--new-pid-ns` orphan are reaped there,
//! not left as zombies under the host's init. The chroot base (a temporary
//! directory) is removed when the [`Jailer`] is dropped; the jailer's own
//! mounts live in its private mount namespace and vanish with it.

#![allow(dead_code)]

use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

// Each user takes part of it.
#[allow(unused_imports)]
pub use testkit::{LineReader, NetNs, TempDir, require_root, unique};

pub const JAILER: &str = env!("CARGO_BIN_EXE_jailer");
pub const INSPECTOR: &str = env!("CARGO_BIN_EXE_jailer-inspector");
/// The exec file name of the inspector, hence its jail directory name.
pub const INSPECTOR_NAME: &str = "jailer-inspector";
/// Ids the jailed process runs as: no such user on the host.
pub const UID: u32 = 40123;
pub const GID: u32 = 40100;
/// How long a jailed process may take to report.
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// One jailer command line, in its own chroot base directory.
#[derive(Debug)]
pub struct Jailer {
    pub base: TempDir,
    pub id: String,
    exec_file: PathBuf,
    uid: String,
    gid: String,
    /// What `--chroot-base-dir` says, when not `base`.
    base_arg: Option<OsString>,
    args: Vec<OsString>,
    exec_args: Vec<OsString>,
    env: Vec<(OsString, OsString)>,
    private_cgroup2: bool,
    leak_fd: bool,
}

impl Jailer {
    /// Jails `exec_file` as [`UID`]:[`GID`] with a fresh id and base.
    pub fn new(exec_file: impl AsRef<Path>) -> Self {
        Jailer {
            base: TempDir::new("jailer-base"),
            id: unique("jt"),
            exec_file: exec_file.as_ref().to_path_buf(),
            uid: UID.to_string(),
            gid: GID.to_string(),
            base_arg: None,
            args: Vec::new(),
            exec_args: Vec::new(),
            env: Vec::new(),
            private_cgroup2: false,
            leak_fd: false,
        }
    }

    /// Jails the inspector (see inspector/main.rs).
    pub fn inspector() -> Self {
        Self::new(INSPECTOR)
    }

    pub fn id(mut self, id: &str) -> Self {
        self.id = id.to_owned();
        self
    }

    /// `--uid` and `--gid` (any text, to test bad ones).
    pub fn ids(mut self, uid: impl ToString, gid: impl ToString) -> Self {
        self.uid = uid.to_string();
        self.gid = gid.to_string();
        self
    }

    /// Passes `dir` as `--chroot-base-dir` instead of the temporary base.
    pub fn base_arg(mut self, dir: impl AsRef<OsStr>) -> Self {
        self.base_arg = Some(dir.as_ref().to_os_string());
        self
    }

    /// A jailer flag (or its value).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> Self {
        self.args.push(arg.as_ref().to_os_string());
        self
    }

    /// The same id and chroot base, without the flags added with [`Jailer::arg`].
    pub fn without_args(mut self) -> Self {
        self.args.clear();
        self
    }

    /// Arguments after `--`, for the jailed program.
    pub fn exec_args<I: IntoIterator<Item = S>, S: AsRef<OsStr>>(mut self, args: I) -> Self {
        self.exec_args
            .extend(args.into_iter().map(|a| a.as_ref().to_os_string()));
        self
    }

    /// An environment variable the jailer is started with.
    pub fn env(mut self, key: &str, value: &str) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Runs the jailer in a private mount namespace where the only cgroup
    /// mount is a cgroup2 hierarchy at /sys/fs/cgroup (as on a v2-only host).
    /// It is the host's v2 hierarchy all the same: cgroups made there must
    /// be removed through the host's mount (see [`cgroup2_mount`]).
    pub fn private_cgroup2(mut self) -> Self {
        self.private_cgroup2 = true;
        self
    }

    /// Starts the jailer with an extra open descriptor (fd 9, no close-on-exec).
    pub fn leak_fd(mut self) -> Self {
        self.leak_fd = true;
        self
    }

    pub fn exec_name(&self) -> String {
        self.exec_file
            .file_name()
            .expect("exec file name")
            .to_string_lossy()
            .into_owned()
    }

    /// `<base>/<exec name>/<id>/root` on the host.
    pub fn jail_root(&self) -> PathBuf {
        self.base
            .path()
            .join(self.exec_name())
            .join(&self.id)
            .join("root")
    }

    /// The jailer's full command line (without the program).
    pub fn jailer_args(&self) -> Vec<OsString> {
        let mut args: Vec<OsString> = vec![
            "--id".into(),
            self.id.clone().into(),
            "--exec-file".into(),
            self.exec_file.clone().into(),
            "--uid".into(),
            self.uid.clone().into(),
            "--gid".into(),
            self.gid.clone().into(),
            "--chroot-base-dir".into(),
            self.base_arg
                .clone()
                .unwrap_or_else(|| self.base.path().into()),
        ];
        args.extend(self.args.iter().cloned());
        args.push("--".into());
        args.extend(self.exec_args.iter().cloned());
        args
    }

    /// Starts the jailer under the reaper; stdout and stderr are captured.
    pub fn spawn(&self) -> Running {
        let mut cmd = Command::new(INSPECTOR);
        cmd.arg("--reap")
            .arg(JAILER)
            .args(self.jailer_args())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let leaked: Option<OwnedFd> = self
            .leak_fd
            .then(|| fs::File::open("/dev/null").expect("open /dev/null").into());
        let leaked_raw = leaked.as_ref().map(AsRawFd::as_raw_fd);
        let private_cgroup2 = self.private_cgroup2;
        // SAFETY: the hook runs in the forked child before exec and makes
        // only async-signal-safe system calls on data prepared before the fork.
        unsafe { cmd.pre_exec(move || before_exec(leaked_raw, private_cgroup2)) };
        let mut child = cmd.spawn().expect("spawn the jailer under the reaper");
        drop(leaked);

        let lines = LineReader::spawn(child.stdout.take().expect("stdout"));
        let stderr = testkit::read_all(child.stderr.take().expect("stderr"));
        Running {
            child,
            lines,
            stderr: Some(stderr),
            jail_root: self.jail_root(),
            pid_file: self.jail_root().join(format!("{}.pid", self.exec_name())),
        }
    }

    /// Runs the jailer to its end (for runs that end by themselves).
    pub fn run(&self) -> Finished {
        self.spawn().finish()
    }
}

/// In the reaper's child before exec: leak a descriptor as fd 9, enter a
/// private mount namespace with only a cgroup2 mount at /sys/fs/cgroup.
fn before_exec(leaked: Option<libc::c_int>, private_cgroup2: bool) -> std::io::Result<()> {
    if let Some(fd) = leaked {
        // SAFETY: dup2 takes plain integers; fd 9 belongs to no Rust object here.
        check(unsafe { libc::dup2(fd, 9) })?;
    }
    if !private_cgroup2 {
        return Ok(());
    }
    // SAFETY: unshare takes a flag word.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) })?;
    let none = std::ptr::null();
    let private = libc::MS_REC | libc::MS_PRIVATE;
    // SAFETY: NUL-terminated static strings and NULLs, as mount(2) expects.
    check(unsafe { libc::mount(none, c"/".as_ptr(), none, private, none.cast()) })?;
    // Detach the tmpfs and every v1/v2 mount under it.
    // SAFETY: a NUL-terminated static string.
    check(unsafe { libc::umount2(c"/sys/fs/cgroup".as_ptr(), libc::MNT_DETACH) })?;
    let (src, target) = (c"cgroup2".as_ptr(), c"/sys/fs/cgroup".as_ptr());
    // SAFETY: NUL-terminated static strings and a NULL data pointer.
    check(unsafe { libc::mount(src, target, src, 0, none.cast()) })
}

fn check(ret: libc::c_int) -> std::io::Result<()> {
    if ret == -1 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// A started jailer run.
#[derive(Debug)]
pub struct Running {
    child: Child,
    lines: LineReader,
    stderr: Option<JoinHandle<String>>,
    pub jail_root: PathBuf,
    pid_file: PathBuf,
}

impl Running {
    /// The next stdout line of the jailed process.
    pub fn recv_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok().map(|l| l.text)
    }

    /// Reads the inspector's report from stdout (up to `end=1`).
    pub fn read_report(&mut self) -> Report {
        let mut lines = Vec::new();
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv_line(left) {
                Some(line) if line == "end=1" => {
                    lines.push(line);
                    return Report::parse(&lines.join("\n"));
                }
                Some(line) => lines.push(line),
                None => panic!(
                    "no report from the inspector; stdout so far: {lines:?}, then: {:?}",
                    self.stop()
                ),
            }
        }
    }

    /// Waits for the inspector's report file (`--report`), given relative to
    /// the jail root.
    pub fn wait_report_file(&mut self, relative: &str) -> Report {
        let path = self.jail_root.join(relative);
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&path) {
                return Report::parse(&text);
            }
            if Instant::now() > deadline {
                panic!("no report at {}: {:?}", path.display(), self.stop());
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// The host pid of the jailed process, from `<exec name>.pid` in the jail.
    pub fn pid(&self) -> i32 {
        let text = fs::read_to_string(&self.pid_file).expect("read the pid file");
        text.trim().parse().expect("a pid in the pid file")
    }

    /// SIGKILL to the jailed process.
    pub fn kill(&self) {
        // SAFETY: kill takes plain integers.
        unsafe { libc::kill(self.pid(), libc::SIGKILL) };
    }

    /// Waits for the reaper: the jailer's exit code once every process of the
    /// run is gone.
    pub fn finish(mut self) -> Finished {
        let deadline = Instant::now() + TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait for the reaper") {
                break status;
            }
            if Instant::now() > deadline {
                panic!("the jailer run did not end: {:?}", self.stop());
            }
            thread::sleep(Duration::from_millis(5));
        };
        let stdout: Vec<String> = self.lines.try_iter().map(|l| l.text).collect();
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        Finished {
            code: status.code().unwrap_or(-1),
            stdout: stdout.join("\n"),
            stderr,
        }
    }

    /// Kills whatever is left of the run; returns the reaper's stderr.
    fn stop(&mut self) -> String {
        if let Ok(text) = fs::read_to_string(&self.pid_file)
            && let Ok(pid) = text.trim().parse::<i32>()
        {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while self.child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.stderr.is_some() {
            self.stop();
        }
    }
}

/// How a run ended.
#[derive(Debug)]
pub struct Finished {
    /// The jailer's exit code (128 + signal if it was killed, e.g. 137 after
    /// SIGKILL to a jailed process that the jailer exec'd itself).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Finished {
    /// Asserts a failed run: `code`, and exactly one stderr line
    /// `jailer: <step>: ...` that contains `needle`.
    pub fn assert_failed(&self, code: i32, step: &str, needle: &str) {
        assert_eq!(self.code, code, "exit code; stderr: {}", self.stderr);
        let lines: Vec<&str> = self.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "one line on stderr: {lines:?}");
        let prefix = format!("jailer: {step}: ");
        assert!(
            lines[0].starts_with(&prefix),
            "{:?} starts with {prefix:?}",
            lines[0]
        );
        assert!(
            lines[0].contains(needle),
            "{:?} contains {needle:?}",
            lines[0]
        );
        assert!(self.stdout.is_empty(), "no stdout: {:?}", self.stdout);
    }
}

/// The inspector's `key=value` lines.
#[derive(Debug, Clone)]
pub struct Report(Vec<(String, String)>);

impl Report {
    pub fn parse(text: &str) -> Self {
        Report(
            text.lines()
                .filter_map(|l| l.split_once('='))
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        )
    }

    /// The first value of `key`; panics if there is none.
    pub fn get(&self, key: &str) -> &str {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .unwrap_or_else(|| panic!("no {key} in {self:#?}"))
    }

    /// Every value of `key`, in order.
    pub fn all(&self, key: &str) -> Vec<&str> {
        self.0
            .iter()
            .filter(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
            .collect()
    }
}

/// The `/proc/<pid>/ns/<kind>` link of a process, e.g. `mnt:[4026531841]`.
pub fn namespace(pid: i32, kind: &str) -> String {
    let link = format!("/proc/{pid}/ns/{kind}");
    fs::read_link(&link)
        .unwrap_or_else(|e| panic!("read {link}: {e}"))
        .to_string_lossy()
        .into_owned()
}

/// `/proc/<pid>/cgroup`, as (hierarchy controllers, path) pairs.
pub fn cgroups_of(pid: i32) -> Vec<(String, String)> {
    let text = fs::read_to_string(format!("/proc/{pid}/cgroup")).expect("read /proc/pid/cgroup");
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// The mount point of the host's hierarchy: `cgroup` (v1) with `controller`
/// among its options, or `cgroup2` when `controller` is `None`.
pub fn cgroup_mount(controller: Option<&str>) -> Option<PathBuf> {
    let mounts = fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
    mounts.lines().find_map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        let found = match controller {
            None => f.get(2) == Some(&"cgroup2"),
            Some(c) => f.get(2) == Some(&"cgroup") && f.get(3)?.split(',').any(|o| o == c),
        };
        found.then(|| PathBuf::from(f[1]))
    })
}

pub fn cgroup2_mount() -> Option<PathBuf> {
    cgroup_mount(None)
}

/// Cgroup directories removed on drop, deepest first (retrying while the
/// kernel still counts an exiting process in them).
#[derive(Debug, Default)]
pub struct CgroupDirs(pub Vec<PathBuf>);

impl CgroupDirs {
    /// `<base>/<relative>` and every directory between, `base` excluded.
    pub fn add(&mut self, base: &Path, relative: &Path) {
        let mut dir = base.to_path_buf();
        for part in relative.components() {
            dir.push(part);
            self.0.push(dir.clone());
        }
    }
}

impl Drop for CgroupDirs {
    fn drop(&mut self) {
        let mut dirs = self.0.clone();
        dirs.sort_by_key(|d| std::cmp::Reverse(d.components().count()));
        dirs.dedup();
        for dir in dirs {
            let deadline = Instant::now() + Duration::from_secs(5);
            while dir.exists() && fs::remove_dir(&dir).is_err() && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(20));
            }
        }
    }
}
