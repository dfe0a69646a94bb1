//! The running VMM: the event loop on the main thread, and the orderly stop of every vCPU
//! thread once the VM must end.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::devices::i8042::I8042Device;
use crate::devices::serial::SerialDevice;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::exit::{ExitReason, ExitSignal};
use crate::vstate::vcpu::{VcpuHandle, VcpuMetrics};
use crate::vstate::vm::Vm;

/// What the event loop holds.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Wakes the event loop when the VM must stop (the reason itself is in the [`ExitSignal`]).
#[derive(Debug)]
pub struct ExitWatcher {
    evt: EventFd,
}

impl ExitWatcher {
    /// Watches `evt`.
    pub fn new(evt: EventFd) -> Self {
        ExitWatcher { evt }
    }
}

impl MutEventSubscriber for ExitWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            // Without this the VMM could not notice the guest's reset: refuse to go on.
            log::error!("cannot watch the exit event: {e}");
            std::process::abort();
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.evt.as_raw_fd() {
            let _ = self.evt.read();
        }
    }
}

/// Reasons for the event loop to hand control back to its caller.
#[derive(Debug, Default)]
pub struct Wake {
    /// An API request is waiting.
    pub api: AtomicBool,
    /// Metrics are due.
    pub metrics: AtomicBool,
}

impl Wake {
    fn any(&self) -> bool {
        self.api.load(Ordering::SeqCst) || self.metrics.load(Ordering::SeqCst)
    }
}

/// Raises a [`Wake`] flag whenever its eventfd (or timerfd) fires.
#[derive(Debug)]
pub struct WakeOn<F: AsRawFd + Send> {
    fd: F,
    wake: Arc<Wake>,
    which: fn(&Wake) -> &AtomicBool,
}

impl<F: AsRawFd + Send> WakeOn<F> {
    /// Raises `which(wake)` when `fd` is readable.
    pub fn new(fd: F, wake: Arc<Wake>, which: fn(&Wake) -> &AtomicBool) -> Self {
        WakeOn { fd, wake, which }
    }
}

impl<F: AsRawFd + Send> MutEventSubscriber for WakeOn<F> {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.fd, EventSet::IN)) {
            log::error!("cannot watch an event source: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Drain the counter (eventfd or timerfd expirations): 8 bytes.
        let mut buf = [0u8; 8];
        // SAFETY: reading 8 bytes into a local buffer from an fd this struct owns.
        let _ = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), 8) };
        (self.which)(&self.wake).store(true, Ordering::SeqCst);
    }
}

/// Devices the VMM keeps handles on (for metrics and the API).
#[derive(Debug)]
pub struct VmmDevices {
    /// COM1.
    pub serial: Arc<Mutex<SerialDevice>>,
    /// The i8042 controller.
    pub i8042: Arc<Mutex<I8042Device>>,
    /// Drives, root first.
    pub blocks: Vec<Arc<Mutex<Block>>>,
    /// Network interfaces.
    pub nets: Vec<Arc<Mutex<Net>>>,
    /// Exit counters of each vCPU.
    pub vcpu_metrics: Vec<Arc<VcpuMetrics>>,
}

/// A started VM.
pub struct Vmm {
    // Field order is drop order: threads are stopped before the VM and its memory go.
    vcpus: Vec<VcpuHandle>,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    devices: VmmDevices,
    vm: Vm,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus)
            .field("exit", &self.exit)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Wraps the parts the builder made.
    pub fn new(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        event_manager: EventManager<Subscriber>,
        exit: Arc<ExitSignal>,
        devices: VmmDevices,
    ) -> Self {
        Vmm {
            vcpus,
            event_manager,
            exit,
            devices,
            vm,
        }
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// The device handles.
    pub fn devices(&self) -> &VmmDevices {
        &self.devices
    }

    /// The stop signal (shared with vCPUs and devices).
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// Runs the event loop until the VM must stop, then stops every vCPU.
    pub fn run(&mut self) -> ExitReason {
        let never = Wake::default();
        let reason = loop {
            if let Some(reason) = self.run_until(&never) {
                break reason;
            }
        };
        self.stop_vcpus();
        reason
    }

    /// Runs the event loop until the VM must stop (returns why) or something raises a
    /// `wake` flag for the caller to handle (returns `None`).
    pub fn run_until(&mut self, wake: &Wake) -> Option<ExitReason> {
        loop {
            if let Some(reason) = self.exit.reason() {
                return Some(reason);
            }
            if wake.any() {
                return None;
            }
            if let Err(e) = self.event_manager.run() {
                self.exit.post(ExitReason::Runtime {
                    detail: format!("event loop failed: {e}"),
                });
            }
        }
    }

    /// Adds a subscriber to the event loop.
    pub fn add_subscriber(&mut self, subscriber: Subscriber) {
        use event_manager::SubscriberOps;
        self.event_manager.add_subscriber(subscriber);
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Asks every vCPU thread to stop, then waits for all of them.
    pub fn stop_vcpus(&mut self) {
        for vcpu in &self.vcpus {
            vcpu.stop();
        }
        for vcpu in &mut self.vcpus {
            vcpu.join();
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
