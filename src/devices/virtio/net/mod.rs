//! virtio-net over a TAP device.
//!
//! - `tap.rs`: the TAP (or any fd with its frame semantics);
//! - `device/`: features, config space, activation, and the RX and TX data paths;
//! - `event_handler.rs`: the event-loop glue (queue kicks, TAP readiness).

mod device;
mod event_handler;
mod tap;

pub use device::{Net, NetConfig};
pub use event_handler::NetEvents;
pub use tap::{Tap, TapError};

use crate::devices::Counter;

/// `struct virtio_net_hdr_v1`: 12 bytes in virtio 1.x, with or without MRG_RXBUF.
pub const VNET_HDR_LEN: usize = 12;
/// Largest frame accepted or delivered, header included: 64 KiB of payload (GSO), the
/// Ethernet header and the virtio-net header.
pub const MAX_FRAME_LEN: usize = 65536 + 14 + VNET_HDR_LEN;
/// Entries of each queue.
pub const QUEUE_SIZE: u16 = 256;
/// Index of the receive queue.
pub const RX_QUEUE: usize = 0;
/// Index of the transmit queue.
pub const TX_QUEUE: usize = 1;

/// virtio-net feature bits.
pub mod features {
    /// The device handles partially checksummed frames from the guest.
    pub const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
    /// The guest handles partially checksummed frames.
    pub const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
    /// The device has a MAC address in config space.
    pub const VIRTIO_NET_F_MAC: u64 = 1 << 5;
    /// The guest accepts TSOv4 frames.
    pub const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
    /// The guest accepts TSOv6 frames.
    pub const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
    /// The device accepts TSOv4 frames.
    pub const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
    /// The device accepts TSOv6 frames.
    pub const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
    /// Receive frames may span several buffers.
    pub const VIRTIO_NET_F_MRG_RXBUF: u64 = 1 << 15;
}

/// Per-interface counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct NetMetrics {
    /// Frames delivered to the guest.
    pub rx_frames: Counter,
    /// Bytes delivered to the guest (without the virtio-net header).
    pub rx_bytes: Counter,
    /// Frames read straight into guest buffers.
    pub rx_zero_copy: Counter,
    /// Frames that went through the bounce buffer.
    pub rx_bounced: Counter,
    /// Frames dropped: larger than the guest's buffers, or malformed.
    pub rx_dropped: Counter,
    /// Receive chains returned unused: unwalkable, not device-writable, or taken together
    /// with one that was.
    pub rx_bad_chains: Counter,
    /// TAP read errors.
    pub rx_errors: Counter,
    /// Frames sent by the guest.
    pub tx_frames: Counter,
    /// Bytes sent by the guest (without the virtio-net header).
    pub tx_bytes: Counter,
    /// Frames dropped: too short, too long, malformed chain or header.
    pub tx_dropped: Counter,
    /// TAP write errors (the frame is lost and counted).
    pub tx_errors: Counter,
    /// Writes the TAP refused with EAGAIN (retried later, never lost).
    pub tx_retries: Counter,
    /// Error or hang-up events from the TAP (e.g. it was deleted).
    pub tap_failures: Counter,
    /// Interrupts raised.
    pub interrupts: Counter,
    /// Available-ring corruption that put the device in NEEDS_RESET.
    pub queue_errors: Counter,
    /// Frames to the guest the RX rate limiter held back (each arms its timer once).
    pub rx_rate_limiter_throttled: Counter,
    /// RX rate-limiter timer expirations.
    pub rx_rate_limiter_event_count: Counter,
    /// Frames to the guest admitted by a configured RX rate limiter.
    pub rx_rate_limiter_admitted_frames: Counter,
    /// Bytes (frames without the virtio-net header) admitted by the RX rate limiter.
    pub rx_rate_limiter_admitted_bytes: Counter,
    /// Frames from the guest the TX rate limiter held back (each arms its timer once).
    pub tx_rate_limiter_throttled: Counter,
    /// TX rate-limiter timer expirations.
    pub tx_rate_limiter_event_count: Counter,
    /// Frames from the guest admitted by a configured TX rate limiter.
    pub tx_rate_limiter_admitted_frames: Counter,
    /// Bytes (frames without the virtio-net header) admitted by the TX rate limiter.
    pub tx_rate_limiter_admitted_bytes: Counter,
}
