//! The Linux x86 boot protocol: the e820 memory map and the zero page (`struct boot_params`).

use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params, setup_header};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::layout::{EBDA_START, HIMEM_START, ZERO_PAGE_START};
use crate::vstate::memory::GuestMemory;

/// `boot_flag` magic of the setup header.
pub const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
/// `header` magic: "HdrS".
pub const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// `type_of_loader` for a loader without an assigned id.
pub const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Kernel alignment advertised for ELF kernels (16 MiB), as Firecracker.
pub const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// Largest number of e820 entries the zero page holds.
pub const E820_MAX_ENTRIES: usize = 128;

/// e820 entry types.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum E820Type {
    /// Usable RAM.
    Ram = 1,
    /// Reserved, not to be used by the OS.
    Reserved = 2,
}

/// One range of the guest's physical memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First address.
    pub addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// What the range is.
    pub kind: E820Type,
}

/// Errors building the Linux boot structures.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The memory map has more entries than the zero page holds.
    #[error("the e820 map has {0} entries, more than the zero page holds")]
    TooManyE820Entries(usize),
    /// Writing the zero page failed.
    #[error("cannot write the zero page: {0}")]
    ZeroPage(#[from] linux_loader::configurator::Error),
}

/// The memory map of `mem`: conventional memory up to the EBDA, the reserved BIOS area up to
/// 1 MiB, then every byte of RAM from 1 MiB on, one entry per guest memory region.
pub fn e820_map(mem: &GuestMemory) -> Vec<E820Entry> {
    let mut map = Vec::new();
    for region in mem.iter() {
        let start = region.start_addr().raw_value();
        let end = start + region.len();
        if start == 0 {
            map.push(E820Entry {
                addr: 0,
                size: end.min(EBDA_START),
                kind: E820Type::Ram,
            });
            if end > EBDA_START {
                map.push(E820Entry {
                    addr: EBDA_START,
                    size: end.min(HIMEM_START) - EBDA_START,
                    kind: E820Type::Reserved,
                });
            }
            if end > HIMEM_START {
                map.push(E820Entry {
                    addr: HIMEM_START,
                    size: end - HIMEM_START,
                    kind: E820Type::Ram,
                });
            }
        } else {
            map.push(E820Entry {
                addr: start,
                size: region.len(),
                kind: E820Type::Ram,
            });
        }
    }
    map
}

/// What the zero page must tell the kernel.
#[derive(Clone, Copy, Debug, Default)]
pub struct LinuxBootInfo {
    /// Guest address of the NUL-terminated command line.
    pub cmdline_addr: u64,
    /// Command line length including its NUL terminator.
    pub cmdline_size: u32,
    /// Initrd location and size, if any.
    pub initrd: Option<(u64, u64)>,
    /// The setup header of a bzImage, which the zero page starts from.
    pub setup_header: Option<setup_header>,
    /// Where the ACPI RSDP is (`acpi_rsdp_addr`, so the kernel need not scan for it).
    pub acpi_rsdp: Option<u64>,
}

/// Builds the zero page for the 64-bit Linux boot protocol.
pub fn build_zero_page(e820: &[E820Entry], info: &LinuxBootInfo) -> Result<boot_params, BootError> {
    let mut params = boot_params::default();
    if let Some(hdr) = info.setup_header {
        // A bzImage's own header comes first; the loader then fills in its fields.
        params.hdr = hdr;
    } else {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = info.cmdline_addr as u32;
    params.ext_cmd_line_ptr = (info.cmdline_addr >> 32) as u32;
    if info.setup_header.is_none() {
        // For ELF kernels there is no kernel-provided maximum; report the actual size as
        // Firecracker does. A bzImage keeps the maximum it declared.
        params.hdr.cmdline_size = info.cmdline_size;
    }
    if let Some((addr, size)) = info.initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.ext_ramdisk_image = (addr >> 32) as u32;
        params.hdr.ramdisk_size = size as u32;
        params.ext_ramdisk_size = (size >> 32) as u32;
    }
    params.acpi_rsdp_addr = info.acpi_rsdp.unwrap_or(0);
    if e820.len() > E820_MAX_ENTRIES {
        return Err(BootError::TooManyE820Entries(e820.len()));
    }
    for (slot, entry) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry {
            addr: entry.addr,
            size: entry.size,
            r#type: entry.kind as u32,
        };
    }
    params.e820_entries = e820.len() as u8;
    Ok(params)
}

