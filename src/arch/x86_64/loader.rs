//! Loading the kernel (ELF vmlinux, with or without a PVH entry, or bzImage) and the initrd
//! into guest memory with linux-loader, and validating what they ask for.

use std::io::{Read, Seek, SeekFrom};

use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, ReadVolatile,
};

use super::layout::{HIMEM_START, MMIO_GAP_START, PAGE_SIZE};
use super::regs::BootProtocol;
use crate::vstate::memory::GuestMemory;

const ELF_MAGIC: [u8; 4] = *b"\x7fELF";
const ELFCLASS64: u8 = 2;
const EM_X86_64: u16 = 62;
/// Boot protocol 2.12 introduced `xloadflags` and the 64-bit entry.
const BZIMAGE_MIN_VERSION: u16 = 0x020c;
const XLF_KERNEL_64: u16 = 1;
/// The 64-bit entry of a bzImage lies this far into the protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;
/// The Linux 64-bit entry runs on the boot identity map, which covers the first 1 GiB.
const IDENTITY_MAPPED_END: u64 = 1 << 30;

/// Errors loading the kernel or initrd.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// Reading the image failed.
    #[error("cannot read the image: {0}")]
    Read(#[source] std::io::Error),
    /// Neither an ELF nor a bzImage.
    #[error("not a kernel: neither an ELF vmlinux nor a bzImage")]
    UnknownFormat,
    /// An ELF for another architecture or class.
    #[error("not a 64-bit x86 ELF (class {class}, machine {machine})")]
    WrongElf {
        /// ELF class byte.
        class: u8,
        /// ELF machine.
        machine: u16,
    },
    /// An ELF segment would land in the first MiB, where the boot structures go (and
    /// linux-loader only checks the entry point).
    #[error(
        "ELF load segment at {paddr:#x} lies below {HIMEM_START:#x}, where the zero page, page tables and MP table go"
    )]
    SegmentBelowHighMemory {
        /// The segment's physical address.
        paddr: u64,
    },
    /// linux-loader refused the image.
    #[error("{0}")]
    Loader(#[from] linux_loader::loader::Error),
    /// A bzImage too old for 64-bit boot.
    #[error(
        "bzImage has boot protocol {version:#06x} and xloadflags {xloadflags:#x}: a 64-bit entry (>= 2.12 with XLF_KERNEL_64) is required"
    )]
    No64BitEntry {
        /// Header version.
        version: u16,
        /// Header xloadflags.
        xloadflags: u16,
    },
    /// The kernel wants to run where the boot protocol cannot enter it.
    #[error("kernel entry point {entry:#x} is outside {what}")]
    BadEntry {
        /// The entry address.
        entry: u64,
        /// Which region it must lie in.
        what: &'static str,
    },
    /// The initrd is empty.
    #[error("the file is empty")]
    EmptyInitrd,
    /// The initrd does not fit.
    #[error(
        "{size} bytes do not fit in guest memory between the kernel's end ({kernel_end:#x}) and {limit:#x}"
    )]
    InitrdDoesNotFit {
        /// Initrd size.
        size: u64,
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Highest address the initrd may reach.
        limit: u64,
    },
    /// Copying the initrd into guest memory failed.
    #[error("cannot copy it into guest memory: {0}")]
    InitrdCopy(vm_memory::GuestMemoryError),
}

/// Where and how the loaded kernel is entered.
#[derive(Clone, Copy, Debug)]
pub struct LoadedKernel {
    /// Entry point.
    pub entry: GuestAddress,
    /// Boot protocol to enter with.
    pub protocol: BootProtocol,
    /// First address past the kernel image.
    pub kernel_end: u64,
    /// A bzImage's setup header.
    pub setup_header: Option<setup_header>,
}

