//! End-to-end boots of the test guest: every boot protocol, 1 and several vCPUs, memory
//! below and across the MMIO gap, with and without an initrd; the serial report is checked
//! line for line, and the exit code.
#![allow(clippy::unwrap_used)]

mod common;

use common::{TempDir, assert_guest_passed, boot, fnv1a, guest, require_kvm, run_kiln};

const MIB: u64 = 1 << 20;
const DEFAULT_CMDLINE: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";

/// The CPU vendor string the guest will see (CPUID passes it through).
fn host_vendor() -> String {
    let r = std::arch::x86_64::__cpuid(0);
    let mut v = Vec::new();
    for w in [r.ebx, r.edx, r.ecx] {
        v.extend_from_slice(&w.to_le_bytes());
    }
    String::from_utf8(v).unwrap()
}

fn host_has_leaf_0xb() -> bool {
    std::arch::x86_64::__cpuid(0).eax >= 0xb
}

/// What a boot of the `boot` scenario must print, line by line.
fn expected_report(
    variant: &str,
    cmdline: &str,
    vcpus: u32,
    mem_mib: u64,
    initrd: Option<&[u8]>,
) -> Vec<String> {
    let mem = mem_mib * MIB;
    let mut l = vec![format!("kiln-guest: start variant={variant}")];
    match variant {
        "pvh" => {
            l.push("ok boot-params protocol=pvh version=1".into());
            l.push(format!(
                "info boot-params start_info=0x6000 modules={}",
                u32::from(initrd.is_some())
            ));
        }
        "bzimage" => {
            l.push("ok boot-params protocol=linux64 version=0x020f code32_start=0x100000".into());
            l.push("info boot-params zero_page=0x7000".into());
        }
        _ => {
            l.push("ok boot-params protocol=linux64".into());
            l.push("info boot-params zero_page=0x7000".into());
        }
    }
    l.push(format!("ok cmdline len={}", cmdline.len()));
    l.push(format!("info cmdline {cmdline}"));
    let low_end = mem.min(0xc000_0000);
    let mut e820 = vec![
        (0u64, 0x9fc00u64, "ram"),
        (0x9fc00, 0x10_0000, "reserved"),
        (0x10_0000, low_end, "ram"),
    ];
    if mem > 0xc000_0000 {
        e820.push((0x1_0000_0000, 0x1_0000_0000 + mem - 0xc000_0000, "ram"));
    }
    for (start, end, kind) in &e820 {
        l.push(format!(
            "info e820 0x{start:016x}-0x{:016x} {kind}",
            end - 1
        ));
    }
    let ram: u64 = e820
        .iter()
        .filter(|e| e.2 == "ram")
        .map(|(s, e, _)| e - s)
        .sum();
    l.push(format!(
        "ok e820 entries={} ram_kib={}",
        e820.len(),
        ram / 1024
    ));
    let high = mem > 0xc000_0000;
    l.push(format!(
        "ok memory ranges={} pages={}",
        if high { 2 } else { 1 },
        if high { 3 } else { 1 }
    ));
    match initrd {
        None => l.push("ok initrd none".into()),
        Some(data) => l.push(format!(
            "ok initrd size={} fnv1a=0x{:08x}",
            data.len(),
            fnv1a(data)
        )),
    }
    l.push(format!(
        "info cpuid vendor={} hypervisor=1 apic_id=0",
        host_vendor()
    ));
    if host_has_leaf_0xb() {
        l.push(format!("info cpuid leaf=0xb logical={vcpus} x2apic_id=0"));
        l.push("ok cpuid hypervisor=1 x2apic=match".into());
    } else {
        l.push("ok cpuid hypervisor=1 x2apic=absent".into());
    }
    let mp_len = 44 + 20 * vcpus + 8 + 8 + 24 * 8 + 2 * 8;
    l.push(format!(
        "info mptable mpf=0x9fc00 table=0x9fc10 length={mp_len} spec=1.4"
    ));
    l.push(format!(
        "ok mptable cpus={vcpus} ioapic=0xfec00000 irq_entries=24"
    ));
    // ACPI: the RSDP where Firecracker puts it, an XSDT listing the FADT and the MADT, one
    // local APIC per vCPU, no virtio devices in these boots.
    l.push("info acpi rsdp=0xe0000 revision=2 root=XSDT tables=FACP,APIC".into());
    let ids: Vec<String> = (0..vcpus).map(|i| i.to_string()).collect();
    l.push(format!(
        "ok acpi cpus={vcpus} apic_ids={} ioapic=0xfec00000 virtio=0 com1=1 hw_reduced=1",
        ids.join(",")
    ));
    if vcpus == 1 {
        l.push("ok smp cpus=1".into());
    } else {
        let ids: Vec<String> = (0..vcpus).map(|i| i.to_string()).collect();
        l.push(format!(
            "ok smp started={n}/{n} apic_ids={}",
            ids.join(","),
            n = vcpus - 1
        ));
    }
    l.push("kiln-guest: done ok=9 fail=0".into());
    l
}

