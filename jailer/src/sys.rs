//! Every raw system call the jailer makes, each behind a small safe wrapper.
//!
//! This is the only module with `unsafe` code. Each wrapper passes only
//! NUL-terminated strings and plain integers that outlive the call, and turns
//! `-1` into the `errno` it came with.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr;

/// Turns a C return value into `Ok(value)` or the `errno` of the call.
fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Same as [`check`] for the `long` that `syscall(2)` returns.
fn check_long(ret: libc::c_long) -> io::Result<()> {
    if ret == -1 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Closes every file descriptor from `first` up (`close_range(2)`, Linux 5.9+).
pub fn close_fds_from(first: u32) -> io::Result<()> {
    // SAFETY: close_range takes plain integers. It is called first thing in
    // main, before the jailer opens anything, so no Rust object owns one of the
    // descriptors it closes.
    check_long(unsafe { libc::syscall(libc::SYS_close_range, first, u32::MAX, 0u32) })
}

/// Empties the process environment (`clearenv(3)`).
pub fn clear_environment() -> io::Result<()> {
    // SAFETY: the jailer is single-threaded when this runs (first thing in
    // main), so no other thread reads or writes the environment meanwhile.
    let ret = unsafe { libc::clearenv() };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::other("clearenv failed"))
    }
}

/// Moves the calling process into the namespace `fd` refers to (`setns(2)`).
pub fn setns(fd: BorrowedFd<'_>, nstype: libc::c_int) -> io::Result<()> {
    // SAFETY: `fd` is a descriptor borrowed for the duration of the call.
    check(unsafe { libc::setns(fd.as_raw_fd(), nstype) }).map(drop)
}

/// Detaches the caller from the namespaces named in `flags` (`unshare(2)`).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare takes a flag word only.
    check(unsafe { libc::unshare(flags) }).map(drop)
}

/// `mount(2)` without filesystem-specific data.
pub fn mount(
    source: Option<&CStr>,
    target: &CStr,
    fstype: Option<&CStr>,
    flags: libc::c_ulong,
) -> io::Result<()> {
    let source = source.map_or(ptr::null(), CStr::as_ptr);
    let fstype = fstype.map_or(ptr::null(), CStr::as_ptr);
    // SAFETY: every pointer is NULL or a NUL-terminated string that outlives
    // the call; the data argument is NULL.
    check(unsafe { libc::mount(source, target.as_ptr(), fstype, flags, ptr::null()) }).map(drop)
}

/// `umount2(2)`.
pub fn umount2(target: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `target` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::umount2(target.as_ptr(), flags) }).map(drop)
}

/// `pivot_root(2)` (no libc wrapper exists).
pub fn pivot_root(new_root: &CStr, put_old: &CStr) -> io::Result<()> {
    // SAFETY: both arguments are NUL-terminated strings that outlive the call.
    check_long(unsafe { libc::syscall(libc::SYS_pivot_root, new_root.as_ptr(), put_old.as_ptr()) })
}

/// Creates a character device node (`mknod(2)`).
pub fn mknod_char(path: &CStr, mode: libc::mode_t, major: u32, minor: u32) -> io::Result<()> {
    let dev = libc::makedev(major, minor);
    // SAFETY: `path` is a NUL-terminated string that outlives the call.
    check(unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | mode, dev) }).map(drop)
}

/// `unlinkat(2)`: removes `path` (relative to the directory `dir`); pass
/// `libc::AT_REMOVEDIR` in `flags` to remove an empty directory.
pub fn unlinkat(dir: BorrowedFd<'_>, path: &CStr, flags: libc::c_int) -> io::Result<()> {
    // SAFETY: `dir` is a borrowed descriptor and `path` a NUL-terminated
    // string, both valid for the duration of the call.
    check(unsafe { libc::unlinkat(dir.as_raw_fd(), path.as_ptr(), flags) }).map(drop)
}

/// The type `setrlimit(2)` takes for its resource: glibc declares its own
/// enum (`__rlimit_resource_t`), musl a plain `int`.
#[cfg(target_env = "gnu")]
pub type Resource = libc::__rlimit_resource_t;
/// The type `setrlimit(2)` takes for its resource: glibc declares its own
/// enum (`__rlimit_resource_t`), musl a plain `int`.
#[cfg(not(target_env = "gnu"))]
pub type Resource = libc::c_int;

/// Sets both the soft and the hard limit of `resource` (`setrlimit(2)`).
pub fn setrlimit(resource: Resource, value: u64) -> io::Result<()> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit that lives across the call.
    check(unsafe { libc::setrlimit(resource, &limit) }).map(drop)
}