/// Loads a kernel image, recognising its format from its first bytes.
pub fn load_kernel<F>(mem: &GuestMemory, image: &mut F) -> Result<LoadedKernel, LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let mut ident = [0u8; 20];
    image.seek(SeekFrom::Start(0)).map_err(LoadError::Read)?;
    let n = read_up_to(image, &mut ident)?;
    if n >= 4 && ident[..4] == ELF_MAGIC {
        let machine = u16::from_le_bytes([ident[18], ident[19]]);
        if n < 20 || ident[4] != ELFCLASS64 || machine != EM_X86_64 {
            return Err(LoadError::WrongElf {
                class: ident[4],
                machine,
            });
        }
        check_elf_segments(image)?;
        let result = Elf::load(mem, None, image, Some(GuestAddress(HIMEM_START)))?;
        let (protocol, entry) = match result.pvh_boot_cap {
            PvhBootCapability::PvhEntryPresent(addr) => (BootProtocol::Pvh, addr),
            _ => (BootProtocol::Linux64, result.kernel_load),
        };
        check_entry(protocol, entry.raw_value())?;
        return Ok(LoadedKernel {
            entry,
            protocol,
            kernel_end: result.kernel_end,
            setup_header: None,
        });
    }

    let result =
        BzImage::load(mem, None, image, Some(GuestAddress(HIMEM_START))).map_err(|e| match e {
            linux_loader::loader::Error::Bzimage(_) => LoadError::UnknownFormat,
            other => LoadError::Loader(other),
        })?;
    let hdr = result.setup_header.ok_or(LoadError::UnknownFormat)?;
    let (version, xloadflags) = (hdr.version, hdr.xloadflags);
    if version < BZIMAGE_MIN_VERSION || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(LoadError::No64BitEntry {
            version,
            xloadflags,
        });
    }
    let entry = result.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET;
    check_entry(BootProtocol::Linux64, entry)?;
    // The kernel needs `init_size` bytes from its load address (decompression, .bss), more
    // than the file holds: nothing may be placed there.
    let init_end = result.kernel_load.raw_value() + u64::from(hdr.init_size);
    let kernel_end = if version >= 0x020a {
        result.kernel_end.max(init_end)
    } else {
        result.kernel_end
    };
    Ok(LoadedKernel {
        entry: GuestAddress(entry),
        protocol: BootProtocol::Linux64,
        kernel_end,
        setup_header: Some(hdr),
    })
}

/// Refuses an ELF whose loadable segments start below 1 MiB (linux-loader checks only the
/// entry point there): kiln writes the zero page, command line, page tables and MP table in
/// that first MiB, over the segment. Headers that cannot be read are left to linux-loader,
/// which reports them.
fn check_elf_segments<F: Read + Seek>(image: &mut F) -> Result<(), LoadError> {
    const PT_LOAD: u32 = 1;
    const PHDR_SIZE: usize = 56;
    let mut ehdr = [0u8; 64];
    image.seek(SeekFrom::Start(0)).map_err(LoadError::Read)?;
    if read_up_to(image, &mut ehdr)? < ehdr.len() {
        return Ok(());
    }
    let le64 = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"));
    let phoff = le64(&ehdr, 32);
    let phnum = u16::from_le_bytes([ehdr[56], ehdr[57]]);
    image
        .seek(SeekFrom::Start(phoff))
        .map_err(LoadError::Read)?;
    let mut phdr = [0u8; PHDR_SIZE];
    for _ in 0..phnum {
        if read_up_to(image, &mut phdr)? < PHDR_SIZE {
            break;
        }
        let p_type = u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]);
        let (paddr, filesz, memsz) = (le64(&phdr, 24), le64(&phdr, 32), le64(&phdr, 40));
        if p_type == PT_LOAD && (filesz != 0 || memsz != 0) && paddr < HIMEM_START {
            return Err(LoadError::SegmentBelowHighMemory { paddr });
        }
    }
    Ok(())
}

fn read_up_to<F: Read>(image: &mut F, buf: &mut [u8]) -> Result<usize, LoadError> {
    let mut filled = 0;
    while filled < buf.len() {
        match image.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(LoadError::Read(e)),
        }
    }
    Ok(filled)
}

