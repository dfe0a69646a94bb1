//! Guest memory in a snapshot's memory file: the regions one after the other, pages the
//! guest never touched left as holes (the file has the guest's size, sparse); restored by
//! mapping the file privately, so pages load on first touch and clones share the page cache.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::bitmap::Bitmap;
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    Address, FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    GuestRegionMmap, MemoryRegionAddress,
};

use super::digest::{CHUNK, MemoryDigest, chunk_digest};
use super::format::Key;
use crate::vstate::memory::{GuestMemory, GuestRegion, new_bitmap};

const PAGE: usize = 4096;

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
    /// A Diff snapshot's base memory file is not the guest's size.
    #[error(
        "a Diff snapshot is merged onto the memory file of an earlier snapshot of this VM, which is {needed} bytes; this one is {found} bytes (give a new path for a diff layer)"
    )]
    Base {
        /// The guest's memory size.
        needed: u64,
        /// The file's size.
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

/// A region's host mapping as bytes.
///
/// # Safety
/// The caller keeps the region mapped and makes sure nothing writes it while the slice
/// lives (the vCPUs are paused and device emulation runs on the calling thread).
unsafe fn region_bytes(region: &GuestRegion) -> Result<&[u8], MemoryFileError> {
    let host = region
        .get_host_address(MemoryRegionAddress(0))
        .map_err(|_| MemoryFileError::Layout("unmapped region"))?;
    // SAFETY: the region is a live mapping of `len` bytes (the caller's contract), and u8
    // has no invalid values.
    Ok(unsafe { std::slice::from_raw_parts(host, region.len() as usize) })
}

/// Writes guest memory into `file` (already empty), leaving holes for pages that were never
/// touched (anonymous memory not resident) or are all zero. With a key, returns the memory's
/// chunk digests as well. Returns the bytes written. With `every_page` (memory a page-fault
/// handler serves: a page not resident is one it has not served yet, not a zero one) every
/// page is read, which has the handler serve the rest.
pub fn save(
    mem: &GuestMemory,
    file: &File,
    key: Option<&Key>,
    every_page: bool,
) -> Result<(u64, Option<MemoryDigest>), MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    file.set_len(total)?;
    let mut digest = key.map(|k| MemoryDigest::zeroed(k, total));
    let mut written = 0u64;
    let mut flags = Vec::new();
    for (region, info) in mem.iter().zip(layout(mem)) {
        // SAFETY: `mem` keeps the region mapped; the VM is paused (this function's contract).
        let bytes = unsafe { region_bytes(region)? };
        // A file-backed region (a restored VM) has its data in the file whether resident or
        // not: every page is read. Anonymous memory never touched is not resident.
        let anonymous = region.file_offset().is_none() && !every_page;
        for (c, chunk) in bytes.chunks(CHUNK as usize).enumerate() {
            let chunk_off = c * CHUNK as usize;
            if anonymous {
                resident(chunk.as_ptr().cast_mut(), chunk.len(), &mut flags)?;
            }
            let mut any = false;
            let mut run: Option<usize> = None;
            for (i, page) in chunk.chunks(PAGE).enumerate() {
                let touched = !anonymous || flags[i] & 1 != 0;
                let data = touched && page.iter().any(|b| *b != 0);
                any |= data;
                match (data, run) {
                    (true, None) => run = Some(i * PAGE),
                    (false, Some(r)) => {
                        let at = info.file_offset + (chunk_off + r) as u64;
                        file.write_all_at(&chunk[r..i * PAGE], at)?;
                        written += (i * PAGE - r) as u64;
                        run = None;
                    }
                    _ => {}
                }
            }
            if let Some(r) = run {
                let at = info.file_offset + (chunk_off + r) as u64;
                file.write_all_at(&chunk[r..], at)?;
                written += (chunk.len() - r) as u64;
            }
            if let (Some(d), Some(k)) = (digest.as_mut(), key) {
                let index = (info.file_offset + chunk_off as u64) / CHUNK;
                if any {
                    d.set(index, chunk_digest(k, index, Some(chunk)));
                }
            }
        }
    }
    Ok((written, digest))
}

