//! What a request asks of the backing file, whichever engine serves it, and the one place
//! where data the host kernel wrote straight into guest memory is accounted.

use crate::devices::virtio::queue::{Buffer, HostBuffer};
use crate::vstate::memory::{GuestMemory, mark_dirty};

/// The file operation of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IoKind {
    /// Read into the guest's buffers.
    Read,
    /// Write from the guest's buffers.
    Write,
    /// Make written data durable.
    Flush,
}

/// A validated transfer or flush: the range is inside the disk, the direction allowed, every
/// buffer inside guest memory.
#[derive(Debug)]
pub struct IoRequest {
    /// What to do.
    pub kind: IoKind,
    /// Byte offset in the file.
    pub offset: u64,
    /// The guest's data buffers (none for a flush).
    pub data: Vec<Buffer>,
    /// The same buffers as host pointers into guest memory.
    pub host: Vec<HostBuffer>,
    /// Bytes to transfer.
    pub len: u64,
}

/// The host kernel wrote into `bufs` of guest memory behind vm-memory's back (a `preadv` or
/// an io_uring read straight into guest buffers): every such write is accounted here, once
/// per completed read whatever its result (a failed read may have written part of them), so
/// a Diff snapshot saves those pages. (`queue::host_buffers` marks writable buffers when it
/// hands them out too; marking again on completion keeps an async read that finishes after
/// a dirty bitmap was taken from being missed.)
pub fn guest_written(mem: &GuestMemory, bufs: &[Buffer]) {
    for b in bufs {
        mark_dirty(mem, b.addr, b.len as usize);
    }
}
