//! Restores beyond the plain `File` load of tests/snapshot.rs: through a page-fault handler
//! (the `Uffd` memory backend, with testkit's handler serving the memory file over
//! Firecracker's handshake), and inside the jailer (files given relative to the jail root,
//! another TAP through `network_overrides`, another drive through `drive_overrides`).
//!
//! The guest is the test guest's `workload` with a drive and a TAP: every step it checks
//! the memory pattern the step before left, reads back the sector the step before wrote and
//! pings the host, so a restored guest that carries on to its last step had its memory,
//! disk and network intact. The handler's own count of the pages it served says that the
//! memory came from it.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::api::ApiKiln;
use common::snapshot::{
    HOST_CIDR, api_kiln, api_kiln_with, check_continuation, check_resumed, config,
    kill_after_snapshot, kill_hard, load_body, load_body_with, snapshot_at, snapshot_running_guest,
};
use common::{NetNs, Output, TempDir, kiln, require_kvm};
use testkit::uffd::{Mode, PageServer};

/// Guest memory of the workload's VM, in pages.
const GUEST_PAGES: u64 = (128 << 20) / 4096;
/// The ids a jailed kiln runs as (no such user on the host).
const UID: u32 = 40123;
const GID: u32 = 40100;

/// A network namespace with TAP `tap` (host side `HOST_CIDR`, IPv6 off so the host sends
/// no unsolicited frames), the TAP usable by `owner` when given.
fn tap_ns(tag: &str, tap: &str, owner: Option<u32>) -> NetNs {
    let ns = NetNs::new(tag).unwrap();
    ns.disable_ipv6().unwrap();
    let mut add = vec!["tuntap", "add", tap, "mode", "tap"];
    let uid = owner.map(|u| u.to_string());
    if let Some(uid) = &uid {
        add.extend(["user", uid]);
    }
    ns.ip(&add).unwrap();
    ns.ip(&["addr", "add", HOST_CIDR, "dev", tap]).unwrap();
    ns.ip(&["link", "set", tap, "up"]).unwrap();
    ns
}

/// The workload with a drive and `tap` in `ns`, snapshotted at step 3 into `dir/vm.*` and
/// killed. Returns the steps before the snapshot, the state file and the memory file.
fn snapshot_networked_guest(
    dir: &TempDir,
    ns: &NetNs,
    tap: &str,
    disk: &Path,
) -> (Vec<u64>, PathBuf, PathBuf) {
    let cfg = config(dir, disk, Some(tap));
    let k = api_kiln_with(
        ns.command(kiln()),
        &dir.path().join("src.sock"),
        &["--config-file", cfg.to_str().unwrap()],
    );
    let (state, mem) = snapshot_at(&k, 3, dir.path(), "vm");
    let before = kill_after_snapshot(k);
    assert!(before.len() >= 4, "{before:?}");
    (before, state, mem)
}

/// Every progress line of `out` pinged the host.
fn assert_pinged(out: &Output) {
    let lines: Vec<&str> = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("info workload step="))
        .collect();
    assert!(!lines.is_empty(), "{out}");
    assert!(lines.iter().all(|l| l.ends_with(" net=ok")), "{out}");
}

#[test]
fn a_uffd_restore_is_served_by_the_handler_and_the_guest_carries_on() {
    require_kvm();
    let dir = TempDir::new("snap-uffd");
    let ns = tap_ns("uffd", "tap0", None);
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (before, state, mem) = snapshot_networked_guest(&dir, &ns, "tap0", &disk);
    let mem_bytes = std::fs::read(&mem).unwrap();

    // Restore with the Uffd backend: kiln never maps the file, the handler serves it.
    let sock = dir.path().join("uffd.sock");
    let server = PageServer::start(&sock, &mem, Mode::Serve).unwrap();
    let k = api_kiln_with(ns.command(kiln()), &dir.path().join("dst.sock"), &[]);
    let body = load_body_with("Uffd", &state, &sock, "");
    let (status, text) = k.api("PUT", "/snapshot/load", Some(&body));
    assert_eq!(status, 204, "{text}");
    let (_, info) = k.api("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{info}");

    // A few steps on, the guest has touched only part of its memory: served on demand.
    let step = before.last().unwrap() + 4;
    k.wait_line(
        &format!("info workload step={step} "),
        Duration::from_secs(120),
    );
    let on_demand = server.served();
    assert!(
        on_demand > 0 && on_demand < GUEST_PAGES / 2,
        "{on_demand} pages served"
    );

    // A snapshot of the restored VM reads every page: the handler serves the rest, each
    // page exactly once.
    let (state2, mem2) = snapshot_at(&k, step + 1, dir.path(), "again");
    kill_hard(k.pid());
    let middle = k.finish(Duration::from_secs(10));
    let middle_steps = check_resumed(&before, &middle);
    assert_pinged(&middle);
    let report = server.finish().unwrap();
    assert!(report.copied > 0, "{report:?}");
    assert_eq!(report.copied + report.zeroed, GUEST_PAGES, "{report:?}");
    assert_eq!(report.unexpected, 0, "{report:?}");
    assert_eq!(report.mappings.len(), 1, "{report:?}");
    assert_eq!(
        (
            report.mappings[0].size,
            report.mappings[0].offset,
            report.mappings[0].page_size
        ),
        (128 << 20, 0, 4096)
    );
    assert_eq!(
        std::fs::read(&mem).unwrap(),
        mem_bytes,
        "the memory file was written"
    );

    // That snapshot restores from its file (the pages the handler served are in it) and
    // the guest runs to its end.
    let k = api_kiln_with(ns.command(kiln()), &dir.path().join("dst2.sock"), &[]);
    let (status, text) = k.api(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state2, &mem2, "")),
    );
    assert_eq!(status, 204, "{text}");
    let out = k.finish(Duration::from_secs(300));
    let all: Vec<u64> = before.iter().chain(&middle_steps).copied().collect();
    check_continuation(&all, &out);
    assert_pinged(&out);
}

