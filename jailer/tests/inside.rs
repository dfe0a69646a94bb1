//! What a jailed process sees (security-tests.md, jailer case 4): the
//! inspector runs in place of kiln and reports; the test also looks at it
//! from the host through /proc. Needs root.

mod common;

use std::fs;
use std::os::unix::fs::MetadataExt;

use common::{GID, INSPECTOR, INSPECTOR_NAME, Jailer, NetNs, Report, UID, namespace, require_root};

/// This test process's namespace of `kind`.
fn own(kind: &str) -> String {
    namespace(i32::try_from(std::process::id()).expect("pid"), kind)
}

/// The misc device number of userfaultfd on this host, from /proc/misc (`MINOR
/// userfaultfd`; misc devices have major 10), if the host has the device.
fn host_userfaultfd_minor() -> Option<u32> {
    let misc = fs::read_to_string("/proc/misc").expect("read /proc/misc");
    misc.lines().find_map(|l| {
        let (minor, name) = l.trim().split_once(' ')?;
        (name == "userfaultfd").then(|| minor.parse().expect("a minor number"))
    })
}

/// The jail holds the binary, its pid file and the device nodes (kvm, net/tun,
/// and userfaultfd when the host has it), and nothing else; everything but the
/// root-owned copy belongs to uid:gid.
fn assert_jail_contents(r: &Report) {
    let owner = format!("{UID}:{GID}");
    assert_eq!(r.get("root"), format!("d - 0700 {owner}"));
    let mut want = vec![
        format!("/dev d - 0700 {owner}"),
        format!("/dev/kvm c 10:232 0600 {owner}"),
        format!("/dev/net d - 0700 {owner}"),
        format!("/dev/net/tun c 10:200 0600 {owner}"),
    ];
    if let Some(minor) = host_userfaultfd_minor() {
        want.push(format!("/dev/userfaultfd c 10:{minor} 0600 {owner}"));
    }
    want.extend([
        format!("/{INSPECTOR_NAME} f - 0755 0:0"),
        format!("/{INSPECTOR_NAME}.pid f - 0644 0:0"),
        format!("/run d - 0700 {owner}"),
    ]);
    assert_eq!(r.all("entry"), want);
}

fn assert_dropped_privileges(r: &Report) {
    assert_eq!(r.get("uid"), format!("{UID},{UID},{UID}"));
    assert_eq!(r.get("gid"), format!("{GID},{GID},{GID}"));
    assert_eq!(r.get("groups"), "");
    assert_eq!(r.get("cap_eff"), "0000000000000000");
    assert_eq!(r.get("cap_prm"), "0000000000000000");
    assert_eq!(r.get("env_count"), "0");
    assert_eq!(r.get("cwd"), "/");
}

