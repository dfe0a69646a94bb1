//! Boot-time CPU state: segments and descriptor tables, identity page tables, general
//! registers, FPU, MSRs and the local APIC's LINT pins, for both the Linux 64-bit boot
//! protocol and PVH.

use kvm_bindings::{Msrs, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{
    BOOT_GDT_MAX, BOOT_GDT_START, BOOT_IDT_START, BOOT_STACK_POINTER, PDE_START, PDPTE_START,
    PML4_START, PVH_INFO_START, ZERO_PAGE_START,
};
use crate::vstate::memory::GuestMemory;

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_NW: u64 = 0x2000_0000;
const X86_CR0_CD: u64 = 0x4000_0000;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// How the kernel is entered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootProtocol {
    /// 64-bit Linux boot protocol: long mode, identity-mapped, RSI = zero page.
    Linux64,
    /// PVH: 32-bit protected mode, paging off, EBX = `hvm_start_info`.
    Pvh,
}

/// Errors setting up boot CPU state.
#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    /// Writing the GDT, IDT or page tables into guest memory failed.
    #[error("cannot write boot descriptor tables or page tables: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
    /// Building the MSR list failed.
    #[error("cannot build the boot MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
}

/// A GDT entry from flags, base and limit (the classic `GDT_ENTRY` macro).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << (56 - 24))
        | ((flags as u64 & 0x0000_f0ff) << 40)
        | ((limit as u64 & 0x000f_0000) << (48 - 16))
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
}

fn entry_base(entry: u64) -> u64 {
    ((entry & 0xff00_0000_0000_0000) >> 32)
        | ((entry & 0x0000_00ff_0000_0000) >> 16)
        | ((entry & 0x0000_0000_ffff_0000) >> 16)
}

fn entry_limit(entry: u64) -> u32 {
    (((entry & 0x000f_0000_0000_0000) >> 32) | (entry & 0x0000_0000_0000_ffff)) as u32
}

/// The `kvm_segment` a GDT entry describes, loaded with selector `table_index * 8`.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let g = ((entry >> 55) & 1) as u8;
    let limit = entry_limit(entry);
    kvm_segment {
        base: entry_base(entry),
        // With the granularity bit the limit counts 4 KiB pages.
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 0x3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: u8::from(((entry >> 47) & 1) == 0),
    }
}

/// The boot GDT for a protocol: null, code, data, TSS.
pub fn boot_gdt(protocol: BootProtocol) -> [u64; BOOT_GDT_MAX] {
    match protocol {
        BootProtocol::Linux64 => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
            gdt_entry(0xc093, 0, 0xfffff), // data
            gdt_entry(0x808b, 0, 0xfffff), // TSS
        ],
        BootProtocol::Pvh => [
            gdt_entry(0, 0, 0),
            gdt_entry(0xc09b, 0, 0xffff_ffff), // 32-bit code, 4 GiB flat
            gdt_entry(0xc093, 0, 0xffff_ffff), // 32-bit data
            gdt_entry(0x008b, 0, 0x67),        // 32-bit TSS
        ],
    }
}

fn write_gdt_idt(mem: &GuestMemory, gdt: &[u64]) -> Result<(), RegsError> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(BOOT_GDT_START + i as u64 * 8))?;
    }
    mem.write_obj(0u64, GuestAddress(BOOT_IDT_START))?;
    Ok(())
}

/// Writes the identity map of the first 1 GiB (2 MiB pages) the 64-bit protocol requires.
pub fn setup_page_tables(mem: &GuestMemory) -> Result<(), RegsError> {
    mem.write_obj(PDPTE_START | 0x03, GuestAddress(PML4_START))?;
    mem.write_obj(PDE_START | 0x03, GuestAddress(PDPTE_START))?;
    let mut pde = [0u8; 4096];
    for (i, chunk) in pde.chunks_exact_mut(8).enumerate() {
        // Present, writable, 2 MiB page.
        let entry = ((i as u64) << 21) | 0x83;
        chunk.copy_from_slice(&entry.to_le_bytes());
    }
    mem.write_slice(&pde, GuestAddress(PDE_START))?;
    Ok(())
}