fn check_boot(file: &str, variant: &str, vcpus: u32, mem_mib: u64, initrd: Option<&[u8]>) {
    let dir = TempDir::new("boot");
    let initrd_path = initrd.map(|d| dir.file("initrd", d));
    let mut extra = Vec::new();
    if let Some(p) = &initrd_path {
        extra.push("--initrd");
        extra.push(p.to_str().unwrap());
    }
    let out = boot(&guest(file), DEFAULT_CMDLINE, vcpus, mem_mib, &extra);
    assert_guest_passed(&out);
    let want = expected_report(variant, DEFAULT_CMDLINE, vcpus, mem_mib, initrd);
    assert_eq!(out.lines(), want, "\n{out}");
    assert!(
        out.stderr.is_empty(),
        "nothing logged on a clean run:\n{out}"
    );
}

/// Deterministic initrd contents.
fn initrd_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x2545_f491_4f6c_dd1du64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn elf_one_vcpu_128mib() {
    check_boot("kiln-guest.elf", "elf", 1, 128, None);
}

#[test]
fn elf_two_vcpus_128mib() {
    check_boot("kiln-guest.elf", "elf", 2, 128, None);
}

#[test]
fn elf_4gib_across_the_mmio_gap() {
    check_boot("kiln-guest.elf", "elf", 1, 4096, None);
}

#[test]
fn elf_two_vcpus_4gib_with_initrd() {
    check_boot(
        "kiln-guest.elf",
        "elf",
        2,
        4096,
        Some(&initrd_bytes(20_000)),
    );
}

#[test]
fn elf_with_initrd() {
    check_boot(
        "kiln-guest.elf",
        "elf",
        1,
        128,
        Some(&initrd_bytes(4096 * 3 + 17)),
    );
}

#[test]
fn pvh_entry() {
    check_boot("kiln-guest-pvh.elf", "pvh", 1, 128, None);
}

#[test]
fn pvh_two_vcpus_4gib_with_initrd() {
    check_boot(
        "kiln-guest-pvh.elf",
        "pvh",
        2,
        4096,
        Some(&initrd_bytes(9000)),
    );
}

#[test]
fn bzimage() {
    check_boot("kiln-guest.bzImage", "bzimage", 1, 128, None);
}

#[test]
fn bzimage_four_vcpus_with_initrd() {
    check_boot(
        "kiln-guest.bzImage",
        "bzimage",
        4,
        256,
        Some(&initrd_bytes(1000)),
    );
}

#[test]
fn builtin_guest_is_the_default_kernel() {
    require_kvm();
    let out = run_kiln(&["--no-api"]);
    assert_guest_passed(&out);
    assert_eq!(
        out.lines(),
        expected_report("elf", DEFAULT_CMDLINE, 1, 128, None),
        "\n{out}"
    );
}

#[test]
fn config_file_mode() {
    require_kvm();
    let dir = TempDir::new("cfgboot");
    let initrd = initrd_bytes(777);
    let initrd_path = dir.file("initrd.img", &initrd);
    let cmdline = "console=ttyS0 reboot=k panic=1 kiln.run=boot";
    let json = format!(
        r#"{{
          "boot-source": {{"kernel_image_path": "{}", "initrd_path": "{}", "boot_args": "{cmdline}"}},
          "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256, "smt": false, "track_dirty_pages": false}},
          "drives": [],
          "network-interfaces": []
        }}"#,
        guest("kiln-guest.elf").display(),
        initrd_path.display()
    );
    let cfg = dir.file("vm.json", json.as_bytes());
    let out = run_kiln(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_guest_passed(&out);
    assert_eq!(
        out.lines(),
        expected_report("elf", cmdline, 2, 256, Some(&initrd)),
        "\n{out}"
    );
}

