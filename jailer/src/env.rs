//! The jailer's steps, in their documented order (see README.md):
//!
//! 1. close inherited file descriptors, clear the environment;
//! 2. validate every argument (and resolve the cgroup hierarchies);
//! 3. copy the exec file into `<base>/<exec name>/<id>/root`;
//! 4. join the network namespace;
//! 5. set the resource limits;
//! 6. create the cgroups and move in;
//! 7. new mount namespace, `pivot_root` into the jail;
//! 8. `/dev/kvm`, `/dev/net/tun`, and `/dev/userfaultfd` when the host has it;
//! 9. daemonize, if asked;
//! 10. new pid namespace, if asked; write `<exec name>.pid`;
//! 11. drop to uid:gid;
//! 12. exec.
//!
//! A failure ends the run with `jailer: <step>: <error>` on stderr and the
//! step's exit code, after removing what the run created in the jail.

use std::convert::Infallible;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use crate::args::{self, ArgsError, Command, JailConfig};
use crate::cgroup::{CgroupError, CgroupPlan};
use crate::chroot::{ChrootError, Jail};
use crate::resource_limits::RlimitError;
use crate::sys::{self, Fork};

/// A failed step. The message starts with the step's name; the exit code
/// tells the step apart (see [`Error::exit_code`]).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("sanitize: {0}: {1}")]
    Sanitize(&'static str, io::Error),
    #[error("arguments: {0}")]
    Args(#[from] ArgsError),
    #[error("copy exec file: {0}")]
    CopyExecFile(ChrootError),
    #[error("netns: join {0}: {1}")]
    Netns(PathBuf, io::Error),
    #[error("resource limits: {0}")]
    ResourceLimits(RlimitError),
    #[error("cgroups: {0}")]
    Cgroups(CgroupError),
    #[error("mount namespace: {0}")]
    MountNamespace(ChrootError),
    #[error("devices: {0}")]
    Devices(ChrootError),
    #[error("daemonize: {0}: {1}")]
    Daemonize(&'static str, io::Error),
    #[error("pid namespace: {0}: {1}")]
    PidNamespace(&'static str, io::Error),
    #[error("pid file: {0}")]
    PidFile(ChrootError),
    #[error("drop privileges: {0}: {1}")]
    DropPrivileges(&'static str, io::Error),
    #[error("exec {0}: {1}")]
    Exec(PathBuf, io::Error),
    /// A failure a forked jailer process reported (its message and code).
    #[error("{1}")]
    Child(u8, String),
}

impl Error {
    /// The process exit code for this failure (documented in README.md).
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Sanitize(..) => 1,
            Error::Args(_) => 2,
            Error::CopyExecFile(_) => 3,
            Error::Netns(..) => 4,
            Error::ResourceLimits(_) => 5,
            Error::Cgroups(_) => 6,
            Error::MountNamespace(_) => 7,
            Error::Devices(_) => 8,
            Error::Daemonize(..) => 9,
            Error::PidNamespace(..) | Error::PidFile(_) => 10,
            Error::DropPrivileges(..) => 11,
            Error::Exec(..) => 12,
            Error::Child(code, _) => *code,
        }
    }
}

/// When the jailer started, as passed on to kiln.
#[derive(Debug, Clone, Copy)]
pub struct StartTimes {
    /// CLOCK_MONOTONIC, µs.
    pub wall_us: u64,
    /// CLOCK_PROCESS_CPUTIME_ID, µs.
    pub cpu_us: u64,
}

impl StartTimes {
    pub fn now() -> Self {
        StartTimes {
            wall_us: sys::clock_us(libc::CLOCK_MONOTONIC),
            cpu_us: sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID),
        }
    }
}

/// Runs the jailer. Returns `Ok` after `--help`/`--version`, or in the
/// original process once a forked descendant has exec'd; otherwise the
/// process has exec'd and nothing returns.
pub fn run(start: StartTimes) -> Result<(), Error> {
    sys::close_fds_from(3).map_err(|e| Error::Sanitize("close inherited file descriptors", e))?;
    sys::clear_environment().map_err(|e| Error::Sanitize("clear the environment", e))?;

    let config = match args::parse(std::env::args_os().skip(1))? {
        Command::Help => {
            print!("{}", args::USAGE);
            return Ok(());
        }
        Command::Version => {
            println!("jailer {}", env!("CARGO_PKG_VERSION"));
            return Ok(());
        }
        Command::Jail(raw) => args::validate(*raw)?,
    };
    let cgroups = plan_cgroups(&config)?;

    let mut jail = Jail::create(&config.chroot_base, &config.exec_file.name, &config.id)
        .map_err(Error::CopyExecFile)?;
    let result = jail_and_exec(&config, cgroups.as_ref(), &mut jail, start);
    if result.is_err() {
        jail.remove_created();
    }
    result
}

fn plan_cgroups(config: &JailConfig) -> Result<Option<CgroupPlan>, Error> {
    let mounts = std::fs::read_to_string("/proc/mounts")
        .map_err(|e| Error::Cgroups(CgroupError::Read("/proc/mounts".into(), e)))?;
    CgroupPlan::new(
        config.cgroup_version,
        &config.cgroups,
        &config.parent_cgroup,
        config.parent_cgroup_given,
        &config.id,
        &mounts,
    )
    .map_err(Error::Cgroups)
}

/// Steps 3 to 12.
fn jail_and_exec(
    config: &JailConfig,
    cgroups: Option<&CgroupPlan>,
    jail: &mut Jail,
    start: StartTimes,
) -> Result<(), Error> {
    jail.copy_exec_file(&config.exec_file.file)
        .map_err(Error::CopyExecFile)?;
    if let Some(netns) = &config.netns {
        join_netns(netns)?;
    }
    config
        .resource_limits
        .install()
        .map_err(Error::ResourceLimits)?;
    if let Some(plan) = cgroups {
        plan.apply(std::process::id()).map_err(Error::Cgroups)?;
    }
    // /dev/null is out of reach once inside the jail.
    let dev_null = match config.daemonize {
        true => Some(
            OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")
                .map_err(|e| Error::Daemonize("open /dev/null", e))?,
        ),
        false => None,
    };
    // The host's /sys is out of reach once inside the jail.
    let userfaultfd = crate::chroot::host_userfaultfd().map_err(Error::Devices)?;
    jail.enter().map_err(Error::MountNamespace)?;
    jail.make_devices(config.uid, config.gid, userfaultfd)
        .map_err(Error::Devices)?;

    let exec = Exec::new(config, jail, start)?;
    hand_off(config, jail, &exec, dev_null.as_ref())
}

fn join_netns(path: &Path) -> Result<(), Error> {
    let ns = File::open(path).map_err(|e| Error::Netns(path.to_path_buf(), e))?;
    sys::setns(ns.as_fd(), libc::CLONE_NEWNET).map_err(|e| Error::Netns(path.to_path_buf(), e))
}

/// Steps 9 to 12. Without `--daemonize` or `--new-pid-ns` this process execs.
/// Otherwise a child does (a grandchild with `--daemonize`), and this
/// process stays until it has: a close-on-exec pipe closes without a word
/// when the exec succeeds, or carries the failure of any process in between,
/// which this process reports on its own stderr with the step's exit code.
fn hand_off(
    config: &JailConfig,
    jail: &mut Jail,
    exec: &Exec,
    dev_null: Option<&File>,
) -> Result<(), Error> {
    let mut cpu = CpuMeter::new(exec.start.cpu_us);
    if dev_null.is_none() && !config.new_pid_ns {
        jail.write_pid_file(std::process::id())
            .map_err(Error::PidFile)?;
        return Err(exec.run(&cpu));
    }

    // The step this hand-off belongs to, for its own failures.
    let step_err = |op| {
        move |e| match dev_null {
            Some(_) => Error::Daemonize(op, e),
            None => Error::PidNamespace(op, e),
        }
    };
    let (mut report_rx, report_tx) = io::pipe().map_err(step_err("create a pipe"))?;
    let fork = match dev_null {
        Some(_) => fork(jail, &mut cpu).map_err(step_err("fork"))?,
        None => fork_into_pid_ns(jail, &mut cpu)?,
    };
    let Fork::Parent(pid) = fork else {
        drop(report_rx);
        let result = match dev_null {
            Some(null) => daemonize(config, jail, exec, null, &mut cpu),
            None => Err(exec.run(&cpu)),
        };
        let Err(err) = result;
        report_and_exit(jail, report_tx, &err)
    };
    drop(report_tx);
    let mut report = Vec::new();
    let read = report_rx.read_to_end(&mut report);
    if dev_null.is_some() {
        // Reap the first daemon process (it exits at once).
        let _ = sys::waitpid(pid);
    }
    match (read, report.split_first()) {
        (Err(e), _) => Err(step_err("read the exec report")(e)),
        (Ok(_), None) => Ok(()),
        (Ok(_), Some((code, message))) => Err(Error::Child(
            *code,
            String::from_utf8_lossy(message).into_owned(),
        )),
    }
}

/// In the first child with `--daemonize`: new session, second fork (the
/// daemon cannot reacquire a terminal), stdio to /dev/null, then the pid
/// namespace if asked, and exec.
fn daemonize(
    config: &JailConfig,
    jail: &mut Jail,
    exec: &Exec,
    dev_null: &File,
    cpu: &mut CpuMeter,
) -> Result<Infallible, Error> {
    sys::setsid().map_err(|e| Error::Daemonize("setsid", e))?;
    if let Fork::Parent(_) = fork(jail, cpu).map_err(|e| Error::Daemonize("fork", e))? {
        sys::exit_now(0);
    }
    for fd in 0..3 {
        sys::dup2(dev_null.as_fd(), fd).map_err(|e| Error::Daemonize("redirect stdio", e))?;
    }
    if !config.new_pid_ns {
        jail.write_pid_file(std::process::id())
            .map_err(Error::PidFile)?;
        return Err(exec.run(cpu));
    }
    match fork_into_pid_ns(jail, cpu)? {
        Fork::Parent(_) => sys::exit_now(0),
        Fork::Child => Err(exec.run(cpu)),
    }
}

/// Forks; the child takes over the CPU meter and owns only what it creates.
fn fork(jail: &mut Jail, cpu: &mut CpuMeter) -> io::Result<Fork> {
    cpu.before_fork();
    let fork = sys::fork()?;
    if fork == Fork::Child {
        jail.forked();
        cpu.forked();
    }
    Ok(fork)
}

/// Forks into a new pid namespace, where the child is pid 1. The parent
/// writes the child's pid (as seen from here) to the pid file and only then
/// lets the child go on, so the file exists before the exec and the child
/// can remove it if the exec fails.
fn fork_into_pid_ns(jail: &mut Jail, cpu: &mut CpuMeter) -> Result<Fork, Error> {
    let pid_ns_err = |op| move |e| Error::PidNamespace(op, e);
    sys::unshare(libc::CLONE_NEWPID).map_err(pid_ns_err("unshare the pid namespace"))?;
    let (mut go_rx, mut go_tx) = io::pipe().map_err(pid_ns_err("create a pipe"))?;
    match fork(jail, cpu).map_err(pid_ns_err("fork"))? {
        Fork::Child => {
            drop(go_tx);
            let mut go = [0u8; 1];
            if !matches!(go_rx.read(&mut go), Ok(1)) {
                // The parent failed and reports it.
                sys::exit_now(1);
            }
            jail.adopt_pid_file();
            Ok(Fork::Child)
        }
        Fork::Parent(pid) => {
            drop(go_rx);
            if let Err(e) = jail.write_pid_file(pid.unsigned_abs()) {
                let _ = sys::kill(pid, libc::SIGKILL);
                let _ = sys::waitpid(pid);
                return Err(Error::PidFile(e));
            }
            go_tx
                .write_all(&[1])
                .map_err(pid_ns_err("start the child"))?;
            Ok(Fork::Parent(pid))
        }
    }
}

/// In a forked jailer process that failed: remove what it created, send the
/// error to the waiting original process, and exit with the step's code.
fn report_and_exit(jail: &mut Jail, mut report: io::PipeWriter, err: &Error) -> ! {
    jail.remove_created();
    let code = err.exit_code();
    let mut message = vec![code];
    message.extend_from_slice(err.to_string().as_bytes());
    let _ = report.write_all(&message);
    sys::exit_now(code)
}

/// The jailer's CPU time, summed over the processes it forks, for
/// `--parent-cpu-time-us`.
#[derive(Debug)]
struct CpuMeter {
    /// CPU time of the processes that came before this one.
    spent_us: u64,
    /// This process's CPU clock when its own share started counting.
    since_us: u64,
}

impl CpuMeter {
    fn new(start_cpu_us: u64) -> Self {
        CpuMeter {
            spent_us: 0,
            since_us: start_cpu_us,
        }
    }

    fn own_us(&self) -> u64 {
        sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID).saturating_sub(self.since_us)
    }

    /// Called before forking: the parent's share so far goes to the child.
    fn before_fork(&mut self) {
        self.spent_us += self.own_us();
        self.since_us = sys::clock_us(libc::CLOCK_PROCESS_CPUTIME_ID);
    }

    /// Called in the child: its CPU clock starts at zero.
    fn forked(&mut self) {
        self.since_us = 0;
    }

    fn total_us(&self) -> u64 {
        self.spent_us + self.own_us()
    }
}

