//! The virtio-net device: features, config space, activation, and the state its RX and TX
//! paths share.

mod rx;
mod tx;

use std::collections::VecDeque;
use std::sync::Arc;

use event_manager::EventSet;
use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::features::*;
use super::{NetMetrics, QUEUE_SIZE, Tap};
use crate::config::MacAddr;
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{Buffer, HostScratch};
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, read_config_bytes,
};
use crate::rate_limiter::{LimiterUpdate, RateLimiter, RateLimiterState};
use crate::vstate::memory::GuestMemory;

/// virtio device id of a network device.
pub const VIRTIO_ID_NET: u32 = 1;

/// How an interface is set up.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The interface id.
    pub iface_id: String,
    /// The guest's MAC address, if fixed.
    pub guest_mac: Option<MacAddr>,
}

struct Active {
    mem: GuestMemory,
    rx_queue: Queue,
    tx_queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    features: u64,
    /// Receive chains taken from the ring, walked, and not used yet (the oldest first): the
    /// next frames go into them. Holding them, rather than putting them back, means each
    /// chain is walked once however many reads it waits through. The first one always has
    /// room for a virtio-net header.
    rx_held: VecDeque<rx::RxChain>,
    /// Bytes the held chains can take.
    rx_held_capacity: usize,
}

impl Active {
    fn has(&self, feature: u64) -> bool {
        self.features & feature != 0
    }
}

/// A virtio-net device.
pub struct Net {
    config: NetConfig,
    tap: Tap,
    /// False once the TAP reported an error or hang-up (e.g. it was deleted).
    tap_alive: bool,
    /// Bumped whenever the TAP's descriptor is replaced (released or reattached for a live
    /// migration): the event loop's registration of the old one is gone.
    tap_generation: u64,
    avail_features: u64,
    config_space: [u8; 8],
    queue_events: Vec<EventFd>,
    metrics: Arc<NetMetrics>,
    active: Option<Active>,
    broken: bool,
    /// A frame read from the TAP into `bounce`, waiting for receive buffers.
    pending_rx: Option<usize>,
    /// Frames are read here when the guest's buffers might be too small for a whole frame.
    bounce: Vec<u8>,
    /// The TAP refused a write (EAGAIN): transmission waits until it is writable.
    tx_blocked: bool,
    /// Whether the RX path wants to hear that the TAP is readable.
    rx_wants_frames: bool,
    /// The receive ring's available index when chains were last gathered.
    rx_seen_avail: u16,
    /// Scratch space for chains.
    chain: Vec<Buffer>,
    /// Buffer lists of used receive chains, kept for the next ones.
    rx_spare: Vec<Vec<Buffer>>,
    /// The host buffers of one read or write, kept from frame to frame so that a frame
    /// allocates nothing (musl's allocator maps and unmaps memory for an allocation freed
    /// as soon as it is made).
    host: HostScratch,
    /// Limits on frames to the guest. With a limit, frames are read into the bounce buffer
    /// (their length must be known before they are admitted), and a frame held back waits
    /// there while the TAP is left unread.
    rx_limiter: RateLimiter,
    /// Limits on frames from the guest; a frame held back stays on the ring.
    tx_limiter: RateLimiter,
    /// The clock read once per run of a queue (the limiters' time for all its frames).
    batch_now: Option<u64>,
}

