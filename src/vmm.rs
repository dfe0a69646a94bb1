//! The running VMM: the event loop on the main thread, and the orderly stop of every vCPU
//! thread once the VM must end.

use std::os::fd::AsRawFd;
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
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.event_manager.run() {
                self.exit.post(ExitReason::Runtime {
                    detail: format!("event loop failed: {e}"),
                });
            }
        };
        self.stop_vcpus();
        reason
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
