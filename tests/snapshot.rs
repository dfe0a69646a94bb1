//! Snapshots end to end: the test guest's `workload` scenario (a memory pattern checked and
//! rewritten every step, a sector written and the previous one read back through the
//! block queue) is paused mid-run, snapshotted, killed, and restored in a new process,
//! where it must carry on from the next step with memory, disk and queue intact. The guest
//! itself is the oracle: it fails a step if anything it left before the snapshot changed.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::Duration;

use common::api::ApiKiln;
use common::snapshot::{
    STEPS, api_kiln, check_continuation, config, config_with, create_snapshot, kill_hard,
    load_body, snapshot_running_guest, steps,
};
use common::{TempDir, require_kvm};

#[test]
fn a_full_snapshot_restores_in_a_new_process_and_the_guest_carries_on() {
    require_kvm();
    let dir = TempDir::new("snap");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (before, state, mem) = snapshot_running_guest(&dir, &disk, &[]);
    assert!(before.len() >= 4, "{before:?}");

    // The memory file has the guest's size and holds only what the guest touched.
    let meta = std::fs::metadata(&mem).unwrap();
    assert_eq!(meta.len(), 128 << 20);
    assert!(
        meta.blocks() * 512 < 32 << 20,
        "{} bytes allocated: untouched memory was written",
        meta.blocks() * 512
    );

    let k = api_kiln(dir.path(), "dst", &[]);
    let (status, text) = k.api("PUT", "/snapshot/load", Some(&load_body(&state, &mem, "")));
    assert_eq!(status, 204, "{text}");
    let (_, info) = k.api("GET", "/", None);
    assert!(info.contains(r#""state":"Running""#), "{info}");
    let (_, cfg) = k.api("GET", "/vm/config", None);
    assert!(cfg.contains("disk.img"), "{cfg}");
    let out = k.finish(Duration::from_secs(300));
    check_continuation(&before, &out);
}

fn create(k: &ApiKiln, state: &Path, mem: &Path, kind: &str) {
    let (status, text) = create_snapshot(k, state, mem, kind);
    assert_eq!(status, 204, "{kind}: {text}");
}

/// Bytes of `path` the file system holds (its data, not its holes).
fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_diff_after_more_work_merges_onto_the_full_and_restores_where_the_guest_was() {
    require_kvm();
    let dir = TempDir::new("snap-diff");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let key = dir.file("key", &[0x33; 32]);
    let cfg = config_with(&dir, &disk, None, true);
    let keyed = ["--snapshot-key-file", key.to_str().unwrap()];
    let mut args = vec!["--config-file", cfg.to_str().unwrap()];
    args.extend_from_slice(&keyed);
    let k = api_kiln(dir.path(), "src", &args);
    k.wait_line("info workload step=3 ", Duration::from_secs(60));
    let paused = r#"{"state": "Paused"}"#;
    let resumed = r#"{"state": "Resumed"}"#;
    assert_eq!(k.api("PATCH", "/vm", Some(paused)).0, 204);
    let mem = dir.path().join("vm.mem");
    create(&k, &dir.path().join("full.state"), &mem, "Full");
    let full_bytes = std::fs::read(&mem).unwrap();
    // A Diff right away: nothing was dirtied while paused, so the layer is all holes.
    let empty = dir.path().join("empty.layer");
    create(&k, &dir.path().join("empty.state"), &empty, "Diff");
    assert_eq!(std::fs::metadata(&empty).unwrap().len(), 128 << 20);
    assert_eq!(allocated(&empty), 0, "a Diff of a paused VM wrote pages");

    // More work, then a Diff merged onto the Full's memory file.
    assert_eq!(k.api("PATCH", "/vm", Some(resumed)).0, 204);
    k.wait_line("info workload step=7 ", Duration::from_secs(120));
    assert_eq!(k.api("PATCH", "/vm", Some(paused)).0, 204);
    let diff_state = dir.path().join("diff.state");
    create(&k, &diff_state, &mem, "Diff");
    kill_hard(k.pid());
    let out = k.finish(Duration::from_secs(10));
    let before = steps(&out.stdout);
    assert!(before.contains(&7), "{before:?}");

    // The merge changed some pages of the Full's memory file, far fewer than the guest has
    // (the oracle is the two files' bytes; the restore below checks the pages are right).
    let merged = std::fs::read(&mem).unwrap();
    assert_eq!(merged.len(), full_bytes.len());
    let changed = merged
        .chunks(4096)
        .zip(full_bytes.chunks(4096))
        .filter(|(a, b)| a != b)
        .count();
    assert!(changed > 0 && changed < 4096, "{changed} pages changed");
    drop((merged, full_bytes));

    // The merged snapshot restores (its keyed memory digest, kept chunk by chunk across the
    // Diff, verified against the file) and the guest carries on after step 7 with memory and
    // disk intact; tracking dirty pages again, a Diff of the restored VM is a layer of only
    // what it dirtied since.
    let k = api_kiln(dir.path(), "dst", &keyed);
    let (status, text) = k.api(
        "PUT",
        "/snapshot/load",
        Some(&load_body(
            &diff_state,
            &mem,
            r#", "track_dirty_pages": true"#,
        )),
    );
    assert_eq!(status, 204, "{text}");
    let next = before.last().unwrap() + 2;
    k.wait_line(
        &format!("info workload step={next} "),
        Duration::from_secs(120),
    );
    assert_eq!(k.api("PATCH", "/vm", Some(paused)).0, 204);
    let layer = dir.path().join("after.layer");
    create(&k, &dir.path().join("after.state"), &layer, "Diff");
    let dirty = allocated(&layer);
    assert_eq!(std::fs::metadata(&layer).unwrap().len(), 128 << 20);
    assert!(dirty > 0 && dirty < 16 << 20, "{dirty} bytes in the layer");
    assert_eq!(k.api("PATCH", "/vm", Some(resumed)).0, 204);
    check_continuation(&before, &k.finish(Duration::from_secs(300)));
}

/// KiB of the memory file mapped in process `pid` and resident (smaps' Rss of its mappings).
fn mapped_kib(pid: u32, mem: &Path) -> u64 {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    testkit::procfs::parse_smaps(&smaps)
        .iter()
        .filter(|m| m.name == mem.to_str().unwrap())
        .map(|m| m.rss)
        .sum()
}

#[test]
fn a_recorded_working_set_is_faulted_in_before_the_next_restore_runs() {
    require_kvm();
    let dir = TempDir::new("snap-ws");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (before, state, mem) = snapshot_running_guest(&dir, &disk, &[]);
    let ws = dir.path().join("vm.ws");
    let ws_param = format!(
        r#", "working_set": {{"path": "{}", "record_after_ms": 300}}"#,
        ws.display()
    );

    // First restore: no file yet, so kiln records one 300 ms after the guest runs (under
    // its seccomp filter: it must still be running afterwards).
    let k = api_kiln(dir.path(), "record", &[]);
    let (status, text) = k.api(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &mem, &ws_param)),
    );
    assert_eq!(status, 204, "{text}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !ws.exists() {
        assert!(
            std::time::Instant::now() < deadline,
            "no working set recorded"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let resident_kib = mapped_kib(k.pid(), &mem);
    let (status, _) = k.api("GET", "/", None);
    assert_eq!(status, 200, "kiln did not survive recording");
    kill_hard(k.pid());
    drop(k);
    let pages = 128 << 20 >> 12;
    let set = kiln::snapshot::working_set::WorkingSet::read(&ws, pages).unwrap();
    // The kernel's own count of the mapping's resident pages, read after the recording,
    // bounds it (the guest may have touched more since).
    assert!(
        set.pages() > 0 && set.pages() * 4 <= resident_kib,
        "{} pages recorded, {resident_kib} KiB resident",
        set.pages()
    );

    // Restores left paused: without the working set hardly anything of the memory file is
    // resident; with it, at least the recorded pages are, before a vCPU ran.
    let paused = |tag: &str, extra: &str| {
        let k = api_kiln(dir.path(), tag, &[]);
        let body =
            load_body(&state, &mem, extra).replace(r#""resume_vm": true"#, r#""resume_vm": false"#);
        let (status, text) = k.api("PUT", "/snapshot/load", Some(&body));
        assert_eq!(status, 204, "{text}");
        let kib = mapped_kib(k.pid(), &mem);
        (k, kib)
    };
    let (plain, plain_kib) = paused("plain", "");
    drop(plain);
    let (k, warm_kib) = paused("warm", &ws_param);
    assert!(
        warm_kib >= set.pages() * 4 && plain_kib < set.pages() * 4,
        "resident before the guest ran: {warm_kib} KiB with the working set ({} KiB), {plain_kib} KiB without",
        set.pages() * 4
    );
    // While paused after the load, its drive moves to a copy (PATCH /drives, as after a
    // boot); the prefaulted guest carries on as any other, on the copy: the original disk
    // is left as it was, the copy has the guest's later steps.
    let copy = dir.path().join("copy.img");
    std::fs::copy(&disk, &copy).unwrap();
    let original = std::fs::read(&disk).unwrap();
    let patch = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}"}}"#,
        copy.display()
    );
    let (status, text) = k.api("PATCH", "/drives/scratch", Some(&patch));
    assert_eq!(status, 204, "{text}");
    assert_eq!(
        k.api("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
        204
    );
    check_continuation(&before, &k.finish(Duration::from_secs(300)));
    assert!(
        std::fs::read(&disk).unwrap() == original,
        "the original disk was written"
    );
    assert!(
        std::fs::read(&copy).unwrap() != original,
        "the copy was not written"
    );

    // A damaged working-set file is refused, naming the field.
    let mut bytes = std::fs::read(&ws).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&ws, &bytes).unwrap();
    let k = api_kiln(dir.path(), "bad-ws", &[]);
    let (status, text) = k.api(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &mem, &ws_param)),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("working_set.path"), "{text}");
}

