//! CPUID normalisation: start from what KVM supports, then make every leaf the guest uses for
//! topology agree with the VM's vCPU count, set the hypervisor bit and hide features a microVM
//! does not virtualise (nested virtualisation, power management, debug store, PMU).

use kvm_bindings::kvm_cpuid_entry2;

/// Leaf 1 ECX: features hidden from the guest.
const LEAF1_ECX_MASK: u32 = (1 << 2) // DTES64: debug store
    | (1 << 3) // MONITOR/MWAIT
    | (1 << 4) // DS-CPL
    | (1 << 5) // VMX: no nested virtualisation
    | (1 << 6) // SMX
    | (1 << 7) // EST: SpeedStep
    | (1 << 8) // TM2
    | (1 << 14) // xTPR update control
    | (1 << 15); // PDCM: perf capabilities MSR
/// Leaf 1 ECX: TSC deadline timer.
const LEAF1_ECX_TSC_DEADLINE: u32 = 1 << 24;
/// Leaf 1 ECX: running under a hypervisor.
const LEAF1_ECX_HYPERVISOR: u32 = 1 << 31;
/// Leaf 1 EDX: features hidden from the guest.
const LEAF1_EDX_MASK: u32 = (1 << 21) // DS: debug store
    | (1 << 22) // ACPI thermal monitor MSRs
    | (1 << 29) // TM: thermal monitor
    | (1 << 31); // PBE
/// Leaf 1 EDX: multi-threading (more than one logical processor per package).
const LEAF1_EDX_HTT: u32 = 1 << 28;
/// Leaf 6 EAX: always-running APIC timer, the one power-management bit worth keeping.
const LEAF6_EAX_ARAT: u32 = 1 << 2;

/// Topology level types in leaves 0xB / 0x1F.
const LEVEL_TYPE_SMT: u32 = 1;
const LEVEL_TYPE_CORE: u32 = 2;

/// The VM's CPU topology: one socket, `threads_per_core` threads per core.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTopology {
    /// Number of vCPUs.
    pub vcpu_count: u8,
    /// 2 with SMT, else 1.
    pub threads_per_core: u8,
}

impl CpuTopology {
    /// The topology for `vcpu_count` vCPUs, with or without SMT.
    pub fn new(vcpu_count: u8, smt: bool) -> Self {
        let threads_per_core = if smt && vcpu_count > 1 { 2 } else { 1 };
        CpuTopology {
            vcpu_count,
            threads_per_core,
        }
    }

    /// Cores in the package.
    pub fn cores(&self) -> u32 {
        u32::from(self.vcpu_count).div_ceil(u32::from(self.threads_per_core))
    }

    /// APIC id bits used by the thread level.
    pub fn smt_shift(&self) -> u32 {
        ceil_log2(u32::from(self.threads_per_core))
    }

    /// APIC id bits below the package id.
    pub fn package_shift(&self) -> u32 {
        self.smt_shift() + ceil_log2(self.cores())
    }
}

