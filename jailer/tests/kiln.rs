//! End to end: the jailer starts kiln in a jail (its own mount namespace, pivot_root,
//! /dev/kvm and /dev/net/tun only, an unprivileged uid, a network namespace), and kiln boots
//! the test guest with a drive and a TAP from inside it.

mod common;

use std::fs;
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};

use common::{GID, Jailer, NetNs, UID, require_root};

/// kiln, built next to the jailer by `cargo test --workspace`.
fn kiln_binary() -> PathBuf {
    let kiln = Path::new(common::JAILER).with_file_name("kiln");
    assert!(
        kiln.exists(),
        "{} is missing: run the workspace's tests (cargo test --workspace), which build kiln",
        kiln.display()
    );
    kiln
}

#[test]
fn kiln_boots_the_test_guest_inside_the_jail() {
    require_root();
    testkit::require_kvm();
    let ns = NetNs::new("jt").expect("a network namespace");
    // The TAP belongs to the jailed uid, so kiln can attach to it without privileges.
    ns.ip(&[
        "tuntap",
        "add",
        "kilnjt0",
        "mode",
        "tap",
        "user",
        &UID.to_string(),
    ])
    .expect("a TAP");
    ns.ip(&["link", "set", "kilnjt0", "up"])
        .expect("the TAP up");

    let jailer = Jailer::new(kiln_binary())
        .arg("--netns")
        .arg(ns.path())
        .exec_args(["--config-file", "/vm.json", "--no-api"]);
    // The VM's files go in the jail before the jailer runs; paths are the jail's.
    let root = jailer.jail_root();
    fs::create_dir_all(&root).expect("create the jail root");
    let disk = root.join("disk.img");
    fs::write(&disk, vec![0u8; 1 << 20]).expect("write the drive");
    chown(&disk, Some(UID), Some(GID)).expect("give the drive to the jailed user");
    let config = r#"{
        "boot-source": {"kernel_image_path": "builtin:test-guest",
                        "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=boot,blk"},
        "machine-config": {"vcpu_count": 2, "mem_size_mib": 128},
        "drives": [{"drive_id": "rootfs", "path_on_host": "/disk.img",
                    "is_root_device": true, "is_read_only": false}],
        "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "kilnjt0",
                                "guest_mac": "aa:fc:00:00:00:05"}]
    }"#;
    fs::write(root.join("vm.json"), config).expect("write the config");

    let done = jailer.run();
    assert_eq!(
        done.code, 0,
        "stdout:\n{}\nstderr:\n{}",
        done.stdout, done.stderr
    );
    let lines: Vec<&str> = done.stdout.lines().collect();
    assert!(
        lines.iter().all(|l| !l.starts_with("fail")),
        "guest failures:\n{}",
        done.stdout
    );
    assert!(
        lines.contains(&"ok smp started=1/1 apic_ids=0,1"),
        "{}",
        done.stdout
    );
    assert!(
        lines.contains(&"ok blk get-id id=\"rootfs\""),
        "{}",
        done.stdout
    );
    assert!(
        lines.iter().any(|l| l.starts_with("info cmdline ")
            && l.contains("virtio_mmio.device=4K@0xc0001000:5")
            && l.contains("virtio_mmio.device=4K@0xc0002000:6")),
        "{}",
        done.stdout
    );
    assert!(
        lines
            .last()
            .is_some_and(|l| l.starts_with("kiln-guest: done ok=") && l.ends_with(" fail=0")),
        "{}",
        done.stdout
    );
    // The guest's write reached the drive inside the jail.
    let image = fs::read(&disk).expect("read the drive back");
    assert!(image.iter().any(|b| *b != 0), "the guest wrote nothing");
}
