//! A vCPU's saved state, and the orders KVM needs to get and set it.
//!
//! Save (on the vCPU's own thread, parked outside KVM_RUN): MP state first (getting it
//! settles pending INIT/SIPI state), then the general and special registers, XSAVE, XCRs,
//! debug registers, the LAPIC, every MSR KVM lists, the TSC frequency, and the vCPU events
//! last (exceptions and NMIs pending at the stop). Restore (before the thread starts): CPUID
//! first (KVM checks the rest against it), then MP state, registers, XSAVE, XCRs, debug
//! registers, LAPIC, MSRs with the TSC before TSC_DEADLINE (a deadline is armed relative to
//! the TSC), and the vCPU events last.

use kvm_bindings::{
    CpuId, Msrs, kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use super::vcpu::VcpuError;

/// IA32_TIME_STAMP_COUNTER.
pub const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuSnapshot {
    /// The vCPU's index (and APIC id).
    pub index: u8,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Runnable, halted, waiting for SIPI, ...
    pub mp_state: kvm_mp_state,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Every MSR KVM could read.
    pub msrs: Vec<kvm_msr_entry>,
    /// The guest's TSC frequency, if KVM reports it.
    pub tsc_khz: Option<u32>,
    /// Pending exceptions, interrupts, NMIs, SMIs.
    pub vcpu_events: kvm_vcpu_events,
}

fn step(cpu: u8, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
    move |source| VcpuError::Configure { cpu, what, source }
}

/// Reads the MSRs in `list` that KVM can read: KVM_GET_MSRS stops at the first MSR it
/// cannot read, so that one is skipped and the read goes on after it.
fn read_msrs(fd: &VcpuFd, cpu: u8, list: &[u32]) -> Result<Vec<kvm_msr_entry>, VcpuError> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(256)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(VcpuError::MsrList)?;
        let n = fd.get_msrs(&mut msrs).map_err(step(cpu, "KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(chunk.len())]);
        // Skip the entry KVM refused (if any) and go on after it.
        let consumed = if n < chunk.len() { n + 1 } else { n };
        rest = &rest[consumed..];
    }
    Ok(out)
}

/// Saves the state of a vCPU that is outside KVM_RUN. `msr_list` is KVM's MSR index list;
/// `cpuid` is what the vCPU was given.
pub fn save(
    fd: &VcpuFd,
    index: u8,
    msr_list: &[u32],
    cpuid: &[kvm_cpuid_entry2],
) -> Result<VcpuSnapshot, VcpuError> {
    let mp_state = fd.get_mp_state().map_err(step(index, "KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(step(index, "KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(step(index, "KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(step(index, "KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(step(index, "KVM_GET_XCRS"))?;
    let debug_regs = fd
        .get_debug_regs()
        .map_err(step(index, "KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(step(index, "KVM_GET_LAPIC"))?;
    let msrs = read_msrs(fd, index, msr_list)?;
    let tsc_khz = fd.get_tsc_khz().ok();
    let cpuid = cpuid.to_vec();
    let vcpu_events = fd
        .get_vcpu_events()
        .map_err(step(index, "KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuSnapshot {
        index,
        cpuid,
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debug_regs,
        lapic,
        msrs,
        tsc_khz,
        vcpu_events,
    })
}

/// The MSRs in the order they must be set: the TSC first, the TSC deadline last.
pub fn restore_order(msrs: &[kvm_msr_entry]) -> Vec<kvm_msr_entry> {
    let rank = |e: &kvm_msr_entry| match e.index {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    };
    let mut sorted = msrs.to_vec();
    sorted.sort_by_key(rank);
    sorted
}

/// Restores a saved state into a vCPU that has not run yet.
pub fn restore(fd: &VcpuFd, s: &VcpuSnapshot) -> Result<(), VcpuError> {
    let cpu = s.index;
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(VcpuError::CpuidList)?;
    fd.set_cpuid2(&cpuid).map_err(step(cpu, "KVM_SET_CPUID2"))?;
    // Another host (or another TSC frequency): the guest keeps the frequency it calibrated,
    // scaled by KVM where the host can, refused naming both where it cannot.
    if let Some(saved) = s.tsc_khz
        && let Ok(host) = fd.get_tsc_khz()
        && host != saved
    {
        fd.set_tsc_khz(saved)
            .map_err(|source| VcpuError::TscScaling {
                cpu,
                saved,
                host,
                source,
            })?;
        log::info!(
            "vCPU {cpu}: TSC scaled from this host's {host} kHz to the snapshot's {saved} kHz"
        );
    }
    fd.set_mp_state(s.mp_state)
        .map_err(step(cpu, "KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(step(cpu, "KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(step(cpu, "KVM_SET_SREGS"))?;
    // SAFETY: `s.xsave` is a whole `kvm_xsave` (the legacy 4 KiB area KVM_GET_XSAVE fills);
    // kiln never enables the larger XSAVE2 layouts, so KVM reads no more than this struct.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(step(cpu, "KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(step(cpu, "KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs)
        .map_err(step(cpu, "KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(step(cpu, "KVM_SET_LAPIC"))?;
    let ordered = restore_order(&s.msrs);
    for chunk in ordered.chunks(256) {
        let msrs = Msrs::from_entries(chunk).map_err(VcpuError::MsrList)?;
        let set = fd.set_msrs(&msrs).map_err(step(cpu, "KVM_SET_MSRS"))?;
        if set != chunk.len() {
            return Err(VcpuError::Msrs {
                cpu,
                set,
                wanted: chunk.len(),
            });
        }
    }
    fd.set_vcpu_events(&s.vcpu_events)
        .map_err(step(cpu, "KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tsc_is_set_before_its_deadline() {
        let e = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let order: Vec<u32> = restore_order(&[e(MSR_IA32_TSC_DEADLINE), e(0x174), e(MSR_IA32_TSC)])
            .iter()
            .map(|m| m.index)
            .collect();
        assert_eq!(order, [MSR_IA32_TSC, 0x174, MSR_IA32_TSC_DEADLINE]);
    }
}
