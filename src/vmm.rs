//! The running VM and its one loop.
//!
//! [`Vmm`] owns everything a started VM is made of — the KVM VM and its guest memory, the
//! vCPU threads, every device (in a [`DeviceRegistry`]) and the event loop — and
//! [`Vmm::run`] is the only loop: it serves the guest's device events, the API channel and
//! the timers (periodic metrics) on the main thread until the VM must end, then stops every
//! vCPU. Pausing and resuming at a safe point live here too.

use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, EventSet, Events, MutEventSubscriber, SubscriberOps};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::actions::{ActionHandler, Machine};
use crate::api::{VmmAction, VmmResponse};
use crate::config::VmConfig;
use crate::devices::i8042::I8042Error;
use crate::devices::registry::{Device, DeviceRegistry, lock};
use crate::devices::virtio::block::DiskFile;
use crate::exit::{ExitReason, ExitSignal};
use crate::metrics::{FLUSH_INTERVAL, Section, device_sections};
use crate::migration::send::{Job, Reply, Request};
use crate::migration::worker::Worker;
use crate::migration::{Backends, Endpoint, MigrationError, MigrationStats, SendParams};
use crate::rate_limiter::LimiterUpdate;
use crate::snapshot::digest::MemoryDigest;
use crate::snapshot::working_set::Recorder;
use crate::snapshot::{Key, SnapshotCreateParams, SnapshotError};
use crate::vstate::vcpu::{VcpuHandle, VcpuMetrics, VcpuState};
use crate::vstate::vm::Vm;

/// What the event loop holds.
pub type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// Where the API's requests come from and its answers go (the API server's bridge).
pub trait ApiChannel {
    /// The next request, if one is waiting.
    fn try_recv(&self) -> Option<VmmAction>;
    /// Answers the request taken last.
    fn respond(&self, response: VmmResponse);
}

impl ApiChannel for crate::api::server::ApiBridge {
    fn try_recv(&self) -> Option<VmmAction> {
        crate::api::server::ApiBridge::try_recv(self)
    }

    fn respond(&self, response: VmmResponse) {
        crate::api::server::ApiBridge::respond(self, response);
    }
}

/// Errors of operations on the running VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// A vCPU thread ended before it could park.
    #[error("The microVM could not be paused: a vCPU has stopped.")]
    VcpuGone,
    /// No drive has that id.
    #[error("no drive `{0}`")]
    NoSuchDrive(String),
    /// The i8042 controller could not take the key sequence.
    #[error(transparent)]
    I8042(#[from] I8042Error),
    /// The VM has no i8042 controller.
    #[error("the microVM has no i8042 controller")]
    NoI8042,
    /// No network interface has that id.
    #[error("no network interface `{0}`")]
    NoSuchInterface(String),
    /// A drive could not finish the requests it had in flight.
    #[error("drive {id}: cannot finish its requests in flight: {source}")]
    Drain {
        /// The drive.
        id: String,
        /// Why.
        source: std::io::Error,
    },
    /// A rate limiter's timer could not be set.
    #[error("cannot update the rate limiter of `{id}`: {source}")]
    RateLimiter {
        /// The drive or interface.
        id: String,
        /// Why.
        source: std::io::Error,
    },
}

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

/// Work for [`Vmm::run`] that the event loop's subscribers cannot do themselves (they do
/// not own the VM): raised by a [`WakeOn`], taken by the loop after the event round.
#[derive(Debug, Default)]
pub struct Wake {
    /// An API request is waiting.
    pub api: AtomicBool,
    /// Metrics are due.
    pub metrics: AtomicBool,
    /// The working set is due to be recorded.
    pub working_set: AtomicBool,
    /// The migration thread has a request.
    pub migration: AtomicBool,
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

/// A started VM: the one owner of its vCPUs, memory, devices and event loop.
pub struct Vmm {
    // Field order is drop order: threads are stopped before the VM and its memory go.
    vcpus: Vec<VcpuHandle>,
    event_manager: EventManager<Subscriber>,
    exit: Arc<ExitSignal>,
    devices: DeviceRegistry,
    vcpu_metrics: Vec<Arc<VcpuMetrics>>,
    wake: Arc<Wake>,
    paused: bool,
    /// With a snapshot key: the memory's chunk digests as of the last snapshot or restore.
    memory_digest: Option<MemoryDigest>,
    /// A working set to record once the restored guest has run for a while.
    working_set: Option<Recorder>,
    /// The migration thread, once started.
    migration: Option<Worker>,
    /// The migration under way.
    outgoing: Option<Outgoing>,
    vm: Vm,
}

/// A migration under way on the source.
#[derive(Debug)]
struct Outgoing {
    /// The migration paused the vCPUs (they resume if it fails).
    paused_here: bool,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus)
            .field("exit", &self.exit)
            .field("paused", &self.paused)
            .field("vm", &self.vm)
            .finish_non_exhaustive()
    }
}

