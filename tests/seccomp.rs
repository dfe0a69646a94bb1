//! Seccomp end to end: every thread of a running kiln is filtered, the audit flag lists
//! the allowlists, and the filter options refuse bad input.
#![allow(clippy::unwrap_used)]

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{
    NetNs, TempDir, guest, kiln, require_kvm, run_kiln, seccomp_modes, sigterm, wait_with_deadline,
};

/// Boots an idle guest with 2 vCPUs, a drive and a TAP (in a network namespace of its own),
/// serving the API or with `--no-api`; returns its thread modes once every vCPU thread runs,
/// then stops it with SIGTERM.
fn thread_modes(tap: &str, api: bool, extra: &[&str]) -> (Vec<(String, String)>, common::Output) {
    require_kvm();
    let dir = TempDir::new("seccomp");
    let disk = dir.file("disk.img", &vec![0u8; 1 << 20]);
    let ns = NetNs::new("seccomp").unwrap();
    ns.ip(&["tuntap", "add", tap, "mode", "tap"]).unwrap();
    let json = format!(
        r#"{{"boot-source": {{"kernel_image_path": "{}", "boot_args": "kiln.run=idle"}},
            "machine-config": {{"vcpu_count": 2, "mem_size_mib": 64}},
            "drives": [{{"drive_id": "d0", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}],
            "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{}"}}]}}"#,
        guest("kiln-guest.elf").display(),
        disk.display(),
        tap
    );
    let cfg = dir.file("vm.json", json.as_bytes());
    let sock = dir.path().join("api.sock");
    let mut args = vec!["--config-file", cfg.to_str().unwrap()];
    if api {
        args.extend_from_slice(&["--api-sock", sock.to_str().unwrap()]);
    } else {
        args.push("--no-api");
    }
    args.extend_from_slice(extra);
    let child = ns
        .command(kiln())
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        let vcpus = seccomp_modes(pid)
            .iter()
            .filter(|(n, _)| n.starts_with("kiln_vcpu"))
            .count();
        if vcpus == 2 {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // The main thread installs its filter right after starting the vCPUs.
    std::thread::sleep(Duration::from_millis(200));
    let modes = seccomp_modes(pid);
    sigterm(pid);
    let out = wait_with_deadline(child, Duration::from_secs(20));
    drop(ns);
    (modes, out)
}

#[test]
fn every_thread_runs_under_its_filter() {
    let (modes, out) = thread_modes("kilnsc0", true, &[]);
    // The main thread, two vCPU threads (and KVM's own worker tasks, which inherit).
    let kiln_threads = modes
        .iter()
        .filter(|(n, _)| n == "kiln" || n.starts_with("kiln_vcpu"))
        .count();
    assert_eq!(kiln_threads, 3, "{modes:?}");
    // The API thread, and the migration thread waiting for PUT /migration/send under its
    // own filter.
    for thread in ["kiln_api", "kiln_migration"] {
        assert!(
            modes.iter().any(|(n, _)| n == thread),
            "{thread}: {modes:?}"
        );
    }
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    assert_eq!(
        out.status,
        128 + 15,
        "SIGTERM stops in order under the filters:\n{out}"
    );
    assert!(!out.stderr.contains("seccomp"), "{out}");
}

/// Without an API nothing can ask for a migration: no migration thread, every thread there
/// is filtered.
#[test]
fn no_api_no_migration_thread() {
    let (modes, out) = thread_modes("kilnsc2", false, &[]);
    assert!(modes.iter().any(|(n, _)| n == "kiln_vcpu1"), "{modes:?}");
    assert!(
        !modes
            .iter()
            .any(|(n, _)| n == "kiln_migration" || n == "kiln_api"),
        "{modes:?}"
    );
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    assert_eq!(out.status, 128 + 15, "{out}");
}

#[test]
fn no_seccomp_warns_and_filters_nothing() {
    let (modes, out) = thread_modes("kilnsc1", false, &["--no-seccomp"]);
    assert!(modes.iter().all(|(_, m)| m == "0"), "{modes:?}");
    assert!(
        out.stderr.contains("running without seccomp filters"),
        "{out}"
    );
}

#[test]
fn print_seccomp_lists_every_category() {
    let out = run_kiln(&["--print-seccomp"]);
    assert_eq!(out.status, 0);
    assert!(out.stdout.contains("[vmm] "), "{}", out.stdout);
    assert!(out.stdout.contains("[vcpu] "), "{}", out.stdout);
    assert!(out.stdout.contains("[migration] "), "{}", out.stdout);
    assert!(out.stdout.contains("ioctl  arg1 == 44672 (KVM_RUN)"));
}

#[test]
fn bad_custom_filters_refuse_to_start() {
    let dir = TempDir::new("seccomp-bad");
    for (name, body) in [
        ("truncated.json", r#"{"vmm": {"default_action": "#),
        ("garbage.json", "not json at all"),
        (
            "no-vcpu.json",
            r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#,
        ),
    ] {
        let p = dir.file(name, body.as_bytes());
        let out = run_kiln(&["--no-api", "--seccomp-filter", p.to_str().unwrap()]);
        assert_eq!(out.status, 2, "{name}:\n{out}");
        assert!(
            out.stderr.starts_with("kiln: error: --seccomp-filter "),
            "{out}"
        );
        assert!(out.stdout.is_empty(), "{name}: nothing may boot:\n{out}");
    }
}

#[test]
fn the_builtin_filters_as_a_custom_file_boot() {
    require_kvm();
    let json = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("seccomp-filters/x86_64.json");
    let out = run_kiln(&[
        "--no-api",
        "--seccomp-filter",
        json.to_str().unwrap(),
        "--cmdline",
        "kiln.run=hello",
    ]);
    assert_eq!(out.status, 0, "{out}");
}
