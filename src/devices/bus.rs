//! The port-I/O and MMIO buses: address ranges mapped to devices, and the dispatch of a vCPU
//! exit to the device that owns the address.
//!
//! A bus is built before the vCPUs start and never changes afterwards, so lookups need no
//! lock; each device has its own mutex.

use std::sync::{Arc, Mutex, PoisonError};

/// A device reachable through a bus. `offset` is relative to the base of the range the
/// device was registered at.
pub trait BusDevice: Send {
    /// A guest read of `data.len()` bytes at `offset`.
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// A guest write of `data` at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// A device shared between the bus (vCPU threads) and its other users (the event loop).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Errors registering a device.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The range overlaps a device already registered.
    #[error("bus range {base:#x}+{len:#x} overlaps another device")]
    Overlap {
        /// Base of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
    /// The range is empty or wraps around.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps")]
    BadRange {
        /// Base of the refused range.
        base: u64,
        /// Its length.
        len: u64,
    },
}

struct BusRange {
    base: u64,
    len: u64,
    device: SharedDevice,
}

/// A set of non-overlapping address ranges, sorted by base.
#[derive(Default)]
pub struct Bus {
    ranges: Vec<BusRange>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.ranges.iter().map(|r| (r.base, r.len)))
            .finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` for `[base, base + len)`.
    pub fn insert(&mut self, device: SharedDevice, base: u64, len: u64) -> Result<(), BusError> {
        let end = base
            .checked_add(len)
            .filter(|_| len > 0)
            .ok_or(BusError::BadRange { base, len })?;
        let pos = self.ranges.partition_point(|r| r.base < base);
        let overlaps_prev = pos > 0 && {
            let p = &self.ranges[pos - 1];
            p.base + p.len > base
        };
        let overlaps_next = pos < self.ranges.len() && self.ranges[pos].base < end;
        if overlaps_prev || overlaps_next {
            return Err(BusError::Overlap { base, len });
        }
        self.ranges.insert(pos, BusRange { base, len, device });
        Ok(())
    }

    /// The device and offset for an access of `size` bytes at `addr`, if one device holds
    /// the whole access.
    fn resolve(&self, addr: u64, size: usize) -> Option<(&SharedDevice, u64)> {
        let pos = self.ranges.partition_point(|r| r.base <= addr);
        let range = self.ranges.get(pos.checked_sub(1)?)?;
        let offset = addr - range.base;
        let end = offset.checked_add(size as u64)?;
        (end <= range.len).then_some((&range.device, offset))
    }

    /// Dispatches a read; returns false (and fills `data` with ones, like an open bus) when
    /// no device claims the address.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false when no device claims the address.
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.resolve(addr, data.len()) {
            Some((device, offset)) => {
                device
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Recorder {
        last_write: Option<(u64, Vec<u8>)>,
    }

    impl BusDevice for Recorder {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.last_write = Some((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatch_by_range() {
        let mut bus = Bus::new();
        let a = Arc::new(Mutex::new(Recorder::default()));
        let b = Arc::new(Mutex::new(Recorder::default()));
        bus.insert(a.clone(), 0x3f8, 8).unwrap();
        bus.insert(b.clone(), 0x60, 5).unwrap();
        let mut d = [0u8; 1];
        assert!(bus.read(0x3fd, &mut d));
        assert_eq!(d, [5]);
        assert!(bus.write(0x64, &[0xfe]));
        assert_eq!(b.lock().unwrap().last_write, Some((4, vec![0xfe])));
        assert!(a.lock().unwrap().last_write.is_none());
    }

    #[test]
    fn unclaimed_addresses() {
        let mut bus = Bus::new();
        bus.insert(Arc::new(Mutex::new(Recorder::default())), 0x100, 0x10)
            .unwrap();
        let mut d = [0u8; 4];
        assert!(!bus.read(0xff, &mut d));
        assert_eq!(d, [0xff; 4]);
        assert!(!bus.read(0x110, &mut d));
        // An access that straddles the end of the range is not the device's.
        assert!(!bus.read(0x10e, &mut d));
        assert!(bus.read(0x10c, &mut d));
        assert!(!bus.write(u64::MAX, &[1, 2]));
    }

    #[test]
    fn overlaps_are_refused() {
        let mut bus = Bus::new();
        let d = || -> SharedDevice { Arc::new(Mutex::new(Recorder::default())) };
        bus.insert(d(), 0x1000, 0x1000).unwrap();
        assert!(bus.insert(d(), 0x1fff, 1).is_err());
        assert!(bus.insert(d(), 0x800, 0x801).is_err());
        assert!(bus.insert(d(), 0x0, 0x2000_0000).is_err());
        bus.insert(d(), 0x800, 0x800).unwrap();
        bus.insert(d(), 0x2000, 0x10).unwrap();
        assert!(matches!(
            bus.insert(d(), u64::MAX, 2),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.insert(d(), 0x5000, 0).is_err());
    }
}
