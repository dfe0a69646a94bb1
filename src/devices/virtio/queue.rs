//! Split virtqueues. Ring handling (available and used rings, notification suppression) is
//! virtio-queue's `Queue`; walking a descriptor chain is done here, so every way a guest can
//! break a chain — loops, `next` past the table, lengths past 4 GiB, buffers outside RAM,
//! unnegotiated or nested indirect tables — is a distinct, countable error instead of a
//! silently shortened chain.

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use crate::vstate::memory::{GuestMemory, mark_dirty};

/// Size of a split-ring descriptor.
const DESC_SIZE: u64 = 16;
/// Largest indirect table kiln follows (entries).
pub const MAX_INDIRECT_ENTRIES: u32 = 4096;

/// One buffer of a chain, checked to lie inside one guest memory region.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// Guest-physical address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub writable: bool,
}

/// A guest buffer as the host sees it: a pointer into a guest memory mapping. Laid out
/// exactly as `struct iovec` (a pointer, then a length), so that a slice of them goes to
/// readv/writev as it is ([`HostBuffer::as_iovecs`]), with nothing allocated per request.
#[derive(Clone, Copy, Debug)]
#[repr(C)]
pub struct HostBuffer {
    /// Host address (inside a guest memory mapping).
    pub ptr: *mut u8,
    /// Length in bytes.
    pub len: usize,
}

const _: () = {
    use std::mem::{align_of, offset_of, size_of};
    assert!(size_of::<HostBuffer>() == size_of::<libc::iovec>());
    assert!(align_of::<HostBuffer>() == align_of::<libc::iovec>());
    assert!(offset_of!(HostBuffer, ptr) == offset_of!(libc::iovec, iov_base));
    assert!(offset_of!(HostBuffer, len) == offset_of!(libc::iovec, iov_len));
};

impl HostBuffer {
    /// The same buffers as iovecs, without a copy.
    pub fn as_iovecs(bufs: &[HostBuffer]) -> &[libc::iovec] {
        // SAFETY: HostBuffer is repr(C) with iovec's size, alignment and field offsets
        // (checked at compile time above), and a `*mut u8` and a `*mut c_void` share one
        // representation, so every HostBuffer is a valid iovec. The slice borrows `bufs`.
        unsafe { std::slice::from_raw_parts(bufs.as_ptr().cast::<libc::iovec>(), bufs.len()) }
    }
}

/// Resolves walked guest buffers to host buffers (each lies inside one region, which
/// `walk_chain` checked). Empty buffers carry nothing and are left out (their address is
/// not checked by the walk). The host kernel writes device-writable buffers behind
/// vm-memory's back, so they are marked dirty here, where they are handed out (a buffer
/// that ends up not written is merely saved once more by the next Diff snapshot).
pub fn host_buffers(mem: &GuestMemory, bufs: &[Buffer]) -> Option<Vec<HostBuffer>> {
    let mut out = Vec::with_capacity(bufs.len());
    host_buffers_into(mem, bufs, &mut out).then_some(out)
}

/// Host buffers a device keeps from one request to the next, so that resolving a request's
/// buffers allocates nothing.
#[derive(Debug, Default)]
pub struct HostScratch(Vec<HostBuffer>);

// SAFETY: the pointers are host addresses of guest memory, which is mapped for the VM's whole
// life and shared by every thread of the VMM; the vector is only used by its owner, which
// refills it before every use.
unsafe impl Send for HostScratch {}

impl HostScratch {
    /// [`host_buffers`] of `bufs` (one chain's, or several chains' in a row), in this vector;
    /// `None` if a buffer has no host address.
    pub fn fill<'a>(
        &mut self,
        mem: &GuestMemory,
        bufs: impl IntoIterator<Item = &'a Buffer>,
    ) -> Option<&[HostBuffer]> {
        host_buffers_into(mem, bufs, &mut self.0).then_some(&self.0)
    }

    /// The buffers of the last successful [`HostScratch::fill`].
    pub fn filled(&self) -> &[HostBuffer] {
        &self.0
    }
}

/// [`host_buffers`] into `out` (cleared first); false if a buffer has no host address.
fn host_buffers_into<'a>(
    mem: &GuestMemory,
    bufs: impl IntoIterator<Item = &'a Buffer>,
    out: &mut Vec<HostBuffer>,
) -> bool {
    out.clear();
    for b in bufs.into_iter().filter(|b| b.len > 0) {
        let Ok(ptr) = mem.get_host_address(b.addr) else {
            return false;
        };
        if b.writable {
            mark_dirty(mem, b.addr, b.len as usize);
        }
        out.push(HostBuffer {
            ptr,
            len: b.len as usize,
        });
    }
    true
}

