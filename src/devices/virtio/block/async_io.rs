//! The `Async` engine: requests go to an io_uring and are answered when their completions
//! come back, so the event loop never waits for the disk.
//!
//! - The ring is created on the drive's first transfer or flush (start-up and restores pay
//!   nothing for it), on the event thread, which alone submits and reaps. On a filesystem
//!   that may block the submitter even in a non-blocking attempt (FUSE, NFS, ...: see
//!   `disk.rs`) reads and writes go to the kernel's io-wq workers at once.
//! - Each request in flight holds a slot: its iovecs (alive until it completes), where its
//!   answer goes, and its parts — a chain of more than `IOV_MAX` buffers is several `READV`
//!   or `WRITEV` operations; a short transfer is resubmitted for what is left.
//! - A FLUSH is an `fdatasync` with `IOSQE_IO_DRAIN`: the kernel starts it only after every
//!   operation submitted before it has completed.
//! - A device reset leaves requests in flight as orphans: they finish into the buffers they
//!   were given, are accounted, and are never answered.
//! - Swapping the backing file retires the ring: it keeps serving what it has in flight,
//!   and a new ring is made for the new file on its first request.

use std::os::fd::AsRawFd;

use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskFile;
use super::io::{IoKind, IoRequest, guest_written};
use super::uring::{Op, Ring, UringError};
use crate::devices::virtio::queue::{Buffer, HostBuffer};
use crate::vstate::memory::GuestMemory;

/// Most iovecs one `READV`/`WRITEV` takes (`IOV_MAX`).
pub const IOV_MAX: usize = 1024;

/// Who gets the answer of a request: the device's business, carried through untouched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    /// The chain's head.
    pub head: u16,
    /// Where the status byte goes.
    pub status: GuestAddress,
    /// Data bytes the rate limiter charged at submission.
    pub charged: u64,
}

/// A request that has finished.
#[derive(Debug, PartialEq, Eq)]
pub struct Completed {
    /// Its token.
    pub token: Token,
    /// Its operation.
    pub kind: IoKind,
    /// Its data bytes.
    pub len: u64,
    /// `None` when every part succeeded, else the first error (`errno`).
    pub error: Option<i32>,
    /// The device was reset while it was in flight: it must not be answered.
    pub orphan: bool,
}

/// Why a request could not be submitted.
#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    /// No room now (ring or completion queue full): take the chain again once completions
    /// free some.
    #[error("the io_uring is full")]
    Busy,
    /// The ring could not be created.
    #[error(transparent)]
    Ring(#[from] UringError),
    /// The kernel refused the submission.
    #[error("cannot submit to the io_uring: {0}")]
    Submit(#[source] std::io::Error),
}

/// iovecs describing guest buffers.
struct Iovecs(Vec<libc::iovec>);

// SAFETY: the pointers are host addresses of guest memory, which is mapped for the VM's whole
// life and shared by every thread of the VMM; the vector is only used by its owner.
unsafe impl Send for Iovecs {}

/// One `READV`/`WRITEV`/`FSYNC` of a request: `iovs[first..end]` at `offset`, `left` bytes
/// still to transfer.
#[derive(Clone, Copy, Debug)]
struct Part {
    first: usize,
    end: usize,
    offset: u64,
    left: u64,
}

struct Slot {
    /// The ring (generation) its operations went to.
    ring: u32,
    token: Token,
    kind: IoKind,
    len: u64,
    data: Vec<Buffer>,
    iovs: Iovecs,
    parts: Vec<Part>,
    pending: usize,
    error: Option<i32>,
    orphan: bool,
}

/// The async engine of one drive.
pub struct AsyncEngine {
    completion: EventFd,
    /// The ring for the current backing file, once a request needed it.
    ring: Option<(u32, Ring)>,
    /// Rings of earlier backing files with requests still in flight.
    retiring: Vec<(u32, Ring)>,
    next_ring: u32,
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Guest memory (from the first activation; it never changes).
    mem: Option<GuestMemory>,
    /// A ring could not be created (logged once).
    setup_failed: bool,
}

impl std::fmt::Debug for AsyncEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AsyncEngine")
            .field("ring", &self.ring)
            .field("retiring", &self.retiring)
            .field("in_flight", &self.in_flight())
            .finish_non_exhaustive()
    }
}

fn user_data(slot: usize, part: usize) -> u64 {
    ((slot as u64) << 16) | part as u64
}

fn split_user_data(ud: u64) -> (usize, usize) {
    ((ud >> 16) as usize, (ud & 0xffff) as usize)
}