fn ceil_log2(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Whether the entries describe an AMD CPU (vendor string in leaf 0).
fn is_amd(entries: &[kvm_cpuid_entry2]) -> bool {
    entries.iter().any(|e| {
        e.function == 0 && e.ebx == 0x6874_7541 && e.edx == 0x6974_6e65 && e.ecx == 0x444d_4163
    })
}

/// `kvm_cpuid_entry2.flags`: the entry depends on the subleaf index.
const KVM_CPUID_FLAG_SIGNIFCANT_INDEX: u32 = 1;

/// Makes sure the extended topology leaf 0xB has its SMT, core and terminating subleaves
/// (KVM may report only an empty subleaf 0); their contents are filled in by `normalize`.
fn ensure_topology_leaf(entries: &mut Vec<kvm_cpuid_entry2>) {
    let max_basic = entries
        .iter()
        .find(|e| e.function == 0)
        .map_or(0, |e| e.eax);
    if max_basic < 0xb {
        return;
    }
    entries.retain(|e| e.function != 0xb);
    for index in 0..3 {
        entries.push(kvm_cpuid_entry2 {
            function: 0xb,
            index,
            flags: KVM_CPUID_FLAG_SIGNIFCANT_INDEX,
            ..Default::default()
        });
    }
}

/// Rewrites `entries` (KVM's supported CPUID) for vCPU `cpu_index` of a VM with topology
/// `topo`. The vCPU's APIC id is its index.
pub fn normalize(
    entries: &mut Vec<kvm_cpuid_entry2>,
    cpu_index: u8,
    topo: CpuTopology,
    tsc_deadline: bool,
) {
    ensure_topology_leaf(entries);
    let apic_id = u32::from(cpu_index);
    let amd = is_amd(entries);
    let vcpus = u32::from(topo.vcpu_count);
    for e in entries.iter_mut() {
        match e.function {
            0x1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (apic_id << 24) | ((vcpus & 0xff) << 16);
                e.ecx = (e.ecx & !LEAF1_ECX_MASK) | LEAF1_ECX_HYPERVISOR;
                if tsc_deadline {
                    e.ecx |= LEAF1_ECX_TSC_DEADLINE;
                } else {
                    e.ecx &= !LEAF1_ECX_TSC_DEADLINE;
                }
                e.edx &= !LEAF1_EDX_MASK;
                if vcpus > 1 {
                    e.edx |= LEAF1_EDX_HTT;
                } else {
                    e.edx &= !LEAF1_EDX_HTT;
                }
            }
            0x4 => {
                // Deterministic cache parameters: which logical processors share each cache.
                let level = (e.eax >> 5) & 0x7;
                let sharing = match level {
                    0 => continue,
                    1 | 2 => u32::from(topo.threads_per_core),
                    _ => vcpus,
                };
                e.eax &= !(0xfff << 14) & !(0x3f << 26);
                e.eax |= ((sharing.next_power_of_two() - 1) & 0xfff) << 14;
                e.eax |= ((topo.cores().next_power_of_two() - 1) & 0x3f) << 26;
            }
            0x6 => {
                e.eax &= LEAF6_EAX_ARAT;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xa => {
                // No virtual PMU is offered.
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = topo.smt_shift();
                        e.ebx = u32::from(topo.threads_per_core);
                        e.ecx = (LEVEL_TYPE_SMT << 8) | e.index;
                    }
                    1 => {
                        e.eax = topo.package_shift();
                        e.ebx = vcpus;
                        e.ecx = (LEVEL_TYPE_CORE << 8) | e.index;
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index & 0xff;
                    }
                }
            }
            0x8000_0008 if amd => {
                // NC (cores - 1) and ApicIdSize.
                e.ecx = (e.ecx & !0xf0ff) | ((vcpus - 1) & 0xff) | (topo.package_shift() << 12);
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn sample() -> Vec<kvm_cpuid_entry2> {
        vec![
            // GenuineIntel
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(1, 0, 0x806f8, 0xff08_0800, 0xffff_ffff, 0xffff_ffff),
            entry(4, 0, (1 << 5) | 1, 0, 0, 0),
            entry(4, 1, (2 << 5) | 3, 0, 0, 0),
            entry(4, 2, (3 << 5) | 3, 0, 0, 0),
            entry(4, 3, 0, 0, 0, 0),
            entry(6, 0, 0xffff_ffff, 1, 1, 1),
            entry(0xa, 0, 0x0703_0802, 7, 0, 0x603),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 6, 64, 0x201, 7),
            entry(0xb, 2, 0, 0, 2, 7),
        ]
    }

    fn find(e: &[kvm_cpuid_entry2], f: u32, i: u32) -> kvm_cpuid_entry2 {
        *e.iter().find(|x| x.function == f && x.index == i).unwrap()
    }

    #[test]
    fn single_vcpu() {
        let mut e = sample();
        normalize(&mut e, 0, CpuTopology::new(1, false), true);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 0);
        assert_eq!((l1.ebx >> 16) & 0xff, 1);
        assert_eq!(l1.ebx & 0xffff, 0x0800, "CLFLUSH size kept");
        assert_ne!(l1.ecx & LEAF1_ECX_HYPERVISOR, 0);
        assert_ne!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_MASK, 0);
        assert_eq!(l1.edx & (LEAF1_EDX_MASK | LEAF1_EDX_HTT), 0);
        let b0 = find(&e, 0xb, 0);
        let b1 = find(&e, 0xb, 1);
        assert_eq!((b0.eax, b0.ebx, b0.ecx, b0.edx), (0, 1, 0x100, 0));
        assert_eq!((b1.eax, b1.ebx, b1.ecx, b1.edx), (0, 1, 0x201, 0));
        assert_eq!(find(&e, 0xb, 2).ecx, 2);
        assert_eq!(find(&e, 6, 0).eax, LEAF6_EAX_ARAT);
        assert_eq!(find(&e, 0xa, 0).eax, 0);
        assert_eq!(find(&e, 4, 0).eax >> 26, 0);
    }

    #[test]
    fn four_vcpus_second_cpu() {
        let mut e = sample();
        normalize(&mut e, 1, CpuTopology::new(4, false), false);
        let l1 = find(&e, 1, 0);
        assert_eq!(l1.ebx >> 24, 1);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_ne!(l1.edx & LEAF1_EDX_HTT, 0);
        assert_eq!(l1.ecx & LEAF1_ECX_TSC_DEADLINE, 0);
        let b1 = find(&e, 0xb, 1);
        assert_eq!((b1.eax, b1.ebx, b1.edx), (2, 4, 1));
        // L1/L2 private, L3 shared by all four; four cores.
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 0);
        assert_eq!((find(&e, 4, 2).eax >> 14) & 0xfff, 3);
        assert_eq!(find(&e, 4, 2).eax >> 26, 3);
        assert_eq!(
            find(&e, 4, 3).eax,
            0,
            "the terminating subleaf is untouched"
        );
    }

    #[test]
    fn smt_topology() {
        let t = CpuTopology::new(6, true);
        assert_eq!((t.cores(), t.smt_shift(), t.package_shift()), (3, 1, 3));
        let mut e = sample();
        normalize(&mut e, 5, t, false);
        let b0 = find(&e, 0xb, 0);
        assert_eq!((b0.eax, b0.ebx, b0.edx), (1, 2, 5));
        assert_eq!((find(&e, 4, 0).eax >> 14) & 0xfff, 1);
        assert_eq!(CpuTopology::new(1, true).threads_per_core, 1);
    }

    #[test]
    fn amd_core_count() {
        let mut e = vec![
            entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(0x8000_0008, 0, 0x3030, 0, 0xffff_0000, 0),
        ];
        normalize(&mut e, 0, CpuTopology::new(3, false), false);
        assert_eq!(find(&e, 0x8000_0008, 0).ecx, 0xffff_0000 | 2 | (2 << 12));
    }

    #[test]
    fn topology_leaf_is_completed() {
        // What KVM reports on some hosts: an empty subleaf 0 only.
        let mut e = vec![
            entry(0, 0, 0x1f, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            entry(0xb, 0, 0, 0, 0, 1),
        ];
        normalize(&mut e, 1, CpuTopology::new(2, false), false);
        let b: Vec<_> = e.iter().filter(|x| x.function == 0xb).collect();
        assert_eq!(b.len(), 3);
        let b1 = find(&e, 0xb, 1);
        assert_eq!(
            (b1.eax, b1.ebx, b1.ecx, b1.edx, b1.flags),
            (1, 2, 0x201, 1, 1)
        );
        assert_eq!(find(&e, 0xb, 2).ecx, 2);
        // A CPU without leaf 0xB gets none.
        let mut e = vec![entry(0, 0, 0xa, 0, 0, 0)];
        normalize(&mut e, 0, CpuTopology::new(2, false), false);
        assert_eq!(e.len(), 1);
    }

    #[test]
    fn log2() {
        assert_eq!(
            [1, 2, 3, 4, 5, 32, 33].map(ceil_log2),
            [0, 1, 2, 2, 3, 5, 6]
        );
    }
}
