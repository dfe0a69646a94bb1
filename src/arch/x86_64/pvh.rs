//! The PVH boot protocol: `hvm_start_info`, its memory map and module list.

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::GuestAddress;

use super::boot::E820Entry;
use super::layout::{MEMMAP_START, MODLIST_START, PVH_INFO_START};
use crate::vstate::memory::GuestMemory;

/// `hvm_start_info.magic`.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;

/// Errors building the PVH structures.
#[derive(Debug, thiserror::Error)]
pub enum PvhError {
    /// Writing the start info, memory map or module list failed.
    #[error("cannot write the PVH start info: {0}")]
    Write(#[from] linux_loader::configurator::Error),
}

/// The PVH structures, ready to be written.
#[derive(Debug)]
pub struct PvhStartInfo {
    /// The start info itself.
    pub start_info: hvm_start_info,
    /// Memory map entries.
    pub memmap: Vec<hvm_memmap_table_entry>,
    /// Modules (the initrd).
    pub modules: Vec<hvm_modlist_entry>,
}

/// Builds the PVH start info for the given memory map, command line, initrd and ACPI RSDP.
pub fn build_start_info(
    e820: &[E820Entry],
    cmdline_addr: u64,
    initrd: Option<(u64, u64)>,
    rsdp: Option<u64>,
) -> PvhStartInfo {
    let memmap: Vec<hvm_memmap_table_entry> = e820
        .iter()
        .map(|e| hvm_memmap_table_entry {
            addr: e.addr,
            size: e.size,
            type_: e.kind as u32,
            reserved: 0,
        })
        .collect();
    let modules: Vec<hvm_modlist_entry> = initrd
        .map(|(paddr, size)| hvm_modlist_entry {
            paddr,
            size,
            ..Default::default()
        })
        .into_iter()
        .collect();
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: 1,
        cmdline_paddr: cmdline_addr,
        memmap_paddr: MEMMAP_START,
        memmap_entries: memmap.len() as u32,
        nr_modules: modules.len() as u32,
        modlist_paddr: if modules.is_empty() { 0 } else { MODLIST_START },
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    PvhStartInfo {
        start_info,
        memmap,
        modules,
    }
}

/// Writes the start info, memory map and module list at their fixed addresses.
pub fn write_start_info(mem: &GuestMemory, info: &PvhStartInfo) -> Result<(), PvhError> {
    let mut params =
        BootParams::new::<hvm_start_info>(&info.start_info, GuestAddress(PVH_INFO_START));
    params.set_sections::<hvm_memmap_table_entry>(&info.memmap, GuestAddress(MEMMAP_START));
    if !info.modules.is_empty() {
        params.set_modules::<hvm_modlist_entry>(&info.modules, GuestAddress(MODLIST_START));
    }
    PvhBootConfigurator::write_bootparams::<GuestMemory>(&params, mem)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arch::x86_64::boot::{E820Type, e820_map};
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::Bytes;

    #[test]
    fn start_info_layout() {
        let mem = create_guest_memory(128).unwrap();
        let e820 = e820_map(&mem);
        let info = build_start_info(&e820, 0x20000, Some((0x0700_0000, 0x2000)), Some(0xe0000));
        write_start_info(&mem, &info).unwrap();
        let rd = |off: u64| -> u32 { mem.read_obj(GuestAddress(PVH_INFO_START + off)).unwrap() };
        let rd64 = |off: u64| -> u64 { mem.read_obj(GuestAddress(PVH_INFO_START + off)).unwrap() };
        // struct hvm_start_info offsets (xen/include/public/arch-x86/hvm/start_info.h).
        assert_eq!(rd(0), XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(rd(4), 1);
        assert_eq!(rd(12), 1); // nr_modules
        assert_eq!(rd64(16), MODLIST_START);
        assert_eq!(rd64(24), 0x20000);
        assert_eq!(rd64(32), 0xe0000); // rsdp_paddr
        assert_eq!(rd64(40), MEMMAP_START);
        assert_eq!(rd(48), 3);
        let m: u64 = mem.read_obj(GuestAddress(MODLIST_START)).unwrap();
        assert_eq!(m, 0x0700_0000);
        let sz: u64 = mem.read_obj(GuestAddress(MODLIST_START + 8)).unwrap();
        assert_eq!(sz, 0x2000);
        // Memory map entries: 24 bytes each.
        let t: u32 = mem.read_obj(GuestAddress(MEMMAP_START + 24 + 16)).unwrap();
        assert_eq!(t, E820Type::Reserved as u32);
        let a: u64 = mem.read_obj(GuestAddress(MEMMAP_START + 48)).unwrap();
        assert_eq!(a, 0x10_0000);
        // The module list ends before the memory map begins.
        const { assert!(MODLIST_START + 32 <= MEMMAP_START) };
    }

    #[test]
    fn no_initrd_no_modules() {
        let info = build_start_info(&[], 0x20000, None, None);
        assert_eq!(info.start_info.nr_modules, 0);
        assert_eq!(info.start_info.modlist_paddr, 0);
    }
}