impl Vmm {
    /// Wraps the parts the builder made and arms the periodic metrics timer.
    pub fn new(
        vm: Vm,
        vcpus: Vec<VcpuHandle>,
        event_manager: EventManager<Subscriber>,
        exit: Arc<ExitSignal>,
        devices: DeviceRegistry,
        vcpu_metrics: Vec<Arc<VcpuMetrics>>,
    ) -> Self {
        let mut vmm = Vmm {
            vcpus,
            event_manager,
            exit,
            devices,
            vcpu_metrics,
            wake: Arc::new(Wake::default()),
            paused: false,
            memory_digest: None,
            working_set: None,
            migration: None,
            outgoing: None,
            vm,
        };
        match TimerFd::new() {
            Ok(mut timer) => match timer.reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL)) {
                Ok(()) => vmm.wake_on(timer, |w| &w.metrics),
                Err(e) => log::warn!("periodic metrics disabled: {e}"),
            },
            Err(e) => log::warn!("periodic metrics disabled: {e}"),
        }
        vmm
    }

    /// Records the guest's working set with `recorder` (its timer's descriptor `timer_fd`)
    /// once the guest has run for the recorder's delay; armed now if the vCPUs run.
    pub fn record_working_set(&mut self, mut recorder: Recorder, timer_fd: OwnedFd) {
        self.wake_on(timer_fd, |w| &w.working_set);
        if !self.paused {
            recorder.arm();
        }
        self.working_set = Some(recorder);
    }

    fn working_set_due(&mut self) {
        let Some(recorder) = self.working_set.take() else {
            return;
        };
        match recorder.record(self.vm.memory()) {
            Ok(ws) => log::info!(
                "working set recorded: {} pages ({} KiB) in {} runs",
                ws.pages(),
                ws.pages() * 4,
                ws.runs().len()
            ),
            Err(e) => log::warn!("working set not recorded: {e}"),
        }
    }

    /// Records the memory's chunk digests a keyed restore verified, for the next Diff.
    pub fn set_memory_digest(&mut self, digest: Option<MemoryDigest>) {
        self.memory_digest = digest;
    }

    /// Waits until every vCPU is parked (a VM restored paused) and records it as paused.
    pub fn wait_paused(&mut self) {
        for vcpu in &self.vcpus {
            vcpu.wait_paused();
        }
        self.paused = true;
    }

    /// Takes the migration thread and the eventfd it wakes the VMM thread with.
    pub fn adopt_migration(&mut self, (worker, evt): (Worker, EventFd)) {
        self.wake_on(evt, |w| &w.migration);
        self.migration = Some(worker);
    }

    /// `PUT /migration/send`: hands the migration to its thread; the answer comes when it
    /// ends ([`Vmm::migration_events`]).
    fn start_migration(
        &mut self,
        params: SendParams,
        key: Option<&Key>,
    ) -> Result<(), MigrationError> {
        if self.outgoing.is_some() {
            return Err(MigrationError::Busy("a migration is already under way"));
        }
        let worker = self.migration.as_ref().ok_or(MigrationError::Busy(
            "live migration is not available in this process",
        ))?;
        Endpoint::parse(&params.destination, "destination")?;
        worker.start(Job {
            params,
            dirty: self.vm.dirty_log().clone(),
            track_dirty_pages: self.vm.tracks_dirty_pages(),
            every_page: self.vm.page_fault_handler().is_some(),
            key: key.copied(),
            backends: Backends::of(&self.devices),
        })?;
        self.outgoing = Some(Outgoing { paused_here: false });
        Ok(())
    }

    /// Serves the migration thread: pauses and saves the VM when asked (then waits for the
    /// end, the vCPUs and devices standing still), and returns the API's answer once the
    /// migration ended.
    fn migration_events(
        &mut self,
        config: Option<VmConfig>,
        key: Option<&Key>,
    ) -> Option<VmmResponse> {
        let worker = self.migration.take()?;
        let mut answer = None;
        while let Ok(request) = worker.requests.try_recv() {
            match request {
                Request::PauseAndSave => {
                    let state = self.pause_and_save(config.as_ref(), key);
                    let saved = state.is_ok();
                    let _ = worker.replies.send(Reply::State(state));
                    if !saved {
                        continue;
                    }
                    // The guest stands still until the migration ends either way; the
                    // migration thread's socket timeouts bound the wait.
                    while let Ok(request) = worker.requests.recv() {
                        match request {
                            Request::Finished(result) => {
                                answer = Some(self.finish_migration(result));
                                break;
                            }
                            Request::PauseAndSave => {
                                let _ = worker
                                    .replies
                                    .send(Reply::State(Err("already paused".into())));
                            }
                        }
                    }
                    break;
                }
                Request::Finished(result) => {
                    answer = Some(self.finish_migration(result));
                    break;
                }
            }
        }
        self.migration = Some(worker);
        answer
    }

    fn pause_and_save(
        &mut self,
        config: Option<&VmConfig>,
        key: Option<&Key>,
    ) -> Result<Vec<u8>, String> {
        let config = config.ok_or("the microVM has no configuration")?;
        if !self.paused {
            self.pause().map_err(|e| e.to_string())?;
            if let Some(o) = &mut self.outgoing {
                o.paused_here = true;
            }
        }
        // Requests taken since the pause are finished first (as for a snapshot).
        self.drain_drives()
            .map_err(|(id, e)| format!("drive {id}: cannot finish its requests: {e}"))?;
        let state = crate::snapshot::capture(config, &self.vm, &self.vcpus, &self.devices)
            .map_err(|e| e.to_string())?;
        let payload = serde_json::to_vec(&state).map_err(|e| e.to_string())?;
        Ok(crate::snapshot::format::encode(&payload, key))
    }

    fn finish_migration(&mut self, result: Result<MigrationStats, MigrationError>) -> VmmResponse {
        use std::sync::atomic::Ordering::Relaxed;
        let outgoing = self.outgoing.take();
        match result {
            Ok(stats) => {
                crate::migration::METRICS.completed.fetch_add(1, Relaxed);
                log::info!(
                    "migrated: {} rounds, {} bytes, downtime {} ms, total {} ms",
                    stats.rounds,
                    stats.bytes_sent,
                    stats.downtime_ms,
                    stats.total_ms
                );
                self.exit.post(ExitReason::Migrated);
                VmmResponse::Json(serde_json::json!(stats).to_string())
            }
            Err(e) => {
                crate::migration::METRICS.failed.fetch_add(1, Relaxed);
                log::warn!("migration failed: {e}");
                // (The migration thread has put the TAPs, drives and dirty logging back.)
                if !matches!(e, MigrationError::InDoubt(_))
                    && outgoing.is_some_and(|o| o.paused_here)
                    && let Err(e) = self.resume()
                {
                    log::error!("cannot resume after the failed migration: {e}");
                }
                VmmResponse::bad_request(format!("Migration error: {e}"))
            }
        }
    }

    /// Serves API requests whenever `evt` (the API bridge's eventfd) fires.
    pub fn watch_api(&mut self, evt: EventFd) {
        self.wake_on(evt, |w| &w.api);
    }

    fn wake_on<F: AsRawFd + Send + 'static>(&mut self, fd: F, which: fn(&Wake) -> &AtomicBool) {
        let source = WakeOn::new(fd, self.wake.clone(), which);
        self.event_manager
            .add_subscriber(Arc::new(Mutex::new(source)));
    }

    /// The VM.
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Every device.
    pub fn devices(&self) -> &DeviceRegistry {
        &self.devices
    }

    /// The stop signal (shared with vCPUs and devices).
    pub fn exit_signal(&self) -> &Arc<ExitSignal> {
        &self.exit
    }

    /// The vCPUs.
    pub fn vcpus(&self) -> &[VcpuHandle] {
        &self.vcpus
    }

    /// Runs the VM until it must end: device events, the API's requests (answered by
    /// `actions`), periodic metrics. Stops every vCPU, writes the last metrics, and says why
    /// the VM ended.
    pub fn run(&mut self, api: Option<&dyn ApiChannel>, actions: &mut ActionHandler) -> ExitReason {
        let reason = loop {
            if let Some(reason) = self.exit.reason() {
                break reason;
            }
            if let Err(e) = self.event_manager.run() {
                self.exit.post(ExitReason::Runtime {
                    detail: format!("event loop failed: {e}"),
                });
                continue;
            }
            if self.wake.api.swap(false, Ordering::SeqCst)
                && let Some(api) = api
            {
                while let Some(action) = api.try_recv() {
                    if let VmmAction::SendMigration(params) = action {
                        // Answered when the migration ends; the API thread waits for it.
                        match self.start_migration(params, actions.snapshot_key()) {
                            Ok(()) => break,
                            Err(e) => {
                                api.respond(VmmResponse::bad_request(format!(
                                    "Migration error: {e}"
                                )));
                                continue;
                            }
                        }
                    }
                    let response = actions.handle_running(action, self);
                    api.respond(response);
                }
            }
            if self.wake.migration.swap(false, Ordering::SeqCst) {
                let config = actions.resources().to_config();
                if let Some(response) = self.migration_events(config, actions.snapshot_key())
                    && let Some(api) = api
                {
                    api.respond(response);
                }
            }
            if self.wake.metrics.swap(false, Ordering::SeqCst) {
                actions.flush_metrics(Some(self));
            }
            if self.wake.working_set.swap(false, Ordering::SeqCst) {
                self.working_set_due();
            }
        };
        self.stop_vcpus();
        actions.flush_metrics(Some(self));
        reason
    }

    /// Finishes every async drive's requests in flight (answering them), so a paused or
    /// saved VM has none half-done. Sync drives never hold any.
    fn drain_drives(&self) -> Result<(), (String, std::io::Error)> {
        for block in self.devices.blocks() {
            let mut b = lock(block.as_ref());
            if let Err(e) = b.drain() {
                return Err((b.config().drive_id.clone(), e));
            }
        }
        Ok(())
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

impl Machine for Vmm {
    fn is_paused(&self) -> bool {
        self.paused
    }

    /// Parks every vCPU outside KVM_RUN and waits until all are parked.
    fn pause(&mut self) -> Result<(), VmmError> {
        for vcpu in &self.vcpus {
            vcpu.pause();
        }
        for vcpu in &self.vcpus {
            vcpu.wait_paused();
        }
        self.paused = self.vcpus.iter().all(|v| v.state() == VcpuState::Paused);
        if !self.paused {
            return Err(VmmError::VcpuGone);
        }
        // The guest cannot ask for more now; what it asked for before is finished.
        self.drain_drives()
            .map_err(|(id, source)| VmmError::Drain { id, source })
    }

    fn resume(&mut self) -> Result<(), VmmError> {
        for vcpu in &self.vcpus {
            vcpu.resume();
        }
        self.paused = false;
        if let Some(recorder) = &mut self.working_set {
            recorder.arm();
        }
        // As after a restore: a driver with EVENT_IDX may have notified while the device
        // could not see it; a spurious notification costs one look at the ring.
        for entry in self.devices.iter() {
            if let Device::Block { transport, .. } | Device::Net { transport, .. } = &entry.device {
                lock(transport.as_ref()).kick_queues();
            }
        }
        Ok(())
    }

    fn send_ctrl_alt_del(&mut self) -> Result<(), VmmError> {
        let i8042 = self.devices.i8042().ok_or(VmmError::NoI8042)?;
        lock(i8042.as_ref()).trigger_ctrl_alt_del()?;
        Ok(())
    }

    fn swap_drive(&mut self, drive_id: &str, disk: DiskFile) -> Result<(), VmmError> {
        let block = self
            .devices
            .block(drive_id)
            .ok_or_else(|| VmmError::NoSuchDrive(drive_id.to_string()))?;
        lock(block.as_ref()).update_disk(disk);
        Ok(())
    }

    fn update_drive_limiter(
        &mut self,
        drive_id: &str,
        update: &LimiterUpdate,
    ) -> Result<(), VmmError> {
        let block = self
            .devices
            .block(drive_id)
            .ok_or_else(|| VmmError::NoSuchDrive(drive_id.to_string()))?;
        lock(block.as_ref())
            .update_rate_limiter(update)
            .map_err(|source| VmmError::RateLimiter {
                id: drive_id.to_string(),
                source,
            })
    }

    fn update_net_limiters(
        &mut self,
        iface_id: &str,
        rx: &LimiterUpdate,
        tx: &LimiterUpdate,
    ) -> Result<(), VmmError> {
        let net = self
            .devices
            .net(iface_id)
            .ok_or_else(|| VmmError::NoSuchInterface(iface_id.to_string()))?;
        lock(net.as_ref())
            .update_rate_limiters(rx, tx)
            .map_err(|source| VmmError::RateLimiter {
                id: iface_id.to_string(),
                source,
            })
    }

    fn metrics_sections(&self) -> Vec<Section> {
        device_sections(&self.devices, &self.vcpu_metrics)
    }

    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        config: &VmConfig,
        key: Option<&Key>,
    ) -> Result<(), SnapshotError> {
        // The action handler refuses a running VM; a vCPU that is not parked refuses to
        // save its state. Requests taken since the pause (a notification the loop saw
        // late, a rate limiter's timer) are finished first.
        self.drain_drives()
            .map_err(|(id, source)| SnapshotError::Drain { id, source })?;
        crate::snapshot::create(
            params,
            config,
            &self.vm,
            &self.vcpus,
            &self.devices,
            key,
            &mut self.memory_digest,
        )
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        self.stop_vcpus();
    }
}
