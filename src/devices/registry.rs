//! Every device the builder placed, with where it sits: the VMM enumerates them for
//! metrics (and, for state save and restore, in a fixed order) without downcasts.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::boot_timer::BootTimer;
use super::i8042::I8042Device;
use super::serial::SerialDevice;
use super::virtio::block::Block;
use super::virtio::mmio::MmioTransport;
use super::virtio::net::Net;

/// A device and its concrete type.
#[derive(Debug)]
pub enum Device {
    /// COM1.
    Serial(Arc<Mutex<SerialDevice>>),
    /// The i8042 controller (reset line, Ctrl+Alt+Del).
    I8042(Arc<Mutex<I8042Device>>),
    /// The boot-timer device.
    BootTimer(Arc<Mutex<BootTimer>>),
    /// A virtio-blk device and its MMIO transport.
    Block {
        /// The device.
        device: Arc<Mutex<Block>>,
        /// Its transport (registers, queues).
        transport: Arc<Mutex<MmioTransport>>,
    },
    /// A virtio-net device and its MMIO transport.
    Net {
        /// The device.
        device: Arc<Mutex<Net>>,
        /// Its transport (registers, queues).
        transport: Arc<Mutex<MmioTransport>>,
    },
}

/// Where a device is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// Port I/O range.
    Pio {
        /// First port.
        base: u64,
        /// Number of ports.
        len: u64,
    },
    /// MMIO range, with the GSI of its interrupt if it has one of its own.
    Mmio {
        /// First address.
        base: u64,
        /// Size in bytes.
        len: u64,
        /// Interrupt line (virtio devices).
        gsi: Option<u32>,
    },
}

/// One placed device.
#[derive(Debug)]
pub struct Entry {
    /// The device.
    pub device: Device,
    /// Where it is.
    pub location: Location,
}

/// The devices of one VM, in the order they were placed.
#[derive(Debug, Default)]
pub struct DeviceRegistry {
    entries: Vec<Entry>,
}

/// Locks a device; a poisoned lock (a panic elsewhere; kiln aborts on panic) is taken as is.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl DeviceRegistry {
    /// Records a placed device.
    pub fn add(&mut self, device: Device, location: Location) {
        self.entries.push(Entry { device, location });
    }

    /// Every device, in placement order.
    pub fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.entries.iter()
    }

    /// The serial console.
    pub fn serial(&self) -> Option<&Arc<Mutex<SerialDevice>>> {
        self.entries.iter().find_map(|e| match &e.device {
            Device::Serial(d) => Some(d),
            _ => None,
        })
    }

    /// The i8042 controller.
    pub fn i8042(&self) -> Option<&Arc<Mutex<I8042Device>>> {
        self.entries.iter().find_map(|e| match &e.device {
            Device::I8042(d) => Some(d),
            _ => None,
        })
    }

    /// The drives, in slot order (root first).
    pub fn blocks(&self) -> impl Iterator<Item = &Arc<Mutex<Block>>> {
        self.entries.iter().filter_map(|e| match &e.device {
            Device::Block { device, .. } => Some(device),
            _ => None,
        })
    }

    /// The drive with id `drive_id`.
    pub fn block(&self, drive_id: &str) -> Option<&Arc<Mutex<Block>>> {
        self.blocks()
            .find(|b| lock(b.as_ref()).config().drive_id == drive_id)
    }

    /// The network interface with id `iface_id`.
    pub fn net(&self, iface_id: &str) -> Option<&Arc<Mutex<Net>>> {
        self.nets()
            .find(|n| lock(n.as_ref()).config().iface_id == iface_id)
    }

    /// The network interfaces, in slot order.
    pub fn nets(&self) -> impl Iterator<Item = &Arc<Mutex<Net>>> {
        self.entries.iter().filter_map(|e| match &e.device {
            Device::Net { device, .. } => Some(device),
            _ => None,
        })
    }
}