#[test]
fn clones_restore_side_by_side_from_one_snapshot_and_from_the_command_line() {
    require_kvm();
    let dir = TempDir::new("snap-clones");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let (before, state, mem) = snapshot_running_guest(&dir, &disk, &[]);

    // Two clones through the API, each on its own copy of the disk, plus one through
    // --restore-snapshot (on the original disk), all at once.
    let mut clones = Vec::new();
    for i in 0..2 {
        let copy = dir.path().join(format!("clone{i}.img"));
        std::fs::copy(&disk, &copy).unwrap();
        let k = api_kiln(dir.path(), &format!("clone{i}"), &[]);
        let extra = format!(
            r#", "drive_overrides": [{{"drive_id": "scratch", "path_on_host": "{}"}}]"#,
            copy.display()
        );
        let (status, text) = k.api(
            "PUT",
            "/snapshot/load",
            Some(&load_body(&state, &mem, &extra)),
        );
        assert_eq!(status, 204, "{text}");
        clones.push(k);
    }
    let cli = common::run_kiln_with(
        &[
            "--no-api",
            "--restore-snapshot",
            state.to_str().unwrap(),
            "--restore-mem",
            mem.to_str().unwrap(),
        ],
        None,
        Duration::from_secs(300),
    );
    check_continuation(&before, &cli);
    for k in clones {
        check_continuation(&before, &k.finish(Duration::from_secs(300)));
    }
}