impl AsyncEngine {
    /// An engine with no ring yet.
    pub fn new() -> std::io::Result<AsyncEngine> {
        Ok(AsyncEngine {
            completion: EventFd::new(libc::EFD_NONBLOCK)?,
            ring: None,
            retiring: Vec::new(),
            next_ring: 0,
            slots: Vec::new(),
            free: Vec::new(),
            mem: None,
            setup_failed: false,
        })
    }

    /// The eventfd the rings signal when they post completions.
    pub fn completion_event(&self) -> &EventFd {
        &self.completion
    }

    /// Guest memory, for accounting reads (also those of orphans).
    pub fn set_memory(&mut self, mem: &GuestMemory) {
        if self.mem.is_none() {
            self.mem = Some(mem.clone());
        }
    }

    /// Requests in flight (orphans included).
    pub fn in_flight(&self) -> usize {
        self.slots.len() - self.free.len()
    }

    /// Whether a ring exists for the current file.
    pub fn has_ring(&self) -> bool {
        self.ring.is_some()
    }

    fn ring_for(&mut self, file: &DiskFile) -> Result<&mut (u32, Ring), UringError> {
        if self.ring.is_none() {
            let ring = Ring::new(
                file.as_raw_fd(),
                self.completion.as_raw_fd(),
                file.may_block(),
            )?;
            self.ring = Some((self.next_ring, ring));
            self.next_ring = self.next_ring.wrapping_add(1);
        }
        // Just set if it was not.
        self.ring.as_mut().ok_or(UringError::Missing)
    }

    /// Submits `req` for `file` (the current backing file). Nothing is handed to the kernel
    /// until [`AsyncEngine::flush_submissions`].
    pub fn submit(
        &mut self,
        file: &DiskFile,
        req: IoRequest,
        token: Token,
    ) -> Result<(), SubmitError> {
        let ring = match self.ring_for(file) {
            Ok(r) => r,
            Err(e) => {
                if !self.setup_failed {
                    self.setup_failed = true;
                    log::error!("the async block engine cannot create its io_uring: {e}");
                }
                return Err(e.into());
            }
        };
        let iovs = HostBuffer::as_iovecs(&req.host).to_vec();
        let mut parts = Vec::new();
        if req.kind == IoKind::Flush {
            parts.push(Part {
                first: 0,
                end: 0,
                offset: 0,
                left: 0,
            });
        } else {
            let mut offset = req.offset;
            for (i, chunk) in iovs.chunks(IOV_MAX).enumerate() {
                let left: u64 = chunk.iter().map(|v| v.iov_len as u64).sum();
                parts.push(Part {
                    first: i * IOV_MAX,
                    end: i * IOV_MAX + chunk.len(),
                    offset,
                    left,
                });
                offset += left;
            }
        }
        if ring.1.room() < parts.len() {
            return Err(SubmitError::Busy);
        }
        let ring_id = ring.0;
        let index = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        let slot = self.slots[index].insert(Slot {
            ring: ring_id,
            token,
            kind: req.kind,
            len: req.len,
            data: req.data,
            iovs: Iovecs(iovs),
            pending: parts.len(),
            parts,
            error: None,
            orphan: false,
        });
        let Some((_, ring)) = self.ring.as_mut() else {
            return Err(SubmitError::Busy);
        };
        for part in 0..slot.parts.len() {
            // SAFETY: the iovecs live in the slot until its last part completes, and
            // describe guest memory, mapped for the VM's life.
            if !unsafe { push_part(ring, slot, index, part) } {
                // Only a full submission queue the kernel would not take: nothing after
                // this part goes.
                slot.error = Some(libc::EAGAIN);
                slot.pending -= slot.parts.len() - part;
                break;
            }
        }
        if slot.pending == 0 {
            self.slots[index] = None;
            self.free.push(index);
            return Err(SubmitError::Busy);
        }
        Ok(())
    }

    /// Hands every queued operation to the kernel (one `io_uring_enter` per ring).
    pub fn flush_submissions(&mut self) -> Result<(), SubmitError> {
        let mut result = Ok(());
        for (_, ring) in self.ring.iter_mut().chain(self.retiring.iter_mut()) {
            if let Err(e) = ring.submit() {
                result = Err(SubmitError::Submit(e));
            }
        }
        result
    }

