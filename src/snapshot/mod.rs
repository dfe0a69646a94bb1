//! Snapshots: the state of a paused VM (vCPUs, VM-wide KVM state, every device) in a state
//! file nobody can alter unnoticed, and its memory in a memory file; restored into a fresh
//! kiln through `PUT /snapshot/load` or `--restore-snapshot`.
//!
//! - `format.rs`: the state file's header, size cap and digest (a keyed MAC with a key),
//!   checked before the state is parsed;
//! - `memory.rs`: the memory file (sparse, or only the dirty pages of a Diff) and its private
//!   mapping on restore;
//! - `digest.rs`: the memory file's keyed digest, in chunks a Diff re-hashes as it dirties them;
//! - `uffd.rs`: the `Uffd` backend: anonymous memory whose pages a page-fault handler in
//!   another process serves, and Firecracker's handshake with that handler;
//! - this file: the API's parameters (Firecracker's `SnapshotCreateParams` and
//!   `SnapshotLoadParams`), the saved state, and creating a snapshot from a paused VM.
//!   Restoring is the builder's other way to make a VM ([`crate::builder::restore`]).

pub mod cpu;
pub mod digest;
pub mod format;
pub mod memory;
pub mod uffd;
pub mod working_set;

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::devices::i8042::I8042Snapshot;
use crate::devices::registry::{Device, DeviceRegistry, lock};
use crate::devices::serial::SerialSnapshot;
use crate::devices::virtio::mmio::TransportSnapshot;
use crate::rate_limiter::RateLimiterState;
use crate::vstate::vcpu::{VcpuError, VcpuHandle};
use crate::vstate::vcpu_state::VcpuSnapshot;
use crate::vstate::vm::{Vm, VmError};
use crate::vstate::vm_state::{self, VmSnapshot};
pub use format::Key;
use memory::RegionInfo;

/// `snapshot_type`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// All of guest memory.
    #[default]
    Full,
    /// Only pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create` (Firecracker's `SnapshotCreateParams`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where the state file goes.
    pub snapshot_path: String,
    /// Where the memory file goes.
    pub mem_file_path: String,
    /// Full (default) or Diff.
    #[serde(default)]
    pub snapshot_type: SnapshotType,
    /// Deprecated in Firecracker and ignored there too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
}

/// `mem_backend.backend_type`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemBackendType {
    /// Map the memory file.
    File,
    /// Page faults served by a userfaultfd handler on a Unix socket.
    Uffd,
}

/// `mem_backend`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemBackend {
    /// File or Uffd.
    pub backend_type: MemBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: String,
}

/// `network_overrides[]`: a new TAP for an interface.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its TAP on this host.
    pub host_dev_name: String,
}

/// `drive_overrides[]` (a kiln extension): a new backing file for a drive.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveOverride {
    /// The drive.
    pub drive_id: String,
    /// Its backing file on this host.
    pub path_on_host: String,
}

/// `working_set` (a kiln extension): prefault the pages a restored guest touches first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkingSetParams {
    /// The working-set file: faulted in before the vCPUs run when it exists; recorded
    /// `record_after_ms` after the guest starts running when it does not.
    pub path: String,
    /// When to record (default 1000 ms of running).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub record_after_ms: Option<u64>,
}

/// Default delay between a restored guest starting to run and its working set being
/// recorded.
pub const WORKING_SET_RECORD_MS: u64 = 1000;
/// The longest recording delay accepted (one hour).
pub const WORKING_SET_RECORD_MAX_MS: u64 = 3_600_000;

/// `PUT /snapshot/load` (Firecracker's `SnapshotLoadParams`, every version's spelling).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// The state file.
    pub snapshot_path: String,
    /// The memory file (older clients; `mem_backend` in newer ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// How guest memory is provided.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemBackend>,
    /// Track dirty pages for later Diff snapshots.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The older name of `track_dirty_pages`.
    #[serde(default)]
    pub enable_diff_snapshots: bool,
    /// Resume the VM once loaded.
    #[serde(default)]
    pub resume_vm: bool,
    /// New TAPs for interfaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// New backing files for drives (kiln extension).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
    /// Move the guest's wall clock to the host's (Firecracker 1.13+); kvm-clock is restored
    /// as saved either way.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
    /// vsock (kiln has no vsock device: refused).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<serde_json::Value>,
    /// Prefault or record the guest's working set (kiln extension).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_set: Option<WorkingSetParams>,
}

