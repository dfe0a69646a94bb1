//! virtio over MMIO: the transport, the split-queue helpers, and the devices.
//!
//! A device's data path takes guest memory and queues and never touches KVM: interrupts leave
//! through an eventfd and notifications arrive through eventfds, so unit tests and fuzzers
//! drive the same code the VMM runs.

pub mod block;
pub mod mmio;
#[cfg(any(test, feature = "test-utils"))]
pub mod mock;
pub mod net;
pub mod queue;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use virtio_queue::Queue;
use vmm_sys_util::eventfd::EventFd;

use super::{Counter, IrqLine};
use crate::vstate::memory::GuestMemory;

/// Feature bits every kiln device offers or understands.
pub mod features {
    /// virtio 1.x (required: kiln has no legacy interface).
    pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
    /// Indirect descriptor tables.
    pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
    /// `used_event` / `avail_event` notification suppression.
    pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;
}

/// Device status bits (virtio 1.x, 2.1).
pub mod status {
    /// The guest noticed the device.
    pub const ACKNOWLEDGE: u32 = 1;
    /// The guest has a driver for it.
    pub const DRIVER: u32 = 2;
    /// The driver is ready.
    pub const DRIVER_OK: u32 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u32 = 8;
    /// The device hit an error and needs a reset.
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    /// The driver gave up on the device.
    pub const FAILED: u32 = 128;
}

/// Interrupt status bits.
pub const INT_VRING: u32 = 1;
/// Configuration change interrupt.
pub const INT_CONFIG: u32 = 2;

/// The interrupt of one virtio device: the status register the driver reads and acks, and
/// the line (KVM_IRQ_LINE or an irqfd, see [`IrqLine`]) that tells it to look.
#[derive(Debug)]
pub struct VirtioInterrupt {
    status: AtomicU32,
    irq: IrqLine,
    /// Interrupts that could not be raised.
    pub failures: Counter,
}

impl VirtioInterrupt {
    /// An interrupt raised through `irq`.
    pub fn new(irq: IrqLine) -> Self {
        VirtioInterrupt {
            status: AtomicU32::new(0),
            irq,
            failures: Counter::default(),
        }
    }

    fn raise(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        if self.irq.trigger().is_err() {
            self.failures.inc();
        }
    }

    /// The device put buffers in a used ring.
    pub fn signal_used_queue(&self) {
        self.raise(INT_VRING);
    }

    /// The device's configuration changed.
    pub fn signal_config_change(&self) {
        self.raise(INT_CONFIG);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// InterruptACK: clears the acknowledged bits.
    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Clears everything (device reset).
    pub fn reset(&self) {
        self.status.store(0, Ordering::SeqCst);
    }

    /// The eventfd behind the line.
    pub fn irq(&self) -> &IrqLine {
        &self.irq
    }
}

/// What a device gets when the driver sets DRIVER_OK.
#[derive(Debug)]
pub struct Activation {
    /// Guest memory.
    pub mem: GuestMemory,
    /// The queues the driver configured, validated.
    pub queues: Vec<Queue>,
    /// Features both sides agreed on.
    pub acked_features: u64,
    /// The device's interrupt.
    pub interrupt: Arc<VirtioInterrupt>,
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ActivateError {
    /// The driver enabled fewer or more queues than the device uses.
    #[error("expected {expected} queues, the driver configured {got}")]
    QueueCount {
        /// Queues the device has.
        expected: usize,
        /// Queues the driver made ready.
        got: usize,
    },
    /// A device-specific failure.
    #[error("{0}")]
    Device(String),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device id (1 net, 2 block).
    fn device_type(&self) -> u32;
    /// Largest size of each queue.
    fn queue_max_sizes(&self) -> &[u16];
    /// Features the device offers.
    fn avail_features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device-specific configuration space.
    fn write_config(&mut self, offset: u64, data: &[u8]);
    /// Starts the data path.
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError>;
    /// Stops the data path and forgets the queues (driver reset).
    fn reset(&mut self);
    /// One eventfd per queue, signalled when the driver notifies that queue (KVM ioeventfd).
    fn queue_events(&self) -> &[EventFd];
    /// Changes whenever the device changes its configuration space.
    fn config_generation(&self) -> u32 {
        0
    }
    /// The device hit an error only a reset clears (DEVICE_NEEDS_RESET).
    fn needs_reset(&self) -> bool {
        false
    }

    /// Where each activated queue stands, as (next available, next used), for a snapshot.
    /// Chains the device took from a ring but has not answered count as not taken, so a
    /// restored device takes them again. Empty when the device is not activated.
    fn queue_positions(&self) -> Vec<(u16, u16)> {
        Vec::new()
    }
}

/// Copies `data.len()` bytes of `config` at `offset` out, filling what lies past its end with
/// zeros (reads past a device's config space are not an error).
pub fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(start) = usize::try_from(offset) else {
        return;
    };
    if start >= config.len() {
        return;
    }
    let n = data.len().min(config.len() - start);
    data[..n].copy_from_slice(&config[start..start + n]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    #[test]
    fn interrupt_status_and_ack() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let i = VirtioInterrupt::new(IrqLine::new(evt.try_clone().unwrap()));
        i.signal_used_queue();
        i.signal_config_change();
        assert_eq!(i.status(), INT_VRING | INT_CONFIG);
        assert_eq!(evt.read().unwrap(), 2);
        i.ack(INT_VRING);
        assert_eq!(i.status(), INT_CONFIG);
        i.reset();
        assert_eq!(i.status(), 0);
    }

    #[test]
    fn config_reads_are_bounded() {
        let cfg = [1u8, 2, 3, 4];
        let mut d = [9u8; 4];
        read_config_bytes(&cfg, 2, &mut d);
        assert_eq!(d, [3, 4, 0, 0]);
        read_config_bytes(&cfg, 100, &mut d);
        assert_eq!(d, [0; 4]);
        read_config_bytes(&cfg, u64::MAX, &mut d);
        assert_eq!(d, [0; 4]);
    }
}