/// Total bytes of `bufs`.
pub fn total_len(bufs: &[Buffer]) -> u64 {
    bufs.iter().map(|b| u64::from(b.len)).sum()
}

/// Copies between `data` and byte `offset` of the stream the buffers form; returns the
/// bytes copied (fewer if the buffers end first).
fn copy_stream(
    bufs: &[Buffer],
    offset: u64,
    len: usize,
    mut each: impl FnMut(GuestAddress, std::ops::Range<usize>) -> bool,
) -> usize {
    let mut pos = 0u64;
    let mut done = 0usize;
    for b in bufs {
        if done == len {
            break;
        }
        let (start, end) = (pos, pos + u64::from(b.len));
        pos = end;
        let at = offset + done as u64;
        if at >= end || at < start {
            continue;
        }
        let n = ((end - at) as usize).min(len - done);
        if !each(GuestAddress(b.addr.0 + (at - start)), done..done + n) {
            break;
        }
        done += n;
    }
    done
}

/// Writes `data` at byte `offset` of the stream the buffers form; returns the bytes written.
pub fn write_stream(mem: &GuestMemory, bufs: &[Buffer], offset: u64, data: &[u8]) -> usize {
    copy_stream(bufs, offset, data.len(), |addr, r| {
        mem.write_slice(&data[r], addr).is_ok()
    })
}

/// Reads into `out` from byte `offset` of the stream the buffers form; returns the bytes read.
pub fn read_stream(mem: &GuestMemory, bufs: &[Buffer], offset: u64, out: &mut [u8]) -> usize {
    let len = out.len();
    copy_stream(bufs, offset, len, |addr, r| {
        mem.read_slice(&mut out[r], addr).is_ok()
    })
}

/// Why a chain was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The head index from the available ring is not a descriptor.
    #[error("head {0} is outside the descriptor table")]
    HeadOutOfRange(u16),
    /// A `next` index is not a descriptor.
    #[error("next index {0} is outside the descriptor table")]
    NextOutOfRange(u16),
    /// More descriptors than the table holds: the chain loops.
    #[error("the chain loops")]
    Loop,
    /// The buffers add up to more than 4 GiB.
    #[error("the chain is longer than 4 GiB")]
    TooLong,
    /// A buffer is not inside guest RAM (or crosses a hole).
    #[error("buffer {addr:#x}+{len:#x} is outside guest RAM")]
    BadBuffer {
        /// Its address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A descriptor could not be read.
    #[error("descriptor at {0:#x} is outside guest RAM")]
    Unreadable(u64),
    /// An indirect descriptor although the feature was not negotiated.
    #[error("indirect descriptor without VIRTIO_RING_F_INDIRECT_DESC")]
    IndirectNotNegotiated,
    /// A malformed indirect descriptor (nested, chained, empty, misaligned or too large).
    #[error("invalid indirect descriptor table")]
    BadIndirect,
}

/// Walks the chain starting at `head` of `queue`, appending its buffers to `out`.
pub fn walk_chain(
    mem: &GuestMemory,
    queue: &Queue,
    head: u16,
    indirect_allowed: bool,
    out: &mut Vec<Buffer>,
) -> Result<(), ChainError> {
    let mut table = GuestAddress(queue.desc_table());
    let mut size = u32::from(queue.size());
    if u32::from(head) >= size {
        return Err(ChainError::HeadOutOfRange(head));
    }
    let mut index = u32::from(head);
    let mut budget = size;
    let mut indirect = false;
    let mut total: u32 = 0;
    loop {
        if budget == 0 {
            return Err(ChainError::Loop);
        }
        budget -= 1;
        let at = table
            .checked_add(u64::from(index) * DESC_SIZE)
            .ok_or(ChainError::Unreadable(table.raw_value()))?;
        let desc: Descriptor = mem
            .read_obj(at)
            .map_err(|_| ChainError::Unreadable(at.raw_value()))?;

        if desc.refers_to_indirect_table() {
            if !indirect_allowed {
                return Err(ChainError::IndirectNotNegotiated);
            }
            let entries = desc.len() / DESC_SIZE as u32;
            if indirect
                || desc.has_next()
                || desc.len() == 0
                || u64::from(desc.len()) % DESC_SIZE != 0
                || entries > MAX_INDIRECT_ENTRIES
                || !mem.check_range(desc.addr(), desc.len() as usize)
            {
                return Err(ChainError::BadIndirect);
            }
            table = desc.addr();
            size = entries;
            index = 0;
            budget = entries;
            indirect = true;
            continue;
        }

        total = total.checked_add(desc.len()).ok_or(ChainError::TooLong)?;
        if desc.len() > 0 && mem.get_slice(desc.addr(), desc.len() as usize).is_err() {
            return Err(ChainError::BadBuffer {
                addr: desc.addr().raw_value(),
                len: desc.len(),
            });
        }
        out.push(Buffer {
            addr: desc.addr(),
            len: desc.len(),
            writable: desc.is_write_only(),
        });
        if !desc.has_next() {
            return Ok(());
        }
        index = u32::from(desc.next());
        if index >= size {
            return Err(ChainError::NextOutOfRange(desc.next()));
        }
    }
}

