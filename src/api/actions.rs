//! Applying API actions: [`VmmAction`] → [`VmmResponse`], with Firecracker's pre-boot and
//! post-boot rules as one table ([`when`]).
//!
//! Before boot an action changes the [`VmResources`]; `InstanceStart` hands the finished
//! configuration back to the caller, which builds the VM. After boot an action goes to the
//! running VM through the [`Machine`] trait, which [`crate::vmm::Vmm`] implements — so
//! every rule and every status code here is tested without KVM.

use std::path::Path;

use serde_json::json;

use super::{ERR_AFTER_BOOT, ERR_BEFORE_BOOT, VmmAction, VmmResponse};
use crate::builder::StartError;
use std::time::Instant;

use serde::Serialize;

use crate::config::{LoggerConfig, MachineConfig, MetricsConfig, VmConfig};
use crate::devices::virtio::block::DiskFile;
use crate::metrics::{Metrics, MetricsError, Section, open_sink};
use crate::rate_limiter::{LimiterUpdate, patched_config};
use crate::resources::VmResources;
use crate::snapshot::{Key, SnapshotCreateParams, SnapshotError, SnapshotLoadParams, SnapshotType};
use crate::vmm::VmmError;

/// kiln's own version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The Firecracker API version kiln implements, reported where Firecracker reports its own
/// version (`GET /version`, `GET /`'s `vmm_version`, `--version`): clients compare it before
/// they use snapshots. kiln's own version goes alongside (`kiln_version`).
pub const FIRECRACKER_API_VERSION: &str = "1.12.0";

/// When an action is allowed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum When {
    /// Before and after `InstanceStart`.
    Always,
    /// Only before `InstanceStart` (configuration): afterwards 400 [`ERR_AFTER_BOOT`].
    BeforeBoot,
    /// Only once the VM runs: before, 400 [`ERR_BEFORE_BOOT`].
    AfterBoot,
}

/// Firecracker's rule for each action.
pub fn when(action: &VmmAction) -> When {
    use VmmAction as A;
    match action {
        A::GetInstanceInfo | A::GetVersion | A::GetMachineConfig | A::GetVmConfig => When::Always,
        A::FlushMetrics => When::Always,
        A::PutMachineConfig(_)
        | A::PatchMachineConfig(_)
        | A::PutBootSource(_)
        | A::PutDrive(_)
        | A::PutNetworkInterface(_)
        | A::PutLogger(_)
        | A::PutMetrics(_)
        | A::InstanceStart
        | A::LoadSnapshot(_)
        | A::ReceiveMigration(_) => When::BeforeBoot,
        A::PatchDrive(_)
        | A::PatchNetworkInterface(_)
        | A::SendCtrlAltDel
        | A::Pause
        | A::Resume
        | A::CreateSnapshot(_)
        | A::SendMigration(_) => When::AfterBoot,
    }
}

/// What the actions need from a running VM.
pub trait Machine {
    /// Whether the vCPUs are parked.
    fn is_paused(&self) -> bool;
    /// Parks every vCPU at a safe point.
    fn pause(&mut self) -> Result<(), VmmError>;
    /// Lets the vCPUs run again.
    fn resume(&mut self) -> Result<(), VmmError>;
    /// Presses Ctrl+Alt+Del on the i8042 keyboard.
    fn send_ctrl_alt_del(&mut self) -> Result<(), VmmError>;
    /// Replaces a drive's backing file.
    fn swap_drive(&mut self, drive_id: &str, disk: DiskFile) -> Result<(), VmmError>;
    /// Changes a drive's rate limiter; a throttled request is re-evaluated at once.
    fn update_drive_limiter(
        &mut self,
        drive_id: &str,
        update: &LimiterUpdate,
    ) -> Result<(), VmmError>;
    /// Changes an interface's RX and TX rate limiters; throttled frames are re-evaluated at
    /// once.
    fn update_net_limiters(
        &mut self,
        iface_id: &str,
        rx: &LimiterUpdate,
        tx: &LimiterUpdate,
    ) -> Result<(), VmmError>;
    /// The VM's metrics sections.
    fn metrics_sections(&self) -> Vec<Section>;
    /// Writes a snapshot of the paused VM, whose configuration is `config`.
    fn create_snapshot(
        &mut self,
        params: &SnapshotCreateParams,
        config: &VmConfig,
        key: Option<&Key>,
    ) -> Result<(), SnapshotError>;
}

