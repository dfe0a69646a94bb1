//! Snapshot tests' shared steps: the test guest's `workload` scenario (a memory pattern
//! checked and rewritten every step, a sector written and the previous one read back, and
//! optionally a ping of the host through a TAP) booted under kiln's API, paused mid-run,
//! snapshotted and killed; a load body; and the check that a restored guest carried on
//! from where it was. The guest is the oracle: it fails a step if anything it left before
//! the snapshot changed.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use super::api::ApiKiln;
use super::{Output, TempDir, kiln};

/// Steps of the workload: enough for a snapshot mid-run and some after the restore.
pub const STEPS: u64 = 20;
/// The guest's MAC address when it has a network interface.
pub const GUEST_MAC: &str = "aa:fc:00:00:00:09";
/// The host side of the guest's TAP (the guest pings it: `kiln.net=` defaults).
pub const HOST_CIDR: &str = "10.0.0.1/24";

/// kiln serving its API at `dir/<name>.sock`, started by `cmd` (kiln itself, or a command
/// that execs it in place: `ip netns exec`, the jailer), with `extra` arguments.
pub fn api_kiln_with(mut cmd: Command, sock: &Path, extra: &[&str]) -> ApiKiln {
    cmd.args(["--api-sock", sock.to_str().unwrap()]).args(extra);
    ApiKiln::spawn(cmd, sock)
}

/// kiln serving its API at `dir/<name>.sock`.
pub fn api_kiln(dir: &Path, name: &str, extra: &[&str]) -> ApiKiln {
    api_kiln_with(
        Command::new(kiln()),
        &dir.join(format!("{name}.sock")),
        extra,
    )
}

/// A configuration running the workload with the scratch drive `disk` and, with `tap`, a
/// network interface on that TAP (the guest then pings the host every step).
pub fn config(dir: &TempDir, disk: &Path, tap: Option<&str>) -> PathBuf {
    config_with(dir, disk, tap, false)
}

/// [`config`], with `track_dirty_pages` as given.
pub fn config_with(
    dir: &TempDir,
    disk: &Path,
    tap: Option<&str>,
    track_dirty_pages: bool,
) -> PathBuf {
    let (net, ifaces) = match tap {
        Some(tap) => (
            ":net",
            format!(
                r#", "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}", "guest_mac": "{GUEST_MAC}"}}]"#
            ),
        ),
        None => ("", String::new()),
    };
    let text = format!(
        r#"{{"boot-source": {{"kernel_image_path": "builtin:test-guest",
              "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=workload:{STEPS}:blk{net}"}},
            "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128, "track_dirty_pages": {track_dirty_pages}}},
            "drives": [{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false}}]{ifaces}}}"#,
        disk.display()
    );
    dir.file("vm.json", text.as_bytes())
}

/// Step numbers of the complete `info workload step=N mem=ok blk=ok[ net=ok]` lines.
pub fn steps(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("info workload step="))
        .filter(|l| l.ends_with(" mem=ok blk=ok") || l.ends_with(" mem=ok blk=ok net=ok"))
        .filter_map(|l| l.split(' ').next()?.parse().ok())
        .collect()
}

/// Waits for the workload's step `step`, pauses the VM and snapshots it into
/// `dir/<tag>.state` and `dir/<tag>.mem`.
pub fn snapshot_at(k: &ApiKiln, step: u64, dir: &Path, tag: &str) -> (PathBuf, PathBuf) {
    k.wait_line(
        &format!("info workload step={step} "),
        Duration::from_secs(120),
    );
    assert_eq!(k.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let state = dir.join(format!("{tag}.state"));
    let mem = dir.join(format!("{tag}.mem"));
    let (status, text) = create_snapshot(k, &state, &mem, "Full");
    assert_eq!(status, 204, "{text}");
    (state, mem)
}

/// `PUT /snapshot/create` of `kind` (`Full` or `Diff`) into `state` and `mem`: the status
/// and the answer.
pub fn create_snapshot(k: &ApiKiln, state: &Path, mem: &Path, kind: &str) -> (u16, String) {
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "{kind}"}}"#,
        state.display(),
        mem.display()
    );
    k.api("PUT", "/snapshot/create", Some(&body))
}

