//! The virtio-blk device: what it offers, its configuration space, and the queue loop that
//! turns chains into file I/O and answers them.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::eventfd::EventFd;

use super::disk::DiskFile;
use super::request::{Request, RequestError, RequestType, parse};
use super::{BlockMetrics, ID_BYTES, QUEUE_SIZE, SECTOR_SHIFT, SECTOR_SIZE, features, status};
use crate::config::CacheType;
use crate::devices::virtio::features::{
    VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};
use crate::devices::virtio::queue::{Buffer, host_buffers, pop_head, return_chain, walk_chain};
use crate::devices::virtio::{
    ActivateError, Activation, VirtioDevice, VirtioInterrupt, read_config_bytes,
};
use crate::rate_limiter::{LimiterUpdate, RateLimiter, RateLimiterState, now_ns};
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
}

/// What became of one chain.
enum Handled {
    /// Answered (or dropped): give it back with this many bytes written.
    Used(u32),
    /// The rate limiter holds it back: it goes back on the ring.
    Throttled,
}

impl std::fmt::Debug for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("config", &self.config)
            .field("disk", &self.disk)
            .field("active", &self.active.is_some())
            .field("broken", &self.broken)
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
        })
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

    /// The backing file.
    pub fn disk(&self) -> &DiskFile {
        &self.disk
    }

    /// Swaps the backing file (API `PATCH /drives`): the guest sees a configuration change
    /// with the new capacity.
    pub fn update_disk(&mut self, disk: DiskFile) {
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
                        Handled::Throttled => {
                            // Back on the ring: the driver's queue fills and holds it back;
                            // the timer brings the device back when the tokens exist.
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
        if used_any && active.queue.needs_notification(&active.mem).unwrap_or(true) {
            self.metrics.interrupts.inc();
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
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
                Ok(request) => {
                    if self.limiter.is_limiting() {
                        self.limited(active, &request)
                    } else {
                        Handled::Used(self.answer(active, &request).1)
                    }
                }
            },
        };
        self.chain = chain;
        used
    }

    /// Executes a request and writes its status; returns the status and the bytes written.
    fn answer(&mut self, active: &Active, request: &Request) -> (u8, u32) {
        let (code, data) = self.execute(active, request);
        let _ = active.mem.write_obj(code, request.status);
        (code, data + 1)
    }

    /// Executes a request if the rate limiter lets it go now: one op, and its data bytes for
    /// reads and writes (charged only if the transfer was done).
    fn limited(&mut self, active: &Active, request: &Request) -> Handled {
        let transfer = matches!(request.kind, RequestType::In | RequestType::Out);
        let bytes = if transfer { request.data_len } else { 0 };
        let now = *self.batch_now.get_or_insert_with(now_ns);
        if let Err(at) = self.limiter.check(bytes, now) {
            match self.limiter.throttle(at) {
                Ok(()) => {
                    self.metrics.rate_limiter_throttled_events.inc();
                    return Handled::Throttled;
                }
                // Without a timer the request would wait forever: let it go.
                Err(e) => log::warn!(
                    "drive {}: cannot arm the rate limiter's timer: {e}",
                    self.config.drive_id
                ),
            }
        }
        let (code, used) = self.answer(active, request);
        let charged = if transfer && code == status::OK {
            bytes
        } else {
            0
        };
        self.limiter.commit(charged);
        self.metrics.rate_limiter_admitted_ops.inc();
        self.metrics.rate_limiter_admitted_bytes.add(charged);
        Handled::Used(used)
    }

    /// Runs a parsed request; returns its status and the data bytes it produced.
    fn execute(&mut self, active: &Active, req: &Request) -> (u8, u32) {
        let invalid = |m: &BlockMetrics| {
            m.invalid_requests.inc();
            (status::IOERR, 0)
        };
        match req.kind {
            RequestType::In | RequestType::Out => {
                if !req.data_len.is_multiple_of(SECTOR_SIZE) {
                    return invalid(&self.metrics);
                }
                let sectors = req.data_len >> SECTOR_SHIFT;
                match req.sector.checked_add(sectors) {
                    Some(end) if end <= self.disk.sectors() => {}
                    _ => return invalid(&self.metrics),
                }
                let write = req.kind == RequestType::Out;
                if write && self.avail_features & features::VIRTIO_BLK_F_RO != 0 {
                    return invalid(&self.metrics);
                }
                let Some(host) = host_buffers(&active.mem, &req.data) else {
                    return invalid(&self.metrics);
                };
                let offset = req.sector << SECTOR_SHIFT;
                let result = if write {
                    // SAFETY: every host buffer lies inside guest memory mapped by
                    // `active.mem` (the chain walk checked each one is inside one region),
                    // and `active.mem` stays alive for the call.
                    unsafe { self.disk.write_at(offset, &host) }
                } else {
                    // SAFETY: as above; the buffers are device-writable guest memory.
                    unsafe { self.disk.read_at(offset, &host) }
                };
                match (result, write) {
                    (Ok(()), true) => {
                        self.metrics.write_count.inc();
                        self.metrics.write_bytes.add(req.data_len);
                        (status::OK, 0)
                    }
                    (Ok(()), false) => {
                        self.metrics.read_count.inc();
                        self.metrics.read_bytes.add(req.data_len);
                        (status::OK, req.data_len as u32)
                    }
                    (Err(e), _) => {
                        log::debug!("drive {}: I/O error: {e}", self.config.drive_id);
                        self.metrics.io_errors.inc();
                        (status::IOERR, 0)
                    }
                }
            }
            RequestType::Flush => {
                if active.features & features::VIRTIO_BLK_F_FLUSH == 0 {
                    self.metrics.unsupported.inc();
                    return (status::UNSUPP, 0);
                }
                match self.disk.flush() {
                    Ok(()) => {
                        self.metrics.flush_count.inc();
                        (status::OK, 0)
                    }
                    Err(e) => {
                        log::debug!("drive {}: flush failed: {e}", self.config.drive_id);
                        self.metrics.io_errors.inc();
                        (status::IOERR, 0)
                    }
                }
            }
            RequestType::GetId => {
                let mut id = [0u8; ID_BYTES];
                let bytes = self.config.drive_id.as_bytes();
                let n = bytes.len().min(ID_BYTES);
                id[..n].copy_from_slice(&bytes[..n]);
                let mut written = 0usize;
                for b in &req.data {
                    let take = (b.len as usize).min(ID_BYTES - written);
                    if take == 0 {
                        break;
                    }
                    if active
                        .mem
                        .write_slice(&id[written..written + take], b.addr)
                        .is_err()
                    {
                        return invalid(&self.metrics);
                    }
                    written += take;
                }
                self.metrics.get_id_count.inc();
                (status::OK, written as u32)
            }
            RequestType::Unsupported(_) => {
                self.metrics.unsupported.inc();
                (status::UNSUPP, 0)
            }
        }
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
        self.active = Some(Active {
            mem,
            queue,
            interrupt,
            features: acked_features,
        });
        self.broken = false;
        // Requests posted before DRIVER_OK are picked up now.
        let _ = self.queue_events[0].write(1);
        Ok(())
    }

    fn reset(&mut self) {
        self.active = None;
        self.broken = false;
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
        // Requests are answered as they are taken: nothing is held between events.
        self.active
            .iter()
            .map(|a| (a.queue.next_avail(), a.queue.next_used()))
            .collect()
    }
}

#[cfg(test)]
mod tests;
