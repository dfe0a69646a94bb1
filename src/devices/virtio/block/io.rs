//! What a request asks of the backing file, whichever engine serves it, and the one place
//! where data the host kernel wrote straight into guest memory is accounted.

use crate::devices::virtio::queue::{Buffer, HostBuffer};
use crate::vstate::memory::GuestMemory;

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
/// dirty-page tracking sees it.
pub fn guest_written(mem: &GuestMemory, bufs: &[Buffer]) {
    // Guest memory has no dirty bitmap yet: nothing to record. Diff snapshots will mark
    // each buffer here (`crate::vstate::memory::mark_dirty`).
    let _ = (mem, bufs);
}