impl SnapshotLoadParams {
    /// Restores from a state file and a memory file, and resumes the VM (the command
    /// line's `--restore-snapshot` / `--restore-mem`).
    pub fn from_files(state: &Path, mem: &Path) -> Self {
        SnapshotLoadParams {
            snapshot_path: state.display().to_string(),
            mem_file_path: Some(mem.display().to_string()),
            mem_backend: None,
            track_dirty_pages: false,
            enable_diff_snapshots: false,
            resume_vm: true,
            network_overrides: Vec::new(),
            drive_overrides: Vec::new(),
            clock_realtime: None,
            vsock_override: None,
            working_set: None,
        }
    }
}

/// One virtio device's saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VirtioSnapshot {
    /// `drive_id` or `iface_id`.
    pub id: String,
    /// The transport's registers and queue positions.
    pub transport: TransportSnapshot,
    /// Its rate limiters' buckets: a drive's one, an interface's RX then TX (time spent
    /// in the snapshot is not credited).
    #[serde(default)]
    pub rate_limiters: Vec<RateLimiterState>,
}

/// Every device's saved state.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DevicesSnapshot {
    /// COM1.
    pub serial: SerialSnapshot,
    /// The i8042 controller.
    pub i8042: I8042Snapshot,
    /// Drives, in slot order.
    pub blocks: Vec<VirtioSnapshot>,
    /// Network interfaces, in slot order.
    pub nets: Vec<VirtioSnapshot>,
}

/// What the guest saw of its host, checked on restore.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostInfo {
    /// The vCPUs' TSC frequency.
    pub tsc_khz: Option<u32>,
}

/// A paused VM's whole state (the state file's payload).
#[derive(Debug, Serialize, Deserialize)]
pub struct MicrovmState {
    /// kiln's version that wrote it.
    pub kiln_version: String,
    /// The VM's configuration (machine, drives, interfaces).
    pub config: VmConfig,
    /// Guest memory regions and their place in the memory file.
    pub memory: Vec<RegionInfo>,
    /// With a key: the memory file's keyed digest (`digest.rs`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_digest: Option<[u8; 32]>,
    /// What the guest saw of the host.
    pub host: HostInfo,
    /// PIT, clock, interrupt controllers.
    pub vm: VmSnapshot,
    /// Each vCPU.
    pub vcpus: Vec<VcpuSnapshot>,
    /// Each device.
    pub devices: DevicesSnapshot,
}

/// Why a snapshot could not be created or loaded.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// Snapshots need a paused VM.
    #[error(
        "the microVM must be paused to create a snapshot (PATCH /vm {{\"state\": \"Paused\"}})"
    )]
    NotPaused,
    /// Not supported by this kiln.
    #[error("{0}")]
    Unsupported(String),
    /// A vCPU's state could not be read or written.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// The VM's state could not be read or written.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// A file could not be written or read.
    #[error("{path}: {source}")]
    File {
        /// The file.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The memory file could not be written or mapped.
    #[error("{path}: {source}")]
    Memory {
        /// The file.
        path: String,
        /// Why.
        source: memory::MemoryFileError,
    },
    /// The state file is not a valid, untampered kiln snapshot.
    #[error("{path}: {source}")]
    Format {
        /// The file.
        path: String,
        /// Why.
        source: format::FormatError,
    },
    /// The state does not parse.
    #[error("{path}: invalid snapshot state: {message}")]
    Parse {
        /// The file.
        path: String,
        /// What serde said.
        message: String,
    },
    /// A value in the state is out of the range the live code accepts.
    #[error("invalid snapshot state: {0}")]
    Invalid(String),
    /// This host lacks CPU features the guest saw.
    #[error("this host lacks CPU features the snapshot's guest uses: {}", .0.join(", "))]
    CpuFeatures(Vec<String>),
    /// The `Uffd` backend's page-fault handler could not be given guest memory.
    #[error("mem_backend.backend_path {path}: {source}")]
    Uffd {
        /// The handler's socket.
        path: String,
        /// Why.
        source: uffd::UffdError,
    },
    /// The memory file's digest does not match the state's.
    #[error("{0}: the memory file does not match the snapshot (corrupted or replaced)")]
    MemoryDigest(String),
    /// A drive could not finish the requests it had in flight.
    #[error("drive {id}: cannot finish its requests in flight: {source}")]
    Drain {
        /// The drive.
        id: String,
        /// Why.
        source: std::io::Error,
    },
}

