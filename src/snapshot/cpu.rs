//! Moving a guest to another host: the CPU features the guest saw must exist there.
//!
//! A guest that found a feature in CPUID uses it (and `clearcpuid` cannot take it back
//! after boot): restoring it where KVM cannot offer that feature would fault or corrupt
//! state later. The check compares the restored vCPU's CPUID feature registers with what
//! this host's KVM supports, ignoring the bits that are the VMM's or the guest's own
//! (hypervisor present, TSC deadline, OSXSAVE, OSPKE).

use kvm_bindings::kvm_cpuid_entry2;

/// (leaf, subleaf, register, bits not to compare).
const FEATURE_REGS: [(u32, u32, Reg, u32); 7] = [
    // OSXSAVE (27) follows the guest's CR4; TSC deadline (24) and hypervisor (31) are set
    // by the VMM.
    (1, 0, Reg::Ecx, 1 << 27 | 1 << 24 | 1 << 31),
    (1, 0, Reg::Edx, 0),
    (7, 0, Reg::Ebx, 0),
    // OSPKE (4) follows the guest's CR4.
    (7, 0, Reg::Ecx, 1 << 4),
    (7, 0, Reg::Edx, 0),
    (0x8000_0001, 0, Reg::Ecx, 0),
    (0x8000_0001, 0, Reg::Edx, 0),
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Reg {
    Ebx,
    Ecx,
    Edx,
}

impl Reg {
    fn get(self, e: &kvm_cpuid_entry2) -> u32 {
        match self {
            Reg::Ebx => e.ebx,
            Reg::Ecx => e.ecx,
            Reg::Edx => e.edx,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Reg::Ebx => "ebx",
            Reg::Ecx => "ecx",
            Reg::Edx => "edx",
        }
    }
}

/// Well-known names of feature bits (the rest are named by leaf, register and bit).
fn feature_name(leaf: u32, reg: Reg, bit: u32) -> Option<&'static str> {
    Some(match (leaf, reg, bit) {
        (1, Reg::Ecx, 0) => "sse3",
        (1, Reg::Ecx, 1) => "pclmulqdq",
        (1, Reg::Ecx, 9) => "ssse3",
        (1, Reg::Ecx, 12) => "fma",
        (1, Reg::Ecx, 13) => "cx16",
        (1, Reg::Ecx, 19) => "sse4_1",
        (1, Reg::Ecx, 20) => "sse4_2",
        (1, Reg::Ecx, 21) => "x2apic",
        (1, Reg::Ecx, 22) => "movbe",
        (1, Reg::Ecx, 23) => "popcnt",
        (1, Reg::Ecx, 25) => "aes",
        (1, Reg::Ecx, 26) => "xsave",
        (1, Reg::Ecx, 28) => "avx",
        (1, Reg::Ecx, 29) => "f16c",
        (1, Reg::Ecx, 30) => "rdrand",
        (1, Reg::Edx, 25) => "sse",
        (1, Reg::Edx, 26) => "sse2",
        (7, Reg::Ebx, 3) => "bmi1",
        (7, Reg::Ebx, 5) => "avx2",
        (7, Reg::Ebx, 8) => "bmi2",
        (7, Reg::Ebx, 9) => "erms",
        (7, Reg::Ebx, 16) => "avx512f",
        (7, Reg::Ebx, 18) => "rdseed",
        (7, Reg::Ebx, 19) => "adx",
        (7, Reg::Ebx, 29) => "sha_ni",
        (7, Reg::Ecx, 9) => "vaes",
        (7, Reg::Edx, 4) => "fsrm",
        (0x8000_0001, Reg::Ecx, 5) => "abm",
        (0x8000_0001, Reg::Edx, 27) => "rdtscp",
        _ => return None,
    })
}

fn find(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries
        .iter()
        .find(|e| e.function == leaf && (e.index == subleaf || e.flags & 1 == 0))
}

/// The features the guest saw (`saved`) that this host (`supported`, KVM's list) lacks,
/// named; empty when the guest can run here.
pub fn missing_features(saved: &[kvm_cpuid_entry2], supported: &[kvm_cpuid_entry2]) -> Vec<String> {
    let mut missing = Vec::new();
    for (leaf, subleaf, reg, ignore) in FEATURE_REGS {
        let Some(guest) = find(saved, leaf, subleaf) else {
            continue;
        };
        let host = find(supported, leaf, subleaf).map_or(0, |e| reg.get(e));
        let lacking = reg.get(guest) & !host & !ignore;
        for bit in 0..32 {
            if lacking & (1 << bit) != 0 {
                missing.push(feature_name(leaf, reg, bit).map_or_else(
                    || format!("cpuid {leaf:#x}.{} bit {bit}", reg.name()),
                    str::to_string,
                ));
            }
        }
    }
    missing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, ebx: u32, ecx: u32, edx: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    #[test]
    fn features_the_host_lacks_are_named() {
        let host = [
            entry(1, 0, 1 << 0 | 1 << 9, 1 << 25),
            entry(7, 1 << 3, 0, 0),
        ];
        let guest = [
            entry(1, 0, 1 << 0 | 1 << 9 | 1 << 28 | 1 << 27 | 1 << 31, 1 << 25),
            entry(7, 1 << 3 | 1 << 5 | 1 << 30, 0, 0),
        ];
        assert_eq!(
            missing_features(&guest, &host),
            ["avx", "avx2", "cpuid 0x7.ebx bit 30"]
        );
        assert!(missing_features(&host, &host).is_empty());
        assert!(missing_features(&[], &host).is_empty());
    }
}