#[test]
fn hostile_state_files_are_refused_before_use_and_nothing_is_written() {
    require_kvm();
    let dir = TempDir::new("snap-hostile");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let key = dir.file("key", &[0x5a; 32]);
    let (_, state, mem) =
        snapshot_running_guest(&dir, &disk, &["--snapshot-key-file", key.to_str().unwrap()]);
    let good = std::fs::read(&state).unwrap();
    let disk_before = std::fs::read(&disk).unwrap();
    let mem_before = std::fs::read(&mem).unwrap();

    // A keyed snapshot re-encoded with its drive pointed elsewhere (as a tamperer without
    // the key would: the plain checksum recomputed).
    let payload = &good[kiln::snapshot::format::HEADER_LEN..];
    let swapped = String::from_utf8(payload.to_vec())
        .unwrap()
        .replace("disk.img", "evil.img");
    dir.file("evil.img", &vec![0u8; 4 << 20]);
    let mut flipped = good.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x04;
    let mut version = good.clone();
    version[8] = 9;
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        (
            "truncated",
            good[..good.len() - 100].to_vec(),
            true,
            "truncated",
        ),
        ("bit-flipped", flipped, true, "checksum"),
        ("wrong version", version, true, "version 9"),
        ("empty", Vec::new(), true, "too short"),
        (
            "oversized",
            kiln::snapshot::format::encode(
                &vec![b' '; kiln::snapshot::format::MAX_PAYLOAD as usize + 1],
                Some(&[0x5a; 32]),
            ),
            true,
            "over the",
        ),
        (
            "drive swapped, re-checksummed without the key",
            kiln::snapshot::format::encode(swapped.as_bytes(), None),
            true,
            "not authenticated",
        ),
        (
            "unkeyed file, keyed kiln",
            good.clone(),
            false,
            "authenticated with a key",
        ),
    ];
    for (what, bytes, with_key, expect) in cases {
        let path = dir.file("bad.state", &bytes);
        let mut args = vec![];
        if with_key {
            args.extend(["--snapshot-key-file", key.to_str().unwrap()]);
        }
        let k = api_kiln(dir.path(), "bad", &args);
        let (status, text) = k.api("PUT", "/snapshot/load", Some(&load_body(&path, &mem, "")));
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains(expect), "{what}: {text}");
        let out = k.finish(Duration::from_secs(10));
        assert_eq!(
            out.status, 1,
            "{what}: a failed load ends kiln with 1\n{out}"
        );
    }

    // Fields out of range, in a correctly authenticated file: caught by validation.
    let key_bytes = [0x5a_u8; 32];
    let text = String::from_utf8(payload.to_vec()).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["devices"]["blocks"][0]["transport"]["queues"][0]["desc"] = serde_json::json!(1u64 << 40);
    let far_queue = kiln::snapshot::format::encode(v.to_string().as_bytes(), Some(&key_bytes));
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["vcpus"] = serde_json::json!([]);
    let no_vcpus = kiln::snapshot::format::encode(v.to_string().as_bytes(), Some(&key_bytes));
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["devices"]["blocks"][0]["transport"]["queues"][0]["size"] = serde_json::json!(512);
    let big_queue = kiln::snapshot::format::encode(v.to_string().as_bytes(), Some(&key_bytes));
    // The guest saw CPU features this host lacks (every leaf-7 EBX bit set).
    let mut st: kiln::snapshot::MicrovmState = serde_json::from_str(&text).unwrap();
    for e in &mut st.vcpus[0].cpuid {
        if e.function == 7 && e.index == 0 {
            e.ebx = u32::MAX;
        }
    }
    let foreign_cpu =
        kiln::snapshot::format::encode(&serde_json::to_vec(&st).unwrap(), Some(&key_bytes));
    for (what, bytes, expect) in [
        (
            "CPU features the host lacks",
            foreign_cpu,
            "lacks CPU features",
        ),
        ("a queue outside guest memory", far_queue, "queue 0"),
        ("no vCPU state", no_vcpus, "vCPU states"),
        ("a queue over the maximum size", big_queue, "queue 0"),
    ] {
        let path = dir.file("bad.state", &bytes);
        let k = api_kiln(
            dir.path(),
            "bad",
            &["--snapshot-key-file", key.to_str().unwrap()],
        );
        let (status, text) = k.api("PUT", "/snapshot/load", Some(&load_body(&path, &mem, "")));
        assert_eq!(status, 400, "{what}: {text}");
        assert!(text.contains(expect), "{what}: {text}");
        assert_eq!(k.finish(Duration::from_secs(10)).status, 1, "{what}");
    }

    // Another host's TSC frequency (half the saved one, so that KVM cannot fall back to its
    // catch-up mode, which only serves rates above the host's): KVM scales it where the host
    // has TSC scaling (KVM_CAP_TSC_CONTROL, the oracle), else the load is refused naming both.
    let mut st: kiln::snapshot::MicrovmState = serde_json::from_str(&text).unwrap();
    let saved = st.vcpus[0]
        .tsc_khz
        .expect("the snapshot records the TSC frequency");
    for v in &mut st.vcpus {
        v.tsc_khz = Some(saved / 2);
    }
    let path = dir.file(
        "tsc.state",
        &kiln::snapshot::format::encode(&serde_json::to_vec(&st).unwrap(), Some(&key_bytes)),
    );
    let scales = kvm_ioctls::Kvm::new()
        .unwrap()
        .check_extension(kvm_ioctls::Cap::TscControl);
    let k = api_kiln(
        dir.path(),
        "tsc",
        &["--snapshot-key-file", key.to_str().unwrap()],
    );
    let (status, text) = k.api("PUT", "/snapshot/load", Some(&load_body(&path, &mem, "")));
    if scales {
        assert_eq!(status, 204, "TSC scaling is available: {text}");
        drop(k);
    } else {
        assert_eq!(status, 400, "{text}");
        assert!(
            text.contains("cannot scale it") && text.contains(&(saved / 2).to_string()),
            "{text}"
        );
        assert_eq!(k.finish(Duration::from_secs(10)).status, 1);
    }

    // A memory file that is not the snapshot's (same size, one byte changed).
    let mut other = mem_before.clone();
    other[0x10_0000] ^= 1;
    let other_mem = dir.file("other.mem", &other);
    let k = api_kiln(
        dir.path(),
        "bad",
        &["--snapshot-key-file", key.to_str().unwrap()],
    );
    let (status, text) = k.api(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &other_mem, "")),
    );
    assert_eq!(status, 400, "{text}");
    assert!(text.contains("does not match the snapshot"), "{text}");
    drop(k);

    assert_eq!(
        std::fs::read(&disk).unwrap(),
        disk_before,
        "the disk was written"
    );
    assert_eq!(
        std::fs::read(&mem).unwrap(),
        mem_before,
        "the memory file was written"
    );
    assert_eq!(
        std::fs::read(&state).unwrap(),
        good,
        "the state file was written"
    );

    // The good file, with its key, still restores.
    let k = api_kiln(
        dir.path(),
        "good",
        &["--snapshot-key-file", key.to_str().unwrap()],
    );
    let (status, text) = k.api("PUT", "/snapshot/load", Some(&load_body(&state, &mem, "")));
    assert_eq!(status, 204, "{text}");
    let out = k.finish(Duration::from_secs(300));
    assert_eq!(out.status, 0, "{out}");
}

