//! The transport's registers and queue positions in a snapshot, and their restore with the
//! same checks a driver's writes go through.

use serde::{Deserialize, Serialize};

use super::{DEVICE_NEEDS_RESET, DRIVER_OK, FEATURES_OK, MmioTransport, QueueConfig};
use crate::devices::virtio::queue::configured_queue;

/// One queue as the driver configured it, and where the device stands in it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Entries.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// Descriptor table address.
    pub desc: u64,
    /// Available ring address.
    pub avail: u64,
    /// Used ring address.
    pub used: u64,
    /// The next available entry the device takes (activated devices).
    pub next_avail: u16,
    /// The next used entry the device fills (activated devices).
    pub next_used: u16,
}

/// A transport's registers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportSnapshot {
    /// The virtio device id (checked against the device restored behind it).
    pub device_type: u32,
    /// Device status as the driver set it (plus DEVICE_NEEDS_RESET).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The queues.
    pub queues: Vec<QueueSnapshot>,
}

/// Why a transport snapshot cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TransportStateError {
    /// The snapshot is of another kind of device.
    #[error("device type {found} where the snapshot has {expected}")]
    DeviceType {
        /// In the snapshot.
        expected: u32,
        /// Here.
        found: u32,
    },
    /// Not the device's number of queues.
    #[error("{found} queues where the device has {expected}")]
    QueueCount {
        /// The device's.
        expected: usize,
        /// In the snapshot.
        found: usize,
    },
    /// Features the device does not offer.
    #[error("acked features {0:#x} include features the device does not offer")]
    Features(u64),
    /// A status no driver can reach.
    #[error("device status {0:#x} is not one a driver can reach")]
    Status(u32),
    /// A ready queue a driver could not have made ready.
    #[error("queue {0}: size or ring addresses a driver could not have set")]
    Queue(usize),
    /// Interrupt status bits that do not exist.
    #[error("interrupt status {0:#x}")]
    Interrupt(u32),
}

/// Driver-set status values a transport can be in (the transition table's states), with
/// FAILED or DEVICE_NEEDS_RESET on top.
fn reachable(status: u32) -> bool {
    use crate::devices::virtio::status::{ACKNOWLEDGE as A, DRIVER as D, FAILED};
    let base = status & !(DEVICE_NEEDS_RESET | FAILED);
    [
        0,
        A,
        A | D,
        A | D | FEATURES_OK,
        A | D | FEATURES_OK | DRIVER_OK,
    ]
    .contains(&base)
}

impl MmioTransport {
    /// The registers and queue positions.
    pub fn save(&self) -> TransportSnapshot {
        let positions = self.device().queue_positions();
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let (next_avail, next_used) = positions.get(i).copied().unwrap_or((0, 0));
                QueueSnapshot {
                    size: q.size,
                    ready: q.ready,
                    desc: q.desc,
                    avail: q.avail,
                    used: q.used,
                    next_avail,
                    next_used,
                }
            })
            .collect();
        TransportSnapshot {
            device_type: self.device_type,
            status: self.effective_status(),
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            queues,
        }
    }

    /// Restores `s` into a fresh transport (its device just built), checking every value
    /// as a driver's writes would be checked; an activated device is activated again at the
    /// saved queue positions.
    pub fn restore(&mut self, s: &TransportSnapshot) -> Result<(), TransportStateError> {
        use crate::devices::virtio::{INT_CONFIG, INT_VRING};
        if s.device_type != self.device_type {
            return Err(TransportStateError::DeviceType {
                expected: s.device_type,
                found: self.device_type,
            });
        }
        if s.queues.len() != self.queues.len() {
            return Err(TransportStateError::QueueCount {
                expected: self.queues.len(),
                found: s.queues.len(),
            });
        }
        if s.acked_features & !self.avail_features != 0 {
            return Err(TransportStateError::Features(s.acked_features));
        }
        if !reachable(s.status) {
            return Err(TransportStateError::Status(s.status));
        }
        if s.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return Err(TransportStateError::Interrupt(s.interrupt_status));
        }
        let mut queues = Vec::with_capacity(s.queues.len());
        for (i, (q, live)) in s.queues.iter().zip(&self.queues).enumerate() {
            let restored = QueueConfig {
                max_size: live.max_size,
                size: q.size,
                ready: q.ready,
                desc: q.desc,
                avail: q.avail,
                used: q.used,
            };
            if q.ready
                && (configured_queue(live.max_size, q.size, q.desc, q.avail, q.used).is_err()
                    || !self.rings_in_ram(&restored))
            {
                return Err(TransportStateError::Queue(i));
            }
            queues.push(restored);
        }
        self.queues = queues;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        let broken = s.status & DEVICE_NEEDS_RESET != 0;
        if s.status & DRIVER_OK != 0 && !broken {
            self.status = s.status & !DRIVER_OK;
            let positions: Vec<(u16, u16)> = s
                .queues
                .iter()
                .map(|q| (q.next_avail, q.next_used))
                .collect();
            self.activate(&positions);
        } else {
            self.status = s.status;
        }
        self.interrupt.ack(!0);
        if s.interrupt_status != 0 {
            // Raised again, level as it was: the guest still has it to acknowledge.
            if s.interrupt_status & INT_VRING != 0 {
                self.interrupt.signal_used_queue();
            }
            if s.interrupt_status & INT_CONFIG != 0 {
                self.interrupt.signal_config_change();
            }
        }
        Ok(())
    }

    /// Whether the device runs (DRIVER_OK without NEEDS_RESET).
    pub fn is_active(&self) -> bool {
        self.effective_status() & (DRIVER_OK | DEVICE_NEEDS_RESET) == DRIVER_OK
    }

    /// Notifies every queue of an active device, as the guest's driver would: after a
    /// restore (or a resume) a driver using EVENT_IDX may believe it already notified.
    pub fn kick_queues(&self) {
        if !self.is_active() {
            return;
        }
        for evt in self.device().queue_events() {
            let _ = evt.write(1);
        }
    }
}
