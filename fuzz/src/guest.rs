//! Guest memory for the device targets: one small region, snapshots of it, and the check
//! that a device changed nothing outside the ranges it was allowed to write.

use std::cell::RefCell;

use kiln::vstate::memory::{GuestMemory, anonymous_memory};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM of the device targets: 256 KiB from address 0 (the start of kiln's layout),
/// small enough that a whole-memory snapshot is cheap.
pub const MEM_SIZE: u64 = 256 << 10;

thread_local! {
    // With dirty-page tracking: the devices' marking of the buffers they hand the host
    // kernel runs under the fuzzer too.
    static MEMORY: GuestMemory =
        anonymous_memory(&[(GuestAddress(0), MEM_SIZE as usize)], true)
            .expect("256 KiB of guest memory");
}

/// Guest memory, all zeros (one mapping per thread, cleared for each input).
pub fn memory() -> GuestMemory {
    MEMORY.with(|m| {
        static ZEROS: [u8; MEM_SIZE as usize] = [0; MEM_SIZE as usize];
        m.write_slice(&ZEROS, GuestAddress(0))
            .expect("guest memory is writable");
        m.clone()
    })
}

/// Half-open guest-physical ranges `[start, end)`.
#[derive(Clone, Debug, Default)]
pub struct Ranges(Vec<(u64, u64)>);

impl Ranges {
    /// Adds `[addr, addr + len)` (clipped to the address space).
    pub fn add(&mut self, addr: u64, len: u64) {
        if len > 0 {
            self.0.push((addr, addr.saturating_add(len)));
        }
    }

    /// Whether `[start, end)` lies inside the union of the ranges.
    pub fn covers(&self, start: u64, end: u64) -> bool {
        let mut v = self.0.clone();
        v.sort_unstable();
        let mut at = start;
        for (s, e) in v {
            if s > at {
                break;
            }
            if e > at {
                at = e;
            }
            if at >= end {
                return true;
            }
        }
        at >= end
    }

    /// Whether any range intersects `[start, end)`.
    pub fn touches(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| s < end && start < e)
    }
}

/// `(addr, len)` pairs, as [`Ranges::add`] takes them (so the mock driver's
/// `QueueLayout::used_writes` fills a `Ranges`).
impl Extend<(u64, u64)> for Ranges {
    fn extend<I: IntoIterator<Item = (u64, u64)>>(&mut self, iter: I) {
        for (addr, len) in iter {
            self.add(addr, len);
        }
    }
}

thread_local! {
    static BEFORE: RefCell<Vec<u8>> = RefCell::new(vec![0; MEM_SIZE as usize]);
    static AFTER: RefCell<Vec<u8>> = RefCell::new(vec![0; MEM_SIZE as usize]);
}

/// Takes a snapshot of guest memory (kept per thread, reused).
pub fn snapshot(mem: &GuestMemory) {
    BEFORE.with(|b| {
        mem.read_slice(&mut b.borrow_mut(), GuestAddress(0))
            .expect("guest memory is readable")
    });
}

/// The byte ranges that changed since [`snapshot`].
pub fn changes(mem: &GuestMemory) -> Vec<(u64, u64)> {
    AFTER.with(|a| {
        let mut a = a.borrow_mut();
        mem.read_slice(&mut a, GuestAddress(0))
            .expect("guest memory is readable");
        BEFORE.with(|b| {
            let b = b.borrow();
            let mut out: Vec<(u64, u64)> = Vec::new();
            const CHUNK: usize = 4096;
            for (i, (x, y)) in b.chunks(CHUNK).zip(a.chunks(CHUNK)).enumerate() {
                if x == y {
                    continue;
                }
                for (j, (p, q)) in x.iter().zip(y).enumerate() {
                    if p != q {
                        let at = (i * CHUNK + j) as u64;
                        match out.last_mut() {
                            Some(last) if last.1 == at => last.1 = at + 1,
                            _ => out.push((at, at + 1)),
                        }
                    }
                }
            }
            out
        })
    })
}

/// Panics if anything changed outside `allowed` since [`snapshot`].
pub fn assert_writes_within(mem: &GuestMemory, allowed: &Ranges, what: &str) {
    for (s, e) in changes(mem) {
        assert!(
            allowed.covers(s, e),
            "{what}: guest memory {s:#x}..{e:#x} changed outside the device-writable buffers and rings (allowed: {allowed:x?})"
        );
    }
}

/// A memfd holding `contents`.
pub fn memfd(contents: &[u8]) -> std::fs::File {
    use std::io::Write;
    // SAFETY: memfd_create with a static NUL-terminated name; the fd is owned below.
    let fd = unsafe { libc::memfd_create(c"kiln-fuzz".as_ptr(), libc::MFD_CLOEXEC) };
    assert!(fd >= 0, "memfd_create: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let mut f = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    f.write_all(contents).expect("write to a memfd");
    f
}

/// The whole contents of a file, read at offset 0.
pub fn file_bytes(f: &std::fs::File) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let len = f.metadata().map(|m| m.len()).unwrap_or(0) as usize;
    let mut v = vec![0u8; len];
    let n = f.read_at(&mut v, 0).unwrap_or(0);
    v.truncate(n);
    v
}