/// How long the last of each slow operation took (Firecracker's `latencies_us`).
#[derive(Debug, Default, Serialize)]
pub struct Latencies {
    /// The last Full `PUT /snapshot/create`.
    pub full_create_snapshot: u64,
    /// The last Diff `PUT /snapshot/create`.
    pub diff_create_snapshot: u64,
    /// `PUT /snapshot/load`.
    pub load_snapshot: u64,
    /// The last `PATCH /vm Paused`.
    pub pause_vm: u64,
    /// The last `PATCH /vm Resumed`.
    pub resume_vm: u64,
}

fn micros(since: Instant) -> u64 {
    u64::try_from(since.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Errors configuring the logger or the metrics destination.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    /// The log file or FIFO could not be opened.
    #[error("log_path {path}: {source}")]
    Log {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The metrics file or FIFO could not be opened.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
}

/// What an action led to.
#[derive(Debug)]
pub enum Outcome {
    /// Answer this.
    Respond(VmmResponse),
    /// `InstanceStart` with a complete configuration: the caller builds the VM and answers
    /// with [`ActionHandler::started`].
    Start(Box<VmConfig>),
    /// `PUT /snapshot/load` into this fresh process: the caller restores the VM and
    /// answers with [`ActionHandler::restored`].
    Restore(Box<SnapshotLoadParams>),
    /// `PUT /migration/receive` into this fresh process: the caller listens, answers, and
    /// receives the VM.
    Receive(Box<crate::migration::ReceiveParams>),
}

/// The VMM's control state: the resources, the instance id, the metrics destination.
pub struct ActionHandler {
    id: String,
    resources: VmResources,
    metrics: Metrics,
    /// Metrics sections that are not the VM's (the API server's counters).
    extra_metrics: Option<Box<dyn Fn() -> Vec<Section> + Send>>,
    /// The key authenticating snapshot files (`--snapshot-key-file`).
    snapshot_key: Option<Key>,
    latencies: Latencies,
}

impl std::fmt::Debug for ActionHandler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActionHandler")
            .field("id", &self.id)
            .field("resources", &self.resources)
            .finish_non_exhaustive()
    }
}

fn ok() -> VmmResponse {
    VmmResponse::NoContent
}

fn bad(message: impl std::fmt::Display) -> VmmResponse {
    VmmResponse::bad_request(message.to_string())
}

impl ActionHandler {
    /// The handler of instance `id`, with nothing configured.
    pub fn new(id: String) -> Self {
        ActionHandler {
            id,
            resources: VmResources::default(),
            metrics: Metrics::default(),
            extra_metrics: None,
            snapshot_key: None,
            latencies: Latencies::default(),
        }
    }

    /// Authenticates snapshot files with `key`.
    pub fn set_snapshot_key(&mut self, key: Key) {
        self.snapshot_key = Some(key);
    }

    /// The snapshot key, if any.
    pub fn snapshot_key(&self) -> Option<&Key> {
        self.snapshot_key.as_ref()
    }

    /// Records how long a snapshot load took (the caller did it).
    pub fn record_load(&mut self, since: Instant) {
        self.latencies.load_snapshot = micros(since);
    }

    /// The resources configured so far.
    pub fn resources(&self) -> &VmResources {
        &self.resources
    }

    /// Adds a source of metrics sections (the API server).
    pub fn set_extra_metrics(&mut self, f: Box<dyn Fn() -> Vec<Section> + Send>) {
        self.extra_metrics = Some(f);
    }

    /// Takes a whole configuration (config file or flags, already validated), logger and
    /// metrics included.
    pub fn apply_config(&mut self, config: VmConfig) -> Result<(), SinkError> {
        if let Some(l) = &config.logger {
            configure_logger(l)?;
        }
        if let Some(m) = &config.metrics {
            self.metrics.set_sink(Path::new(&m.metrics_path))?;
        }
        self.resources = VmResources::from_config(config);
        Ok(())
    }

    /// Sends metrics to `path` (`--metrics-path`).
    pub fn set_metrics_path(&mut self, path: &Path) -> Result<(), SinkError> {
        self.metrics.set_sink(path)?;
        self.resources.metrics = Some(MetricsConfig {
            metrics_path: path.display().to_string(),
        });
        Ok(())
    }

    /// Writes one metrics line, if a destination is configured.
    pub fn flush_metrics(&mut self, vm: Option<&dyn Machine>) {
        if !self.metrics.configured() {
            return;
        }
        let mut sections = vm.map(Machine::metrics_sections).unwrap_or_default();
        if let Some(extra) = &self.extra_metrics {
            sections.extend(extra());
        }
        if let Ok(l) = serde_json::to_value(&self.latencies) {
            sections.push(("latencies_us".to_string(), l));
        }
        if let Err(e) = self.metrics.flush(sections) {
            log::warn!("{e}");
        }
    }