fn file_err(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::File {
        path: path.display().to_string(),
        source,
    }
}

/// A file written next to its destination and renamed over it once complete: a failed
/// snapshot leaves the destination as it was, and a memory file a restored VM still maps
/// is never truncated under it.
struct Staged {
    tmp: PathBuf,
    dest: PathBuf,
    file: File,
}

impl Staged {
    fn create(dest: &Path) -> Result<Staged, SnapshotError> {
        let name = dest
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let tmp = dest.with_file_name(format!(".{name}.kiln-tmp-{}", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&tmp)
            .map_err(file_err(dest))?;
        Ok(Staged {
            tmp,
            dest: dest.to_path_buf(),
            file,
        })
    }

    fn commit(self) -> Result<(), SnapshotError> {
        self.file.sync_all().map_err(file_err(&self.dest))?;
        std::fs::rename(&self.tmp, &self.dest).map_err(file_err(&self.dest))?;
        Ok(())
    }
}

impl Drop for Staged {
    fn drop(&mut self) {
        // After a successful rename the temporary name is gone and this fails harmlessly.
        let _ = std::fs::remove_file(&self.tmp);
    }
}

/// Saves the devices' state.
pub fn save_devices(devices: &DeviceRegistry) -> Result<DevicesSnapshot, SnapshotError> {
    let serial = devices
        .serial()
        .map(|s| lock(s.as_ref()).save())
        .ok_or_else(|| SnapshotError::Invalid("no serial device".into()))?;
    let i8042 = devices
        .i8042()
        .map(|d| lock(d.as_ref()).save())
        .ok_or_else(|| SnapshotError::Invalid("no i8042 device".into()))?;
    let mut blocks = Vec::new();
    let mut nets = Vec::new();
    for entry in devices.iter() {
        match &entry.device {
            // The device lock is released before the transport takes it again.
            Device::Block { device, transport } => {
                let (id, limiter) = {
                    let mut d = lock(device.as_ref());
                    (d.config().drive_id.clone(), d.save_rate_limiter())
                };
                let transport = lock(transport.as_ref()).save();
                blocks.push(VirtioSnapshot {
                    id,
                    transport,
                    rate_limiters: vec![limiter],
                });
            }
            Device::Net { device, transport } => {
                let (id, (rx, tx)) = {
                    let mut d = lock(device.as_ref());
                    (d.config().iface_id.clone(), d.save_rate_limiters())
                };
                let transport = lock(transport.as_ref()).save();
                nets.push(VirtioSnapshot {
                    id,
                    transport,
                    rate_limiters: vec![rx, tx],
                });
            }
            _ => {}
        }
    }
    Ok(DevicesSnapshot {
        serial,
        i8042,
        blocks,
        nets,
    })
}

/// Where a snapshot's memory goes.
enum MemoryTarget {
    /// A new file, renamed into place once complete.
    New(Staged),
    /// A Diff merged in place onto the memory file of an earlier snapshot.
    Base(File),
}

impl MemoryTarget {
    fn file(&self) -> &File {
        match self {
            MemoryTarget::New(staged) => &staged.file,
            MemoryTarget::Base(file) => file,
        }
    }