fn check_entry(protocol: BootProtocol, entry: u64) -> Result<(), LoadError> {
    let (limit, what) = match protocol {
        BootProtocol::Linux64 => (IDENTITY_MAPPED_END, "the boot identity map (first 1 GiB)"),
        BootProtocol::Pvh => (MMIO_GAP_START, "32-bit RAM (PVH enters in 32-bit mode)"),
    };
    if entry < HIMEM_START || entry >= limit {
        return Err(LoadError::BadEntry { entry, what });
    }
    Ok(())
}

/// Where an initrd of `size` bytes goes: as high as possible in RAM below the MMIO gap (and
/// below the kernel's `initrd_addr_max`), page aligned, above the kernel.
pub fn initrd_address(
    mem: &GuestMemory,
    size: u64,
    kernel: &LoadedKernel,
) -> Result<u64, LoadError> {
    let lowmem_end = mem
        .iter()
        .find(|r| r.start_addr().raw_value() == 0)
        .map_or(0, |r| r.len().min(MMIO_GAP_START));
    let mut limit = lowmem_end;
    if let Some(hdr) = kernel.setup_header {
        let max = u64::from(hdr.initrd_addr_max);
        if hdr.version >= 0x0203 && max != 0 {
            limit = limit.min(max.saturating_add(1));
        }
    }
    let kernel_end = kernel.kernel_end.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let fail = LoadError::InitrdDoesNotFit {
        size,
        kernel_end: kernel.kernel_end,
        limit,
    };
    let addr = limit.checked_sub(size).ok_or(fail)? & !(PAGE_SIZE - 1);
    if addr < kernel_end.max(HIMEM_START) {
        return Err(LoadError::InitrdDoesNotFit {
            size,
            kernel_end: kernel.kernel_end,
            limit,
        });
    }
    Ok(addr)
}

