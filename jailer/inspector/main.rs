//! Test support for the jailer, not shipped: a small static program the tests
//! jail instead of kiln. It prints what it sees as `key=value` lines.
//!
//! `jailer-inspector [--id ID ...] [--report FILE] [--hold] [--stamp FILE]`
//! - default: print the report on stdout, ending with `end=1`;
//! - `--report FILE`: write it to FILE as well (atomically, via FILE.tmp);
//! - `--hold`: then wait until killed (the test looks at /proc meanwhile);
//! - `--stamp FILE`: only write CLOCK_MONOTONIC (µs) at entry to FILE and exit
//!   (the start-up benchmark).
//!
//! `jailer-inspector --reap PROGRAM [ARGS...]`: run PROGRAM as a child
//! subreaper, so the processes the jailer orphans (daemonized, in a new pid
//! namespace) are reaped here instead of by the host's init. Exits once every
//! descendant is gone, with PROGRAM's exit code (128 + signal if killed).

use std::ffi::{CStr, OsString};
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

fn main() -> ExitCode {
    let entry_us = monotonic_us();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "--reap") {
        return reap(&args[2..]);
    }
    let mut report_file = None;
    let mut hold = false;
    let mut rest = args.iter().skip(1);
    while let Some(arg) = rest.next() {
        if arg == "--stamp" {
            let Some(path) = rest.next() else {
                return ExitCode::FAILURE;
            };
            return match fs::write(path, entry_us.to_string()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(_) => ExitCode::FAILURE,
            };
        } else if arg == "--report" {
            report_file = rest.next().map(PathBuf::from);
        } else if arg == "--hold" {
            hold = true;
        }
    }

    let report = report(&args);
    let mut stdout = io::stdout();
    let _ = stdout.write_all(report.as_bytes());
    let _ = stdout.flush();
    if let Some(path) = report_file {
        let tmp = path.with_extension("tmp");
        if fs::write(&tmp, &report)
            .and_then(|()| fs::rename(&tmp, &path))
            .is_err()
        {
            return ExitCode::FAILURE;
        }
    }
    if hold {
        loop {
            // SAFETY: pause takes no arguments; it returns when a handled signal arrives.
            unsafe { libc::pause() };
        }
    }
    ExitCode::SUCCESS
}

fn report(args: &[OsString]) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        out.push_str(key);
        out.push('=');
        out.push_str(&value);
        out.push('\n');
    };
    for arg in &args[1..] {
        line("arg", arg.to_string_lossy().into_owned());
    }
    line("pid", std::process::id().to_string());
    // SAFETY: getppid takes no arguments.
    line("ppid", unsafe { libc::getppid() }.to_string());
    // SAFETY: getsid(0) asks about the calling process.
    line("sid", unsafe { libc::getsid(0) }.to_string());
    // SAFETY: getpgrp takes no arguments.
    line("pgid", unsafe { libc::getpgrp() }.to_string());
    let (r, e, s) = ids(libc::getresuid);
    line("uid", format!("{r},{e},{s}"));
    let (r, e, s) = ids(libc::getresgid);
    line("gid", format!("{r},{e},{s}"));
    line("groups", join(&groups()));
    let (effective, permitted) = capabilities();
    line("cap_eff", format!("{effective:016x}"));
    line("cap_prm", format!("{permitted:016x}"));
    let fds = open_fds();
    line("fds", join(&fds));
    for fd in fds {
        line(&format!("fd.{fd}"), fd_kind(fd));
    }
    let env: Vec<(OsString, OsString)> = std::env::vars_os().collect();
    line("env_count", env.len().to_string());
    for (k, v) in env {
        line(
            "env",
            format!("{}={}", k.to_string_lossy(), v.to_string_lossy()),
        );
    }
    line(
        "cwd",
        std::env::current_dir().map_or_else(|e| e.to_string(), |p| p.display().to_string()),
    );
    line("rlimit_nofile", rlimit(libc::RLIMIT_NOFILE));
    line("rlimit_fsize", rlimit(libc::RLIMIT_FSIZE));
    for name in net_devices() {
        line("netdev", name);
    }
    match fs::symlink_metadata("/") {
        Ok(m) => line("root", describe(&m)),
        Err(e) => line("root", e.to_string()),
    }
    let mut entries = Vec::new();
    walk(Path::new("/"), &mut entries);
    entries.sort();
    for entry in entries {
        line("entry", entry);
    }
    line("end", String::from("1"));
    out
}

fn join(values: &[impl ToString]) -> String {
    values
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

type GetIds = unsafe extern "C" fn(*mut u32, *mut u32, *mut u32) -> libc::c_int;

fn ids(get: GetIds) -> (u32, u32, u32) {
    let (mut r, mut e, mut s) = (u32::MAX, u32::MAX, u32::MAX);
    // SAFETY: getresuid/getresgid write one id to each of three valid pointers.
    unsafe { get(&mut r, &mut e, &mut s) };
    (r, e, s)
}

fn groups() -> Vec<u32> {
    let mut list = [0u32; 64];
    // SAFETY: `list` has room for 64 entries, the size passed.
    let n = unsafe { libc::getgroups(64, list.as_mut_ptr()) };
    list[..usize::try_from(n).unwrap_or(0)].to_vec()
}

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Default, Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// (effective, permitted) capability sets of this process.
fn capabilities() -> (u64, u64) {
    const VERSION_3: u32 = 0x2008_0522;
    let mut header = CapHeader {
        version: VERSION_3,
        pid: 0,
    };
    let mut data = [CapData::default(); 2];
    // SAFETY: version 3 of capget writes two CapData entries into `data`.
    let ret = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) };
    if ret != 0 {
        return (u64::MAX, u64::MAX);
    }
    let join = |lo: u32, hi: u32| (u64::from(hi) << 32) | u64::from(lo);
    (
        join(data[0].effective, data[1].effective),
        join(data[0].permitted, data[1].permitted),
    )
}

