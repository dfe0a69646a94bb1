//! virtio-blk backed by a raw image file.
//!
//! - `disk.rs`: the backing file (open, lock, capacity, vectored I/O straight to and from
//!   guest memory, flush);
//! - `request.rs`: turning a descriptor chain into a request, whatever its framing;
//! - `device/`: the device (features, config space, activation, the queue loop, answers);
//! - `io.rs`: a request's file operation, whichever engine does it;
//! - `uring.rs`, `async_io.rs`: the `Async` engine (a locked-down io_uring per drive, the
//!   requests in flight on it);
//! - `event_handler.rs`: the event-loop glue.

mod async_io;
mod device;
pub(crate) mod disk;
mod event_handler;
mod io;
mod request;
pub mod uring;

pub use device::{Block, BlockConfig};
pub use disk::{DiskError, DiskFile};
pub use event_handler::BlockEvents;
pub use request::{Request, RequestError, RequestType};

use crate::devices::Counter;

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Bits to shift a byte count by to get sectors.
pub const SECTOR_SHIFT: u32 = 9;
/// Size of the queue kiln offers.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of the GET_ID answer.
pub const ID_BYTES: usize = 20;

/// Request status codes.
pub mod status {
    /// Success.
    pub const OK: u8 = 0;
    /// I/O error.
    pub const IOERR: u8 = 1;
    /// Unsupported request.
    pub const UNSUPP: u8 = 2;
}

/// virtio-blk feature bits kiln uses.
pub mod features {
    /// Maximum number of segments in a request (`seg_max` in config space).
    pub const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
    /// Read-only device.
    pub const VIRTIO_BLK_F_RO: u64 = 1 << 5;
    /// FLUSH is supported.
    pub const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
}

/// Per-drive counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct BlockMetrics {
    /// Queue notifications handled.
    pub queue_events: Counter,
    /// Successful reads.
    pub read_count: Counter,
    /// Bytes read.
    pub read_bytes: Counter,
    /// Successful writes.
    pub write_count: Counter,
    /// Bytes written.
    pub write_bytes: Counter,
    /// Successful flushes.
    pub flush_count: Counter,
    /// GET_ID requests.
    pub get_id_count: Counter,
    /// Requests answered IOERR because they were malformed (framing, range, direction).
    pub invalid_requests: Counter,
    /// Requests answered IOERR because the backing file failed.
    pub io_errors: Counter,
    /// Requests answered UNSUPP.
    pub unsupported: Counter,
    /// Chains returned unanswered: no usable status byte, or an unwalkable chain.
    pub dropped_chains: Counter,
    /// Available-ring corruption that put the device in NEEDS_RESET.
    pub queue_errors: Counter,
    /// Interrupts raised.
    pub interrupts: Counter,
    /// Requests the rate limiter held back (each arms its timer once).
    pub rate_limiter_throttled_events: Counter,
    /// Rate-limiter timer expirations (the queue was looked at again).
    pub rate_limiter_event_count: Counter,
    /// Requests admitted by a configured rate limiter.
    pub rate_limiter_admitted_ops: Counter,
    /// Data bytes admitted by a configured rate limiter.
    pub rate_limiter_admitted_bytes: Counter,
    /// Requests answered IOERR because the async engine could not take them (its io_uring
    /// could not be created, or refused a submission), and submissions it had to retry.
    pub io_engine_errors: Counter,
}