/// Returns chain `head` to the driver with `len` bytes written. A head outside the queue
/// (from a corrupt available ring) has no used-ring slot: it is not returned, and virtio-queue
/// is not asked to (it would log every such attempt, letting a guest flood the log).
pub fn return_chain(queue: &mut Queue, mem: &GuestMemory, head: u16, len: u32) -> bool {
    head < queue.size() && queue.add_used(mem, head, len).is_ok()
}

/// Errors reading the available ring.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RingError {
    /// `avail.idx` moved further than the queue size since the last look: the driver is
    /// broken or hostile.
    #[error("the available index jumped ahead by more than the queue size")]
    AvailIndexJump,
    /// The ring could not be read.
    #[error("the available ring cannot be read: {0}")]
    Unreadable(String),
}

/// Takes the next available head, if any.
pub fn pop_head(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<u16>, RingError> {
    match queue.iter(mem) {
        Ok(mut iter) => Ok(iter.next().map(|chain| chain.head_index())),
        Err(virtio_queue::Error::InvalidAvailRingIndex) => Err(RingError::AvailIndexJump),
        Err(e) => Err(RingError::Unreadable(e.to_string())),
    }
}

/// A queue of `size` entries configured at the given addresses and made ready, as a driver
/// would; used by the transport at activation and by tests.
pub fn configured_queue(
    max_size: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
) -> Result<Queue, virtio_queue::Error> {
    let mut q = Queue::new(max_size)?;
    q.try_set_size(size)?;
    q.try_set_desc_table_address(GuestAddress(desc))?;
    q.try_set_avail_ring_address(GuestAddress(avail))?;
    q.try_set_used_ring_address(GuestAddress(used))?;
    q.set_ready(true);
    Ok(q)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::devices::virtio::mock::{F_INDIRECT, F_NEXT, F_WRITE, write_desc};
    use crate::vstate::memory::create_guest_memory;

    pub(crate) const DESC: u64 = 0x1000;
    pub(crate) const AVAIL: u64 = 0x2000;
    pub(crate) const USED: u64 = 0x3000;

    fn setup() -> (GuestMemory, Queue) {
        let mem = create_guest_memory(16).unwrap();
        let q = configured_queue(16, 16, DESC, AVAIL, USED).unwrap();
        (mem, q)
    }

    fn walk(
        mem: &GuestMemory,
        q: &Queue,
        head: u16,
        indirect: bool,
    ) -> Result<Vec<Buffer>, ChainError> {
        let mut v = Vec::new();
        walk_chain(mem, q, head, indirect, &mut v).map(|()| v)
    }

    #[test]
    fn simple_chain() {
        let (mem, q) = setup();
        write_desc(&mem, DESC, 0, (0x10000, 16, F_NEXT, 5));
        write_desc(&mem, DESC, 5, (0x11000, 512, F_NEXT | F_WRITE, 2));
        write_desc(&mem, DESC, 2, (0x12000, 1, F_WRITE, 0));
        let b = walk(&mem, &q, 0, false).unwrap();
        assert_eq!(b.len(), 3);
        assert_eq!(
            b[1],
            Buffer {
                addr: GuestAddress(0x11000),
                len: 512,
                writable: true
            }
        );
        assert!(!b[0].writable);
    }

    #[test]
    fn loops_and_bad_indices() {
        let (mem, q) = setup();
        write_desc(&mem, DESC, 0, (0x10000, 16, F_NEXT, 0));
        assert_eq!(walk(&mem, &q, 0, false), Err(ChainError::Loop));
        write_desc(&mem, DESC, 0, (0x10000, 16, F_NEXT, 1));
        write_desc(&mem, DESC, 1, (0x10000, 16, F_NEXT, 0));
        assert_eq!(walk(&mem, &q, 0, false), Err(ChainError::Loop));
        write_desc(&mem, DESC, 0, (0x10000, 16, F_NEXT, 16));
        assert_eq!(
            walk(&mem, &q, 0, false),
            Err(ChainError::NextOutOfRange(16))
        );
        assert_eq!(
            walk(&mem, &q, 16, false),
            Err(ChainError::HeadOutOfRange(16))
        );
        assert_eq!(
            walk(&mem, &q, u16::MAX, false),
            Err(ChainError::HeadOutOfRange(u16::MAX))
        );
    }

    #[test]
    fn lengths_past_4gib() {
        // Two 3 GiB buffers, each inside RAM, 6 GiB together.
        let mem = create_guest_memory(8192).unwrap();
        let q = configured_queue(16, 16, DESC, AVAIL, USED).unwrap();
        write_desc(&mem, DESC, 0, (0, 0xc000_0000, F_NEXT, 1));
        write_desc(&mem, DESC, 1, (0x1_0000_0000, 0xc000_0000, 0, 0));
        assert_eq!(walk(&mem, &q, 0, false), Err(ChainError::TooLong));
    }

    #[test]
    fn buffers_outside_ram() {
        let (mem, q) = setup();
        for (addr, len) in [
            (16 << 20, 1),
            ((16 << 20) - 1, 2),
            (u64::MAX, 1),
            (u64::MAX - 4, 16),
        ] {
            write_desc(&mem, DESC, 0, (addr, len, 0, 0));
            assert!(
                matches!(walk(&mem, &q, 0, false), Err(ChainError::BadBuffer { .. })),
                "{addr:#x}"
            );
        }
        // Zero-length buffers touch nothing.
        write_desc(&mem, DESC, 0, (u64::MAX, 0, 0, 0));
        assert_eq!(walk(&mem, &q, 0, false).unwrap().len(), 1);
    }

    #[test]
    fn buffer_crossing_the_mmio_gap() {
        let mem = create_guest_memory(4096).unwrap();
        let q = configured_queue(16, 16, DESC, AVAIL, USED).unwrap();
        write_desc(&mem, DESC, 0, (0xc000_0000 - 0x800, 0x1000, 0, 0));
        assert!(matches!(
            walk(&mem, &q, 0, false),
            Err(ChainError::BadBuffer { .. })
        ));
        write_desc(&mem, DESC, 0, (0x1_0000_0000, 0x1000, 0, 0));
        assert!(walk(&mem, &q, 0, false).is_ok());
    }

    #[test]
    fn descriptor_table_outside_ram() {
        let mem = create_guest_memory(16).unwrap();
        let q = configured_queue(16, 16, (16 << 20) - 32, AVAIL, USED).unwrap();
        assert!(matches!(
            walk(&mem, &q, 5, false),
            Err(ChainError::Unreadable(_))
        ));
    }

    #[test]
    fn indirect_tables() {
        let (mem, q) = setup();
        let table = 0x8000u64;
        write_desc(&mem, DESC, 3, (table, 3 * 16, F_INDIRECT, 0));
        write_desc(&mem, table, 0, (0x10000, 16, F_NEXT, 1));
        write_desc(&mem, table, 1, (0x11000, 4096, F_NEXT | F_WRITE, 2));
        write_desc(&mem, table, 2, (0x12000, 1, F_WRITE, 0));
        assert_eq!(
            walk(&mem, &q, 3, false),
            Err(ChainError::IndirectNotNegotiated)
        );
        assert_eq!(walk(&mem, &q, 3, true).unwrap().len(), 3);
        // Nested.
        write_desc(&mem, table, 2, (table, 16, F_INDIRECT, 0));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::BadIndirect));
        // Loop inside the table.
        write_desc(&mem, table, 2, (0x12000, 1, F_NEXT, 0));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::Loop));
        // Misaligned length, empty, chained.
        write_desc(&mem, DESC, 3, (table, 20, F_INDIRECT, 0));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::BadIndirect));
        write_desc(&mem, DESC, 3, (table, 0, F_INDIRECT, 0));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::BadIndirect));
        write_desc(&mem, DESC, 3, (table, 16, F_INDIRECT | F_NEXT, 4));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::BadIndirect));
        // Table outside RAM.
        write_desc(&mem, DESC, 3, (16 << 20, 16, F_INDIRECT, 0));
        assert_eq!(walk(&mem, &q, 3, true), Err(ChainError::BadIndirect));
    }

    #[test]
    fn stream_writes_span_buffers() {
        let (mem, _) = setup();
        let bufs = [
            Buffer {
                addr: GuestAddress(0x10000),
                len: 4,
                writable: true,
            },
            Buffer {
                addr: GuestAddress(0x20000),
                len: 4,
                writable: true,
            },
        ];
        assert_eq!(write_stream(&mem, &bufs, 2, &[1, 2, 3, 4]), 4);
        let mut a = [0u8; 4];
        mem.read_slice(&mut a, GuestAddress(0x10000)).unwrap();
        assert_eq!(a, [0, 0, 1, 2]);
        mem.read_slice(&mut a, GuestAddress(0x20000)).unwrap();
        assert_eq!(a, [3, 4, 0, 0]);
        assert_eq!(write_stream(&mem, &bufs, 7, &[9, 9, 9]), 1);
        assert_eq!(write_stream(&mem, &bufs, 8, &[9]), 0);
        let mut back = [0u8; 5];
        assert_eq!(read_stream(&mem, &bufs, 2, &mut back), 5);
        assert_eq!(back, [1, 2, 3, 4, 0]);
        assert_eq!(total_len(&bufs), 8);
    }

    #[test]
    fn avail_index_jump_is_an_error() {
        let (mem, mut q) = setup();
        assert_eq!(pop_head(&mut q, &mem), Ok(None));
        mem.write_obj(3u16, GuestAddress(AVAIL + 4)).unwrap();
        mem.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(pop_head(&mut q, &mem), Ok(Some(3)));
        assert_eq!(pop_head(&mut q, &mem), Ok(None));
        mem.write_obj(100u16, GuestAddress(AVAIL + 2)).unwrap();
        assert_eq!(pop_head(&mut q, &mem), Err(RingError::AvailIndexJump));
    }

    #[test]
    fn buffers_handed_to_the_host_kernel_for_writing_are_marked_dirty() {
        use std::ops::Deref;
        use vm_memory::bitmap::Bitmap;
        let mem = create_guest_memory(16).unwrap();
        let bufs = [
            Buffer {
                addr: GuestAddress(0x10_0000),
                len: 0x1800,
                writable: true,
            },
            Buffer {
                addr: GuestAddress(0x20_0000),
                len: 0x1000,
                writable: false,
            },
        ];
        assert_eq!(host_buffers(&mem, &bufs).unwrap().len(), 2);
        let region = mem.iter().next().unwrap();
        let bitmap = region.deref().bitmap();
        // The writable buffer's two pages, and nothing else.
        assert!(bitmap.dirty_at(0x10_0000) && bitmap.dirty_at(0x10_1000));
        assert!(!bitmap.dirty_at(0x10_2000));
        assert!(
            !bitmap.dirty_at(0x20_0000),
            "a device-readable buffer is not dirtied"
        );
    }

    #[test]
    fn a_reused_scratch_resolves_each_request_afresh_and_reads_as_iovecs() {
        let mem = create_guest_memory(16).unwrap();
        let buf = |addr: u64, len: u32| Buffer {
            addr: GuestAddress(addr),
            len,
            writable: false,
        };
        let mut scratch = HostScratch::default();
        let first = [buf(0x1000, 16), buf(0x3000, 0), buf(0x8000, 32)];
        assert_eq!(scratch.fill(&mem, &first).map(<[_]>::len), Some(2));
        let second = [buf(0x2000, 8)];
        let host = scratch.fill(&mem, &second).unwrap().to_vec();
        assert_eq!(host.len(), 1, "the first request's buffers are gone");
        // The iovecs the kernel gets: the guest address's host mapping, the same length.
        let iovs = HostBuffer::as_iovecs(&host);
        let want = mem.get_host_address(GuestAddress(0x2000)).unwrap();
        assert_eq!((iovs[0].iov_base.cast::<u8>(), iovs[0].iov_len), (want, 8));
        // A buffer outside guest memory fails the whole request.
        assert!(
            scratch
                .fill(&mem, &[buf(0x2000, 8), buf(1 << 40, 8)])
                .is_none()
        );
    }
}
