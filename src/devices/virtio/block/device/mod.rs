//! The virtio-blk device: what it offers, its configuration space, and the queue loop that
//! turns chains into file I/O and answers them.
//!
//! - `mod.rs`: the device, the queue loop, the transport's side (activation, reset);
//! - `execute.rs`: from a parsed request to its answer: checks, GET_ID, the rate limiter,
//!   and the `Sync` engine's file I/O;
//! - `completion.rs`: the `Async` engine's answers, when its io_uring completes them.

mod completion;
mod execute;

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::async_io::{AsyncEngine, Completed};
use super::disk::DiskFile;
use super::request::{RequestError, parse};
use super::{BlockMetrics, QUEUE_SIZE, SECTOR_SIZE, features, status};
use crate::config::{CacheType, IoEngine};
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{Buffer, pop_head, return_chain, walk_chain};
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, read_config_bytes,
};
use crate::rate_limiter::{LimiterUpdate, RateLimiter, RateLimiterState};
use crate::vstate::memory::GuestMemory;

/// virtio device id of a block device.
pub const VIRTIO_ID_BLOCK: u32 = 2;
/// Bytes of config space kiln exposes (capacity .. blk_size).
const CONFIG_SPACE_SIZE: usize = 24;

/// How a drive behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The drive id (also the GET_ID answer).
    pub drive_id: String,
    /// Read-only drive.
    pub read_only: bool,
    /// Cache type.
    pub cache_type: CacheType,
    /// How requests reach the backing file.
    pub io_engine: IoEngine,
}

struct Active {
    mem: GuestMemory,
    queue: Queue,
    interrupt: Arc<VirtioInterrupt>,
    features: u64,
}

/// A virtio-blk device.
pub struct Block {
    config: BlockConfig,
    disk: DiskFile,
    avail_features: u64,
    config_space: [u8; CONFIG_SPACE_SIZE],
    config_generation: u32,
    queue_events: Vec<EventFd>,
    metrics: Arc<BlockMetrics>,
    active: Option<Active>,
    /// The driver corrupted the available ring; nothing runs until it resets the device.
    broken: bool,
    /// Scratch space for walking chains.
    chain: Vec<Buffer>,
    /// Bandwidth (data bytes) and ops (requests) limits.
    limiter: RateLimiter,
    /// The clock read once per run of the queue (the limiter's time for all its requests).
    batch_now: Option<u64>,
    /// The `Async` engine (`None`: `Sync`, requests are served on the spot).
    engine: Option<Box<AsyncEngine>>,
    /// A chain went back on the ring because the engine was full: the queue runs again
    /// when completions make room.
    starved: bool,
    /// Scratch space for finished async requests.
    completed: Vec<Completed>,
}

/// What became of one chain.
enum Handled {
    /// Answered (or dropped): give it back with this many bytes written.
    Used(u32),
    /// Handed to the async engine: answered when it completes.
    Submitted,
    /// It cannot go now — the rate limiter holds it back, or the async engine is full: it
    /// goes back on the ring.
    Later,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("disk", &self.disk)
            .field("active", &self.active.is_some())
            .field("broken", &self.broken)
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

fn config_space(sectors: u64) -> [u8; CONFIG_SPACE_SIZE] {
    let mut c = [0u8; CONFIG_SPACE_SIZE];
    c[0..8].copy_from_slice(&sectors.to_le_bytes());
    // seg_max: a chain holds the header and status besides the data segments.
    c[12..16].copy_from_slice(&u32::from(QUEUE_SIZE - 2).to_le_bytes());
    c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
    c
}

impl Block {
    /// A drive backed by `disk`.
    pub fn new(config: BlockConfig, disk: DiskFile) -> std::io::Result<Block> {
        let mut avail_features = VIRTIO_F_VERSION_1
            | VIRTIO_RING_F_EVENT_IDX
            | VIRTIO_RING_F_INDIRECT_DESC
            | features::VIRTIO_BLK_F_SEG_MAX;
        if config.read_only || disk.read_only() {
            avail_features |= features::VIRTIO_BLK_F_RO;
        }
        if config.cache_type == CacheType::Writeback {
            avail_features |= features::VIRTIO_BLK_F_FLUSH;
        }
        let engine = match config.io_engine {
            IoEngine::Sync => None,
            IoEngine::Async => Some(Box::new(AsyncEngine::new()?)),
        };
        Ok(Block {
            config_space: config_space(disk.sectors()),
            config,
            disk,
            avail_features,
            config_generation: 0,
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            metrics: Arc::new(BlockMetrics::default()),
            active: None,
            broken: false,
            chain: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            limiter: RateLimiter::new(None)?,
            batch_now: None,
            engine,
            starved: false,
            completed: Vec::new(),
        })
    }

