//! Guest memory: anonymous, `MAP_NORESERVE` mappings laid out around the 32-bit MMIO gap.
//!
//! Memory is reserved, never touched or zeroed by kiln: the host kernel hands out zero pages
//! on the guest's first access, so a VM costs only what its guest actually uses.
//!
//! Each region carries a bitmap in which vm-memory marks every page device emulation writes
//! through it; writes the host kernel makes straight into guest buffers (readv/preadv on host
//! addresses) are marked by whoever hands those buffers out ([`mark_dirty`]). vCPU writes are
//! KVM's dirty log, switched on for Diff snapshots (`track_dirty_pages`) or for the length
//! of a live migration ([`crate::vstate::vm::Vm`]). The bitmaps are always there, so that a
//! migration can start on any VM: one bit per page (32 KiB for 1 GiB), and one atomic OR per
//! page a device writes, whether or not anyone reads them.

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap};
use vm_memory::mmap::{MmapRegionBuilder, MmapRegionError};
use vm_memory::{
    Address, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
};

use crate::arch::x86_64::layout::{FIRST_ADDR_PAST_32BITS, MMIO_GAP_START};

/// A region's dirty-page bitmap (every region of kiln's memory has one).
pub type DirtyBitmap = AtomicBitmap;

/// The guest memory type used throughout kiln.
pub type GuestMemory = GuestMemoryMmap<DirtyBitmap>;

/// One region of [`GuestMemory`].
pub type GuestRegion = GuestRegionMmap<DirtyBitmap>;

const MIB: u64 = 1 << 20;

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The memory (plus the MMIO gap it straddles) does not fit the guest physical space.
    #[error(
        "machine-config.mem_size_mib: {size_mib} MiB does not fit the {phys_bits}-bit guest physical address space"
    )]
    TooLarge {
        /// Requested size.
        size_mib: u64,
        /// Physical address bits of this host.
        phys_bits: u8,
    },
    /// The host refused the mapping.
    #[error("machine-config.mem_size_mib: cannot map {size_mib} MiB of guest memory: {source}")]
    Map {
        /// Requested size.
        size_mib: u64,
        /// Why the mapping failed.
        source: MmapRegionError,
    },
    /// The regions do not form a valid guest memory.
    #[error("machine-config.mem_size_mib: invalid guest memory layout: {0}")]
    Layout(String),
}

/// Splits `size` bytes of RAM into guest-physical regions: below the MMIO gap, and the rest
/// from 4 GiB upward.
pub fn arch_memory_regions(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START),
            (GuestAddress(FIRST_ADDR_PAST_32BITS), size - MMIO_GAP_START),
        ]
    }
}

/// Physical address width of the host CPU (CPUID 0x80000008 EAX[7:0]); 36 when not reported.
pub fn host_phys_bits() -> u8 {
    let max_ext = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max_ext < 0x8000_0008 {
        return 36;
    }
    (std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff) as u8
}

/// The bitmap a region of `len` bytes gets: one bit per page.
pub fn new_bitmap(len: usize) -> DirtyBitmap {
    AtomicBitmap::with_len(len)
}

/// Reserves `size_mib` MiB of guest RAM, each region with its dirty-page bitmap.
pub fn create_guest_memory(size_mib: u64) -> Result<GuestMemory, MemoryError> {
    let phys_bits = host_phys_bits();
    let too_large = MemoryError::TooLarge {
        size_mib,
        phys_bits,
    };
    let size = size_mib.checked_mul(MIB).ok_or(too_large)?;
    let regions = arch_memory_regions(size);
    let end = regions
        .last()
        .and_then(|(start, len)| start.raw_value().checked_add(*len));
    match end {
        Some(end) if phys_bits >= 64 || end <= 1u64 << phys_bits => {}
        _ => {
            return Err(MemoryError::TooLarge {
                size_mib,
                phys_bits,
            });
        }
    }
    let ranges: Vec<(GuestAddress, usize)> = regions
        .iter()
        .map(|(start, len)| (*start, *len as usize))
        .collect();
    anonymous_memory(&ranges)
}

/// Anonymous, private, `MAP_NORESERVE` guest memory with the regions `ranges` (sorted, not
/// overlapping), each with its dirty-page bitmap.
pub fn anonymous_memory(ranges: &[(GuestAddress, usize)]) -> Result<GuestMemory, MemoryError> {
    let size_mib = ranges.iter().map(|(_, l)| *l as u64).sum::<u64>() / MIB;
    let mut mapped = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let region = MmapRegionBuilder::new_with_bitmap(len, new_bitmap(len))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|source| MemoryError::Map { size_mib, source })?;
        let region = GuestRegionMmap::new(region, start)
            .ok_or_else(|| MemoryError::Layout("a region wraps the address space".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryError::Layout(e.to_string()))
}

/// Records that the host kernel is about to write `len` bytes at `addr` straight into guest
/// memory (through a host address vm-memory does not see). A no-op without tracking;
/// addresses outside guest memory are ignored (the caller's own checks refuse them).
pub fn mark_dirty(mem: &GuestMemory, addr: GuestAddress, len: usize) {
    if len == 0 {
        return;
    }
    if let Some((region, offset)) = mem.to_region_addr(addr) {
        region.bitmap().mark_dirty(offset.raw_value() as usize, len);
    }
}

/// Bytes of guest memory currently resident in host RAM (pages the guest or kiln touched).
pub fn resident_bytes(mem: &GuestMemory) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    let mut vec = vec![0u8; 1 << 16];
    for region in mem.iter() {
        let Ok(base) = region.get_host_address(vm_memory::MemoryRegionAddress(0)) else {
            continue;
        };
        let len = region.len() as usize;
        let mut off = 0usize;
        while off < len {
            let chunk = (len - off).min(vec.len() * page);
            let start = base.wrapping_add(off).cast::<libc::c_void>();
            // SAFETY: `start .. start + chunk` lies inside this region's live mapping, and
            // `vec` holds one byte per page of the chunk, as mincore(2) requires.
            let ret = unsafe { libc::mincore(start, chunk, vec.as_mut_ptr()) };
            if ret != 0 {
                break;
            }
            let pages = chunk.div_ceil(page);
            total += vec[..pages].iter().filter(|b| **b & 1 != 0).count() as u64 * page as u64;
            off += chunk;
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_below_the_gap() {
        assert_eq!(
            arch_memory_regions(128 * MIB),
            vec![(GuestAddress(0), 128 * MIB)]
        );
        assert_eq!(
            arch_memory_regions(MMIO_GAP_START),
            vec![(GuestAddress(0), MMIO_GAP_START)]
        );
    }

    #[test]
    fn regions_across_the_gap() {
        assert_eq!(
            arch_memory_regions(4096 * MIB),
            vec![
                (GuestAddress(0), 3072 * MIB),
                (GuestAddress(4096 * MIB), 1024 * MIB)
            ]
        );
    }

    #[test]
    fn memory_is_reserved_not_touched() {
        let mem = create_guest_memory(64).unwrap();
        assert_eq!(mem.num_regions(), 1);
        assert_eq!(resident_bytes(&mem), 0);
        vm_memory::Bytes::write_obj(&mem, 1u64, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(resident_bytes(&mem), 4096);
    }

    #[test]
    fn absurd_sizes_are_refused() {
        assert!(matches!(
            create_guest_memory(u64::MAX / MIB),
            Err(MemoryError::TooLarge { .. })
        ));
        assert!(create_guest_memory(u64::MAX).is_err());
    }
}