fn ns_pid_line(pid: i32) -> String {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).expect("read status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .expect("NSpid line")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[test]
fn plain_run() {
    require_root();
    let jailer = Jailer::inspector()
        .leak_fd()
        .env("KILN_SECRET", "leak")
        .exec_args(["--hold", "--config-file", "vm.json"]);
    let mut run = jailer.spawn();
    let r = run.read_report();

    // Arguments: what Firecracker's jailer passes, then the user's.
    let args = r.all("arg");
    assert_eq!(args.len(), 11, "{args:?}");
    assert_eq!(args[..2], ["--id", jailer.id.as_str()]);
    assert_eq!(args[2], "--start-time-us");
    assert!(args[3].parse::<u64>().expect("start time") > 0);
    assert_eq!(args[4..6], ["--start-time-cpu-us", "0"]);
    assert_eq!(args[6], "--parent-cpu-time-us");
    args[7].parse::<u64>().expect("parent cpu time");
    assert_eq!(args[8..], ["--hold", "--config-file", "vm.json"]);

    assert_dropped_privileges(&r);
    // The leaked fd 9 was closed; stdin is the reaper's /dev/null, stdout a
    // pipe to this test, stderr another.
    assert_eq!(r.get("fds"), "0,1,2");
    assert_eq!(r.get("fd.1"), "fifo");
    assert_eq!(r.get("rlimit_nofile"), "2048:2048");
    assert_jail_contents(&r);

    let pid = run.pid();
    assert_eq!(r.get("pid"), pid.to_string(), "the jailer exec'd in place");
    assert_ne!(namespace(pid, "mnt"), own("mnt"), "own mount namespace");
    assert_eq!(namespace(pid, "pid"), own("pid"));
    assert_eq!(namespace(pid, "net"), own("net"));
    let root = fs::read_link(format!("/proc/{pid}/root")).expect("root link");
    assert_eq!(root, std::path::Path::new("/"), "pivot_root, not chroot");

    // A copy, not a link.
    let copy = fs::metadata(jailer.jail_root().join(INSPECTOR_NAME)).expect("the copy");
    let source = fs::metadata(INSPECTOR).expect("the source");
    assert_eq!(copy.nlink(), 1);
    assert_ne!((copy.dev(), copy.ino()), (source.dev(), source.ino()));
    assert_eq!(copy.size(), source.size());

    run.kill();
    let done = run.finish();
    assert_eq!(done.code, 128 + libc::SIGKILL);
    assert_eq!(done.stderr, "");
    // The jail's bind mount lived in the jailer's namespace only.
    let mounts = fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    assert!(!mounts.contains(&jailer.base.path().display().to_string()));
}

#[test]
fn new_pid_namespace() {
    require_root();
    let jailer = Jailer::inspector()
        .arg("--new-pid-ns")
        .exec_args(["--hold"]);
    let mut run = jailer.spawn();
    let r = run.read_report();
    assert_eq!(r.get("pid"), "1");
    assert_eq!(r.get("ppid"), "0");
    assert_dropped_privileges(&r);
    assert_eq!(r.get("fds"), "0,1,2");
    assert_jail_contents(&r);

    // The pid file holds the pid as seen from the host.
    let pid = run.pid();
    assert_eq!(ns_pid_line(pid), format!("{pid} 1"));
    assert_ne!(namespace(pid, "pid"), own("pid"));
    assert_ne!(namespace(pid, "mnt"), own("mnt"));

    run.kill();
    let done = run.finish();
    assert_eq!(done.code, 0, "the jailer returned once the child exec'd");
    assert_eq!(done.stderr, "");
}

#[test]
fn daemonize() {
    require_root();
    let jailer =
        Jailer::inspector()
            .arg("--daemonize")
            .exec_args(["--report", "/run/report", "--hold"]);
    let mut run = jailer.spawn();
    let r = run.wait_report_file("run/report");
    assert_dropped_privileges(&r);
    assert_eq!(r.get("fds"), "0,1,2");
    for fd in 0..3 {
        assert_eq!(
            r.get(&format!("fd.{fd}")),
            "char 1:3",
            "fd {fd} is /dev/null"
        );
    }
    // A new session, led by the first fork; the daemon is the second.
    // SAFETY: getsid(0) asks about the calling process.
    let own_sid = unsafe { libc::getsid(0) };
    let (pid, sid) = (r.get("pid"), r.get("sid"));
    assert_ne!(sid, own_sid.to_string());
    assert_eq!(r.get("pgid"), sid);
    assert_ne!(pid, sid, "not a session leader");
    assert_eq!(run.pid().to_string(), pid);
    assert_eq!(namespace(run.pid(), "pid"), own("pid"));

    run.kill();
    let done = run.finish();
    assert_eq!(done.code, 0);
    assert_eq!(done.stdout, "", "stdout went to /dev/null");
    assert_eq!(done.stderr, "");
}

#[test]
fn daemonize_in_new_pid_namespace() {
    require_root();
    let jailer = Jailer::inspector()
        .arg("--daemonize")
        .arg("--new-pid-ns")
        .exec_args(["--report", "/run/report", "--hold"]);
    let mut run = jailer.spawn();
    let r = run.wait_report_file("run/report");
    assert_eq!(r.get("pid"), "1");
    assert_dropped_privileges(&r);
    assert_eq!(r.get("fds"), "0,1,2");
    assert_eq!(r.get("fd.2"), "char 1:3");
    let pid = run.pid();
    assert_eq!(ns_pid_line(pid), format!("{pid} 1"));

    run.kill();
    let done = run.finish();
    assert_eq!(done.code, 0);
    assert_eq!(done.stderr, "");
}

#[test]
fn network_namespace() {
    require_root();
    let netns = NetNs::new("jt").expect("a network namespace");
    netns
        .ip(&["tuntap", "add", "dev", "kjt0", "mode", "tap"])
        .expect("a TAP");
    let jailer = Jailer::inspector()
        .arg("--netns")
        .arg(netns.path())
        .exec_args(["--hold"]);
    let mut run = jailer.spawn();
    let r = run.read_report();
    let mut devices = r.all("netdev");
    devices.sort_unstable();
    assert_eq!(devices, ["kjt0", "lo"]);
    let handle = fs::metadata(netns.path()).expect("netns handle");
    assert_eq!(
        namespace(run.pid(), "net"),
        format!("net:[{}]", handle.ino())
    );
    run.kill();
    assert_eq!(run.finish().code, 128 + libc::SIGKILL);
}

#[test]
fn resource_limits() {
    require_root();
    let jailer = Jailer::inspector()
        .arg("--resource-limit")
        .arg("fsize=1048576")
        .arg("--resource-limit")
        .arg("no-file=1024");
    let mut run = jailer.spawn();
    let r = run.read_report();
    assert_eq!(r.get("rlimit_fsize"), "1048576:1048576");
    assert_eq!(r.get("rlimit_nofile"), "1024:1024");
    assert_eq!(run.finish().code, 0);
}