/// Writes the zero page at its fixed address.
pub fn write_zero_page(mem: &GuestMemory, params: &boot_params) -> Result<(), BootError> {
    LinuxBootConfigurator::write_bootparams::<GuestMemory>(
        &BootParams::new::<boot_params>(params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{ByteValued, Bytes};

    fn u16_at(b: &[u8], off: usize) -> u16 {
        u16::from_le_bytes(b[off..off + 2].try_into().unwrap())
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    #[test]
    fn e820_without_the_gap() {
        let mem = create_guest_memory(128).unwrap();
        assert_eq!(
            e820_map(&mem),
            vec![
                E820Entry {
                    addr: 0,
                    size: 0x9fc00,
                    kind: E820Type::Ram
                },
                E820Entry {
                    addr: 0x9fc00,
                    size: 0x400 + 0x60000,
                    kind: E820Type::Reserved
                },
                E820Entry {
                    addr: 0x10_0000,
                    size: (128 << 20) - 0x10_0000,
                    kind: E820Type::Ram
                },
            ]
        );
    }

    #[test]
    fn e820_across_the_gap() {
        let mem = create_guest_memory(4096).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map.len(), 4);
        assert_eq!(
            map[2],
            E820Entry {
                addr: 0x10_0000,
                size: 0xc000_0000 - 0x10_0000,
                kind: E820Type::Ram
            }
        );
        assert_eq!(
            map[3],
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: E820Type::Ram
            }
        );
        // Nothing in the map touches the MMIO gap.
        assert!(
            map.iter()
                .all(|e| e.addr + e.size <= 0xc000_0000 || e.addr >= 0x1_0000_0000)
        );
    }

    #[test]
    fn e820_of_tiny_memory() {
        let mem = create_guest_memory(1).unwrap();
        let map = e820_map(&mem);
        assert_eq!(map.len(), 2);
        assert_eq!(map[1].addr + map[1].size, 0x10_0000);
    }

    #[test]
    fn zero_page_fields_at_protocol_offsets() {
        let e820 = [
            E820Entry {
                addr: 0,
                size: 0x9fc00,
                kind: E820Type::Ram,
            },
            E820Entry {
                addr: 0x1_0000_0000,
                size: 0x4000_0000,
                kind: E820Type::Ram,
            },
        ];
        let info = LinuxBootInfo {
            cmdline_addr: 0x20000,
            cmdline_size: 42,
            initrd: Some((0x7ff_f000, 0x1234)),
            setup_header: None,
            acpi_rsdp: Some(0xe0000),
        };
        let params = build_zero_page(&e820, &info).unwrap();
        let b = params.as_slice();
        assert_eq!(b.len(), 4096);
        assert_eq!(u16_at(b, 0x1fe), 0xaa55);
        assert_eq!(u32_at(b, 0x202), 0x5372_6448);
        assert_eq!(b[0x210], 0xff);
        assert_eq!(u32_at(b, 0x218), 0x7ff_f000);
        assert_eq!(u32_at(b, 0x21c), 0x1234);
        assert_eq!(u32_at(b, 0x228), 0x20000);
        assert_eq!(u32_at(b, 0x230), 0x0100_0000);
        assert_eq!(u32_at(b, 0x238), 42);
        assert_eq!(u32_at(b, 0x0c0), 0);
        assert_eq!(u32_at(b, 0x0c8), 0);
        assert_eq!(u64_at(b, 0x070), 0xe0000);
        assert_eq!(b[0x1e8], 2);
        // e820 entries: 20 bytes each from 0x2d0.
        assert_eq!(u64_at(b, 0x2d0), 0);
        assert_eq!(u64_at(b, 0x2d8), 0x9fc00);
        assert_eq!(u32_at(b, 0x2e0), 1);
        assert_eq!(u64_at(b, 0x2e4), 0x1_0000_0000);
        assert_eq!(u64_at(b, 0x2ec), 0x4000_0000);
        assert_eq!(u32_at(b, 0x2f4), 1);
    }

    #[test]
    fn zero_page_keeps_a_bzimage_header() {
        let mut hdr = setup_header {
            version: 0x020f,
            cmdline_size: 2047,
            code32_start: 0x10_0000,
            setup_sects: 1,
            ..Default::default()
        };
        hdr.kernel_alignment = 0x20_0000;
        let info = LinuxBootInfo {
            cmdline_addr: 0x20000,
            cmdline_size: 10,
            initrd: None,
            setup_header: Some(hdr),
            acpi_rsdp: None,
        };
        let params = build_zero_page(&[], &info).unwrap();
        let b = params.as_slice();
        assert_eq!(b[0x1f1], 1);
        assert_eq!(u16_at(b, 0x206), 0x020f);
        assert_eq!(u32_at(b, 0x214), 0x10_0000);
        assert_eq!(u32_at(b, 0x230), 0x20_0000);
        // The kernel's declared maximum stays.
        assert_eq!(u32_at(b, 0x238), 2047);
        assert_eq!(b[0x210], 0xff);
        assert_eq!(u32_at(b, 0x218), 0);
    }

    #[test]
    fn too_many_entries_is_an_error() {
        let e = E820Entry {
            addr: 0,
            size: 1,
            kind: E820Type::Ram,
        };
        let map = vec![e; 129];
        assert!(build_zero_page(&map, &LinuxBootInfo::default()).is_err());
    }

    #[test]
    fn zero_page_is_written_at_0x7000() {
        let mem = create_guest_memory(16).unwrap();
        let params = build_zero_page(&e820_map(&mem), &LinuxBootInfo::default()).unwrap();
        write_zero_page(&mem, &params).unwrap();
        let magic: u32 = mem.read_obj(GuestAddress(0x7000 + 0x202)).unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
    }
}