/// Steps 11 and 12, prepared before any fork.
#[derive(Debug)]
struct Exec {
    path: PathBuf,
    c_path: CString,
    id: String,
    uid: u32,
    gid: u32,
    start: StartTimes,
    extra: Vec<CString>,
}

impl Exec {
    fn new(config: &JailConfig, jail: &Jail, start: StartTimes) -> Result<Self, Error> {
        let path = jail.exec_path();
        let invalid = |e| Error::Exec(path.clone(), e);
        Ok(Exec {
            c_path: sys::cstring(path.as_os_str().as_bytes()).map_err(invalid)?,
            extra: config
                .exec_args
                .iter()
                .map(|a| sys::cstring(a.as_bytes()))
                .collect::<io::Result<_>>()
                .map_err(invalid)?,
            path,
            id: config.id.clone(),
            uid: config.uid,
            gid: config.gid,
            start,
        })
    }

    /// Drops to uid:gid and execs, as Firecracker's jailer does:
    /// `<exec> --id <id> --start-time-us <µs> --start-time-cpu-us 0
    /// --parent-cpu-time-us <µs> <args after -->`. Returns only on failure.
    fn run(&self, cpu: &CpuMeter) -> Error {
        let mut argv = Vec::with_capacity(self.extra.len() + 9);
        argv.push(self.c_path.clone());
        for (flag, value) in [
            ("--id", self.id.clone()),
            ("--start-time-us", self.start.wall_us.to_string()),
            ("--start-time-cpu-us", String::from("0")),
            ("--parent-cpu-time-us", cpu.total_us().to_string()),
        ] {
            match (sys::cstring(flag), sys::cstring(value)) {
                (Ok(f), Ok(v)) => argv.extend([f, v]),
                (Err(e), _) | (_, Err(e)) => return Error::Exec(self.path.clone(), e),
            }
        }
        argv.extend(self.extra.iter().cloned());

        if let Err(e) = drop_privileges(self.uid, self.gid) {
            return e;
        }
        if let Err(e) = sys::default_sigpipe() {
            return Error::Exec(self.path.clone(), e);
        }
        Error::Exec(self.path.clone(), sys::execve(&self.c_path, &argv))
    }
}

