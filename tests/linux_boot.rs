//! The slow tier (issue 9): a real Linux kernel — the microVM guest kernel built by
//! `guest-kernel/build.sh` — boots on kiln under its default seccomp filters, with its root
//! file system on an ext4 image over virtio-blk and its address from a real DHCP server
//! (dnsmasq) over virtio-net, and kiln's devices are checked against Linux's own drivers:
//! the block device has the image's capacity, the ext4 root is mounted, the lease is the
//! server's, init is reached on the mounted root, and kiln ends cleanly when the kernel,
//! finding no init it can run, panics and resets the machine (`panic=1 reboot=k`). Linux
//! boots from kiln's ACPI tables (its RSDP, the MADT's CPUs and IOAPIC, no ACPI error); the
//! same boot with `acpi=off` runs from the MP table alone and passes the same checks.
//!
//! A second boot checks the i8042 path against Linux's AT keyboard driver: kiln's
//! `SendCtrlAltDel` (through the API socket) makes the kernel restart, which resets the
//! machine through the i8042 and ends kiln cleanly.
//!
//! Two more boots run a user space (issues 19 and 20, tests/linux/workload.rs): the busybox
//! root image of `guest-kernel/rootfs.sh`, whose init runs a workload checking processes,
//! threads and signals, a file written to the root (then checked from the host, content and
//! `e2fsck -fn`), a data drive's contents, a read-only drive, ping, TCP both ways and an HTTP
//! download against peers in the test's network namespace, then reboots — with kiln under
//! the jailer and its default seccomp filters, once with 1 vCPU and once with 2.
//!
//! The kernel is `KILN_LINUX_KERNEL`, else the one `guest-kernel/build.sh` builds (once,
//! several minutes) and caches; the root image is `KILN_LINUX_ROOTFS`, else
//! `guest-kernel/rootfs.sh`'s. The marker boots take about half a minute each on the
//! emulated KVM of the development machines, the workload boots about two minutes;
//! `KILN_SKIP_LINUX=1` leaves the tier out of a quick local run. Needs root, /dev/kvm, `ip`,
//! `mkfs.ext4`/`e2fsck`/`debugfs` (e2fsprogs), `dnsmasq` (dnsmasq-base), busybox-static and
//! the jailer built next to kiln (`cargo test --workspace` builds it).
#![allow(clippy::unwrap_used)]

mod linux;

use std::time::Duration;

use linux::{Firmware, KernelChoice, Options, check_boot, check_firmware, choose_kernel};

/// Generous but bounded: a stock kernel needs ~7 minutes here, the microVM kernel far less.
const TIMEOUT: Duration = Duration::from_secs(15 * 60);

/// The kernel to boot, or None (after saying so) when the user skipped the slow tier.
fn kernel() -> Option<std::path::PathBuf> {
    match choose_kernel() {
        KernelChoice::Kernel(path) => {
            testkit::require_kvm();
            Some(path)
        }
        KernelChoice::Skipped => {
            eprintln!("linux_boot: skipped ({}=1)", linux::SKIP_ENV);
            None
        }
    }
}

#[test]
fn linux_boots_to_init_with_virtio_blk_root_and_dhcp() {
    let Some(kernel) = kernel() else { return };
    // Default seccomp filters: no --no-seccomp.
    let boot = linux::boot(&kernel, &[], TIMEOUT, true);
    check_boot(&boot);
    check_firmware(&boot, Firmware::Acpi);
    let completions = boot.vcpu_metric("emulation_completions");
    eprintln!("linux_boot: milestones (wall time from kiln start):");
    for (i, (name, _)) in linux::MILESTONES.iter().enumerate() {
        eprintln!(
            "  {name:<18} {:>7.1} s",
            boot.milestones[i].unwrap().as_secs_f64()
        );
    }
    eprintln!("  {:<18} {:>7.1} s", "kiln exit", boot.end.as_secs_f64());
    eprintln!("  emulation completions: {completions:?}");
    assert!(
        completions.is_some(),
        "no emulation_completions in kiln's metrics\n{boot}"
    );
}