    fn commit(self, path: &Path) -> Result<(), SnapshotError> {
        match self {
            MemoryTarget::New(staged) => staged.commit(),
            MemoryTarget::Base(file) => file.sync_all().map_err(file_err(path)),
        }
    }
}

/// Writes a snapshot of a paused VM: the memory file first, then the state file (which
/// names the memory's digest when keyed); both are synced and a new file appears only when
/// complete.
///
/// `Full` writes all of guest memory to a new file. `Diff` (the VM must track dirty pages)
/// writes only the pages dirtied since the last snapshot — the vCPUs' (KVM's dirty log) and
/// device emulation's (the memory bitmaps): merged in place when `mem_file_path` is the
/// guest-sized memory file of an earlier snapshot, else into a new file that holds only
/// those pages (Firecracker's diff layer, to be merged onto its base before a load).
/// Dirty pages are forgotten only once the snapshot is complete, so a failed attempt can be
/// retried. `digest` carries the memory's chunk digests from one keyed snapshot (or restore)
/// to the next.
pub fn create(
    params: &SnapshotCreateParams,
    config: &VmConfig,
    vm: &Vm,
    vcpus: &[VcpuHandle],
    devices: &DeviceRegistry,
    key: Option<&Key>,
    digest: &mut Option<digest::MemoryDigest>,
) -> Result<(), SnapshotError> {
    let diff = params.snapshot_type == SnapshotType::Diff;
    if diff && !vm.tracks_dirty_pages() {
        return Err(SnapshotError::Unsupported(
            "Diff snapshots are not allowed on uVMs with dirty page tracking disabled (machine-config track_dirty_pages, or track_dirty_pages on the snapshot load)".into(),
        ));
    }
    let mut vcpu_states = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        vcpu_states.push(v.save_state()?);
    }
    let vm_state = vm_state::save(vm.fd())?;
    let devices = save_devices(devices)?;