#[test]
fn uffd_loads_without_a_willing_handler_fail_with_400_and_exit_1() {
    require_kvm();
    let dir = TempDir::new("snap-uffd-bad");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (_, state, mem) = snapshot_running_guest(&dir, &disk, &[]);
    let files = [&state, &mem, &disk].map(|p| std::fs::read(p).unwrap());
    let key = dir.file("key", &[0x5a; 32]);

    let missing = dir.path().join("nobody.sock");
    let closing = dir.path().join("closing.sock");
    let unread = dir.path().join("unread.sock");
    let listening = dir.path().join("listening.sock");
    /// What the load is given, and what its 400 must say.
    type Case<'a> = (
        &'a str,
        &'a Path,
        Option<Mode>,
        &'a [&'a str],
        &'a [&'a str],
    );
    let cases: [Case; 4] = [
        (
            "no socket",
            &missing,
            None,
            &[],
            &["mem_backend.backend_path", "cannot connect", "No such file"],
        ),
        (
            "a handler that closes at once",
            &closing,
            Some(Mode::CloseAtOnce),
            &[],
            &[
                "mem_backend.backend_path",
                "closing.sock",
                "closed the connection without taking the handshake",
            ],
        ),
        (
            "a handler that closes without reading the handshake",
            &unread,
            Some(Mode::CloseUnread),
            &[],
            &[
                "mem_backend.backend_path",
                "unread.sock",
                "closed the connection without taking the handshake",
            ],
        ),
        (
            "a kiln with a snapshot key",
            &listening,
            Some(Mode::Serve),
            &["--snapshot-key-file", key.to_str().unwrap()],
            &["mem_backend.backend_type Uffd", "--snapshot-key-file"],
        ),
    ];
    for (what, sock, mode, args, expect) in cases {
        let server = mode.map(|m| PageServer::start(sock, &mem, m).unwrap());
        let k = api_kiln(dir.path(), "bad", args);
        let body = load_body_with("Uffd", &state, sock, "");
        let (status, text) = k.api("PUT", "/snapshot/load", Some(&body));
        assert_eq!(status, 400, "{what}: {text}");
        for e in expect {
            assert!(text.contains(e), "{what}: {text}");
        }
        let out = k.finish(Duration::from_secs(10));
        assert_eq!(
            out.status, 1,
            "{what}: a failed load ends kiln with 1\n{out}"
        );
        match (server, mode) {
            (Some(server), Some(Mode::CloseAtOnce | Mode::CloseUnread)) => {
                let report = server.finish().unwrap();
                assert_eq!(report.copied + report.zeroed, 0, "{what}: {report:?}");
            }
            // Refused before kiln made a userfaultfd: it never connected.
            (Some(server), _) => assert!(server.finish().is_err(), "{what}: kiln connected"),
            (None, _) => {}
        }
    }
    // Either way the handler that closed at once was refused: its connection was never
    // used, and nothing was written.
    for (path, before) in [&state, &mem, &disk].iter().zip(&files) {
        assert_eq!(
            &std::fs::read(path).unwrap(),
            before,
            "{} was written",
            path.display()
        );
    }
}

// ---- under the jailer ----------------------------------------------------------------------

/// The jailer, built next to kiln by `cargo test --workspace`.
fn jailer_binary() -> PathBuf {
    let jailer = Path::new(kiln()).with_file_name("jailer");
    assert!(
        jailer.is_file(),
        "{} is missing: build the workspace (cargo test --workspace builds the jailer)",
        jailer.display()
    );
    jailer
}