/// The same boot from the MP table alone (`acpi=off`: devices from the command line), as a
/// kernel without ACPI boots: every check of the ACPI boot.
#[test]
fn linux_boots_from_the_mp_table_with_acpi_off() {
    let Some(kernel) = kernel() else { return };
    let boot = linux::boot_with(
        &kernel,
        &Options {
            cmdline_extra: "acpi=off",
            timeout: TIMEOUT,
            echo: true,
            ..Options::default()
        },
    );
    check_boot(&boot);
    check_firmware(&boot, Firmware::MpTable);
}

/// The workload tier (tests/linux/workload.rs): busybox user space runs its checks of
/// processes, the root file system, a data drive, a read-only drive and the network, then
/// reboots; kiln runs under the jailer with its default seccomp filters. One boot per vCPU
/// count.
fn workload(vcpus: u32) {
    let Some(kernel) = kernel() else { return };
    let run = linux::workload::run(&kernel, vcpus, TIMEOUT, true);
    linux::workload::report(&run);
    linux::workload::check(&run);
}

#[test]
fn linux_user_space_workload_jailed_1_vcpu() {
    workload(1);
}

#[test]
fn linux_user_space_workload_jailed_2_vcpus() {
    workload(2);
}

/// Snapshot Linux mid-boot (its block device probed, before the DHCP lease and the root
/// mount), kill kiln, restore in a new kiln: the boot finishes there — DHCP lease, root
/// mounted, init started, a clean reset — with every check of the plain boot.
#[test]
fn linux_snapshotted_mid_boot_finishes_booting_in_a_new_process() {
    let Some(kernel) = kernel() else { return };
    let boot = linux::boot_with(
        &kernel,
        &Options {
            snapshot_on: Some("[vda] "),
            timeout: TIMEOUT,
            echo: true,
            ..Options::default()
        },
    );
    assert_rest_after_probe(&boot, "snapshot");
    check_boot(&boot);
}

/// Every milestone after the block device's probe (where the VM was snapshotted or
/// migrated, `what`) came after it: the boot went on in the new process.
fn assert_rest_after_probe(boot: &linux::Boot, what: &str) {
    let probed = boot.milestones[1].unwrap();
    for (i, (name, _)) in linux::MILESTONES.iter().enumerate().skip(2) {
        assert!(
            boot.milestones[i].unwrap() > probed,
            "{name} came before the {what}\n{boot}"
        );
    }
}

#[test]
fn linux_migrated_mid_boot_finishes_booting_on_the_destination() {
    let Some(kernel) = kernel() else { return };
    let boot = linux::boot_with(
        &kernel,
        &Options {
            migrate_on: Some("[vda] "),
            timeout: TIMEOUT,
            echo: true,
            ..Options::default()
        },
    );
    assert_rest_after_probe(&boot, "migration");
    assert!(
        boot.stderr.contains("the destination kiln"),
        "the boot did not move\n{boot}"
    );
    check_boot(&boot);
}

#[test]
fn linux_restarts_on_ctrl_alt_del_through_the_i8042() {
    let Some(kernel) = kernel() else { return };
    // No DHCP server: the kernel waits for an answer, long after its keyboard is up.
    let boot = linux::boot_with(
        &kernel,
        &Options {
            dhcp_server: false,
            ctrl_alt_del_on: Some("input: AT Raw Set 2 keyboard"),
            timeout: TIMEOUT,
            echo: true,
            ..Options::default()
        },
    );
    let answer = boot
        .ctrl_alt_del
        .as_deref()
        .unwrap_or_else(|| panic!("the AT keyboard never came up\n{boot}"));
    assert!(
        answer.starts_with("HTTP/1.1 204"),
        "SendCtrlAltDel: {answer}\n{boot}"
    );
    assert!(
        boot.line("reboot: Restarting system").is_some(),
        "Linux did not restart on Ctrl+Alt+Del\n{boot}"
    );
    assert!(
        boot.line("as init process").is_none() && boot.line("Kernel panic").is_none(),
        "the reset was not Ctrl+Alt+Del's\n{boot}"
    );
    assert_eq!(boot.status, 0, "kiln did not end cleanly\n{boot}");
    assert_eq!(
        boot.metric("i8042", "reset_count"),
        Some(1),
        "kiln did not see the reset through the i8042\n{boot}"
    );
}