/// Writes the descriptor tables (and page tables for long mode) and sets `sregs` to match.
pub fn setup_sregs(
    mem: &GuestMemory,
    sregs: &mut kvm_sregs,
    protocol: BootProtocol,
) -> Result<(), RegsError> {
    let gdt = boot_gdt(protocol);
    write_gdt_idt(mem, &gdt)?;
    sregs.gdt.base = BOOT_GDT_START;
    sregs.gdt.limit = (size_of_val(&gdt) - 1) as u16;
    sregs.idt.base = BOOT_IDT_START;
    sregs.idt.limit = (size_of::<u64>() - 1) as u16;

    let code = segment_from_gdt(gdt[1], 1);
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);

    // Caches on: the reset state has CD/NW set.
    sregs.cr0 = (sregs.cr0 & !(X86_CR0_CD | X86_CR0_NW)) | X86_CR0_PE | X86_CR0_ET;
    match protocol {
        BootProtocol::Linux64 => {
            setup_page_tables(mem)?;
            sregs.cr3 = PML4_START;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
        BootProtocol::Pvh => {
            sregs.cr0 &= !X86_CR0_PG;
            sregs.cr3 = 0;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
    }
    Ok(())
}

/// General registers at the kernel entry.
pub fn boot_regs(protocol: BootProtocol, entry: u64) -> kvm_regs {
    let mut regs = kvm_regs {
        rflags: 0x2,
        rip: entry,
        ..Default::default()
    };
    match protocol {
        BootProtocol::Linux64 => {
            regs.rsp = BOOT_STACK_POINTER;
            regs.rbp = BOOT_STACK_POINTER;
            regs.rsi = ZERO_PAGE_START;
        }
        BootProtocol::Pvh => regs.rbx = PVH_INFO_START,
    }
    regs
}

/// The x87/SSE state at power-on, as the Linux boot protocol expects it.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices set at boot.
pub mod msr_index {
    /// IA32_TSC.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// IA32_MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// MTRR default type.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// STAR.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL flag mask.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// Kernel GS base.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
}

/// IA32_MISC_ENABLE: fast string operations.
const MISC_ENABLE_FAST_STRING: u64 = 1;
/// MTRRs enabled, default memory type write-back.
const MTRR_ENABLE_WRITEBACK: u64 = (1 << 11) | 6;

/// The boot MSR values, as (index, value).
pub fn boot_msr_entries() -> Vec<(u32, u64)> {
    use msr_index::*;
    vec![
        (IA32_SYSENTER_CS, 0),
        (IA32_SYSENTER_ESP, 0),
        (IA32_SYSENTER_EIP, 0),
        (STAR, 0),
        (CSTAR, 0),
        (KERNEL_GS_BASE, 0),
        (SYSCALL_MASK, 0),
        (LSTAR, 0),
        (IA32_TSC, 0),
        (IA32_MISC_ENABLE, MISC_ENABLE_FAST_STRING),
        (MTRR_DEF_TYPE, MTRR_ENABLE_WRITEBACK),
    ]
}

/// The boot MSRs as KVM's list type.
pub fn boot_msrs() -> Result<Msrs, RegsError> {
    let entries: Vec<kvm_msr_entry> = boot_msr_entries()
        .into_iter()
        .map(|(index, data)| kvm_msr_entry {
            index,
            data,
            ..Default::default()
        })
        .collect();
    Msrs::from_entries(&entries).map_err(RegsError::MsrList)
}

/// Local APIC register offsets and LVT delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn set_apic_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// Programs LINT0 as ExtINT (the 8259's output) and LINT1 as NMI, as firmware would.
pub fn setup_lint(regs: &mut [std::os::raw::c_char; 1024]) {
    for (offset, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut bytes = [0u8; 4];
        for (b, r) in bytes.iter_mut().zip(&regs[offset..offset + 4]) {
            *b = *r as u8;
        }
        let value = set_apic_delivery_mode(u32::from_le_bytes(bytes), mode);
        for (r, b) in regs[offset..offset + 4].iter_mut().zip(value.to_le_bytes()) {
            *r = b as std::os::raw::c_char;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn gdt_entries_match_the_linux_macro() {
        // Values from Linux's GDT_ENTRY_INIT for the boot code/data segments.
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
        assert_eq!(gdt_entry(0x808b, 0, 0xfffff), 0x008f_8b00_0000_ffff);
        assert_eq!(gdt_entry(0xc09b, 0, 0xffff_ffff), 0x00cf_9b00_0000_ffff);
    }

    #[test]
    fn long_mode_code_segment() {
        let cs = segment_from_gdt(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(cs.selector, 8);
        assert_eq!(
            (cs.l, cs.db, cs.g, cs.present, cs.s, cs.dpl),
            (1, 0, 1, 1, 1, 0)
        );
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((ds.selector, ds.type_, ds.db, ds.l), (0x10, 0x3, 1, 0));
        let tr = segment_from_gdt(gdt_entry(0x808b, 0, 0xfffff), 3);
        assert_eq!((tr.selector, tr.type_, tr.s), (0x18, 0xb, 0));
        let null = segment_from_gdt(0, 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn segment_base_round_trip() {
        let e = gdt_entry(0x0093, 0x1234_5678, 0x0abcd);
        let s = segment_from_gdt(e, 5);
        assert_eq!(s.base, 0x1234_5678);
        assert_eq!(s.limit, 0xabcd);
    }

    #[test]
    fn linux64_sregs_and_tables() {
        let mem = create_guest_memory(16).unwrap();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            ..Default::default()
        };
        setup_sregs(&mem, &mut sregs, BootProtocol::Linux64).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET | X86_CR0_PG);
        assert_eq!(sregs.cr3, 0x9000);
        assert_eq!(sregs.cr4 & X86_CR4_PAE, X86_CR4_PAE);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!((sregs.gdt.base, sregs.gdt.limit), (0x500, 31));
        assert_eq!((sregs.idt.base, sregs.idt.limit), (0x520, 7));
        let gdt1: u64 = mem.read_obj(GuestAddress(0x508)).unwrap();
        assert_eq!(gdt1, 0x00af_9b00_0000_ffff);
        let pml4: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4, 0xa003);
        let pdpte: u64 = mem.read_obj(GuestAddress(0xa000)).unwrap();
        assert_eq!(pdpte, 0xb003);
        let pde0: u64 = mem.read_obj(GuestAddress(0xb000)).unwrap();
        let pde511: u64 = mem.read_obj(GuestAddress(0xb000 + 511 * 8)).unwrap();
        assert_eq!(pde0, 0x83);
        assert_eq!(pde511, (511 << 21) | 0x83);
    }

    #[test]
    fn pvh_sregs() {
        let mem = create_guest_memory(16).unwrap();
        let mut sregs = kvm_sregs {
            cr0: 0x6000_0010,
            efer: EFER_LME,
            ..Default::default()
        };
        setup_sregs(&mem, &mut sregs, BootProtocol::Pvh).unwrap();
        assert_eq!(sregs.cr0, X86_CR0_PE | X86_CR0_ET);
        assert_eq!((sregs.cr4, sregs.efer), (0, 0));
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.limit),
            (1, 0, 0xffff_ffff)
        );
        assert_eq!((sregs.tr.limit, sregs.tr.type_), (0x67, 0xb));
        // No page tables were written for PVH.
        let pml4: u64 = mem.read_obj(GuestAddress(0x9000)).unwrap();
        assert_eq!(pml4, 0);
    }

    #[test]
    fn entry_registers() {
        let r = boot_regs(BootProtocol::Linux64, 0x100_0000);
        assert_eq!(
            (r.rip, r.rsi, r.rsp, r.rflags),
            (0x100_0000, 0x7000, 0x8ff0, 2)
        );
        let r = boot_regs(BootProtocol::Pvh, 0x100_1000);
        assert_eq!((r.rip, r.rbx, r.rsi, r.rflags), (0x100_1000, 0x6000, 0, 2));
    }

    #[test]
    fn msrs_and_fpu() {
        let msrs = boot_msrs().unwrap();
        assert_eq!(msrs.as_slice().len(), 11);
        assert!(
            msrs.as_slice()
                .iter()
                .any(|m| m.index == 0x2ff && m.data == 0x806)
        );
        let fpu = boot_fpu();
        assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    }

    #[test]
    fn lint_pins() {
        let mut regs = [0 as std::os::raw::c_char; 1024];
        regs[0x350 + 1] = 0x07; // stale mode bits must be replaced, not or-ed
        regs[0x360 + 2] = 0x01; // masked bit stays
        setup_lint(&mut regs);
        assert_eq!(regs[0x351] as u8, 0x07);
        assert_eq!(regs[0x361] as u8, 0x04);
        assert_eq!(regs[0x362] as u8, 0x01);
    }
}
