//! Guest memory in a snapshot's memory file: the regions one after the other, pages the
//! guest never touched left as holes (the file has the guest's size, sparse); restored by
//! mapping the file privately, so pages load on first touch and clones share the page cache.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use crate::vstate::memory::GuestMemory;

const PAGE: usize = 4096;
/// Pages examined per mincore(2) call.
const CHUNK_PAGES: usize = 1 << 14;

/// One region of guest memory and where it is in the memory file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionInfo {
    /// Guest-physical start.
    pub guest_addr: u64,
    /// Length in bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Why memory could not be saved or mapped.
#[derive(Debug, thiserror::Error)]
pub enum MemoryFileError {
    /// Reading, writing or sizing the file failed.
    #[error("memory file: {0}")]
    Io(#[from] io::Error),
    /// The file is shorter than the guest's memory.
    #[error("memory file is {found} bytes, the snapshot's guest memory needs {needed}")]
    Short {
        /// Bytes needed.
        needed: u64,
        /// Bytes in the file.
        found: u64,
    },
    /// The regions are not a layout kiln makes.
    #[error("memory layout in the snapshot is invalid: {0}")]
    Layout(&'static str),
    /// mmap failed.
    #[error("cannot map the memory file: {0}")]
    Map(String),
}

/// The regions of `mem`, laid out one after the other in the file.
pub fn layout(mem: &GuestMemory) -> Vec<RegionInfo> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let info = RegionInfo {
                guest_addr: r.start_addr().raw_value(),
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            info
        })
        .collect()
}

/// Which pages of `len` bytes at `host` are resident (mincore), one flag per page.
fn resident(host: *mut u8, len: usize, out: &mut Vec<u8>) -> io::Result<()> {
    out.resize(len.div_ceil(PAGE), 0);
    // SAFETY: `host .. host + len` lies inside a live guest memory mapping, and `out` holds
    // one byte per page of it, as mincore(2) requires.
    let ret = unsafe { libc::mincore(host.cast(), len, out.as_mut_ptr()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Writes guest memory into `file` (already empty), leaving holes for pages that were never
/// touched (anonymous memory not resident) or are all zero, and feeds every byte (holes as
/// zeroes) to `hasher`. Returns the bytes written. With `every_page` (memory a page-fault
/// handler serves: a page not resident is one it has not served yet, not a zero one) every
/// page is read, which has the handler serve the rest.
pub fn save(
    mem: &GuestMemory,
    file: &File,
    mut hasher: Option<&mut blake3::Hasher>,
    every_page: bool,
) -> Result<u64, MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)?;
    let zero = [0u8; PAGE];
    let mut written = 0u64;
    let mut flags = Vec::new();
    for (region, info) in mem.iter().zip(layout(mem)) {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|_| MemoryFileError::Layout("unmapped region"))?;
        // A file-backed region (a restored VM) has its data in the file whether resident or
        // not: every page is read. Anonymous memory never touched is not resident.
        let anonymous = region.file_offset().is_none() && !every_page;
        let len = region.len() as usize;
        let mut off = 0usize;
        while off < len {
            let chunk = (len - off).min(CHUNK_PAGES * PAGE);
            let base = host.wrapping_add(off);
            if anonymous {
                resident(base, chunk, &mut flags)?;
            }
            for (i, page_off) in (0..chunk).step_by(PAGE).enumerate() {
                let n = PAGE.min(chunk - page_off);
                let touched = !anonymous || flags[i] & 1 != 0;
                // SAFETY: the page lies inside the region's live mapping, which `mem` keeps
                // alive; the vCPUs are paused, so nothing writes it meanwhile, and u8 has no
                // invalid values.
                let page = unsafe { std::slice::from_raw_parts(base.wrapping_add(page_off), n) };
                let data = if touched && page.iter().any(|b| *b != 0) {
                    let at = info.file_offset + (off + page_off) as u64;
                    file.write_all_at(page, at)?;
                    written += n as u64;
                    page
                } else {
                    &zero[..n]
                };
                if let Some(h) = hasher.as_deref_mut() {
                    h.update(data);
                }
            }
            off += chunk;
        }
    }
    Ok(written)
}

/// The BLAKE3 (keyed with `key`) of the first `len` bytes of `file`.
pub fn digest(file: &File, len: u64, key: &[u8; 32]) -> io::Result<[u8; 32]> {
    let mut h = blake3::Hasher::new_keyed(key);
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], off)?;
        h.update(&buf[..n]);
        off += n as u64;
    }
    Ok(*h.finalize().as_bytes())
}

