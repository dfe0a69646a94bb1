//! Working sets (a kiln extension to snapshot loads): the pages a restored guest touched in
//! its first moments, recorded once, and faulted in before the vCPUs run on every later
//! restore from the same snapshot — one `MADV_POPULATE_READ` per run of pages instead of a
//! guest page fault, a host fault and a file read per page (REAP, FaaSnap).
//!
//! A page is "touched" when it is present in kiln's page tables for the guest mapping
//! (`/proc/self/pagemap`, bit 63): every page the guest (or a device) read or wrote, since
//! the memory file is mapped on demand.
//!
//! The file: a header, then the runs, then a BLAKE3 of everything before it, checked
//! before anything is parsed; each run must lie inside the snapshot's memory and follow
//! the one before it. It only ever makes kiln read its own memory file earlier, so a
//! wrong (but well-formed) file costs time, never correctness.
//!
//! ```text
//! offset  size        field
//!      0     8        magic "KILNWSET"
//!      8     4        version 1 (little endian)
//!     12     4        0
//!     16     8        number of runs N (little endian)
//!     24     16 × N   runs: first page, page count (u64 little endian each; pages of the
//!                     memory file, 4 KiB)
//!  24+16N    32       BLAKE3 of bytes 0 .. 24+16N
//! ```

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress};

use super::memory::layout;
use super::{SnapshotError, Staged};
use crate::rate_limiter::{Timer, now_ns};
use crate::vstate::memory::GuestMemory;

const MAGIC: [u8; 8] = *b"KILNWSET";
const VERSION: u32 = 1;
const HEADER: usize = 24;
const RUN: usize = 16;
const DIGEST: usize = 32;
const PAGE: u64 = 4096;
/// Pagemap entries read at a time.
const PAGEMAP_BATCH: usize = 4096;

/// Why a working-set file is refused or could not be made.
#[derive(Debug, thiserror::Error)]
pub enum WorkingSetError {
    /// Reading or writing failed.
    #[error("working set: {0}")]
    Io(#[from] io::Error),
    /// Not a working-set file this kiln reads.
    #[error("working set: not a kiln working-set file ({0})")]
    Format(&'static str),
    /// A run outside the snapshot's memory, or out of order.
    #[error(
        "working set: run {index} (pages {first}+{count}) is outside the snapshot's {pages} pages or out of order"
    )]
    Run {
        /// Which run.
        index: usize,
        /// Its first page.
        first: u64,
        /// Its length.
        count: u64,
        /// Pages in the memory file.
        pages: u64,
    },
}

/// Runs of pages of the memory file: (first page, count), sorted, not touching.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WorkingSet {
    runs: Vec<(u64, u64)>,
}

impl WorkingSet {
    /// The runs.
    pub fn runs(&self) -> &[(u64, u64)] {
        &self.runs
    }

    /// Pages in the set.
    pub fn pages(&self) -> u64 {
        self.runs.iter().map(|r| r.1).sum()
    }

    /// Builds a set from page numbers in increasing order.
    fn from_sorted_pages(pages: impl IntoIterator<Item = u64>) -> WorkingSet {
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for p in pages {
            match runs.last_mut() {
                Some((first, count)) if *first + *count == p => *count += 1,
                _ => runs.push((p, 1)),
            }
        }
        WorkingSet { runs }
    }