/// Open descriptors, found without /proc (there is none in the jail).
fn open_fds() -> Vec<i32> {
    (0..4096)
        // SAFETY: F_GETFD only reads the flags of a descriptor number.
        .filter(|&fd| unsafe { libc::fcntl(fd, libc::F_GETFD) } != -1)
        .collect()
}

fn fd_kind(fd: i32) -> String {
    // SAFETY: an all-zero stat is a valid value for fstat to overwrite.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `st` is a valid, writable stat buffer.
    if unsafe { libc::fstat(fd, &mut st) } != 0 {
        return String::from("?");
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFCHR => format!(
            "char {}:{}",
            libc::major(st.st_rdev),
            libc::minor(st.st_rdev)
        ),
        libc::S_IFIFO => String::from("fifo"),
        libc::S_IFREG => String::from("file"),
        libc::S_IFSOCK => String::from("socket"),
        libc::S_IFDIR => String::from("dir"),
        _ => String::from("other"),
    }
}

fn rlimit(resource: jailer::RlimitResource) -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit.
    unsafe { libc::getrlimit(resource, &mut limit) };
    let show = |v: u64| match v {
        libc::RLIM_INFINITY => String::from("unlimited"),
        v => v.to_string(),
    };
    format!("{}:{}", show(limit.rlim_cur), show(limit.rlim_max))
}

/// Network interfaces of this network namespace.
fn net_devices() -> Vec<String> {
    // SAFETY: if_nameindex takes no arguments; the result is freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut names = Vec::new();
    let mut i = 0;
    loop {
        // SAFETY: the array ends with an entry whose index is 0 and `i` stops
        // there, so `list + i` stays inside the array.
        let entry = unsafe { list.add(i) };
        // SAFETY: `entry` points at an initialized element of the array.
        let entry = unsafe { &*entry };
        if entry.if_index == 0 {
            break;
        }
        // SAFETY: if_name of an entry before the end is a NUL-terminated string.
        let name = unsafe { CStr::from_ptr(entry.if_name) };
        names.push(name.to_string_lossy().into_owned());
        i += 1;
    }
    // SAFETY: `list` came from if_nameindex and is freed once.
    unsafe { libc::if_freenameindex(list) };
    names
}

/// `<kind> <rdev> <mode> <uid>:<gid>`: kind is d, f, c, l or o.
fn describe(m: &fs::Metadata) -> String {
    let ft = m.file_type();
    let (kind, rdev) = if ft.is_dir() {
        ("d", String::from("-"))
    } else if ft.is_char_device() {
        let (major, minor) = (libc::major(m.rdev()), libc::minor(m.rdev()));
        ("c", format!("{major}:{minor}"))
    } else if ft.is_symlink() {
        ("l", String::from("-"))
    } else if ft.is_file() {
        ("f", String::from("-"))
    } else {
        ("o", String::from("-"))
    };
    format!(
        "{kind} {rdev} {:04o} {}:{}",
        m.mode() & 0o7777,
        m.uid(),
        m.gid()
    )
}

/// Every entry under `dir`, as `<path> <describe>` (at most 1000).
fn walk(dir: &Path, out: &mut Vec<String>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if out.len() >= 1000 {
            return;
        }
        let path = entry.path();
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        out.push(format!("{} {}", path.display(), describe(&meta)));
        if meta.is_dir() {
            walk(&path, out);
        }
    }
}

fn monotonic_us() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000
        + u64::try_from(ts.tv_nsec).unwrap_or(0) / 1000
}

/// `--reap`: see the module documentation.
fn reap(command: &[OsString]) -> ExitCode {
    let Some((program, args)) = command.split_first() else {
        eprintln!("jailer-inspector: --reap needs a program");
        return ExitCode::from(125);
    };
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        eprintln!("jailer-inspector: prctl: {}", io::Error::last_os_error());
        return ExitCode::from(125);
    }
    let mut child = match Command::new(program).args(args).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("jailer-inspector: spawn {}: {e}", program.to_string_lossy());
            return ExitCode::from(125);
        }
    };
    let code = match child.wait() {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            match (status.code(), status.signal()) {
                (Some(code), _) => u8::try_from(code).unwrap_or(125),
                (None, Some(signal)) => u8::try_from(128 + signal).unwrap_or(125),
                (None, None) => 125,
            }
        }
        Err(_) => 125,
    };
    // Reap the orphans until none is left.
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == -1 && io::Error::last_os_error().raw_os_error() != Some(libc::EINTR) {
            break;
        }
    }
    ExitCode::from(code)
}
