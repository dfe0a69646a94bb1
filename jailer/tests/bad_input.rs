//! Bad input (security-tests.md, jailer cases 1-3) and failures: each ends
//! with one line `jailer: <step>: <error>`, the step's exit code, and nothing
//! left behind that would make a retry fail differently. Needs root.

mod common;

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::Path;

use common::{Finished, INSPECTOR, Jailer, TempDir, require_root};

/// Entries under `dir`, recursively, as paths relative to it.
fn tree(dir: &Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            out.push(
                p.strip_prefix(dir)
                    .expect("under dir")
                    .display()
                    .to_string(),
            );
            if e.file_type().expect("file type").is_dir() {
                stack.push(p);
            }
        }
    }
    out.sort();
    out
}

fn assert_rejected(run: &Finished, needle: &str) {
    run.assert_failed(2, "arguments", needle);
}

#[test]
fn case1_bad_ids_are_rejected() {
    require_root();
    let long = "a".repeat(65);
    for id in [
        "",
        long.as_str(),
        "a/b",
        "..",
        "../x",
        "vmé",
        "vm 1",
        "vm_1",
    ] {
        let jailer = Jailer::inspector().id(id);
        let run = jailer.run();
        assert_rejected(&run, "invalid --id");
        assert!(
            tree(jailer.base.path()).is_empty(),
            "{id:?}: nothing created"
        );
    }
    // The boundary: 64 characters is fine (fails later, on purpose, at the
    // netns step, to keep this test short).
    let jailer = Jailer::inspector()
        .id(&"a".repeat(64))
        .arg("--netns")
        .arg("/nonexistent");
    jailer.run().assert_failed(4, "netns", "/nonexistent");
}

#[test]
fn case2_bad_cgroup_arguments_are_rejected() {
    require_root();
    for (flag, value, needle) in [
        ("--parent-cgroup", "../x", "invalid --parent-cgroup"),
        ("--parent-cgroup", "/abs", "invalid --parent-cgroup"),
        ("--cgroup", "../cpu.max=1", "invalid --cgroup"),
        ("--cgroup", "cpu.max=", "invalid --cgroup"),
        ("--cgroup", "cpu.max", "invalid --cgroup"),
        ("--cgroup-version", "3", "invalid --cgroup-version"),
    ] {
        let jailer = Jailer::inspector()
            .arg("--cgroup")
            .arg("cpu.shares=100")
            .arg(flag)
            .arg(value);
        assert_rejected(&jailer.run(), needle);
        assert!(tree(jailer.base.path()).is_empty());
        let cpu = common::cgroup_mount(Some("cpu")).expect("a cgroup v1 cpu hierarchy");
        assert!(!cpu.join(common::INSPECTOR_NAME).join(&jailer.id).exists());
    }
}

#[test]
fn case3_existing_exec_path_is_refused() {
    require_root();
    let elsewhere = TempDir::new("jailer-target");
    let target = elsewhere.path().join("precious");
    fs::write(&target, b"precious").unwrap();
    for what in ["file", "symlink", "dangling symlink", "hard link"] {
        let jailer = Jailer::inspector();
        let root = jailer.jail_root();
        fs::create_dir_all(&root).unwrap();
        let dest = root.join(common::INSPECTOR_NAME);
        match what {
            "file" => fs::write(&dest, b"old").unwrap(),
            "symlink" => symlink(&target, &dest).unwrap(),
            "dangling symlink" => symlink("/nonexistent", &dest).unwrap(),
            _ => fs::hard_link(&target, &dest).unwrap(),
        }
        let before = fs::symlink_metadata(&dest).unwrap();

        jailer.run().assert_failed(
            3,
            "copy exec file",
            "a file, symlink or hard link is already there",
        );
        let after = fs::symlink_metadata(&dest).unwrap();
        assert_eq!(
            (before.ino(), before.size()),
            (after.ino(), after.size()),
            "{what}"
        );
        assert_eq!(fs::read(&target).unwrap(), b"precious", "{what}");
        assert_eq!(
            tree(&root),
            [common::INSPECTOR_NAME],
            "{what}: nothing added"
        );
    }
}