#[test]
fn describe_snapshot_and_refusals_that_need_no_guest() {
    let dir = TempDir::new("snap-describe");
    let bogus = dir.file("x.state", b"not a snapshot");
    let out = common::run_kiln(&["--describe-snapshot", bogus.to_str().unwrap()]);
    assert_eq!(out.status, 2, "{out}");
    assert!(
        out.stderr.contains("bad magic") || out.stderr.contains("too short"),
        "{out}"
    );
    let short_key = dir.file("k", b"short");
    let out = common::run_kiln(&[
        "--snapshot-key-file",
        short_key.to_str().unwrap(),
        "--describe-snapshot",
        bogus.to_str().unwrap(),
    ]);
    assert_eq!(out.status, 2, "{out}");
    assert!(out.stderr.contains("--snapshot-key-file"), "{out}");
    let out = common::run_kiln(&["--restore-snapshot", bogus.to_str().unwrap()]);
    assert_eq!(out.status, 2, "{out}");
    assert!(out.stderr.contains("--restore-mem"), "{out}");
}

#[test]
fn a_guest_paused_and_resumed_a_thousand_times_loses_no_interrupt() {
    require_kvm();
    let dir = TempDir::new("snap-pause");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let cfg = config(&dir, &disk, None);
    let k = api_kiln(
        dir.path(),
        "pause",
        &["--config-file", cfg.to_str().unwrap()],
    );
    k.wait_line("info workload step=1 ", Duration::from_secs(120));
    // Pauses land anywhere: in the middle of a block request, between a notification and
    // its completion, with an interrupt pending. A lost notification or interrupt shows as
    // the guest's `fail virtio timeout` / `no-interrupt`, or as a step that never comes.
    for i in 0..1000 {
        assert_eq!(
            k.api("PATCH", "/vm", Some(r#"{"state": "Paused"}"#)).0,
            204,
            "pause {i}"
        );
        assert_eq!(
            k.api("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#)).0,
            204,
            "resume {i}"
        );
    }
    let out = k.finish(Duration::from_secs(300));
    assert_eq!(out.status, 0, "{out}");
    assert!(!out.stdout.contains("fail "), "{out}");
    assert!(
        out.stdout.contains(&format!("ok workload steps={STEPS}")),
        "{out}"
    );
    assert_eq!(steps(&out.stdout), (0..STEPS).collect::<Vec<_>>(), "{out}");
}