    /// The file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER + self.runs.len() * RUN + DIGEST);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (first, count) in &self.runs {
            out.extend_from_slice(&first.to_le_bytes());
            out.extend_from_slice(&count.to_le_bytes());
        }
        let digest = blake3::hash(&out);
        out.extend_from_slice(digest.as_bytes());
        out
    }

    /// Parses a file's bytes for a memory file of `pages` pages.
    pub fn decode(bytes: &[u8], pages: u64) -> Result<WorkingSet, WorkingSetError> {
        if bytes.len() < HEADER + DIGEST {
            return Err(WorkingSetError::Format("too short"));
        }
        let (body, digest) = bytes.split_at(bytes.len() - DIGEST);
        if blake3::hash(body) != blake3::Hash::from_slice(digest).unwrap_or(blake3::hash(b"")) {
            return Err(WorkingSetError::Format("checksum"));
        }
        if body[..8] != MAGIC {
            return Err(WorkingSetError::Format("magic"));
        }
        let u64_at = |at: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&body[at..at + 8]);
            u64::from_le_bytes(b)
        };
        let mut version = [0u8; 4];
        version.copy_from_slice(&body[8..12]);
        if u32::from_le_bytes(version) != VERSION || body[12..16] != [0; 4] {
            return Err(WorkingSetError::Format("version"));
        }
        let n = u64_at(16);
        let expected = u64::try_from(body.len() - HEADER).unwrap_or(u64::MAX) / RUN as u64;
        if n != expected || !(body.len() - HEADER).is_multiple_of(RUN) {
            return Err(WorkingSetError::Format("length"));
        }
        let mut runs = Vec::with_capacity(n as usize);
        let mut next = 0u64;
        for index in 0..n as usize {
            let (first, count) = (
                u64_at(HEADER + index * RUN),
                u64_at(HEADER + index * RUN + 8),
            );
            let end = first.checked_add(count);
            if count == 0 || first < next || end.is_none_or(|e| e > pages) {
                return Err(WorkingSetError::Run {
                    index,
                    first,
                    count,
                    pages,
                });
            }
            next = first + count;
            runs.push((first, count));
        }
        Ok(WorkingSet { runs })
    }

    /// Reads and checks the file at `path` for a memory file of `pages` pages.
    pub fn read(path: &Path, pages: u64) -> Result<WorkingSet, WorkingSetError> {
        use std::io::Read;
        // The largest file `pages` pages can need (every other page), plus one byte to see
        // an oversized file.
        let cap = (HEADER + DIGEST) as u64 + pages.div_ceil(2).saturating_mul(RUN as u64);
        let mut bytes = Vec::new();
        File::open(path)?
            .take(cap.saturating_add(1))
            .read_to_end(&mut bytes)?;
        if bytes.len() as u64 > cap {
            return Err(WorkingSetError::Format("too large"));
        }
        WorkingSet::decode(&bytes, pages)
    }

    /// The pages of `mem` present in this process's page tables (`pagemap`: an open
    /// `/proc/self/pagemap`), as pages of the memory file.
    pub fn record(mem: &GuestMemory, pagemap: &File) -> Result<WorkingSet, WorkingSetError> {
        let mut pages = Vec::new();
        let mut entries = vec![0u8; PAGEMAP_BATCH * 8];
        for (region, info) in mem.iter().zip(layout(mem)) {
            let host = region
                .get_host_address(MemoryRegionAddress(0))
                .map_err(|_| WorkingSetError::Format("unmapped region"))?
                as u64;
            let count = region.len() / PAGE;
            let mut done = 0u64;
            while done < count {
                let n = (count - done).min(PAGEMAP_BATCH as u64) as usize;
                let buf = &mut entries[..n * 8];
                read_at(pagemap, buf, (host / PAGE + done) * 8)?;
                for (i, e) in buf.chunks_exact(8).enumerate() {
                    let mut b = [0u8; 8];
                    b.copy_from_slice(e);
                    // Bit 63: present; bit 62: swapped (touched as well).
                    if u64::from_le_bytes(b) >> 62 != 0 {
                        pages.push(info.file_offset / PAGE + done + i as u64);
                    }
                }
                done += n as u64;
            }
        }
        Ok(WorkingSet::from_sorted_pages(pages))
    }

    /// Faults every page of the set into `mem` (a private mapping of the memory file): the
    /// reads of every run are started at once (`POSIX_FADV_WILLNEED`, so a cold page cache
    /// is filled by large reads in parallel), then each run is mapped with one
    /// `MADV_POPULATE_READ`. Returns the pages faulted in.
    pub fn prefault(&self, mem: &GuestMemory) -> Result<u64, WorkingSetError> {
        use std::os::fd::AsRawFd;
        let regions: Vec<_> = mem.iter().zip(layout(mem)).collect();
        if let Some(file) = regions.iter().find_map(|(r, _)| r.file_offset()) {
            for &(first, count) in &self.runs {
                let (Ok(off), Ok(len)) = (
                    libc::off_t::try_from(first * PAGE),
                    libc::off_t::try_from(count * PAGE),
                ) else {
                    continue;
                };
                // SAFETY: advice on a file descriptor the memory keeps open; no memory is
                // passed. A failure only loses the read-ahead.
                unsafe {
                    libc::posix_fadvise(
                        file.file().as_raw_fd(),
                        off,
                        len,
                        libc::POSIX_FADV_WILLNEED,
                    )
                };
            }
        }
        let mut faulted = 0;
        for &(first, count) in &self.runs {
            let (start, end) = (first * PAGE, (first + count) * PAGE);
            for (region, info) in &regions {
                let lo = start.max(info.file_offset);
                let hi = end.min(info.file_offset + info.size);
                if lo >= hi {
                    continue;
                }
                let host = region
                    .get_host_address(MemoryRegionAddress(lo - info.file_offset))
                    .map_err(|_| WorkingSetError::Format("unmapped region"))?;
                // SAFETY: `host .. host + (hi - lo)` lies inside the region's live mapping
                // (clipped to the region above); MADV_POPULATE_READ only reads it in.
                let rc = unsafe {
                    libc::madvise(host.cast(), (hi - lo) as usize, libc::MADV_POPULATE_READ)
                };
                if rc != 0 {
                    return Err(io::Error::last_os_error().into());
                }
                faulted += (hi - lo) / PAGE;
            }
        }
        Ok(faulted)
    }
}

