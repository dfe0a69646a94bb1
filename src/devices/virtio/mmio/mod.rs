//! The virtio-mmio transport, version 2 (virtio 1.x): the register file a driver programs,
//! feature negotiation, the device-status state machine (an explicit transition table),
//! queue configuration with validation, interrupt status, and device reset.

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::queue::configured_queue;
use super::status::{ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK};
use super::{Activation, VirtioDevice, VirtioInterrupt, features};
use crate::devices::Counter;
use crate::devices::bus::BusDevice;
use crate::vstate::memory::GuestMemory;

/// "virt".
const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// The non-legacy register layout.
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0;

/// Register offsets.
mod reg {
    pub const MAGIC_VALUE: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_AVAIL_LOW: u64 = 0x090;
    pub const QUEUE_AVAIL_HIGH: u64 = 0x094;
    pub const QUEUE_USED_LOW: u64 = 0x0a0;
    pub const QUEUE_USED_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Offset of QueueNotify, where KVM ioeventfds are attached.
pub const NOTIFY_REG_OFFSET: u64 = reg::QUEUE_NOTIFY;

/// Transport counters.
#[derive(Debug, Default)]
pub struct MmioMetrics {
    /// Status writes the transition table refused.
    pub illegal_status: Counter,
    /// Accesses to registers in a state, width or direction the spec forbids.
    pub bad_accesses: Counter,
    /// Queue configurations refused (size, alignment, outside RAM).
    pub bad_queues: Counter,
    /// DRIVER_OK that could not activate the device.
    pub activate_failures: Counter,
    /// Successful activations.
    pub activations: Counter,
    /// Device resets by the driver.
    pub resets: Counter,
}

/// What a status write does, from the transition table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusAction {
    /// Store the new value.
    Set,
    /// Check the negotiated features, then set FEATURES_OK (or leave it clear).
    NegotiateFeatures,
    /// Activate the device.
    Activate,
    /// Reset the device.
    Reset,
    /// Illegal: ignore.
    Reject,
}

/// The device-status transition table (virtio 1.x 3.1.1, driver initialisation order).
pub fn status_action(current: u32, new: u32) -> StatusAction {
    const A: u32 = ACKNOWLEDGE;
    const AD: u32 = ACKNOWLEDGE | DRIVER;
    const ADF: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK;
    const ADFO: u32 = ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK;
    if new == 0 {
        return StatusAction::Reset;
    }
    if new == current | FAILED {
        return StatusAction::Set;
    }
    if current & DEVICE_NEEDS_RESET != 0 {
        return StatusAction::Reject;
    }
    match (current, new) {
        (0, A) | (A, AD) => StatusAction::Set,
        (AD, ADF) => StatusAction::NegotiateFeatures,
        (ADF, ADFO) => StatusAction::Activate,
        _ => StatusAction::Reject,
    }
}

/// What the driver wrote about one queue.
#[derive(Clone, Copy, Debug, Default)]
struct QueueConfig {
    max_size: u16,
    size: u16,
    ready: bool,
    desc: u64,
    avail: u64,
    used: u64,
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }
}

fn set_low(v: &mut u64, low: u32) {
    *v = (*v & !0xffff_ffff) | u64::from(low);
}

fn set_high(v: &mut u64, high: u32) {
    *v = (*v & 0xffff_ffff) | (u64::from(high) << 32);
}

