//! Device models. Every device here runs without KVM: the bus hands it offsets and bytes,
//! interrupts go out through eventfds, so tests and fuzzers drive it directly.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod registry;
pub mod serial;
pub mod virtio;

use std::sync::atomic::{AtomicU64, Ordering};

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd that KVM turns into an edge on a GSI (irqfd).
#[derive(Debug)]
pub struct IrqLine(EventFd);

impl IrqLine {
    /// A line backed by `evt`.
    pub fn new(evt: EventFd) -> Self {
        IrqLine(evt)
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.0
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        IrqLine::trigger(self)
    }
}

/// A monotonically increasing counter, shared lock-free between threads.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

/// Serialized as its current value (metrics).
impl serde::Serialize for Counter {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.get())
    }
}

impl Counter {
    /// Adds one.
    pub fn inc(&self) {
        self.add(1);
    }

    /// Adds `n`.
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    /// The current value.
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