    /// Applies an action before the VM is started.
    pub fn handle_preboot(&mut self, action: VmmAction) -> Outcome {
        if when(&action) == When::AfterBoot {
            return Outcome::Respond(bad(ERR_BEFORE_BOOT));
        }
        Outcome::Respond(match action {
            VmmAction::ReceiveMigration(params) => {
                if self.is_configured() {
                    bad(
                        "Receiving a migrated microVM is not allowed after configuring boot-specific resources.",
                    )
                } else {
                    return Outcome::Receive(Box::new(params));
                }
            }
            VmmAction::LoadSnapshot(params) => {
                let r = &self.resources;
                let configured = r.boot_source.is_some()
                    || !r.drives.is_empty()
                    || !r.nets.is_empty()
                    || r.machine != MachineConfig::default();
                if configured {
                    bad(
                        "Loading a microVM snapshot not allowed after configuring boot-specific resources.",
                    )
                } else {
                    return Outcome::Restore(Box::new(params));
                }
            }
            VmmAction::InstanceStart => {
                return match self.resources.to_config() {
                    Some(config) => Outcome::Start(Box::new(config)),
                    None => Outcome::Respond(bad(format!(
                        "Cannot start the microVM: {}",
                        StartError::NotConfigured(
                            "Cannot start microvm without kernel configuration."
                        )
                    ))),
                };
            }
            VmmAction::PutMachineConfig(m) => {
                self.resources.put_machine(m).map_or_else(bad, |()| ok())
            }
            VmmAction::PatchMachineConfig(u) => {
                self.resources.patch_machine(u).map_or_else(bad, |()| ok())
            }
            VmmAction::PutBootSource(b) => self
                .resources
                .put_boot_source(b)
                .map_or_else(bad, |()| ok()),
            VmmAction::PutDrive(d) => self.resources.put_drive(d).map_or_else(bad, |()| ok()),
            VmmAction::PutNetworkInterface(n) => {
                self.resources.put_net(n).map_or_else(bad, |()| ok())
            }
            VmmAction::PutLogger(l) => match configure_logger(&l) {
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
            other => self.handle_any(other, None),
        })
    }

    /// The answer to `PUT /snapshot/load` once the caller tried to restore the VM; the
    /// restored VM's configuration becomes the resources.
    pub fn restored(&mut self, result: Result<VmConfig, &StartError>) -> VmmResponse {
        match result {
            Ok(config) => {
                let (logger, metrics) =
                    (self.resources.logger.take(), self.resources.metrics.take());
                self.resources = VmResources::from_config(config);
                self.resources.logger = logger;
                self.resources.metrics = metrics;
                ok()
            }
            Err(e) => bad(format!("Load snapshot error: {e}")),
        }
    }

    /// Whether anything but the logger and metrics was configured.
    fn is_configured(&self) -> bool {
        let r = &self.resources;
        r.boot_source.is_some()
            || !r.drives.is_empty()
            || !r.nets.is_empty()
            || r.machine != MachineConfig::default()
    }

    /// The configuration of a VM a migration brought becomes the resources.
    pub fn migrated_in(&mut self, config: VmConfig) {
        let _ = self.restored(Ok(config));
    }

    /// The answer to `InstanceStart` once the caller tried to build the VM.
    pub fn started(result: Result<(), StartError>) -> VmmResponse {
        match result {
            Ok(()) => ok(),
            Err(e) => bad(format!("Cannot start the microVM: {e}")),
        }
    }

    /// Applies an action to the running VM.
    pub fn handle_running(&mut self, action: VmmAction, vm: &mut dyn Machine) -> VmmResponse {
        if when(&action) == When::BeforeBoot {
            return bad(ERR_AFTER_BOOT);
        }
        match action {
            VmmAction::PatchDrive(u) => {
                let Some(index) = self.resources.drive_index(&u.drive_id) else {
                    return bad(format!("no drive `{}`", u.drive_id));
                };
                let disk = match &u.path_on_host {
                    None => None,
                    Some(path) => {
                        let read_only = self.resources.drives[index].is_read_only;
                        match DiskFile::open(Path::new(path), read_only) {
                            Ok(d) => Some(d),
                            Err(e) => {
                                return bad(format!("drives[{index}].path_on_host: {path}: {e}"));
                            }
                        }
                    }
                };
                if let Some(rl) = &u.rate_limiter {
                    let update = LimiterUpdate::from_config(Some(rl));
                    if let Err(e) = vm.update_drive_limiter(&u.drive_id, &update) {
                        return bad(e);
                    }
                    let drive = &mut self.resources.drives[index];
                    drive.rate_limiter = patched_config(drive.rate_limiter.as_ref(), rl);
                }
                if let (Some(disk), Some(path)) = (disk, u.path_on_host) {
                    if let Err(e) = vm.swap_drive(&u.drive_id, disk) {
                        return bad(e);
                    }
                    self.resources.drives[index].path_on_host = path;
                }
                ok()
            }
            VmmAction::PatchNetworkInterface(u) => {
                let Some(index) = self.resources.net_index(&u.iface_id) else {
                    return bad(format!("no network interface `{}`", u.iface_id));
                };
                let rx = LimiterUpdate::from_config(u.rx_rate_limiter.as_ref());
                let tx = LimiterUpdate::from_config(u.tx_rate_limiter.as_ref());
                if rx.is_keep() && tx.is_keep() {
                    return ok();
                }
                if let Err(e) = vm.update_net_limiters(&u.iface_id, &rx, &tx) {
                    return bad(e);
                }
                let iface = &mut self.resources.nets[index];
                if let Some(rl) = &u.rx_rate_limiter {
                    iface.rx_rate_limiter = patched_config(iface.rx_rate_limiter.as_ref(), rl);
                }
                if let Some(rl) = &u.tx_rate_limiter {
                    iface.tx_rate_limiter = patched_config(iface.tx_rate_limiter.as_ref(), rl);
                }
                ok()
            }
            VmmAction::SendCtrlAltDel => vm.send_ctrl_alt_del().map_or_else(bad, |()| ok()),
            VmmAction::Pause => {
                let t = Instant::now();
                let r = vm.pause().map_or_else(bad, |()| ok());
                self.latencies.pause_vm = micros(t);
                r
            }
            VmmAction::Resume => {
                let t = Instant::now();
                let r = vm.resume().map_or_else(bad, |()| ok());
                self.latencies.resume_vm = micros(t);
                r
            }
            VmmAction::CreateSnapshot(params) => {
                if !vm.is_paused() {
                    return bad(format!(
                        "Create snapshot error: {}",
                        SnapshotError::NotPaused
                    ));
                }
                let Some(config) = self.resources.to_config() else {
                    return bad("Create snapshot error: the microVM has no configuration");
                };
                let t = Instant::now();
                let result = vm.create_snapshot(&params, &config, self.snapshot_key.as_ref());
                match params.snapshot_type {
                    SnapshotType::Full => self.latencies.full_create_snapshot = micros(t),
                    SnapshotType::Diff => self.latencies.diff_create_snapshot = micros(t),
                }
                match result {
                    Ok(()) => ok(),
                    Err(e) => bad(format!("Create snapshot error: {e}")),
                }
            }
            other => self.handle_any(other, Some(vm)),
        }
    }

    /// The actions allowed at any time.
    fn handle_any(&mut self, action: VmmAction, vm: Option<&mut dyn Machine>) -> VmmResponse {
        match action {
            VmmAction::GetInstanceInfo => {
                let state = match &vm {
                    None => "Not started",
                    Some(vm) if vm.is_paused() => "Paused",
                    Some(_) => "Running",
                };
                VmmResponse::Json(
                    json!({
                        "id": self.id,
                        "state": state,
                        "vmm_version": FIRECRACKER_API_VERSION,
                        "app_name": "kiln",
                        "kiln_version": VERSION,
                    })
                    .to_string(),
                )
            }
            VmmAction::GetVersion => VmmResponse::Json(
                json!({
                    "firecracker_version": FIRECRACKER_API_VERSION,
                    "kiln_version": VERSION,
                })
                .to_string(),
            ),
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
                self.flush_metrics(vm.map(|v| &*v));
                ok()
            }
            // The callers take every other action before they get here (`when`).
            other => VmmResponse::Error(500, format!("unexpected action {other:?}")),
        }
    }
}

/// Applies a logger configuration (`PUT /logger`, the config file's `logger`).
pub fn configure_logger(l: &LoggerConfig) -> Result<(), SinkError> {
    let out: Option<Box<dyn std::io::Write + Send>> = match &l.log_path {
        Some(p) => Some(Box::new(open_sink(Path::new(p)).map_err(|source| {
            SinkError::Log {
                path: p.clone(),
                source,
            }
        })?)),
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

#[cfg(test)]
mod tests;