/// A jail for kiln (`<base>/kiln/<id>/root`) in `ns`, its files put in before the jailer
/// runs: the state file, the memory file (linked), and a copy of `disk` owned by the
/// jailed user.
struct Jail {
    base: TempDir,
    id: String,
    root: PathBuf,
}

impl Jail {
    fn new(tag: &str, state: &Path, mem: &Path, disk: &Path) -> Jail {
        let base = TempDir::new(tag);
        let id = testkit::unique(tag);
        let root = base.path().join("kiln").join(&id).join("root");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::copy(state, root.join("vm.state")).unwrap();
        std::fs::hard_link(mem, root.join("vm.mem")).unwrap();
        std::fs::copy(disk, root.join("clone.img")).unwrap();
        chown(root.join("clone.img"), Some(UID), Some(GID)).unwrap();
        Jail { base, id, root }
    }

    /// Starts kiln in the jail (in `ns`), serving its API at `/run/kiln.sock`.
    fn kiln(&self, ns: &NetNs) -> ApiKiln {
        let mut cmd = Command::new(jailer_binary());
        cmd.args(["--id", &self.id, "--exec-file", kiln()])
            .args(["--uid", &UID.to_string(), "--gid", &GID.to_string()])
            .arg("--chroot-base-dir")
            .arg(self.base.path())
            .arg("--netns")
            .arg(ns.path())
            .args(["--", "--api-sock", "/run/kiln.sock"]);
        ApiKiln::spawn(cmd, &self.root.join("run/kiln.sock"))
    }
}

#[test]
fn snapshots_restore_under_the_jailer_from_a_file_and_through_a_handler() {
    require_kvm();
    let dir = TempDir::new("snap-jail");
    let ns = tap_ns("snapsrc", "tap0", None);
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (before, state, mem) = snapshot_networked_guest(&dir, &ns, "tap0", &disk);
    drop(ns);
    let disk_at_snapshot = std::fs::read(&disk).unwrap();
    // The handler needs the jail's /dev/userfaultfd, which the jailer makes when the host
    // has the device.
    assert!(
        Path::new("/dev/userfaultfd").exists(),
        "this host has no /dev/userfaultfd (Linux 6.1+): a jailed kiln cannot restore through a page-fault handler"
    );

    // Two jails side by side, each with its own namespace and TAP (not the snapshot's) and
    // its own copy of the drive; the paths in the load are the jail's.
    let overrides = r#", "network_overrides": [{"iface_id": "eth0", "host_dev_name": "kjsnap1"}],
        "drive_overrides": [{"drive_id": "scratch", "path_on_host": "/clone.img"}]"#;
    let mut runs = Vec::new();
    for backend in ["File", "Uffd"] {
        let ns = tap_ns("snapjail", "kjsnap1", Some(UID));
        let jail = Jail::new(&format!("snapjail-{backend}"), &state, &mem, &disk);
        let server = (backend == "Uffd").then(|| {
            let sock = jail.root.join("uffd.sock");
            let server = PageServer::start(&sock, &mem, Mode::Serve).unwrap();
            chown(&sock, Some(UID), Some(GID)).unwrap();
            server
        });
        let path = match backend {
            "File" => "/vm.mem",
            _ => "/uffd.sock",
        };
        let k = jail.kiln(&ns);
        let body = load_body_with(backend, Path::new("/vm.state"), Path::new(path), overrides);
        let (status, text) = k.api("PUT", "/snapshot/load", Some(&body));
        assert_eq!(status, 204, "{backend}: {text}");
        let (_, cfg) = k.api("GET", "/vm/config", None);
        assert!(
            cfg.contains("/clone.img") && cfg.contains("kjsnap1"),
            "{backend}: {cfg}"
        );
        runs.push((backend, jail, ns, server, k));
    }
    for (backend, jail, ns, server, k) in runs {
        let out = k.finish(Duration::from_secs(300));
        check_continuation(&before, &out);
        assert_pinged(&out);
        if let Some(server) = server {
            let report = server.finish().unwrap();
            assert!(report.copied > 0, "{backend}: {report:?}");
        }
        // The guest's later steps went to the jail's copy of the drive, not the original.
        let clone = std::fs::read(jail.root.join("clone.img")).unwrap();
        assert_ne!(
            clone, disk_at_snapshot,
            "{backend}: the clone was not written"
        );
        drop(ns);
    }
    assert_eq!(
        std::fs::read(&disk).unwrap(),
        disk_at_snapshot,
        "the snapshot's drive was written after the snapshot"
    );
}
