//! The VMM thread's side of the control API: the resources configured before boot, the
//! pre-boot and post-boot rules, and every action applied to the running VM.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::json;
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{
    DriveUpdate, ERR_AFTER_BOOT, ERR_BEFORE_BOOT, MachineConfigUpdate, NetUpdate, VmmAction,
    VmmResponse,
};
use crate::builder::{RunOptions, StartError, build_and_start};
use crate::config::{
    BootSourceConfig, DriveConfig, LoggerConfig, MachineConfig, MetricsConfig, NetConfig, VmConfig,
    validate_boot_source, validate_drives, validate_machine, validate_net,
};
use crate::devices::virtio::block::DiskFile;
use crate::exit::ExitReason;
use crate::metrics::{FLUSH_INTERVAL, Metrics, Section, open_sink, vmm_sections};
use crate::vmm::{Vmm, Wake, WakeOn};
use crate::vstate::vcpu::VcpuState;

/// kiln's version, reported by `GET /` and `GET /version`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

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

/// What the API has configured so far (Firecracker's "VM resources").
#[derive(Clone, Debug, Default)]
pub struct VmResources {
    /// `boot-source`.
    pub boot_source: Option<BootSourceConfig>,
    /// `machine-config`.
    pub machine: MachineConfig,
    /// `drives`.
    pub drives: Vec<DriveConfig>,
    /// `network-interfaces`.
    pub nets: Vec<NetConfig>,
    /// `logger`.
    pub logger: Option<LoggerConfig>,
    /// `metrics`.
    pub metrics: Option<MetricsConfig>,
}

impl VmResources {
    /// The resources a config file describes.
    pub fn from_config(config: VmConfig) -> Self {
        VmResources {
            boot_source: Some(config.boot_source),
            machine: config.machine_config,
            drives: config.drives,
            nets: config.network_interfaces,
            logger: config.logger,
            metrics: config.metrics,
        }
    }

    /// The configuration to boot, once a kernel is set.
    pub fn to_config(&self) -> Option<VmConfig> {
        Some(VmConfig {
            boot_source: self.boot_source.clone()?,
            machine_config: self.machine.clone(),
            drives: self.drives.clone(),
            network_interfaces: self.nets.clone(),
            logger: self.logger.clone(),
            metrics: self.metrics.clone(),
        })
    }

    /// `GET /vm/config`: the configuration in Firecracker's full-configuration shape, which
    /// is also a valid config file.
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = json!({
            "machine-config": self.machine,
            "drives": self.drives,
            "network-interfaces": self.nets,
        });
        if let Some(b) = &self.boot_source {
            v["boot-source"] = json!(b);
        }
        if let Some(l) = &self.logger {
            v["logger"] = json!(l);
        }
        if let Some(m) = &self.metrics {
            v["metrics"] = json!(m);
        }
        v
    }
}

/// Runs the VM's life: the configuration, the start, and every later action.
pub struct Controller {
    id: String,
    resources: VmResources,
    opts: RunOptions,
    metrics: Metrics,
    /// Extra metrics sections (the API server's counters), produced on demand.
    extra_metrics: Option<Box<dyn Fn() -> Vec<Section> + Send>>,
    vmm: Option<Vmm>,
    paused: bool,
    wake: Arc<Wake>,
    api_evt: Option<EventFd>,
}

impl std::fmt::Debug for Controller {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Controller")
            .field("id", &self.id)
            .field("started", &self.vmm.is_some())
            .field("paused", &self.paused)
            .finish_non_exhaustive()
    }
}

fn ok() -> VmmResponse {
    VmmResponse::NoContent
}

fn bad(message: impl std::fmt::Display) -> VmmResponse {
    VmmResponse::bad_request(message.to_string())
}

impl Controller {
    /// A controller for instance `id`.
    pub fn new(id: String, opts: RunOptions) -> Self {
        Controller {
            id,
            resources: VmResources::default(),
            opts,
            metrics: Metrics::default(),
            extra_metrics: None,
            vmm: None,
            paused: false,
            wake: Arc::new(Wake::default()),
            api_evt: None,
        }
    }

    /// Adds a source of metrics sections (the API server).
    pub fn set_extra_metrics(&mut self, f: Box<dyn Fn() -> Vec<Section> + Send>) {
        self.extra_metrics = Some(f);
    }