#[test]
fn exec_file_must_be_a_static_executable() {
    require_root();
    let dir = TempDir::new("jailer-exec");
    let script = dir.path().join("script");
    fs::write(&script, "#!/bin/sh\n").unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    let not_exec = dir.path().join("not-exec");
    fs::copy(INSPECTOR, &not_exec).unwrap();
    fs::set_permissions(&not_exec, fs::Permissions::from_mode(0o644)).unwrap();
    let dynamic = ["/bin/sh", "/bin/true", "/usr/bin/env"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("a dynamically linked program");
    for (file, needle) in [
        (Path::new(dynamic), "dynamically linked"),
        (script.as_path(), "not an ELF executable"),
        (not_exec.as_path(), "not executable"),
        (dir.path(), "not a regular file"),
        (Path::new("/nonexistent"), "No such file or directory"),
    ] {
        let jailer = Jailer::new(file);
        assert_rejected(&jailer.run(), needle);
        assert!(tree(jailer.base.path()).is_empty());
    }
}

#[test]
fn other_arguments_are_validated() {
    require_root();
    for (uid, gid, needle) in [
        ("abc", "1", "invalid --uid \"abc\""),
        ("1", "-5", "invalid --gid \"-5\""),
        ("4294967296", "1", "invalid --uid"),
        ("", "1", "invalid --uid"),
    ] {
        assert_rejected(&Jailer::inspector().ids(uid, gid).run(), needle);
    }
    for (flag, value, needle) in [
        ("--resource-limit", "cpu=1", "invalid --resource-limit"),
        ("--resource-limit", "no-file=x", "invalid --resource-limit"),
        ("--bogus", "1", "unknown argument"),
        ("--id", "again", "--id given more than once"),
    ] {
        let jailer = Jailer::inspector().arg(flag).arg(value);
        assert_rejected(&jailer.run(), needle);
    }
    let jailer = Jailer::inspector().base_arg("/nonexistent");
    assert_rejected(&jailer.run(), "chroot base dir /nonexistent: No such file");
}

#[test]
fn failed_netns_step_removes_the_copy_and_a_retry_works() {
    require_root();
    let jailer = Jailer::inspector().arg("--netns").arg("/nonexistent/netns");
    jailer
        .run()
        .assert_failed(4, "netns", "No such file or directory (os error 2)");
    assert!(tree(jailer.base.path()).is_empty(), "everything removed");

    // The same id again, now without the bad namespace.
    let retry = jailer.without_args();
    let mut run = retry.spawn();
    assert_eq!(run.read_report().get("uid"), "40123,40123,40123");
    assert_eq!(run.finish().code, 0);
}

/// An ELF file for another machine: valid for the jailer, refused by execve.
fn foreign_elf(dir: &Path) -> std::path::PathBuf {
    let mut h = vec![0u8; 64];
    h[..4].copy_from_slice(b"\x7fELF");
    h[4] = 2; // 64-bit
    h[5] = 1; // little-endian
    h[6] = 1;
    h[16] = 2; // ET_EXEC
    h[18] = 0xb7; // EM_AARCH64
    h[0x34] = 64;
    let path = dir.join("foreign");
    fs::write(&path, h).expect("write the ELF file");
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod");
    path
}

#[test]
fn failed_exec_cleans_the_jail_in_every_mode() {
    require_root();
    let dir = TempDir::new("jailer-foreign");
    let foreign = foreign_elf(dir.path());
    for mode in [
        &[][..],
        &["--daemonize"],
        &["--new-pid-ns"],
        &["--daemonize", "--new-pid-ns"],
    ] {
        let mut jailer = Jailer::new(&foreign);
        for flag in mode {
            jailer = jailer.arg(flag);
        }
        // Twice: the retry meets the same error, not leftovers.
        for _ in 0..2 {
            let run = jailer.run();
            run.assert_failed(12, "exec /foreign", "Exec format error (os error 8)");
            // The error reaches the original stderr even when daemonized.
            let left = tree(&jailer.jail_root());
            assert!(left.is_empty(), "{mode:?}: left in the jail: {left:?}");
        }
    }
}