/// Whether any page of `region` is marked dirty in its bitmap.
fn dirty_pages(region: &GuestRegion) -> Vec<bool> {
    let pages = (region.len() as usize).div_ceil(PAGE);
    (0..pages)
        .map(|p| region.bitmap().dirty_at(p * PAGE))
        .collect()
}

/// Writes the pages marked dirty in the regions' bitmaps into `file`, which is either the
/// guest-sized memory file of an earlier snapshot (they are merged onto it in place) or a new
/// empty file (it becomes Firecracker's diff layer: the guest's size, only the dirty pages
/// present). Every dirty page is written, zero or not, so that the layer overrides its base.
/// With `digest`, the chunks holding dirty pages are re-hashed. Returns the bytes written.
///
/// The caller keeps the VM paused, and resets the bitmaps only once the snapshot is complete,
/// so that a failed attempt loses no dirty page.
pub fn save_dirty(
    mem: &GuestMemory,
    file: &File,
    mut digest: Option<(&Key, &mut MemoryDigest)>,
) -> Result<u64, MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let found = file.metadata()?.len();
    if found == 0 {
        file.set_len(total)?;
    } else if found != total {
        return Err(MemoryFileError::Base {
            needed: total,
            found,
        });
    }
    // The runs to write, found before anything is written.
    let mut runs = Vec::new();
    for (region, info) in mem.iter().zip(layout(mem)) {
        let dirty = dirty_pages(region);
        let mut start = None;
        for (p, d) in dirty.iter().chain(std::iter::once(&false)).enumerate() {
            match (*d, start) {
                (true, None) => start = Some(p),
                (false, Some(s)) => {
                    runs.push((region, info.file_offset, s * PAGE, p * PAGE));
                    start = None;
                }
                _ => {}
            }
        }
    }
    // Reserve the blocks first: a full file system fails here, before the file changes.
    for (region, file_offset, from, to) in &runs {
        let to = (*to).min(region.len() as usize);
        reserve(file, file_offset + *from as u64, (to - from) as u64)?;
    }
    let mut written = 0u64;
    let mut rehash = std::collections::BTreeSet::new();
    for (region, file_offset, from, to) in &runs {
        // SAFETY: `mem` keeps the region mapped; the VM is paused (this function's contract).
        let bytes = unsafe { region_bytes(region)? };
        let to = (*to).min(bytes.len());
        file.write_all_at(&bytes[*from..to], file_offset + *from as u64)?;
        written += (to - from) as u64;
        let first = (file_offset + *from as u64) / CHUNK;
        let last = (file_offset + to as u64 - 1) / CHUNK;
        rehash.extend(first..=last);
    }
    if let Some((key, d)) = digest.as_mut() {
        for (region, info) in mem.iter().zip(layout(mem)) {
            // SAFETY: as above.
            let bytes = unsafe { region_bytes(region)? };
            let first = info.file_offset / CHUNK;
            for index in rehash.range(first..first + info.size.div_ceil(CHUNK)) {
                let off = ((index - first) * CHUNK) as usize;
                let end = (off + CHUNK as usize).min(bytes.len());
                d.set(*index, chunk_digest(key, *index, Some(&bytes[off..end])));
            }
        }
    }
    Ok(written)
}

/// Reserves the blocks of `len` bytes at `offset` (`fallocate(KEEP_SIZE)`), where the file
/// system supports it.
fn reserve(file: &File, offset: u64, len: u64) -> io::Result<()> {
    let (Ok(off), Ok(len)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(());
    };
    // SAFETY: fallocate on a file descriptor `file` owns; no memory is passed.
    let r = unsafe { libc::fallocate(file.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, off, len) };
    if r != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
            return Err(e);
        }
    }
    Ok(())
}