/// Reads the (soft, hard) limits of `resource` (`getrlimit(2)`).
#[cfg(test)]
pub fn getrlimit(resource: Resource) -> io::Result<(u64, u64)> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: `limit` is a valid, writable rlimit that lives across the call.
    check(unsafe { libc::getrlimit(resource, &mut limit) })?;
    Ok((limit.rlim_cur, limit.rlim_max))
}

/// The result of [`fork`], as seen by each side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fork {
    /// In the parent, with the child's pid.
    Parent(libc::pid_t),
    /// In the child.
    Child,
}

/// `fork(2)`.
pub fn fork() -> io::Result<Fork> {
    // SAFETY: the jailer is single-threaded, so the child is a complete copy
    // of the only thread and no lock can be held by a thread that is gone.
    match check(unsafe { libc::fork() })? {
        0 => Ok(Fork::Child),
        pid => Ok(Fork::Parent(pid)),
    }
}

/// Starts a new session with the caller as its leader (`setsid(2)`).
pub fn setsid() -> io::Result<()> {
    // SAFETY: setsid takes no arguments.
    check(unsafe { libc::setsid() }).map(drop)
}

/// Makes `new_fd` a copy of `old` (`dup2(2)`); the copy has no close-on-exec flag.
pub fn dup2(old: BorrowedFd<'_>, new_fd: libc::c_int) -> io::Result<()> {
    // SAFETY: `old` is a borrowed open descriptor. `new_fd` is one of the
    // standard descriptors 0-2, which no Rust object owns: replacing it is
    // exactly what daemonizing means.
    check(unsafe { libc::dup2(old.as_raw_fd(), new_fd) }).map(drop)
}

/// Sends `signal` to `pid` (`kill(2)`).
pub fn kill(pid: libc::pid_t, signal: libc::c_int) -> io::Result<()> {
    // SAFETY: kill takes plain integers.
    check(unsafe { libc::kill(pid, signal) }).map(drop)
}

/// Waits for the child `pid` to end (`waitpid(2)`), retrying on EINTR.
pub fn waitpid(pid: libc::pid_t) -> io::Result<libc::c_int> {
    let mut status = 0;
    loop {
        // SAFETY: `status` is a valid, writable int that lives across the call.
        match check(unsafe { libc::waitpid(pid, &mut status, 0) }) {
            Ok(_) => return Ok(status),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
}

/// Drops every supplementary group (`setgroups(2)` with an empty list).
pub fn clear_supplementary_groups() -> io::Result<()> {
    // SAFETY: a zero-length list needs no valid pointer; NULL is allowed.
    check(unsafe { libc::setgroups(0, ptr::null()) }).map(drop)
}

/// Sets the real, effective and saved group ids (`setresgid(2)`).
pub fn setresgid(gid: libc::gid_t) -> io::Result<()> {
    // SAFETY: setresgid takes plain integers.
    check(unsafe { libc::setresgid(gid, gid, gid) }).map(drop)
}

/// Sets the real, effective and saved user ids (`setresuid(2)`).
pub fn setresuid(uid: libc::uid_t) -> io::Result<()> {
    // SAFETY: setresuid takes plain integers.
    check(unsafe { libc::setresuid(uid, uid, uid) }).map(drop)
}

/// Restores the default action of SIGPIPE, which the Rust runtime sets to
/// "ignore" at start-up: an ignored signal would stay ignored across exec.
pub fn default_sigpipe() -> io::Result<()> {
    // SAFETY: installs the default disposition; no handler function is involved.
    let previous = unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if previous == libc::SIG_ERR {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Replaces the process image with `path`, argument vector `args` (including
/// `argv[0]`) and an empty environment (`execve(2)`). Returns only on failure.
pub fn execve(path: &CStr, args: &[CString]) -> io::Error {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(ptr::null());
    let envp: [*const libc::c_char; 1] = [ptr::null()];
    // SAFETY: `path` and every argv entry are NUL-terminated strings that
    // outlive the call; argv and envp are NULL-terminated arrays of them.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
}

/// Ends the process at once with `code` (`_exit(2)`), running no exit
/// handlers: used by the jailer's intermediate processes after a fork.
pub fn exit_now(code: u8) -> ! {
    // SAFETY: _exit takes a plain integer and never returns.
    unsafe { libc::_exit(libc::c_int::from(code)) }
}

/// Reads `clock` in microseconds (`clock_gettime(2)`).
pub fn clock_us(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec that lives across the call.
    let ret = unsafe { libc::clock_gettime(clock, &mut ts) };
    if ret != 0 {
        return 0;
    }
    let secs = u64::try_from(ts.tv_sec).unwrap_or(0);
    let nanos = u64::try_from(ts.tv_nsec).unwrap_or(0);
    secs.saturating_mul(1_000_000).saturating_add(nanos / 1_000)
}

/// Turns a path or argument into a C string; only an interior NUL can fail.
pub fn cstring(bytes: impl Into<Vec<u8>>) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))
}