    /// The eventfd the `Async` engine signals when requests complete (`None` for `Sync`).
    pub fn completion_event(&self) -> Option<&EventFd> {
        self.engine.as_deref().map(AsyncEngine::completion_event)
    }

    /// Requests handed to the async engine and not answered yet (orphans of a reset
    /// included).
    pub fn in_flight(&self) -> usize {
        self.engine.as_deref().map_or(0, AsyncEngine::in_flight)
    }

    /// Whether the async engine made its io_uring for the current backing file (it does on
    /// the first transfer or flush).
    pub fn has_io_ring(&self) -> bool {
        self.engine.as_deref().is_some_and(AsyncEngine::has_ring)
    }

    /// Limits the drive with `limiter`.
    pub fn set_rate_limiter(&mut self, limiter: RateLimiter) {
        self.limiter = limiter;
    }

    /// The rate limiter.
    pub fn rate_limiter(&self) -> &RateLimiter {
        &self.limiter
    }

    /// Changes the rate limiter (API `PATCH /drives`); a throttled queue is looked at again
    /// at once (its timer fires now).
    pub fn update_rate_limiter(&mut self, update: &LimiterUpdate) -> std::io::Result<()> {
        self.limiter.update(update)
    }

    /// The rate limiter's state, for a snapshot (time spent saved is not credited).
    pub fn save_rate_limiter(&mut self) -> RateLimiterState {
        self.limiter.save()
    }

    /// Restores the rate limiter's state from a snapshot; the queue is looked at again at
    /// once.
    pub fn restore_rate_limiter(&mut self, state: &RateLimiterState) -> std::io::Result<()> {
        self.limiter.restore(state)
    }

    /// The rate limiter's timer fired: the held-back request may go.
    pub fn rate_limiter_timer(&mut self) {
        self.limiter.timer_fired();
        self.metrics.rate_limiter_event_count.inc();
        self.process_queue();
    }

    /// The drive's counters.
    pub fn metrics(&self) -> Arc<BlockMetrics> {
        self.metrics.clone()
    }

    /// The drive's configuration.
    pub fn config(&self) -> &BlockConfig {
        &self.config
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.disk.sectors()
    }

    /// Whether the driver activated the device.
    pub fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    /// Swaps the backing file (API `PATCH /drives`): the guest sees a configuration change
    /// with the new capacity. Requests in flight on the old file finish there.
    pub fn update_disk(&mut self, disk: DiskFile) {
        if let Some(engine) = self.engine.as_deref_mut() {
            engine.retire_ring();
        }
        self.disk = disk;
        self.config_space = config_space(self.disk.sectors());
        self.config_generation = self.config_generation.wrapping_add(1);
        if let Some(active) = &self.active {
            active.interrupt.signal_config_change();
        }
    }