/// Checks that `regions` is the layout kiln gives `size_mib` of memory.
pub fn check_layout(regions: &[RegionInfo], size_mib: u64) -> Result<(), MemoryFileError> {
    let size = size_mib
        .checked_mul(1 << 20)
        .ok_or(MemoryFileError::Layout("memory size"))?;
    let expected: Vec<(u64, u64)> = crate::vstate::memory::arch_memory_regions(size)
        .iter()
        .map(|(a, l)| (a.raw_value(), *l))
        .collect();
    let mut offset = 0u64;
    if regions.len() != expected.len() {
        return Err(MemoryFileError::Layout("region count"));
    }
    for (r, (addr, len)) in regions.iter().zip(expected) {
        if r.guest_addr != addr || r.size != len || r.file_offset != offset {
            return Err(MemoryFileError::Layout("regions"));
        }
        offset += len;
    }
    Ok(())
}

/// Maps `file` as guest memory laid out as `regions`: private, so the guest's writes stay
/// in this process and the file is never changed.
pub fn map(file: &File, regions: &[RegionInfo]) -> Result<GuestMemory, MemoryFileError> {
    let needed = regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0);
    let found = file.metadata()?.len();
    if found < needed {
        return Err(MemoryFileError::Short { needed, found });
    }
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|_| MemoryFileError::Layout("size"))?;
        let region = MmapRegionBuilder::<()>::new(size)
            .with_file_offset(FileOffset::new(file.try_clone()?, r.file_offset))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| MemoryFileError::Map(e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or(MemoryFileError::Layout("region wraps"))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| MemoryFileError::Map(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::Bytes;

    /// An empty read-write scratch file, and its path (removed by the test).
    fn scratch(tag: &str) -> (File, std::path::PathBuf) {
        let path = std::env::temp_dir().join(format!("kiln-snapmem-{tag}-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        (file, path)
    }

    #[test]
    fn untouched_memory_is_a_hole_and_restores_as_zero() {
        let mem = create_guest_memory(16).unwrap();
        mem.write_obj(0xdead_beef_u64, GuestAddress(0x5000))
            .unwrap();
        mem.write_obj(0x1234_u64, GuestAddress(0xff_f000)).unwrap();
        let (file, path) = scratch("holes");
        let written = save(&mem, &file, None, false).unwrap();
        assert_eq!(written, 2 * PAGE as u64, "only the two touched pages");
        assert_eq!(file.metadata().unwrap().len(), 16 << 20);
        let restored = map(&file, &layout(&mem)).unwrap();
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0x5000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(
            restored.read_obj::<u64>(GuestAddress(0xff_f000)).unwrap(),
            0x1234
        );
        assert_eq!(restored.read_obj::<u64>(GuestAddress(0x9000)).unwrap(), 0);
        // Private: writes to the restored memory never reach the file.
        restored.write_obj(7u64, GuestAddress(0x5000)).unwrap();
        let mut b = [0u8; 8];
        file.read_exact_at(&mut b, 0x5000).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0xdead_beef);
        // A snapshot of the restored (file-backed) memory keeps every page.
        let (file2, path2) = scratch("again");
        save(&restored, &file2, None, false).unwrap();
        let again = map(&file2, &layout(&mem)).unwrap();
        assert_eq!(again.read_obj::<u64>(GuestAddress(0x5000)).unwrap(), 7);
        assert_eq!(
            again.read_obj::<u64>(GuestAddress(0xff_f000)).unwrap(),
            0x1234
        );
        std::fs::remove_file(&path).unwrap();
        std::fs::remove_file(&path2).unwrap();
    }

    #[test]
    fn a_short_file_or_a_foreign_layout_is_refused() {
        let (file, path) = scratch("short");
        file.set_len(4096).unwrap();
        let regions = vec![RegionInfo {
            guest_addr: 0,
            size: 16 << 20,
            file_offset: 0,
        }];
        assert!(matches!(
            map(&file, &regions),
            Err(MemoryFileError::Short { .. })
        ));
        assert!(check_layout(&regions, 16).is_ok());
        assert!(check_layout(&regions, 32).is_err());
        let mut shifted = regions.clone();
        shifted[0].file_offset = 4096;
        assert!(check_layout(&shifted, 16).is_err());
        std::fs::remove_file(&path).unwrap();
    }
}