/// The chunk digests of guest memory as it is now (for a Diff with a key and no earlier
/// digest in this process).
pub fn digest_of(mem: &GuestMemory, key: &Key) -> Result<MemoryDigest, MemoryFileError> {
    let total: u64 = mem.iter().map(|r| r.len()).sum();
    let mut digest = MemoryDigest::zeroed(key, total);
    let mut flags = Vec::new();
    for (region, info) in mem.iter().zip(layout(mem)) {
        // SAFETY: `mem` keeps the region mapped; the VM is paused.
        let bytes = unsafe { region_bytes(region)? };
        let anonymous = region.file_offset().is_none();
        for (c, chunk) in bytes.chunks(CHUNK as usize).enumerate() {
            if anonymous {
                resident(chunk.as_ptr().cast_mut(), chunk.len(), &mut flags)?;
                if flags.iter().all(|f| f & 1 == 0) {
                    continue;
                }
            }
            let index = info.file_offset / CHUNK + c as u64;
            digest.set(index, chunk_digest(key, index, Some(chunk)));
        }
    }
    Ok(digest)
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

/// The `File` backend of a load: opens the memory file at `path`, checks it against the
/// state's keyed digest when there is a key (returning its chunk digests), and maps it.
pub fn load(
    path: &str,
    state: &super::MicrovmState,
    key: Option<&Key>,
) -> Result<(GuestMemory, Option<MemoryDigest>), super::SnapshotError> {
    let err = |source| super::SnapshotError::Memory {
        path: path.to_string(),
        source,
    };
    let file = File::open(path).map_err(|e| err(MemoryFileError::Io(e)))?;
    let mut digest = None;
    if let (Some(k), Some(want)) = (key, state.memory_digest) {
        let len = state.memory.iter().map(|r| r.size).sum();
        let got = MemoryDigest::of_file(&file, len, k).map_err(|e| err(MemoryFileError::Io(e)))?;
        if blake3::Hash::from(got.total(k)) != blake3::Hash::from(want) {
            return Err(super::SnapshotError::MemoryDigest(path.to_string()));
        }
        digest = Some(got);
    }
    let memory = map(&file, &state.memory).map_err(err)?;
    Ok((memory, digest))
}

/// Maps `file` as guest memory laid out as `regions`: private, so the guest's writes stay
/// in this process and the file is never changed; with dirty-page bitmaps.
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
        let region = MmapRegionBuilder::new_with_bitmap(size, new_bitmap(size))
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
    use std::ops::Deref;
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
        let (written, _) = save(&mem, &file, None, false).unwrap();
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

    /// Every byte of guest memory, read through vm-memory (the oracle a file is compared with).
    fn contents(mem: &GuestMemory) -> Vec<u8> {
        let mut out = Vec::new();
        for r in mem.iter() {
            let mut buf = vec![0u8; r.len() as usize];
            mem.read_slice(&mut buf, r.start_addr()).unwrap();
            out.extend(buf);
        }
        out
    }

    fn file_contents(file: &File) -> Vec<u8> {
        let mut buf = vec![0u8; file.metadata().unwrap().len() as usize];
        file.read_exact_at(&mut buf, 0).unwrap();
        buf
    }

    fn clear_bitmaps(mem: &GuestMemory) {
        for r in mem.iter() {
            r.deref().bitmap().reset();
        }
    }

    #[test]
    fn a_diff_merges_the_dirty_pages_onto_the_base_and_keeps_the_digest_right() {
        let key = [9u8; 32];
        let mem = create_guest_memory(8).unwrap();
        mem.write_obj(0x1111_u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0x2222_u64, GuestAddress(0x40_0000)).unwrap();
        let (base, path) = scratch("diff-base");
        let (_, full) = save(&mem, &base, Some(&key), false).unwrap();
        let mut digest = full.unwrap();
        assert_eq!(
            digest.total(&key),
            MemoryDigest::of_file(&base, 8 << 20, &key)
                .unwrap()
                .total(&key)
        );
        clear_bitmaps(&mem);
        // After the Full: one page changed, one zeroed, one new (across a chunk boundary).
        mem.write_obj(0x3333_u64, GuestAddress(0x1000)).unwrap();
        mem.write_obj(0_u64, GuestAddress(0x40_0000)).unwrap();
        mem.write_slice(&[0xab; 8192], GuestAddress(0x1f_f000))
            .unwrap();
        let written = save_dirty(&mem, &base, Some((&key, &mut digest))).unwrap();
        assert_eq!(written, 4 * PAGE as u64, "the four dirty pages only");
        assert!(
            file_contents(&base) == contents(&mem),
            "merged file == memory"
        );
        // The incrementally kept digest is the file's, recomputed from scratch.
        assert_eq!(
            digest.total(&key),
            MemoryDigest::of_file(&base, 8 << 20, &key)
                .unwrap()
                .total(&key)
        );
        assert_eq!(digest, digest_of(&mem, &key).unwrap());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_diff_into_a_new_file_holds_only_the_dirty_pages_zero_or_not() {
        let mem = create_guest_memory(8).unwrap();
        mem.write_obj(0x1111_u64, GuestAddress(0x1000)).unwrap();
        clear_bitmaps(&mem);
        mem.write_obj(0x7777_u64, GuestAddress(0x3000)).unwrap();
        mem.write_obj(0_u64, GuestAddress(0x5000)).unwrap();
        let (layer, path) = scratch("diff-layer");
        let written = save_dirty(&mem, &layer, None).unwrap();
        assert_eq!(written, 2 * PAGE as u64);
        assert_eq!(layer.metadata().unwrap().len(), 8 << 20);
        let bytes = file_contents(&layer);
        // Page 0x1000 was not dirty: absent from the layer although the guest has data there.
        assert!(bytes[0x1000..0x2000].iter().all(|b| *b == 0));
        assert_eq!(&bytes[0x3000..0x3008], &0x7777_u64.to_le_bytes());
        // The zeroed dirty page is data in the file (so a merge overwrites its base), not a hole.
        // SAFETY: lseek on an fd the test owns.
        let data = unsafe { libc::lseek(layer.as_raw_fd(), 0x4000, libc::SEEK_DATA) };
        assert_eq!(data, 0x5000);
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_diff_refuses_a_base_of_another_size_and_writes_nothing() {
        let mem = create_guest_memory(8).unwrap();
        mem.write_obj(1_u64, GuestAddress(0x1000)).unwrap();
        let (base, path) = scratch("diff-short");
        base.set_len(4 << 20).unwrap();
        assert!(matches!(
            save_dirty(&mem, &base, None),
            Err(MemoryFileError::Base { .. })
        ));
        assert!(file_contents(&base).iter().all(|b| *b == 0));
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn a_diff_above_the_mmio_gap_lands_at_the_high_regions_file_offset() {
        // 3 GiB below the gap, 16 MiB from 4 GiB up (reserved, never touched but these pages).
        let mem = create_guest_memory(3072 + 16).unwrap();
        assert_eq!(mem.num_regions(), 2);
        clear_bitmaps(&mem);
        mem.write_obj(0x4141_u64, GuestAddress((4 << 30) + 0x2000))
            .unwrap();
        mem.write_obj(0x4242_u64, GuestAddress((3 << 30) - 0x1000))
            .unwrap();
        let (layer, path) = scratch("diff-gap");
        assert_eq!(save_dirty(&mem, &layer, None).unwrap(), 2 * PAGE as u64);
        let mut b = [0u8; 8];
        layer.read_exact_at(&mut b, (3 << 30) + 0x2000).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x4141);
        layer.read_exact_at(&mut b, (3 << 30) - 0x1000).unwrap();
        assert_eq!(u64::from_le_bytes(b), 0x4242);
        std::fs::remove_file(&path).unwrap();
    }
}