/// The DSDT describes each virtio-mmio device of the command line (window and GSI), checked
/// by the guest against the `virtio_mmio.device=` entries kiln appended.
#[test]
fn acpi_describes_every_virtio_device() {
    require_kvm();
    let dir = TempDir::new("acpiboot");
    let drives: Vec<String> = (0..3)
        .map(|i| {
            let path = dir.file(&format!("disk{i}.img"), &vec![0u8; 64 * 1024]);
            format!(
                r#"{{"drive_id": "d{i}", "path_on_host": "{}", "is_root_device": {}, "is_read_only": {}}}"#,
                path.display(),
                i == 1,
                i == 2
            )
        })
        .collect();
    let json = format!(
        r#"{{
          "boot-source": {{"kernel_image_path": "{}", "boot_args": "console=ttyS0 kiln.run=acpi"}},
          "machine-config": {{"vcpu_count": 2, "mem_size_mib": 128}},
          "drives": [{}]
        }}"#,
        guest("kiln-guest.elf").display(),
        drives.join(",")
    );
    let cfg = dir.file("vm.json", json.as_bytes());
    let out = run_kiln(&["--config-file", cfg.to_str().unwrap(), "--no-api"]);
    assert_guest_passed(&out);
    assert_eq!(
        out.line("ok acpi"),
        "ok acpi cpus=2 apic_ids=0,1 ioapic=0xfec00000 virtio=3 com1=1 hw_reduced=1",
        "\n{out}"
    );
}

#[test]
fn triple_fault_exit_code() {
    let out = boot(
        &guest("kiln-guest.elf"),
        "kiln.run=triple-fault",
        1,
        64,
        &[],
    );
    assert_eq!(out.status, 3, "{out}");
    assert_eq!(out.lines().last(), Some(&"info triple-fault now"));
    let log: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(log.len(), 1, "{out}");
    assert!(
        log[0].contains("ERROR] vCPU 0 triple-faulted (rip="),
        "{out}"
    );
}

#[test]
fn kvm_internal_error_exit_code() {
    let out = boot(
        &guest("kiln-guest.elf"),
        "kiln.run=emulation-failure",
        1,
        64,
        &[],
    );
    assert_eq!(out.status, 4, "{out}");
    let log: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(log.len(), 1, "{out}");
    assert!(
        log[0].contains("KVM internal error on vCPU 0 (suberror 1): emulation failure, instruction bytes 0f 57 c0"),
        "{out}"
    );
}

#[test]
fn triple_fault_on_a_secondary_vcpu_stops_everything() {
    // Two vCPUs: the AP (vCPU 1, APIC id 1) is started and triple-faults while the BSP keeps
    // running; kiln must stop the whole VM, name vCPU 1, and exit 3.
    let out = boot(
        &guest("kiln-guest.elf"),
        "kiln.run=triple-fault-ap",
        2,
        64,
        &[],
    );
    assert_eq!(out.status, 3, "{out}");
    assert_eq!(
        out.lines().last(),
        Some(&"info triple-fault-ap apic_id=1 now"),
        "{out}"
    );
    let log: Vec<&str> = out.stderr.lines().collect();
    assert_eq!(log.len(), 1, "{out}");
    assert!(
        log[0].contains("ERROR] vCPU 1 triple-faulted (rip="),
        "{out}"
    );
}

#[test]
fn unknown_scenario_is_reported_by_the_guest() {
    let out = boot(
        &guest("kiln-guest.elf"),
        "kiln.run=no-such-thing",
        1,
        64,
        &[],
    );
    assert_eq!(out.status, 0);
    assert!(
        out.stdout.contains("fail scenario unknown=no-such-thing"),
        "{out}"
    );
}

#[test]
fn boot_timer_logs_the_guest_boot_time() {
    require_kvm();
    let out = run_kiln(&[
        "--no-api",
        "--boot-timer",
        "--level",
        "Info",
        "--cmdline",
        "kiln.run=boot-timer",
    ]);
    assert_eq!(out.status, 0, "{out}");
    assert!(out.stdout.contains("info boot-timer signalled"), "{out}");
    let line = out
        .stderr
        .lines()
        .find(|l| l.contains("Guest-boot-time ="))
        .unwrap_or_else(|| panic!("no boot time logged:\n{out}"));
    assert!(line.contains(" us ") && line.contains(" CPU ms"), "{line}");
    // Without the flag the write lands on no device and nothing is logged.
    let out = run_kiln(&[
        "--no-api",
        "--level",
        "Info",
        "--cmdline",
        "kiln.run=boot-timer",
    ]);
    assert_eq!(out.status, 0, "{out}");
    assert!(!out.stderr.contains("Guest-boot-time"), "{out}");
}