/// The transport of one device, placed on the MMIO bus.
pub struct MmioTransport {
    device: Arc<Mutex<dyn VirtioDevice>>,
    mem: GuestMemory,
    interrupt: Arc<VirtioInterrupt>,
    metrics: Arc<MmioMetrics>,
    device_type: u32,
    avail_features: u64,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device_type)
            .field("status", &self.status)
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// A transport for `device`, interrupting through `interrupt`.
    pub fn new(
        device: Arc<Mutex<dyn VirtioDevice>>,
        mem: GuestMemory,
        interrupt: Arc<VirtioInterrupt>,
    ) -> Self {
        let (device_type, avail_features, queues) = {
            let d = device.lock().unwrap_or_else(PoisonError::into_inner);
            let queues = d
                .queue_max_sizes()
                .iter()
                .map(|m| QueueConfig::new(*m))
                .collect();
            (d.device_type(), d.avail_features(), queues)
        };
        MmioTransport {
            device,
            mem,
            interrupt,
            metrics: Arc::new(MmioMetrics::default()),
            device_type,
            avail_features,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<MmioMetrics> {
        self.metrics.clone()
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.effective_status()
    }

    fn device(&self) -> std::sync::MutexGuard<'_, dyn VirtioDevice + 'static> {
        self.device.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        let sel = usize::try_from(self.queue_sel).ok()?;
        self.queues.get_mut(sel)
    }

    /// Queue registers may be written after FEATURES_OK and before DRIVER_OK.
    fn queue_writable(&self) -> bool {
        self.status & (FEATURES_OK | DRIVER_OK | FAILED | DEVICE_NEEDS_RESET) == FEATURES_OK
    }

    fn rings_in_ram(&self, q: &QueueConfig) -> bool {
        let n = u64::from(q.size);
        let ok = |addr: u64, len: u64| {
            self.mem.check_range(
                GuestAddress(addr),
                usize::try_from(len).unwrap_or(usize::MAX),
            )
        };
        ok(q.desc, 16 * n) && ok(q.avail, 6 + 2 * n) && ok(q.used, 6 + 8 * n)
    }

    fn set_queue_ready(&mut self, ready: bool) {
        let Some(q) = self.selected_queue().copied() else {
            self.metrics.bad_accesses.inc();
            return;
        };
        let valid = !ready
            || (configured_queue(q.max_size, q.size, q.desc, q.avail, q.used).is_ok()
                && self.rings_in_ram(&q));
        if !valid {
            self.metrics.bad_queues.inc();
        }
        if let Some(sel) = self.selected_queue() {
            sel.ready = ready && valid;
        }
    }

    fn negotiate_features(&mut self) {
        // virtio 1.x only: a driver that did not accept VERSION_1 is a legacy driver.
        if self.acked_features & features::VIRTIO_F_VERSION_1 != 0 {
            self.status |= FEATURES_OK;
        } else {
            self.metrics.illegal_status.inc();
        }
    }

    /// Activates the device with the ready queues; `positions` (a restored snapshot) says
    /// where each queue's next available and next used entries are.
    fn activate(&mut self, positions: &[(u16, u16)]) {
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready {
                break;
            }
            match configured_queue(q.max_size, q.size, q.desc, q.avail, q.used) {
                Ok(mut queue) => {
                    use virtio_queue::QueueT;
                    queue.set_event_idx(
                        self.acked_features & features::VIRTIO_RING_F_EVENT_IDX != 0,
                    );
                    if let Some(&(next_avail, next_used)) = positions.get(i) {
                        queue.set_next_avail(next_avail);
                        queue.set_next_used(next_used);
                    }
                    queues.push(queue);
                }
                Err(_) => break,
            }
        }
        let activation = Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.acked_features,
            interrupt: self.interrupt.clone(),
        };
        let result = self.device().activate(activation);
        match result {
            Ok(()) => {
                self.status |= DRIVER_OK;
                self.metrics.activations.inc();
            }
            Err(e) => {
                log::warn!("virtio device {} not activated: {e}", self.device_type);
                self.metrics.activate_failures.inc();
                self.status |= DEVICE_NEEDS_RESET;
                self.interrupt.signal_config_change();
            }
        }
    }

    fn reset(&mut self) {
        self.device().reset();
        self.interrupt.reset();
        self.metrics.resets.inc();
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.acked_features = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
    }

    /// The status register: what the driver set plus what the device reports.
    fn effective_status(&self) -> u32 {
        if self.device().needs_reset() {
            self.status | DEVICE_NEEDS_RESET
        } else {
            self.status
        }
    }

    fn write_status(&mut self, new: u32) {
        match status_action(self.effective_status(), new) {
            StatusAction::Set => self.status = new,
            StatusAction::NegotiateFeatures => self.negotiate_features(),
            StatusAction::Activate => self.activate(&[]),
            StatusAction::Reset => self.reset(),
            StatusAction::Reject => self.metrics.illegal_status.inc(),
        }
    }

    fn read_register(&mut self, offset: u64) -> u32 {
        match offset {
            reg::MAGIC_VALUE => MMIO_MAGIC_VALUE,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => self.device_type,
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match self.device_features_sel {
                0 => self.avail_features as u32,
                1 => (self.avail_features >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size)),
            reg::QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready)),
            reg::INTERRUPT_STATUS => self.interrupt.status(),
            reg::STATUS => self.effective_status(),
            reg::CONFIG_GENERATION => self.device().config_generation(),
            _ => {
                self.metrics.bad_accesses.inc();
                0
            }
        }
    }

    fn write_register(&mut self, offset: u64, v: u32) {
        let queue_ok = self.queue_writable();
        match offset {
            reg::DEVICE_FEATURES_SEL => self.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            reg::DRIVER_FEATURES if self.status == ACKNOWLEDGE | DRIVER => {
                // Bits the device did not offer are dropped.
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return self.metrics.bad_accesses.inc(),
                };
                let mask = 0xffff_ffffu64 << shift;
                self.acked_features =
                    (self.acked_features & !mask) | ((u64::from(v) << shift) & self.avail_features);
            }
            reg::QUEUE_SEL => self.queue_sel = v,
            reg::QUEUE_NUM if queue_ok => match self.selected_queue() {
                Some(q) if !q.ready => q.size = v.min(u32::from(u16::MAX)) as u16,
                _ => self.metrics.bad_accesses.inc(),
            },
            reg::QUEUE_READY if queue_ok => self.set_queue_ready(v == 1),
            reg::QUEUE_DESC_LOW
            | reg::QUEUE_DESC_HIGH
            | reg::QUEUE_AVAIL_LOW
            | reg::QUEUE_AVAIL_HIGH
            | reg::QUEUE_USED_LOW
            | reg::QUEUE_USED_HIGH
                if queue_ok =>
            {
                let Some(q) = self.selected_queue().filter(|q| !q.ready) else {
                    return self.metrics.bad_accesses.inc();
                };
                match offset {
                    reg::QUEUE_DESC_LOW => set_low(&mut q.desc, v),
                    reg::QUEUE_DESC_HIGH => set_high(&mut q.desc, v),
                    reg::QUEUE_AVAIL_LOW => set_low(&mut q.avail, v),
                    reg::QUEUE_AVAIL_HIGH => set_high(&mut q.avail, v),
                    reg::QUEUE_USED_LOW => set_low(&mut q.used, v),
                    _ => set_high(&mut q.used, v),
                }
            }
            reg::QUEUE_NOTIFY => {
                // Normally swallowed by the ioeventfd in KVM; from here (tests, or a KVM
                // without ioeventfd) it is forwarded to the same eventfd.
                let device = self.device();
                match usize::try_from(v)
                    .ok()
                    .and_then(|i| device.queue_events().get(i))
                {
                    Some(evt) if self.status & DRIVER_OK != 0 => {
                        let _ = evt.write(1);
                    }
                    _ => self.metrics.bad_accesses.inc(),
                }
            }
            reg::INTERRUPT_ACK => self.interrupt.ack(v),
            reg::STATUS => self.write_status(v),
            _ => self.metrics.bad_accesses.inc(),
        }
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= reg::CONFIG {
            return self.device().read_config(offset - reg::CONFIG, data);
        }
        if data.len() != 4 {
            self.metrics.bad_accesses.inc();
            data.fill(0);
            return;
        }
        let v = self.read_register(offset);
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= reg::CONFIG {
            return self.device().write_config(offset - reg::CONFIG, data);
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return self.metrics.bad_accesses.inc();
        };
        self.write_register(offset, u32::from_le_bytes(bytes));
    }
}

mod state;
pub use state::{QueueSnapshot, TransportSnapshot};

#[cfg(test)]
mod tests;