/// Kills `k` hard (the snapshot files are complete on disk before the answer) and returns
/// the steps it printed.
pub fn kill_after_snapshot(k: ApiKiln) -> Vec<u64> {
    kill_hard(k.pid());
    let out = k.finish(Duration::from_secs(10));
    steps(&out.stdout)
}

/// Boots the workload, pauses it after a few steps, snapshots it and kills it (checking on
/// the way that a Diff without dirty-page tracking is refused). Returns the steps printed
/// before the snapshot.
pub fn snapshot_running_guest(
    dir: &TempDir,
    disk: &Path,
    extra: &[&str],
) -> (Vec<u64>, PathBuf, PathBuf) {
    let cfg = config(dir, disk, None);
    let mut args = vec!["--config-file", cfg.to_str().unwrap()];
    args.extend_from_slice(extra);
    let k = api_kiln(dir.path(), "src", &args);
    k.wait_line("info workload step=3 ", Duration::from_secs(60));
    assert_eq!(k.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0, 204);
    let state = dir.path().join("vm.state");
    let mem = dir.path().join("vm.mem");
    // Without dirty-page tracking a Diff is refused (Firecracker's words), and writes nothing.
    let (status, text) = create_snapshot(&k, &state, &mem, "Diff");
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("dirty page tracking disabled"), "{text}");
    assert!(!state.exists() && !mem.exists());
    let (status, text) = create_snapshot(&k, &state, &mem, "Full");
    assert_eq!(status, 204, "{text}");
    (kill_after_snapshot(k), state, mem)
}

pub fn kill_hard(pid: u32) {
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
}

/// A `PUT /snapshot/load` body with the `File` backend.
pub fn load_body(state: &Path, mem: &Path, extra: &str) -> String {
    load_body_with("File", state, mem, extra)
}

/// A `PUT /snapshot/load` body with `backend` (`File` or `Uffd`) at `path`, resuming.
pub fn load_body_with(backend: &str, state: &Path, path: &Path, extra: &str) -> String {
    format!(
        r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "{backend}", "backend_path": "{}"}}, "resume_vm": true{extra}}}"#,
        state.display(),
        path.display()
    )
}

/// The steps of a run restored after `before` (a line cut by the snapshot may be lost):
/// each step once, starting right after the last step before the snapshot, no damage
/// found by the guest.
pub fn check_resumed(before: &[u64], after_out: &Output) -> Vec<u64> {
    assert!(
        !after_out.stdout.contains("fail "),
        "the restored guest found damage:\n{after_out}"
    );
    let after = steps(&after_out.stdout);
    let last_before = *before.last().unwrap();
    let first_after = *after.first().unwrap_or_else(|| panic!("{after_out}"));
    assert!(
        first_after == last_before + 1 || first_after == last_before + 2,
        "before the snapshot: {before:?}; after the restore: {after:?}"
    );
    let all: BTreeSet<u64> = before.iter().chain(&after).copied().collect();
    assert_eq!(
        all.len(),
        before.len() + after.len(),
        "a step ran twice: {before:?} / {after:?}"
    );
    after
}

/// [`check_resumed`], and the guest finished cleanly.
pub fn check_continuation(before: &[u64], after_out: &Output) {
    assert_eq!(after_out.status, 0, "{after_out}");
    assert!(
        after_out
            .stdout
            .contains(&format!("ok workload steps={STEPS}")),
        "{after_out}"
    );
    let after = check_resumed(before, after_out);
    let all: BTreeSet<u64> = before.iter().chain(&after).copied().collect();
    assert!(all.len() as u64 >= STEPS - 1, "{before:?} / {after:?}");
}