/// Fills `buf` from `offset` of `file` with preadv(2): the call the VMM thread's seccomp
/// filter already allows (for virtio-blk), rather than widening it with pread64.
fn read_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let mut done = 0;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        let off = libc::off_t::try_from(offset + done as u64)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: one iovec describing the writable rest of `buf`; `file` is open.
        let n = unsafe { libc::preadv(file.as_raw_fd(), &iov, 1, off) };
        match n {
            n if n > 0 => done += n as usize,
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            _ => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
        }
    }
    Ok(())
}

/// Records a restored guest's working set once it has run for a while: armed when the
/// vCPUs start running, fired by the VMM's event loop.
#[derive(Debug)]
pub struct Recorder {
    path: PathBuf,
    after_ms: u64,
    pagemap: File,
    timer: Timer,
    armed: bool,
}

impl Recorder {
    /// A recorder writing to `path` `after_ms` after it is armed, and a descriptor of its
    /// timer for the event loop. Opens what it needs now (before the VMM thread's seccomp
    /// filter): `/proc/self/pagemap` and the timer.
    pub fn new(path: &Path, after_ms: u64) -> Result<(Recorder, OwnedFd), WorkingSetError> {
        let timer = Timer::new()?;
        let fd = timer.try_clone_fd()?;
        let recorder = Recorder {
            path: path.to_path_buf(),
            after_ms,
            pagemap: File::open("/proc/self/pagemap")?,
            timer,
            armed: false,
        };
        Ok((recorder, fd))
    }

    /// Starts the delay (once: a pause and resume does not restart it).
    pub fn arm(&mut self) {
        if self.armed {
            return;
        }
        let at = now_ns().saturating_add(self.after_ms.saturating_mul(1_000_000));
        match self.timer.arm_at(at.max(1)) {
            Ok(()) => self.armed = true,
            Err(e) => log::warn!("working set not recorded: cannot arm its timer: {e}"),
        }
    }

    /// Records the working set of `mem` into the file (written under a temporary name,
    /// synced, renamed into place). Returns the set.
    pub fn record(self, mem: &GuestMemory) -> Result<WorkingSet, WorkingSetError> {
        let ws = WorkingSet::record(mem, &self.pagemap)?;
        let staged = Staged::create(&self.path).map_err(staged_err)?;
        (&staged.file).write_all(&ws.encode())?;
        staged.commit().map_err(staged_err)?;
        Ok(ws)
    }
}

fn staged_err(e: SnapshotError) -> WorkingSetError {
    match e {
        SnapshotError::File { source, .. } => WorkingSetError::Io(source),
        _ => WorkingSetError::Format("cannot write the file"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn a_file_round_trips_and_any_damage_is_refused() {
        let ws = WorkingSet::from_sorted_pages([0, 1, 2, 7, 9, 10]);
        assert_eq!(ws.runs(), &[(0, 3), (7, 1), (9, 2)]);
        let bytes = ws.encode();
        assert_eq!(WorkingSet::decode(&bytes, 11).unwrap(), ws);
        // A run past the end of the memory.
        assert!(matches!(
            WorkingSet::decode(&bytes, 10),
            Err(WorkingSetError::Run { index: 2, .. })
        ));
        // Every truncation and every flipped bit.
        for n in 0..bytes.len() {
            assert!(WorkingSet::decode(&bytes[..n], 11).is_err(), "{n} bytes");
        }
        for i in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[i / 8] ^= 1 << (i % 8);
            assert!(WorkingSet::decode(&b, 11).is_err(), "bit {i}");
        }
        // Overlapping or unordered runs, well sealed, are refused too.
        let bad = WorkingSet {
            runs: vec![(5, 3), (6, 1)],
        };
        assert!(WorkingSet::decode(&bad.encode(), 100).is_err());
        let empty = WorkingSet { runs: vec![(5, 0)] };
        assert!(WorkingSet::decode(&empty.encode(), 100).is_err());
    }

    #[test]
    fn recording_sees_exactly_the_touched_pages_and_prefault_brings_them_back() {
        let mem = create_guest_memory(8).unwrap();
        for page in [3u64, 4, 5, 200, 2047] {
            mem.write_obj(1u8, GuestAddress(page * PAGE)).unwrap();
        }
        let pagemap = File::open("/proc/self/pagemap").unwrap();
        let ws = WorkingSet::record(&mem, &pagemap).unwrap();
        assert_eq!(ws.runs(), &[(3, 3), (200, 1), (2047, 1)]);
        // Prefaulting into fresh memory makes those pages (and only those) present.
        let fresh = create_guest_memory(8).unwrap();
        assert_eq!(ws.prefault(&fresh).unwrap(), 5);
        assert_eq!(WorkingSet::record(&fresh, &pagemap).unwrap(), ws);
    }
}