    /// Takes every completion there is; finished requests are appended to `out` (their
    /// reads accounted first). Short transfers are resubmitted.
    pub fn reap(&mut self, out: &mut Vec<Completed>) {
        let AsyncEngine {
            ring,
            retiring,
            slots,
            free,
            mem,
            ..
        } = self;
        for (id, ring) in ring.iter_mut().chain(retiring.iter_mut()) {
            while let Some((ud, res)) = ring.pop() {
                let (index, part) = split_user_data(ud);
                let Some(slot) = slots.get_mut(index).and_then(Option::as_mut) else {
                    continue;
                };
                if slot.ring != *id || part >= slot.parts.len() {
                    continue;
                }
                if !complete_part(ring, slot, index, part, res) {
                    continue;
                }
                let Some(slot) = slots[index].take() else {
                    continue;
                };
                free.push(index);
                if slot.kind == IoKind::Read
                    && let Some(mem) = mem.as_ref()
                {
                    guest_written(mem, &slot.data);
                }
                out.push(Completed {
                    token: slot.token,
                    kind: slot.kind,
                    len: slot.len,
                    error: slot.error,
                    orphan: slot.orphan,
                });
            }
        }
        // Resubmissions of short transfers.
        let _ = self.flush_submissions();
        self.retiring.retain(|(_, r)| r.in_flight() > 0);
    }

    /// Blocks until no request is in flight, appending each as it finishes to `out`.
    pub fn drain(&mut self, out: &mut Vec<Completed>) -> std::io::Result<()> {
        loop {
            self.reap(out);
            if self.in_flight() == 0 {
                return Ok(());
            }
            let busy = self
                .ring
                .iter_mut()
                .chain(self.retiring.iter_mut())
                .map(|(_, r)| r)
                .find(|r| r.in_flight() > 0);
            match busy {
                Some(ring) => ring.wait_one()?,
                // Slots without operations cannot happen; do not spin on them.
                None => return Ok(()),
            }
        }
    }

    /// The driver reset the device: every request in flight becomes an orphan, finished but
    /// never answered. Makes no system call (the reset comes from a vCPU thread).
    pub fn orphan_all(&mut self) {
        for slot in self.slots.iter_mut().flatten() {
            slot.orphan = true;
        }
    }

    /// The backing file changes: the current ring finishes what it has in flight, and the
    /// next request makes a ring for the new file.
    pub fn retire_ring(&mut self) {
        if let Some(ring) = self.ring.take()
            && ring.1.in_flight() > 0
        {
            self.retiring.push(ring);
        }
    }
}

/// Queues part `part` of `slot` (at `index`) on `ring`.
///
/// # Safety
/// The slot's iovecs must stay alive and unmoved until the part completes.
unsafe fn push_part(ring: &mut Ring, slot: &Slot, index: usize, part: usize) -> bool {
    let p = slot.parts[part];
    let iovs = &slot.iovs.0[p.first..p.end];
    let len = iovs.len() as u32;
    let op = match slot.kind {
        IoKind::Read => Op::Read {
            iov: iovs.as_ptr(),
            len,
            offset: p.offset,
        },
        IoKind::Write => Op::Write {
            iov: iovs.as_ptr(),
            len,
            offset: p.offset,
        },
        IoKind::Flush => Op::Flush,
    };
    // SAFETY: forwarded from the caller.
    unsafe { ring.push(op, user_data(index, part)) }
}

/// Applies a completion to part `part` of `slot`; true when the whole request is done.
fn complete_part(ring: &mut Ring, slot: &mut Slot, index: usize, part: usize, res: i32) -> bool {
    let p = &mut slot.parts[part];
    let done = match res {
        r if r < 0 => {
            slot.error.get_or_insert(-r);
            true
        }
        _ if slot.kind == IoKind::Flush => true,
        0 if p.left > 0 => {
            // End of file inside the capacity (the image shrank), or a write that made no
            // progress: never retried forever.
            slot.error.get_or_insert(libc::EIO);
            true
        }
        r => {
            let n = (r as u64).min(p.left);
            p.left -= n;
            if p.left == 0 {
                true
            } else {
                advance(&mut slot.iovs.0[p.first..p.end], &mut p.first, n);
                p.offset += n;
                // SAFETY: the slot keeps its iovecs until this part completes.
                if unsafe { push_part(ring, slot, index, part) } {
                    false
                } else {
                    slot.error.get_or_insert(libc::EAGAIN);
                    true
                }
            }
        }
    };
    if done {
        slot.pending -= 1;
    }
    slot.pending == 0
}

/// Drops the first `n` bytes of the iovecs starting at `*first` (the part's window).
fn advance(iovs: &mut [libc::iovec], first: &mut usize, mut n: u64) {
    let mut skipped = 0;
    for v in iovs.iter_mut() {
        if n == 0 {
            break;
        }
        let len = v.iov_len as u64;
        if n >= len {
            n -= len;
            skipped += 1;
        } else {
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n as usize).cast();
            v.iov_len -= n as usize;
            n = 0;
        }
    }
    *first += skipped;
}

impl Drop for AsyncEngine {
    fn drop(&mut self) {
        // The kernel must be done with guest memory before it can go away.
        for (_, ring) in self.ring.iter_mut().chain(self.retiring.iter_mut()) {
            if let Err(e) = ring.wait_all() {
                log::error!("a drive's io_uring did not finish its requests: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests;