    /// Handles every available request, then interrupts the guest if it wants to know.
    /// This is the whole data path; tests and fuzzers call it directly.
    pub fn process_queue(&mut self) {
        if self.broken || self.limiter.is_throttled() {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.batch_now = None;
        let event_idx = active.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut used_any = false;
        'outer: loop {
            if event_idx {
                let _ = active.queue.disable_notification(&active.mem);
            }
            loop {
                match pop_head(&mut active.queue, &active.mem) {
                    Ok(Some(head)) => match self.handle_chain(&active, head) {
                        Handled::Used(len) => {
                            // A head outside the queue was counted by handle_chain (it
                            // cannot be walked); it has no used-ring slot to give back.
                            return_chain(&mut active.queue, &active.mem, head, len);
                            used_any = true;
                        }
                        Handled::Submitted => {}
                        Handled::Later => {
                            // Back on the ring: the driver's queue fills and holds it back;
                            // the limiter's timer, or the engine's completions, bring the
                            // device back.
                            let back = active.queue.next_avail().wrapping_sub(1);
                            active.queue.set_next_avail(back);
                            break 'outer;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        // Counted, not logged: a guest could otherwise flood the log.
                        log::debug!(
                            "drive {}: {e}; the device needs a reset",
                            self.config.drive_id
                        );
                        self.metrics.queue_errors.inc();
                        self.broken = true;
                        active.interrupt.signal_config_change();
                        break 'outer;
                    }
                }
            }
            if !event_idx {
                break;
            }
            // Re-enable notifications; if buffers arrived meanwhile, go round again.
            match active.queue.enable_notification(&active.mem) {
                Ok(true) => {}
                _ => break,
            }
        }
        self.limiter.idle();
        if self.engine.is_some() {
            self.submit_batch();
            // Page-cache hits complete during the submission: answered now, with the
            // same interrupt, not one trip round the event loop later.
            used_any |= self.answer_finished(&mut active);
        }
        if used_any {
            self.notify(&mut active);
        }
        self.active = Some(active);
    }

    /// Interrupts the guest if it wants to know about new used buffers.
    fn notify(&self, active: &mut Active) {
        if active.queue.needs_notification(&active.mem).unwrap_or(true) {
            self.metrics.interrupts.inc();
            active.interrupt.signal_used_queue();
        }
    }

    /// Executes one chain, unless the rate limiter holds it back.
    fn handle_chain(&mut self, active: &Active, head: u16) -> Handled {
        let indirect = active.features & VIRTIO_RING_F_INDIRECT_DESC != 0;
        let mut chain = std::mem::take(&mut self.chain);
        chain.clear();
        let walked = walk_chain(&active.mem, &active.queue, head, indirect, &mut chain);
        let used = match walked {
            Err(e) => {
                log::debug!("drive {}: chain {head} refused: {e}", self.config.drive_id);
                self.metrics.dropped_chains.inc();
                Handled::Used(0)
            }
            Ok(()) => match parse(&active.mem, &chain) {
                Err(RequestError::NoStatus) => {
                    self.metrics.dropped_chains.inc();
                    Handled::Used(0)
                }
                Err(RequestError::Malformed { status, .. }) => {
                    self.metrics.invalid_requests.inc();
                    let _ = active.mem.write_obj(status::IOERR, status);
                    Handled::Used(1)
                }
                Ok(request) => self.run(active, head, request),
            },
        };
        self.chain = chain;
        used
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        // Nothing in kiln's config space is writable (no VIRTIO_BLK_F_CONFIG_WCE).
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation {
            mem,
            mut queues,
            acked_features,
            interrupt,
        } = activation;
        if queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: queues.len(),
            });
        }
        let queue = queues.remove(0);
        if let Some(engine) = self.engine.as_deref_mut() {
            engine.set_memory(&mem);
        }
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            features: acked_features,
        });
        self.broken = false;
        self.starved = false;
        // Requests posted before DRIVER_OK are picked up now.
        let _ = self.queue_events[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        // Requests in flight finish into the buffers they were given and are never answered
        // (this runs on a vCPU thread: no system call, no waiting for the disk).
        if let Some(engine) = self.engine.as_deref_mut() {
            engine.orphan_all();
        }
        self.active = None;
        self.broken = false;
        self.starved = false;
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn config_generation(&self) -> u32 {
        self.config_generation
    }

    fn needs_reset(&self) -> bool {
        self.broken
    }

    fn queue_positions(&self) -> Vec<(u16, u16)> {
        use virtio_queue::QueueT;
        // Sync requests are answered as they are taken; async ones are drained first
        // (`Block::drain`, before any save), so nothing is held between events.
        debug_assert_eq!(
            self.in_flight(),
            0,
            "queue positions with requests in flight"
        );
        self.active
            .iter()
            .map(|a| (a.queue.next_avail(), a.queue.next_used()))
            .collect()
    }
}

#[cfg(test)]
mod async_tests;
#[cfg(test)]
mod tests;