/// Loads the initrd after the kernel; returns its (address, size).
pub fn load_initrd<F>(
    mem: &GuestMemory,
    image: &mut F,
    kernel: &LoadedKernel,
) -> Result<(u64, u64), LoadError>
where
    F: Read + ReadVolatile + Seek,
{
    let size = image.seek(SeekFrom::End(0)).map_err(LoadError::Read)?;
    if size == 0 {
        return Err(LoadError::EmptyInitrd);
    }
    let addr = initrd_address(mem, size, kernel)?;
    image.seek(SeekFrom::Start(0)).map_err(LoadError::Read)?;
    mem.read_exact_volatile_from(GuestAddress(addr), image, size as usize)
        .map_err(LoadError::InitrdCopy)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use std::io::Cursor;
    use vm_memory::Bytes;

    /// A minimal ELF64 with one PT_LOAD (and optionally a PVH note).
    pub(crate) fn tiny_elf(paddr: u64, entry: u64, pvh_entry: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh_entry.is_some() { 2 } else { 1 };
        let mut f = vec![0u8; 64 + 56 * phnum as usize];
        f[0..4].copy_from_slice(b"\x7fELF");
        f[4] = 2; // 64-bit
        f[5] = 1; // little endian
        f[6] = 1;
        f[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f[18..20].copy_from_slice(&62u16.to_le_bytes());
        f[20..24].copy_from_slice(&1u32.to_le_bytes());
        f[24..32].copy_from_slice(&entry.to_le_bytes());
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[52..54].copy_from_slice(&64u16.to_le_bytes());
        f[54..56].copy_from_slice(&56u16.to_le_bytes());
        f[56..58].copy_from_slice(&phnum.to_le_bytes());
        let payload_off = f.len() as u64 + if pvh_entry.is_some() { 20 } else { 0 };
        let payload = [0xf4u8; 16]; // hlt
        // PT_LOAD
        let ph = &mut f[64..120];
        ph[0..4].copy_from_slice(&1u32.to_le_bytes());
        ph[8..16].copy_from_slice(&payload_off.to_le_bytes());
        ph[16..24].copy_from_slice(&paddr.to_le_bytes());
        ph[24..32].copy_from_slice(&paddr.to_le_bytes());
        ph[32..40].copy_from_slice(&16u64.to_le_bytes());
        ph[40..48].copy_from_slice(&0x1000u64.to_le_bytes());
        if let Some(pvh) = pvh_entry {
            let note_off = f.len() as u64;
            let ph = &mut f[120..176];
            ph[0..4].copy_from_slice(&4u32.to_le_bytes()); // PT_NOTE
            ph[8..16].copy_from_slice(&note_off.to_le_bytes());
            ph[32..40].copy_from_slice(&20u64.to_le_bytes());
            f.extend_from_slice(&4u32.to_le_bytes()); // namesz
            f.extend_from_slice(&4u32.to_le_bytes()); // descsz
            f.extend_from_slice(&18u32.to_le_bytes()); // XEN_ELFNOTE_PHYS32_ENTRY
            f.extend_from_slice(b"Xen\0");
            f.extend_from_slice(&pvh.to_le_bytes());
        }
        f.extend_from_slice(&payload);
        f
    }

    /// A minimal bzImage: one setup sector after the boot sector, then the payload.
    pub(crate) fn tiny_bzimage(version: u16, xloadflags: u16) -> Vec<u8> {
        let mut f = vec![0u8; 1024 + 0x400];
        f[0x1f1] = 1; // setup_sects
        f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
        f[0x202..0x206].copy_from_slice(b"HdrS");
        f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        f[0x211] = 1; // LOADED_HIGH
        f[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
        f[0x22c..0x230].copy_from_slice(&0x37ff_ffffu32.to_le_bytes()); // initrd_addr_max
        f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        f[0x238..0x23c].copy_from_slice(&2047u32.to_le_bytes());
        f[0x260..0x264].copy_from_slice(&0x8_0000u32.to_le_bytes()); // init_size
        f[1024 + 0x200] = 0xf4;
        f
    }

    #[test]
    fn elf_linux64() {
        let mem = create_guest_memory(32).unwrap();
        let k = load_kernel(
            &mem,
            &mut Cursor::new(tiny_elf(0x100_0000, 0x100_0000, None)),
        )
        .unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x100_0000));
        assert_eq!(k.kernel_end, 0x100_0000 + 0x1000);
        let b: u8 = mem.read_obj(GuestAddress(0x100_0000)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn elf_with_pvh_note() {
        let mem = create_guest_memory(32).unwrap();
        let elf = tiny_elf(0x100_0000, 0x100_0000, Some(0x100_0008));
        let k = load_kernel(&mem, &mut Cursor::new(elf)).unwrap();
        assert_eq!(k.protocol, BootProtocol::Pvh);
        assert_eq!(k.entry, GuestAddress(0x100_0008));
    }

    #[test]
    fn bzimage_64bit_entry() {
        let mem = create_guest_memory(32).unwrap();
        let k = load_kernel(&mem, &mut Cursor::new(tiny_bzimage(0x020f, 3))).unwrap();
        assert_eq!(k.protocol, BootProtocol::Linux64);
        assert_eq!(k.entry, GuestAddress(0x10_0200));
        let hdr = k.setup_header.unwrap();
        assert_eq!({ hdr.version }, 0x020f);
        // The end covers init_size, not only the file.
        assert_eq!(k.kernel_end, 0x10_0000 + 0x8_0000);
        let b: u8 = mem.read_obj(GuestAddress(0x10_0200)).unwrap();
        assert_eq!(b, 0xf4);
    }

    #[test]
    fn old_bzimage_is_refused() {
        let mem = create_guest_memory(32).unwrap();
        for (v, x) in [(0x020b, 1), (0x020f, 0)] {
            let err = load_kernel(&mem, &mut Cursor::new(tiny_bzimage(v, x))).unwrap_err();
            assert!(matches!(err, LoadError::No64BitEntry { .. }), "{err}");
        }
    }

    #[test]
    fn garbage_and_foreign_files() {
        let mem = create_guest_memory(32).unwrap();
        for bytes in [
            vec![],
            vec![0u8; 10],
            vec![0x55u8; 8192],
            b"\x7fELF".to_vec(),
        ] {
            assert!(load_kernel(&mem, &mut Cursor::new(bytes)).is_err());
        }
        let mut elf32 = tiny_elf(0x100_0000, 0x100_0000, None);
        elf32[4] = 1;
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(elf32)),
            Err(LoadError::WrongElf { class: 1, .. })
        ));
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(vec![0u8; 8192])),
            Err(LoadError::UnknownFormat)
        ));
    }

    #[test]
    fn entries_outside_the_protocol_are_refused() {
        let mem = create_guest_memory(2048).unwrap();
        let elf = tiny_elf(0x4000_0000, 0x4000_0000, None);
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(elf)),
            Err(LoadError::BadEntry { .. })
        ));
        // A kernel larger than memory.
        let small = create_guest_memory(8).unwrap();
        let elf = tiny_elf(0x100_0000, 0x100_0000, None);
        assert!(load_kernel(&small, &mut Cursor::new(elf)).is_err());
    }

    #[test]
    fn segments_below_one_mib_are_refused() {
        // Found by the kernel_loader fuzz target: the entry was high, a segment was not, and
        // linux-loader only checks the entry.
        let mem = create_guest_memory(32).unwrap();
        let elf = tiny_elf(0x100, 0x100_0000, None);
        assert!(matches!(
            load_kernel(&mem, &mut Cursor::new(elf)),
            Err(LoadError::SegmentBelowHighMemory { paddr: 0x100 })
        ));
        let mut low = vec![0u8; HIMEM_START as usize];
        mem.read_slice(&mut low, GuestAddress(0)).unwrap();
        assert!(low.iter().all(|b| *b == 0), "nothing written below 1 MiB");
        // The segment just at 1 MiB is fine.
        let elf = tiny_elf(HIMEM_START, HIMEM_START, None);
        assert!(load_kernel(&mem, &mut Cursor::new(elf)).is_ok());
    }

    #[test]
    fn initrd_goes_high_and_aligned() {
        let mem = create_guest_memory(128).unwrap();
        let k = load_kernel(
            &mem,
            &mut Cursor::new(tiny_elf(0x100_0000, 0x100_0000, None)),
        )
        .unwrap();
        let data: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
        let (addr, size) = load_initrd(&mem, &mut Cursor::new(data.clone()), &k).unwrap();
        assert_eq!(size, 5000);
        assert_eq!(addr, (128 << 20) - 0x2000);
        let mut back = vec![0u8; 5000];
        mem.read_slice(&mut back, GuestAddress(addr)).unwrap();
        assert_eq!(back, data);
    }

    #[test]
    fn initrd_below_the_gap_and_the_kernel_limit() {
        let mem = create_guest_memory(4096).unwrap();
        let k = load_kernel(&mem, &mut Cursor::new(tiny_bzimage(0x020f, 1))).unwrap();
        // initrd_addr_max 0x37ffffff bounds the placement.
        assert_eq!(
            initrd_address(&mem, 0x1000, &k).unwrap(),
            0x3800_0000 - 0x1000
        );
        let elf = load_kernel(
            &mem,
            &mut Cursor::new(tiny_elf(0x100_0000, 0x100_0000, None)),
        )
        .unwrap();
        assert_eq!(
            initrd_address(&mem, 0x1000, &elf).unwrap(),
            0xc000_0000 - 0x1000
        );
    }

    #[test]
    fn initrd_that_does_not_fit() {
        let mem = create_guest_memory(32).unwrap();
        let k = load_kernel(
            &mem,
            &mut Cursor::new(tiny_elf(0x100_0000, 0x100_0000, None)),
        )
        .unwrap();
        assert!(matches!(
            initrd_address(&mem, 20 << 20, &k),
            Err(LoadError::InitrdDoesNotFit { .. })
        ));
        assert!(matches!(
            load_initrd(&mem, &mut Cursor::new(Vec::new()), &k),
            Err(LoadError::EmptyInitrd)
        ));
    }
}