    /// The API's eventfd, watched by the event loop once the VM runs.
    pub fn set_api_eventfd(&mut self, evt: EventFd) {
        self.api_evt = Some(evt);
    }

    /// Whether the VM was started.
    pub fn started(&self) -> bool {
        self.vmm.is_some()
    }

    /// The running VM.
    pub fn vmm_mut(&mut self) -> Option<&mut Vmm> {
        self.vmm.as_mut()
    }

    /// Takes a whole configuration (config file or flags, already validated), logger and
    /// metrics included.
    pub fn apply_config(&mut self, config: VmConfig) -> Result<(), String> {
        if let Some(l) = &config.logger {
            self.configure_logger(l)?;
        }
        if let Some(m) = &config.metrics {
            self.metrics
                .set_sink(Path::new(&m.metrics_path))
                .map_err(|e| e.to_string())?;
        }
        self.resources = VmResources::from_config(config);
        Ok(())
    }

    /// Sends metrics to `path` (`--metrics-path`).
    pub fn set_metrics_path(&mut self, path: &Path) -> Result<(), String> {
        self.metrics.set_sink(path).map_err(|e| e.to_string())?;
        self.resources.metrics = Some(MetricsConfig {
            metrics_path: path.display().to_string(),
        });
        Ok(())
    }

    /// Applies a logger configuration.
    pub fn configure_logger(&mut self, l: &LoggerConfig) -> Result<(), String> {
        let out: Option<Box<dyn std::io::Write + Send>> = match &l.log_path {
            Some(p) => Some(Box::new(
                open_sink(Path::new(p)).map_err(|e| format!("log_path {p}: {e}"))?,
            )),
            None => None,
        };
        crate::logger::configure(
            out,
            l.level.map(|lv| lv.filter()),
            l.show_level,
            l.show_log_origin,
            l.module.clone(),
        );
        Ok(())
    }

    /// Builds and starts the VM from the resources.
    pub fn start(&mut self) -> Result<(), StartError> {
        if self.vmm.is_some() {
            return Err(StartError::AlreadyStarted);
        }
        let config = self.resources.to_config().ok_or(StartError::NotConfigured(
            "Cannot start microvm without kernel configuration.",
        ))?;
        let mut vmm = build_and_start(&config, &self.opts)?;
        // The event loop hands control back for API requests and for the metrics timer.
        if let Some(evt) = self.api_evt.take() {
            vmm.add_subscriber(Arc::new(Mutex::new(WakeOn::new(
                evt,
                self.wake.clone(),
                |w| &w.api,
            ))));
        }
        match TimerFd::new() {
            Ok(mut timer) => {
                if timer.reset(FLUSH_INTERVAL, Some(FLUSH_INTERVAL)).is_ok() {
                    vmm.add_subscriber(Arc::new(Mutex::new(WakeOn::new(
                        timer,
                        self.wake.clone(),
                        |w| &w.metrics,
                    ))));
                }
            }
            Err(e) => log::warn!("periodic metrics disabled: {e}"),
        }
        self.vmm = Some(vmm);
        Ok(())
    }