impl std::fmt::Debug for Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Net")
            .field("config", &self.config)
            .field("tap", &self.tap.name())
            .field("tap_alive", &self.tap_alive)
            .field("active", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Net {
    /// An interface on `tap`.
    pub fn new(config: NetConfig, tap: Tap) -> std::io::Result<Net> {
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | VIRTIO_NET_F_CSUM
            | VIRTIO_NET_F_GUEST_CSUM
            | VIRTIO_NET_F_GUEST_TSO4
            | VIRTIO_NET_F_GUEST_TSO6
            | VIRTIO_NET_F_HOST_TSO4
            | VIRTIO_NET_F_HOST_TSO6
            | VIRTIO_NET_F_MRG_RXBUF;
        let mut config_space = [0u8; 8];
        if let Some(mac) = config.guest_mac {
            avail_features |= VIRTIO_NET_F_MAC;
            config_space[..6].copy_from_slice(&mac.0);
        }
        Ok(Net {
            config,
            tap,
            tap_alive: true,
            tap_generation: 0,
            avail_features,
            config_space,
            queue_events: vec![
                EventFd::new(libc::EFD_NONBLOCK)?,
                EventFd::new(libc::EFD_NONBLOCK)?,
            ],
            metrics: Arc::new(NetMetrics::default()),
            active: None,
            broken: false,
            pending_rx: None,
            bounce: Vec::new(),
            tx_blocked: false,
            rx_wants_frames: false,
            rx_seen_avail: 0,
            chain: Vec::with_capacity(64),
            rx_spare: Vec::new(),
            host: HostScratch::default(),
            rx_limiter: RateLimiter::new(None)?,
            tx_limiter: RateLimiter::new(None)?,
            batch_now: None,
        })
    }

    /// Limits the interface with `rx` (frames to the guest) and `tx` (frames from it).
    pub fn set_rate_limiters(&mut self, rx: RateLimiter, tx: RateLimiter) {
        self.rx_limiter = rx;
        self.tx_limiter = tx;
    }

    /// The limiters' clock for the current run of a queue (read once per run).
    fn limiter_now(&mut self) -> u64 {
        *self
            .batch_now
            .get_or_insert_with(crate::rate_limiter::now_ns)
    }

    /// The RX and TX rate limiters.
    pub fn rate_limiters(&self) -> (&RateLimiter, &RateLimiter) {
        (&self.rx_limiter, &self.tx_limiter)
    }

    /// Changes the rate limiters (API `PATCH /network-interfaces`); a held-back frame is
    /// looked at again at once (its timer fires now).
    pub fn update_rate_limiters(
        &mut self,
        rx: &LimiterUpdate,
        tx: &LimiterUpdate,
    ) -> std::io::Result<()> {
        self.rx_limiter.update(rx)?;
        self.tx_limiter.update(tx)
    }

    /// The RX and TX rate limiters' state, for a snapshot (time spent saved is not
    /// credited).
    pub fn save_rate_limiters(&mut self) -> (RateLimiterState, RateLimiterState) {
        (self.rx_limiter.save(), self.tx_limiter.save())
    }

    /// Restores the rate limiters' state from a snapshot; held-back frames are looked at
    /// again at once.
    pub fn restore_rate_limiters(
        &mut self,
        rx: &RateLimiterState,
        tx: &RateLimiterState,
    ) -> std::io::Result<()> {
        self.rx_limiter.restore(rx)?;
        self.tx_limiter.restore(tx)
    }

    /// The RX rate limiter's timer fired: the held-back frame may go.
    pub fn rx_rate_limiter_timer(&mut self) {
        self.rx_limiter.timer_fired();
        self.metrics.rx_rate_limiter_event_count.inc();
        self.process_rx();
    }

    /// The TX rate limiter's timer fired: the held-back frame may go.
    pub fn tx_rate_limiter_timer(&mut self) {
        self.tx_limiter.timer_fired();
        self.metrics.tx_rate_limiter_event_count.inc();
        self.process_tx();
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<NetMetrics> {
        self.metrics.clone()
    }

    /// The configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    /// The TAP.
    pub fn tap(&self) -> &Tap {
        &self.tap
    }

    /// Which descriptor [`Net::tap`] is (see `tap_generation`).
    pub fn tap_generation(&self) -> u64 {
        self.tap_generation
    }

    /// Lets go of the TAP for a live migration's destination (the VM is paused).
    pub fn release_tap(&mut self) -> std::io::Result<()> {
        self.tap.release()?;
        self.tap_generation += 1;
        Ok(())
    }

    /// Takes the TAP back by name after a failed live migration, with the offloads the
    /// guest negotiated.
    pub fn reattach_tap(&mut self) -> Result<(), super::TapError> {
        let offloads = self.active.as_ref().map_or(0, |a| tap_offloads(a.features));
        self.tap.reattach(offloads)?;
        self.tap_generation += 1;
        Ok(())
    }

    /// What the event loop should watch the TAP for.
    pub fn tap_interest(&self) -> EventSet {
        if !self.tap_alive || self.active.is_none() || self.broken {
            return EventSet::empty();
        }
        let mut set = EventSet::empty();
        if self.rx_wants_frames {
            set |= EventSet::IN;
        }
        if self.tx_blocked {
            set |= EventSet::OUT;
        }
        set
    }

    /// The TAP reported an error or hang-up: stop using it for reading. Writes keep being
    /// attempted (and their errors counted) so the guest's transmit queue keeps moving.
    pub fn tap_failed(&mut self) {
        if self.tap_alive {
            log::warn!(
                "interface {}: TAP {} failed; frames are dropped and counted",
                self.config.iface_id,
                self.tap.name()
            );
        }
        self.metrics.tap_failures.inc();
        self.tap_alive = false;
        self.tx_blocked = false;
        self.rx_wants_frames = false;
    }

    /// The RX queue was kicked: the guest added receive buffers.
    pub fn rx_queue_kicked(&mut self) {
        self.process_rx();
    }

    /// The TAP is writable again.
    pub fn tap_writable(&mut self) {
        self.tx_blocked = false;
        self.process_tx();
    }

    /// Marks the device broken after ring corruption, telling the driver.
    fn queue_corrupted(&mut self, what: &str, interrupt: &VirtioInterrupt) {
        log::warn!(
            "interface {}: {what}; the device needs a reset",
            self.config.iface_id
        );
        self.metrics.queue_errors.inc();
        self.broken = true;
        interrupt.signal_config_change();
    }
}

/// TUNSETOFFLOAD flags for the guest's receive offloads.
fn tap_offloads(features: u64) -> libc::c_uint {
    let mut flags = 0;
    if features & VIRTIO_NET_F_GUEST_CSUM != 0 {
        flags |= libc::TUN_F_CSUM;
        if features & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            flags |= libc::TUN_F_TSO4;
        }
        if features & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            flags |= libc::TUN_F_TSO6;
        }
    }
    flags
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space[..6], offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // The MAC is read-only without VIRTIO_NET_F_CTRL_MAC_ADDR.
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            queues,
            acked_features,
            interrupt,
        } = activation;
        let [rx_queue, tx_queue]: [Queue; 2] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| ActivateError::QueueCount {
                    expected: 2,
                    got: q.len(),
                })?;
        self.tap
            .set_offload(tap_offloads(acked_features))
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        self.active = Some(Active {
            mem,
            rx_queue,
            tx_queue,
            interrupt,
            features: acked_features,
            rx_held: VecDeque::new(),
            rx_held_capacity: 0,
        });
        self.broken = false;
        self.pending_rx = None;
        self.tx_blocked = false;
        self.rx_wants_frames = true;
        // Buffers posted before DRIVER_OK are picked up now.
        for evt in &self.queue_events {
            let _ = evt.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
        self.pending_rx = None;
        self.tx_blocked = false;
        self.rx_wants_frames = false;
        let _ = self.tap.set_offload(0);
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        use virtio_queue::QueueT;
        let Some(a) = &self.active else {
            return Vec::new();
        };
        // Receive chains held for frames to come were taken last, in ring order: a
        // restored device takes them again.
        let held = u16::try_from(a.rx_held.len()).unwrap_or(u16::MAX);
        vec![
            (
                a.rx_queue.next_avail().wrapping_sub(held),
                a.rx_queue.next_used(),
            ),
            (a.tx_queue.next_avail(), a.tx_queue.next_used()),
        ]
    }
}

#[cfg(test)]
mod tests;