/// No supplementary groups, then gid, then uid (real, effective and saved):
/// the capabilities of root go with the uid.
fn drop_privileges(uid: u32, gid: u32) -> Result<(), Error> {
    sys::clear_supplementary_groups().map_err(|e| Error::DropPrivileges("setgroups", e))?;
    sys::setresgid(gid).map_err(|e| Error::DropPrivileges("setresgid", e))?;
    sys::setresuid(uid).map_err(|e| Error::DropPrivileges("setresuid", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_per_step() {
        let io = || io::Error::from_raw_os_error(libc::EPERM);
        let chroot = || ChrootError::Sys {
            op: "x",
            source: io(),
        };
        let errors = [
            Error::Sanitize("x", io()),
            Error::Args(ArgsError::Missing("id")),
            Error::CopyExecFile(chroot()),
            Error::Netns(PathBuf::new(), io()),
            Error::Cgroups(CgroupError::NoV2Hierarchy),
            Error::MountNamespace(chroot()),
            Error::Devices(chroot()),
            Error::Daemonize("x", io()),
            Error::PidNamespace("x", io()),
            Error::DropPrivileges("x", io()),
            Error::Exec(PathBuf::new(), io()),
        ];
        let mut codes: Vec<u8> = errors.iter().map(Error::exit_code).collect();
        assert!(codes.iter().all(|&c| c != 0));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), errors.len());
        assert_eq!(Error::Child(7, String::from("m")).exit_code(), 7);
    }

    #[test]
    fn messages_name_the_step_and_the_os_error() {
        let e = Error::Netns(
            PathBuf::from("/run/netns/x"),
            io::Error::from_raw_os_error(libc::ENOENT),
        );
        assert_eq!(
            e.to_string(),
            "netns: join /run/netns/x: No such file or directory (os error 2)"
        );
        let e = Error::Args(ArgsError::Missing("uid"));
        assert_eq!(e.to_string(), "arguments: --uid is required");
    }

    #[test]
    fn cpu_meter_sums_processes() {
        let mut m = CpuMeter::new(0);
        m.spent_us = 100;
        m.forked();
        assert!(m.total_us() >= 100);
    }
}