    /// Runs the started VM until it ends, serving `api` and flushing metrics on the way.
    pub fn run(&mut self, api: Option<&dyn ApiChannel>) -> ExitReason {
        let wake = self.wake.clone();
        let reason = loop {
            let Some(vmm) = self.vmm.as_mut() else {
                break ExitReason::Stopped;
            };
            if let Some(reason) = vmm.run_until(&wake) {
                break reason;
            }
            if wake.api.swap(false, Ordering::SeqCst)
                && let Some(api) = api
            {
                self.serve(api);
            }
            if wake.metrics.swap(false, Ordering::SeqCst) && self.metrics.configured() {
                self.flush_metrics();
            }
        };
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.stop_vcpus();
        }
        if self.metrics.configured() {
            self.flush_metrics();
        }
        reason
    }

    /// Answers every waiting request.
    pub fn serve(&mut self, api: &dyn ApiChannel) {
        while let Some(action) = api.try_recv() {
            let response = self.handle(action);
            api.respond(response);
        }
    }

    fn flush_metrics(&mut self) {
        let mut sections = self.vmm.as_ref().map(vmm_sections).unwrap_or_default();
        if let Some(extra) = &self.extra_metrics {
            sections.extend(extra());
        }
        if let Err(e) = self.metrics.flush(sections) {
            log::warn!("{e}");
        }
    }

    fn state_name(&self) -> &'static str {
        match &self.vmm {
            None => "Not started",
            Some(_) if self.paused => "Paused",
            Some(_) => "Running",
        }
    }

    /// Applies one API action and says how it went.
    pub fn handle(&mut self, action: VmmAction) -> VmmResponse {
        let started = self.vmm.is_some();
        match action {
            VmmAction::GetInstanceInfo => VmmResponse::Json(
                json!({
                    "id": self.id,
                    "state": self.state_name(),
                    "vmm_version": VERSION,
                    "app_name": "kiln",
                })
                .to_string(),
            ),
            VmmAction::GetVersion => {
                VmmResponse::Json(json!({ "firecracker_version": VERSION }).to_string())
            }
            VmmAction::GetMachineConfig => {
                VmmResponse::Json(json!(self.resources.machine).to_string())
            }
            VmmAction::GetVmConfig => VmmResponse::Json(self.resources.to_json().to_string()),
            VmmAction::FlushMetrics => {
                if !self.metrics.configured() {
                    return bad(
                        "The metrics system is not initialized: configure it with PUT /metrics.",
                    );
                }
                self.flush_metrics();
                ok()
            }

            // Before boot only.
            VmmAction::PutMachineConfig(_)
            | VmmAction::PatchMachineConfig(_)
            | VmmAction::PutBootSource(_)
            | VmmAction::PutDrive(_)
            | VmmAction::PutNetworkInterface(_)
            | VmmAction::PutLogger(_)
            | VmmAction::PutMetrics(_)
            | VmmAction::InstanceStart
                if started =>
            {
                bad(ERR_AFTER_BOOT)
            }
            VmmAction::PutMachineConfig(m) => self.put_machine(m),
            VmmAction::PatchMachineConfig(u) => self.patch_machine(u),
            VmmAction::PutBootSource(b) => self.put_boot_source(b),
            VmmAction::PutDrive(d) => self.put_drive(d),
            VmmAction::PutNetworkInterface(n) => self.put_net(n),
            VmmAction::PutLogger(l) => match self.configure_logger(&l) {
                Ok(()) => {
                    self.resources.logger = Some(l);
                    ok()
                }
                Err(e) => bad(e),
            },
            VmmAction::PutMetrics(m) => match self.metrics.set_sink(Path::new(&m.metrics_path)) {
                Ok(()) => {
                    self.resources.metrics = Some(m);
                    ok()
                }
                Err(e) => bad(e),
            },
            VmmAction::InstanceStart => match self.start() {
                Ok(()) => ok(),
                Err(e) => bad(format!("Cannot start the microVM: {e}")),
            },

            // After boot only.
            VmmAction::PatchDrive(_)
            | VmmAction::PatchNetworkInterface(_)
            | VmmAction::SendCtrlAltDel
            | VmmAction::Pause
            | VmmAction::Resume
                if !started =>
            {
                bad(ERR_BEFORE_BOOT)
            }
            VmmAction::PatchDrive(u) => self.patch_drive(u),
            VmmAction::PatchNetworkInterface(u) => self.patch_net(u),
            VmmAction::SendCtrlAltDel => self.ctrl_alt_del(),
            VmmAction::Pause => self.pause(),
            VmmAction::Resume => self.resume(),
        }
    }

    fn put_machine(&mut self, m: MachineConfig) -> VmmResponse {
        if let Err(e) = validate_machine(&m) {
            return bad(e);
        }
        self.resources.machine = m;
        ok()
    }

    fn patch_machine(&mut self, u: MachineConfigUpdate) -> VmmResponse {
        let mut m = self.resources.machine.clone();
        if let Some(v) = u.vcpu_count {
            m.vcpu_count = v;
        }
        if let Some(v) = u.mem_size_mib {
            m.mem_size_mib = v;
        }
        if let Some(v) = u.smt {
            m.smt = v;
        }
        if let Some(v) = u.track_dirty_pages {
            m.track_dirty_pages = v;
        }
        if let Some(v) = u.huge_pages {
            m.huge_pages = v;
        }
        self.put_machine(m)
    }

    fn put_boot_source(&mut self, b: BootSourceConfig) -> VmmResponse {
        if let Err(e) = validate_boot_source(&b) {
            return bad(e);
        }
        // Refuse files that cannot be opened now rather than at InstanceStart.
        if b.kernel_image_path != crate::config::BUILTIN_KERNEL
            && let Err(e) = std::fs::File::open(&b.kernel_image_path)
        {
            return bad(format!(
                "boot-source.kernel_image_path: {}: {e}",
                b.kernel_image_path
            ));
        }
        if let Some(p) = &b.initrd_path
            && let Err(e) = std::fs::File::open(p)
        {
            return bad(format!("boot-source.initrd_path: {p}: {e}"));
        }
        self.resources.boot_source = Some(b);
        ok()
    }

    fn put_drive(&mut self, d: DriveConfig) -> VmmResponse {
        let mut drives = self.resources.drives.clone();
        match drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
            Some(slot) => *slot = d,
            None => drives.push(d),
        }
        if let Err(e) = validate_drives(&drives) {
            return bad(e);
        }
        self.resources.drives = drives;
        ok()
    }

    fn put_net(&mut self, n: NetConfig) -> VmmResponse {
        let mut nets = self.resources.nets.clone();
        match nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
            Some(slot) => *slot = n,
            None => nets.push(n),
        }
        if let Err(e) = validate_net(&nets) {
            return bad(e);
        }
        self.resources.nets = nets;
        ok()
    }

    fn patch_drive(&mut self, u: DriveUpdate) -> VmmResponse {
        if u.rate_limiter.is_some() {
            return bad("rate limiters are not supported by kiln");
        }
        let Some(index) = self
            .resources
            .drives
            .iter()
            .position(|d| d.drive_id == u.drive_id)
        else {
            return bad(format!("no drive `{}`", u.drive_id));
        };
        let Some(path) = u.path_on_host else {
            return ok();
        };
        let read_only = self.resources.drives[index].is_read_only;
        let disk = match DiskFile::open(Path::new(&path), read_only) {
            Ok(d) => d,
            Err(e) => return bad(format!("drives[{index}].path_on_host: {path}: {e}")),
        };
        let Some(vmm) = self.vmm.as_ref() else {
            return bad(ERR_BEFORE_BOOT);
        };
        let Some(block) = vmm.devices().blocks.iter().find(|b| {
            b.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .config()
                .drive_id
                == u.drive_id
        }) else {
            return bad(format!("no drive `{}`", u.drive_id));
        };
        block
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .update_disk(disk);
        self.resources.drives[index].path_on_host = path;
        ok()
    }

    fn patch_net(&mut self, u: NetUpdate) -> VmmResponse {
        if !self.resources.nets.iter().any(|n| n.iface_id == u.iface_id) {
            return bad(format!("no network interface `{}`", u.iface_id));
        }
        if u.rx_rate_limiter.is_some() || u.tx_rate_limiter.is_some() {
            return bad("rate limiters are not supported by kiln");
        }
        ok()
    }

    fn ctrl_alt_del(&mut self) -> VmmResponse {
        let Some(vmm) = self.vmm.as_ref() else {
            return bad(ERR_BEFORE_BOOT);
        };
        let result = vmm
            .devices()
            .i8042
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .trigger_ctrl_alt_del();
        match result {
            Ok(()) => ok(),
            Err(e) => bad(e),
        }
    }

    fn pause(&mut self) -> VmmResponse {
        let Some(vmm) = self.vmm.as_ref() else {
            return bad(ERR_BEFORE_BOOT);
        };
        for vcpu in vmm.vcpus() {
            vcpu.pause();
        }
        for vcpu in vmm.vcpus() {
            vcpu.wait_paused();
        }
        self.paused = vmm.vcpus().iter().all(|v| v.state() == VcpuState::Paused);
        if self.paused {
            ok()
        } else {
            bad("The microVM could not be paused: a vCPU has stopped.")
        }
    }

    fn resume(&mut self) -> VmmResponse {
        let Some(vmm) = self.vmm.as_ref() else {
            return bad(ERR_BEFORE_BOOT);
        };
        for vcpu in vmm.vcpus() {
            vcpu.resume();
        }
        self.paused = false;
        ok()
    }
}
