//! Device models. Every device here runs without KVM: the bus hands it offsets and bytes,
//! interrupts go out through eventfds (or KVM_IRQ_LINE in a real VM, see [`IrqLine`]), so tests
//! and fuzzers drive it directly.

pub mod boot_timer;
pub mod bus;
pub mod i8042;
pub mod registry;
pub mod serial;
pub mod virtio;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an edge on a GSI of the in-kernel IOAPIC.
///
/// Raised by writing an eventfd that KVM has as an irqfd for the GSI (what tests and fuzzers
/// read back), or, on a line made with [`IrqLine::direct`], by KVM_IRQ_LINE on the VM fd.
/// An irqfd on an IOAPIC pin cannot inject where it is signalled: KVM hands every signal to a
/// kworker, which on a busy host preempts the signalling device thread and then injects (seen
/// in `perf sched`: one kworker preemption of kiln's event loop per interrupt). KVM_IRQ_LINE
/// injects in the caller's own system call, exactly as the irqfd does it (the pin up, then
/// down, from the same user-space IRQ source).
#[derive(Debug)]
pub struct IrqLine {
    evt: EventFd,
    direct: Option<(Arc<VmFd>, u32)>,
}

impl IrqLine {
    /// A line backed by `evt` (registered as an irqfd, or read by a test).
    pub fn new(evt: EventFd) -> Self {
        IrqLine { evt, direct: None }
    }

    /// A line raised with KVM_IRQ_LINE on GSI `gsi` of `vm`; `evt` stays for
    /// [`IrqLine::eventfd`] and is not written.
    pub fn direct(evt: EventFd, vm: Arc<VmFd>, gsi: u32) -> Self {
        IrqLine {
            evt,
            direct: Some((vm, gsi)),
        }
    }

    /// The eventfd to register with KVM.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }

    /// Another handle on the same line, raised the same way.
    pub fn try_clone(&self) -> std::io::Result<IrqLine> {
        Ok(IrqLine {
            evt: self.evt.try_clone()?,
            direct: self.direct.clone(),
        })
    }

    /// Raises the interrupt.
    pub fn trigger(&self) -> std::io::Result<()> {
        match &self.direct {
            Some((vm, gsi)) => vm
                .set_irq_line(*gsi, true)
                .and_then(|()| vm.set_irq_line(*gsi, false))
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno())),
            None => self.evt.write(1),
        }
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
