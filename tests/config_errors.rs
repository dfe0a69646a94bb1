//! Bad configuration: each case gives one clear line naming the field, exit code 2, and
//! never a panic.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TempDir, guest, run_kiln};

fn assert_config_error(args: &[&str], want: &str) {
    let out = run_kiln(args);
    assert_eq!(out.status, 2, "{out}");
    let lines: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line expected:\n{out}");
    assert!(lines[0].starts_with("kiln: error: "), "{out}");
    assert!(lines[0].contains(want), "want `{want}`:\n{out}");
    assert!(out.stdout.is_empty(), "nothing may boot:\n{out}");
}

fn config_file(dir: &TempDir, json: &str) -> String {
    dir.file("vm.json", json.as_bytes())
        .to_str()
        .unwrap()
        .to_string()
}

fn kernel() -> String {
    guest("kiln-guest.elf").to_str().unwrap().to_string()
}

#[test]
fn config_file_errors_name_the_field() {
    let k = kernel();
    let cases = [
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 64, "vcpus": 2}}}}"#
            ),
            "machine-config.vcpus: unknown field `vcpus`",
        ),
        (
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/vmlinux"}}"#.to_string(),
            "boot-source.kernel_image_path: /nonexistent/vmlinux: No such file or directory",
        ),
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 64}}"#.to_string(),
            "missing field `boot-source`",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 0, "mem_size_mib": 64}}}}"#
            ),
            "machine-config.vcpu_count: must be between 1 and 32, got 0",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 33, "mem_size_mib": 64}}}}"#
            ),
            "machine-config.vcpu_count: must be between 1 and 32, got 33",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 0}}}}"#
            ),
            "machine-config.mem_size_mib: must be at least 1",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}"}}, "machine-config": {{"vcpu_count": 1, "mem_size_mib": 1000000000000}}}}"#
            ),
            "machine-config.mem_size_mib:",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}", "boot_args": "{}"}}}}"#,
                "x".repeat(3000)
            ),
            "boot-source.boot_args: 3000 bytes, over the 2047 byte limit",
        ),
        (
            format!(
                r#"{{"boot-source": {{"kernel_image_path": "{k}", "initrd_path": "/nonexistent/initrd"}}}}"#
            ),
            "boot-source.initrd_path: /nonexistent/initrd: No such file or directory",
        ),
        (
            format!(r#"{{"boot-source": {{"kernel_image_path": "{k}"}}"#),
            "EOF while parsing",
        ),
    ];
    for (json, want) in cases {
        let dir = TempDir::new("cfg");
        let path = config_file(&dir, &json);
        assert_config_error(&["--config-file", &path, "--no-api"], want);
    }
}

#[test]
fn garbage_kernel_is_refused() {
    let dir = TempDir::new("garbage");
    let junk: Vec<u8> = (0..64 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
        .collect();
    let path = dir.file("vmlinux", &junk);
    assert_config_error(
        &["--no-api", "--kernel", path.to_str().unwrap()],
        "not a kernel: neither an ELF vmlinux nor a bzImage",
    );
    // An ELF for another machine (the ELF header of /proc/self/exe is x86_64, so patch it).
    let mut elf = std::fs::read(guest("kiln-guest.elf")).unwrap();
    elf[18] = 40; // EM_ARM
    let path = dir.file("arm.elf", &elf);
    assert_config_error(
        &["--no-api", "--kernel", path.to_str().unwrap()],
        "not a 64-bit x86 ELF",
    );
    // A truncated ELF.
    let elf = std::fs::read(guest("kiln-guest.elf")).unwrap();
    let path = dir.file("short.elf", &elf[..100]);
    assert_config_error(
        &["--no-api", "--kernel", path.to_str().unwrap()],
        "boot-source.kernel_image_path",
    );
}

#[test]
fn empty_initrd_is_refused() {
    let dir = TempDir::new("initrd");
    let empty = dir.file("initrd", b"");
    assert_config_error(
        &["--no-api", "--initrd", empty.to_str().unwrap()],
        "boot-source.initrd_path:",
    );
}

#[test]
fn bad_arguments() {
    assert_config_error(&["--bogus"], "unknown argument `--bogus`");
    assert_config_error(&["--no-api", "--vcpus", "many"], "--vcpus: `many` is not");
    assert_config_error(&["--no-api", "--vcpus", "40"], "machine-config.vcpu_count");
    assert_config_error(&["--no-api", "--mem-mib"], "--mem-mib needs a value");
    assert_config_error(
        &["--config-file", "/nonexistent/vm.json", "--no-api"],
        "/nonexistent/vm.json",
    );
    assert_config_error(
        &["--no-api", "--cmdline", "bad\u{7}bell"],
        "boot-source.boot_args",
    );
    // Init arguments with no kernel argument before "--": linux-loader cannot build it
    // (found by the kernel_loader fuzz target).
    assert_config_error(
        &["--no-api", "--cmdline", " --  ! "],
        "boot-source.boot_args: Cmdline cannot contain only init args",
    );
}