    let mem_path = Path::new(&params.mem_file_path);
    let mem_err = |source| SnapshotError::Memory {
        path: params.mem_file_path.clone(),
        source,
    };
    let (target, new_digest) = if diff {
        vm.sync_dirty_log()?;
        let target = match File::options().read(true).write(true).open(mem_path) {
            Ok(file) if file.metadata().map(|m| m.is_file()).unwrap_or(false) => {
                MemoryTarget::Base(file)
            }
            Ok(_) => {
                return Err(mem_err(memory::MemoryFileError::Base {
                    needed: memory::layout(vm.memory()).iter().map(|r| r.size).sum(),
                    found: 0,
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                MemoryTarget::New(Staged::create(mem_path)?)
            }
            Err(e) => return Err(file_err(mem_path)(e)),
        };
        let mut d = match (key, digest.clone()) {
            (Some(k), None) => Some(memory::digest_of(vm.memory(), k).map_err(mem_err)?),
            (_, d) => d,
        };
        memory::save_dirty(vm.memory(), target.file(), key.zip(d.as_mut())).map_err(mem_err)?;
        (target, d)
    } else {
        let staged = Staged::create(mem_path)?;
        let every_page = vm.page_fault_handler().is_some();
        let (_, d) = memory::save(vm.memory(), &staged.file, key, every_page).map_err(mem_err)?;
        (MemoryTarget::New(staged), d)
    };
    let state = MicrovmState {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        config: config.clone(),
        memory: memory::layout(vm.memory()),
        memory_digest: key.zip(new_digest.as_ref()).map(|(k, d)| d.total(k)),
        host: HostInfo {
            tsc_khz: vcpu_states.first().and_then(|v| v.tsc_khz),
        },
        vm: vm_state,
        vcpus: vcpu_states,
        devices,
    };
    let payload = serde_json::to_vec(&state).map_err(|e| SnapshotError::Invalid(e.to_string()))?;
    let state_path = Path::new(&params.snapshot_path);
    let mut state_file = Staged::create(state_path)?;
    state_file
        .file
        .write_all(&format::encode(&payload, key))
        .map_err(file_err(state_path))?;
    target.commit(mem_path)?;
    state_file.commit()?;
    // Complete: what was dirty is saved.
    if vm.tracks_dirty_pages() {
        vm.reset_dirty()?;
    }
    *digest = new_digest;
    Ok(())
}

/// Reads, authenticates and parses a state file, and checks it against what the live code
/// accepts before anything is built from it.
pub fn read_state(path: &Path, key: Option<&Key>) -> Result<MicrovmState, SnapshotError> {
    use std::io::Read;
    let p = path.display().to_string();
    let file = File::open(path).map_err(file_err(path))?;
    let cap = format::MAX_PAYLOAD + format::HEADER_LEN as u64;
    let mut bytes = Vec::new();
    file.take(cap + 1)
        .read_to_end(&mut bytes)
        .map_err(file_err(path))?;
    parse_state(&bytes, key, &p)
}

/// Authenticates, parses and checks the bytes of a state file (`path` names it in errors).
pub fn parse_state(
    bytes: &[u8],
    key: Option<&Key>,
    path: &str,
) -> Result<MicrovmState, SnapshotError> {
    let payload = format::decode(bytes, key).map_err(|source| SnapshotError::Format {
        path: path.to_string(),
        source,
    })?;
    let state: MicrovmState =
        serde_json::from_slice(payload).map_err(|e| SnapshotError::Parse {
            path: path.to_string(),
            message: e.to_string(),
        })?;
    validate(&state)?;
    Ok(state)
}

/// The checks a state must pass before it is used: the same limits the configuration and
/// the live code keep.
pub fn validate(s: &MicrovmState) -> Result<(), SnapshotError> {
    let invalid = |m: String| Err(SnapshotError::Invalid(m));
    if let Err(e) = s.config.validate() {
        return invalid(format!("config: {e}"));
    }
    let vcpus = usize::from(s.config.vcpus());
    if s.vcpus.len() != vcpus {
        return invalid(format!("{} vCPU states for {vcpus} vCPUs", s.vcpus.len()));
    }
    for (i, v) in s.vcpus.iter().enumerate() {
        if usize::from(v.index) != i {
            return invalid(format!("vCPU state {i} is for vCPU {}", v.index));
        }
        if v.cpuid.len() > kvm_bindings::KVM_MAX_CPUID_ENTRIES {
            return invalid(format!("vCPU {i}: {} CPUID entries", v.cpuid.len()));
        }
        if v.msrs.len() > 4096 {
            return invalid(format!("vCPU {i}: {} MSRs", v.msrs.len()));
        }
    }
    if let Err(e) = memory::check_layout(&s.memory, s.config.machine_config.mem_size_mib) {
        return invalid(e.to_string());
    }
    let ids = |v: &[VirtioSnapshot]| v.iter().map(|d| d.id.clone()).collect::<Vec<_>>();
    let mut drives: Vec<usize> = (0..s.config.drives.len()).collect();
    drives.sort_by_key(|i| !s.config.drives[*i].is_root_device);
    let drive_ids: Vec<String> = drives
        .iter()
        .map(|i| s.config.drives[*i].drive_id.clone())
        .collect();
    if ids(&s.devices.blocks) != drive_ids {
        return invalid("drive states do not match the drives".into());
    }
    let net_ids: Vec<String> = s
        .config
        .network_interfaces
        .iter()
        .map(|n| n.iface_id.clone())
        .collect();
    if ids(&s.devices.nets) != net_ids {
        return invalid("interface states do not match the interfaces".into());
    }
    Ok(())
}

/// `--describe-snapshot`: the version and a summary of a state file.
pub fn describe(path: &Path, key: Option<&Key>) -> Result<String, SnapshotError> {
    let s = read_state(path, key)?;
    let m = &s.config.machine_config;
    let mut out = format!(
        "kiln snapshot, format version {}, written by kiln {}\n\
         vcpus: {}\nmemory: {} MiB in {} region(s){}\ntsc_khz: {}\n",
        format::VERSION,
        s.kiln_version,
        m.vcpu_count,
        m.mem_size_mib,
        s.memory.len(),
        if s.memory_digest.is_some() {
            ", digest in the state"
        } else {
            ""
        },
        s.host
            .tsc_khz
            .map_or_else(|| "unknown".to_string(), |k| k.to_string()),
    );
    for d in &s.config.drives {
        out.push_str(&format!(
            "drive {}: {}{}\n",
            d.drive_id,
            d.path_on_host,
            if d.is_read_only { " (read-only)" } else { "" }
        ));
    }
    for n in &s.config.network_interfaces {
        out.push_str(&format!(
            "interface {}: TAP {}\n",
            n.iface_id, n.host_dev_name
        ));
    }
    Ok(out)
}
