//! Building a VM, in boot order: KVM → guest memory → VM → devices → kernel, initrd and
//! command line → vCPUs → event loop → start.

use std::fs::File;
use std::io::{Cursor, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, IoEventAddress};
use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

use crate::arch::x86_64::acpi::MmioDevice;
use crate::arch::x86_64::configure_system;
use crate::arch::x86_64::cpuid::CpuTopology;
use crate::arch::x86_64::layout::{
    BOOT_TIMER_START, CMDLINE_MAX_SIZE, GSI_MAX, I8042_GSI, SERIAL_GSI, VIRTIO_GSI_START,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START,
};
use crate::arch::x86_64::loader::{LoadError, LoadedKernel, load_initrd, load_kernel};
use crate::config::{BUILTIN_KERNEL, DEFAULT_BOOT_ARGS, IoEngine, VmConfig};
use crate::devices::IrqLine;
use crate::devices::boot_timer::{BOOT_TIMER_SIZE, BootTimer};
use crate::devices::bus::{Bus, BusError};
use crate::devices::i8042::{I8042_BASE, I8042_PORTS, I8042Device};
use crate::devices::registry::{Device, DeviceRegistry, Location, lock};
use crate::devices::serial::{
    COM1_BASE, OUTPUT_BUFFER, OutputFlusher, SerialDevice, SerialInput, UART_PORTS,
};
use crate::devices::virtio::block::{Block, BlockConfig, BlockEvents, DiskFile};
use crate::devices::virtio::mmio::{MmioTransport, NOTIFY_REG_OFFSET};
use crate::devices::virtio::net::{Net, NetConfig, NetEvents, Tap};
use crate::devices::virtio::{VirtioDevice, VirtioInterrupt};
use crate::exit::{ExitCode, ExitSignal};
use crate::migration::worker::Worker;
use crate::rate_limiter::RateLimiter;
use crate::seccomp::{SeccompFilters, ThreadCategory};
use crate::signals::SignalWatcher;
use crate::snapshot::WorkingSetParams;
use crate::snapshot::uffd::{self, PageFaultHandler};
use crate::snapshot::working_set::{Recorder, WorkingSet, WorkingSetError};
use crate::snapshot::{
    DriveOverride, Key, MemBackendType, MicrovmState, NetworkOverride, SnapshotError,
    SnapshotLoadParams, read_state,
};
use crate::vmm::{ExitWatcher, Subscriber, Vmm};
use crate::vstate::memory::{GuestMemory, MemoryError, create_guest_memory};
use crate::vstate::vcpu::{Vcpu, VcpuError, install_kick_handler};
use crate::vstate::vm::{Vm, VmError, open_kvm};

/// Start-up errors. Those caused by the configuration name the field.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// KVM is missing or unsuitable, or the VM could not be created.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// Guest memory could not be reserved.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// The kernel image could not be opened.
    #[error("boot-source.kernel_image_path: {path}: {source}")]
    KernelOpen {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The kernel image could not be loaded.
    #[error("boot-source.kernel_image_path: {path}: {source}")]
    Kernel {
        /// The path.
        path: String,
        /// Why.
        source: LoadError,
    },
    /// The built-in guest was asked for but is not built in.
    #[error("boot-source.kernel_image_path: this kiln was built without the test guest")]
    NoBuiltinKernel,
    /// The initrd could not be opened.
    #[error("boot-source.initrd_path: {path}: {source}")]
    InitrdOpen {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// The initrd could not be loaded.
    #[error("boot-source.initrd_path: {path}: {source}")]
    Initrd {
        /// The path.
        path: String,
        /// Why.
        source: LoadError,
    },
    /// The command line is invalid or too long.
    #[error("boot-source.boot_args: {0}")]
    Cmdline(String),
    /// The boot structures could not be written.
    #[error(transparent)]
    Configure(#[from] crate::arch::x86_64::ConfigureError),
    /// KVM's CPUID could not be read.
    #[error("cannot read the CPUID KVM supports: {0}")]
    Cpuid(#[source] kvm_ioctls::Error),
    /// KVM's MSR list could not be read.
    #[error("cannot read the MSR list KVM supports: {0}")]
    MsrList(#[source] kvm_ioctls::Error),
    /// The snapshot could not be used.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A device's saved state could not be restored.
    #[error("invalid snapshot state: {0}")]
    DeviceState(String),
    /// A vCPU could not be set up.
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    /// An eventfd could not be created or registered.
    #[error("cannot set up {what}: {source}")]
    Event {
        /// For what.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// A device could not be placed on a bus.
    #[error("cannot place a device: {0}")]
    Bus(#[from] BusError),
    /// The event loop could not be created.
    #[error("cannot create the event loop: {0}")]
    EventManager(event_manager::Error),
    /// A drive's backing file could not be used.
    #[error("drives[{index}].path_on_host: {path}: {source}")]
    Drive {
        /// Position in `drives`.
        index: usize,
        /// The path.
        path: String,
        /// Why.
        source: crate::devices::virtio::block::DiskError,
    },
    /// A drive asks for the `Async` engine, which this host cannot run.
    #[error("drives[{index}].io_engine: Async needs io_uring: {source}")]
    IoEngine {
        /// Position in `drives`.
        index: usize,
        /// Why.
        source: crate::devices::virtio::block::uring::UringError,
    },
    /// A network interface's TAP could not be used.
    #[error("network-interfaces[{index}].host_dev_name: {source}")]
    Tap {
        /// Position in `network-interfaces`.
        index: usize,
        /// Why.
        source: crate::devices::virtio::net::TapError,
    },
    /// More virtio devices than interrupt lines.
    #[error("too many virtio devices: at most {0} fit the interrupt lines")]
    TooManyDevices(u32),
    /// The KVM notification or interrupt of a virtio device could not be registered.
    #[error("cannot wire virtio device {slot} into KVM: {source}")]
    VirtioKvm {
        /// Its slot.
        slot: u32,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// Something the VM needs was never configured.
    #[error("{0}")]
    NotConfigured(&'static str),
    /// The VM was already started.
    #[error("the microVM is already running")]
    AlreadyStarted,
    /// The serial output file could not be opened.
    #[error("--serial-out {path}: {source}")]
    SerialOut {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
}

impl StartError {
    /// The exit code: configuration problems are 2, everything else 1.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            StartError::Memory(_)
            | StartError::KernelOpen { .. }
            | StartError::Kernel { .. }
            | StartError::NoBuiltinKernel
            | StartError::InitrdOpen { .. }
            | StartError::Initrd { .. }
            | StartError::Cmdline(_)
            | StartError::SerialOut { .. }
            | StartError::NotConfigured(_)
            | StartError::Drive { .. }
            | StartError::Tap { .. }
            | StartError::TooManyDevices(_)
            | StartError::Vm(VmError::TooManyVcpus { .. } | VmError::MemorySlot(_)) => {
                ExitCode::BadConfiguration
            }
            _ => ExitCode::StartFailure,
        }
    }
}

/// Options that are not part of the VM configuration.
#[derive(Debug)]
pub struct RunOptions {
    /// Serial output file instead of stdout.
    pub serial_out: Option<PathBuf>,
    /// Feed stdin to the serial console.
    pub serial_in: bool,
    /// Install the boot-timer device.
    pub boot_timer: bool,
    /// When the process started (for the boot timer).
    pub start: Option<(Instant, u64)>,
    /// Stop the VM in order on SIGINT, SIGTERM and SIGHUP.
    pub stop_on_signals: bool,
    /// The seccomp filters each thread installs.
    pub seccomp: Arc<SeccompFilters>,
    /// Start the live-migration thread (migrations are asked for through the API, so
    /// `--no-api` has none).
    pub migration: bool,
}

/// Starts the migration thread when `opts` asks for one; it comes to nothing, with a
/// warning, when the filters have no `migration` category or the thread cannot start.
/// Called before the VM is built, so that the thread's set-up does not compete with the
/// guest's boot, and before the VMM thread's filter, which does not allow its calls.
fn migration_thread(opts: &RunOptions) -> Option<(Worker, EventFd)> {
    if !opts.migration {
        return None;
    }
    if !opts.seccomp.has(ThreadCategory::Migration) {
        log::warn!(
            "live migration is not available: the --seccomp-filter file has no `migration` category"
        );
        return None;
    }
    let spawned = EventFd::new(libc::EFD_NONBLOCK).and_then(|evt| {
        let worker = Worker::spawn(opts.seccomp.clone(), evt.try_clone()?)?;
        Ok((worker, evt))
    });
    spawned
        .inspect_err(|e| {
            log::warn!("live migration is not available: cannot start its thread: {e}")
        })
        .ok()
}

fn event_err(what: &'static str) -> impl FnOnce(std::io::Error) -> StartError {
    move |source| StartError::Event { what, source }
}

/// Loads the kernel named by `path`: the built-in test guest or a file.
fn load_kernel_from(mem: &GuestMemory, path: &str) -> Result<LoadedKernel, StartError> {
    let loaded = if path == BUILTIN_KERNEL {
        let bytes = crate::test_guest::ELF.ok_or(StartError::NoBuiltinKernel)?;
        load_kernel(mem, &mut Cursor::new(bytes))
    } else {
        let mut file = File::open(path).map_err(|source| StartError::KernelOpen {
            path: path.to_string(),
            source,
        })?;
        load_kernel(mem, &mut file)
    };
    loaded.map_err(|source| StartError::Kernel {
        path: path.to_string(),
        source,
    })
}

/// The kernel command line: the user's (or the default) plus what devices add.
fn base_cmdline(config: &VmConfig) -> Result<Cmdline, StartError> {
    let args = config
        .boot_source
        .boot_args
        .as_deref()
        .unwrap_or(DEFAULT_BOOT_ARGS);
    Cmdline::try_from(args, CMDLINE_MAX_SIZE).map_err(|e| StartError::Cmdline(e.to_string()))
}

/// The console: `--serial-out PATH` or (a duplicate of) stdout, behind a bounded buffer
/// so a console nobody reads never blocks a vCPU. `None` for the flusher when stdout is
/// closed (output is then discarded, as before).
fn serial_output(
    path: &Option<PathBuf>,
) -> Result<(Box<dyn Write + Send>, Option<OutputFlusher>), StartError> {
    let (file, shown) = match path {
        None => match crate::devices::serial::open_stdout() {
            Ok(file) => (file, "stdout".to_string()),
            Err(_) => return Ok((Box::new(std::io::sink()), None)),
        },
        Some(p) => {
            let file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .open(p)
                .map_err(|source| StartError::SerialOut {
                    path: p.display().to_string(),
                    source,
                })?;
            (file, p.display().to_string())
        }
    };
    let (out, flusher) =
        crate::devices::serial::serial_output(file, OUTPUT_BUFFER).map_err(|source| {
            StartError::SerialOut {
                path: shown,
                source,
            }
        })?;
    Ok((Box::new(out), Some(flusher)))
}

fn stdin_source() -> Option<File> {
    // A duplicate, so reads bypass std's buffering and closing it leaves fd 0 alone.
    nix::unistd::dup(std::io::stdin()).ok().map(File::from)
}

/// The interrupt line on GSI `gsi` raised through `evt`: KVM_IRQ_LINE when `direct`, an
/// irqfd registered with KVM otherwise (see [`IrqLine`]).
fn irq_line(vm: &Vm, evt: EventFd, gsi: u32, direct: bool) -> Result<IrqLine, kvm_ioctls::Error> {
    if direct {
        return Ok(IrqLine::direct(evt, vm.shared_fd(), gsi));
    }
    vm.fd().register_irqfd(&evt, gsi)?;
    Ok(IrqLine::new(evt))
}

/// A legacy device's line on GSI `gsi` (`what` names it in an error).
fn legacy_irq_line(
    vm: &Vm,
    gsi: u32,
    direct: bool,
    what: &'static str,
) -> Result<IrqLine, StartError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(event_err(what))?;
    irq_line(vm, evt, gsi, direct)
        .map_err(|e| event_err(what)(std::io::Error::from_raw_os_error(e.errno())))
}

/// Where the next virtio device goes, and how interrupts are raised.
struct MmioSlots {
    /// The next free slot.
    next: u32,
    /// Raise interrupts with KVM_IRQ_LINE instead of an irqfd (see [`IrqLine`]): when the
    /// seccomp filters allow it ([`SeccompFilters::allows_irq_line`]).
    direct_irq: bool,
}

/// Places a virtio device in the next MMIO slot: its transport on the bus, its interrupt
/// on a GSI, its queue notifications on ioeventfds, and its `virtio_mmio.device=` entry on
/// the command line. Returns the transport and where it is.
fn attach_virtio_device(
    vm: &Vm,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
    device: Arc<Mutex<dyn VirtioDevice>>,
    slots: &mut MmioSlots,
) -> Result<(Arc<Mutex<MmioTransport>>, Location), StartError> {
    let slot = slots.next;
    let gsi = VIRTIO_GSI_START + slot;
    if gsi > GSI_MAX {
        return Err(StartError::TooManyDevices(GSI_MAX - VIRTIO_GSI_START + 1));
    }
    let base = VIRTIO_MMIO_START + u64::from(slot) * VIRTIO_MMIO_SIZE;
    let kvm_err = |source| StartError::VirtioKvm { slot, source };
    let irq = EventFd::new(libc::EFD_NONBLOCK).map_err(event_err("a virtio interrupt"))?;
    let irq = irq_line(vm, irq, gsi, slots.direct_irq).map_err(kvm_err)?;
    {
        let d = device
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (queue, evt) in d.queue_events().iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + NOTIFY_REG_OFFSET);
            vm.fd()
                .register_ioevent(evt, &addr, queue as u32)
                .map_err(kvm_err)?;
        }
    }
    let interrupt = Arc::new(VirtioInterrupt::new(irq));
    let transport = Arc::new(Mutex::new(MmioTransport::new(
        device,
        vm.memory().clone(),
        interrupt,
    )));
    mmio.insert(transport.clone(), base, VIRTIO_MMIO_SIZE)?;
    cmdline
        .add_virtio_mmio_device(VIRTIO_MMIO_SIZE, GuestAddress(base), gsi, None)
        .map_err(|e| StartError::Cmdline(e.to_string()))?;
    let location = Location::Mmio {
        base,
        len: VIRTIO_MMIO_SIZE,
        gsi: Some(gsi),
    };
    slots.next += 1;
    Ok((transport, location))
}

/// Opens every drive (the root drive first, so it is /dev/vda) and attaches it.
fn attach_block_devices(
    config: &VmConfig,
    vm: &Vm,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
    event_manager: &mut EventManager<Subscriber>,
    devices: &mut DeviceRegistry,
    slots: &mut MmioSlots,
) -> Result<(), StartError> {
    let mut order: Vec<usize> = (0..config.drives.len()).collect();
    order.sort_by_key(|i| !config.drives[*i].is_root_device);
    for index in order {
        let drive = &config.drives[index];
        let drive_err = |source| StartError::Drive {
            index,
            path: drive.path_on_host.clone(),
            source,
        };
        let io_engine = drive.io_engine.unwrap_or_default();
        if io_engine == IoEngine::Async {
            // Refused now, never silently served synchronously; the ring itself is made on
            // the drive's first request.
            crate::devices::virtio::block::uring::probe()
                .map_err(|source| StartError::IoEngine { index, source })?;
        }
        let disk = DiskFile::open(Path::new(&drive.path_on_host), drive.is_read_only)
            .map_err(drive_err)?;
        let block_config = BlockConfig {
            drive_id: drive.drive_id.clone(),
            read_only: drive.is_read_only,
            cache_type: drive.cache_type,
            io_engine,
        };
        let mut block = Block::new(block_config, disk).map_err(event_err("a drive's queue"))?;
        block.set_rate_limiter(
            RateLimiter::new(drive.rate_limiter.as_ref())
                .map_err(event_err("a drive's rate limiter"))?,
        );
        let block = Arc::new(Mutex::new(block));
        let (transport, location) = attach_virtio_device(vm, mmio, cmdline, block.clone(), slots)?;
        if drive.is_root_device {
            let root = match &drive.partuuid {
                Some(uuid) => format!("root=PARTUUID={uuid}"),
                None => "root=/dev/vda".to_string(),
            };
            let mode = if drive.is_read_only { "ro" } else { "rw" };
            for arg in [root.as_str(), mode] {
                cmdline
                    .insert_str(arg)
                    .map_err(|e| StartError::Cmdline(e.to_string()))?;
            }
        }
        let events: Subscriber = Arc::new(Mutex::new(BlockEvents::new(block.clone())));
        event_manager.add_subscriber(events);
        devices.add(
            Device::Block {
                device: block,
                transport,
            },
            location,
        );
    }
    Ok(())
}

/// Opens every network interface's TAP and attaches the devices, after the drives.
fn attach_net_devices(
    config: &VmConfig,
    vm: &Vm,
    mmio: &mut Bus,
    cmdline: &mut Cmdline,
    event_manager: &mut EventManager<Subscriber>,
    devices: &mut DeviceRegistry,
    slots: &mut MmioSlots,
) -> Result<(), StartError> {
    for (index, iface) in config.network_interfaces.iter().enumerate() {
        let tap =
            Tap::open(&iface.host_dev_name).map_err(|source| StartError::Tap { index, source })?;
        let net_config = NetConfig {
            iface_id: iface.iface_id.clone(),
            guest_mac: iface.guest_mac,
        };
        let mut net = Net::new(net_config, tap).map_err(event_err("an interface's queues"))?;
        let limiter = |c| RateLimiter::new(c).map_err(event_err("an interface's rate limiters"));
        net.set_rate_limiters(
            limiter(iface.rx_rate_limiter.as_ref())?,
            limiter(iface.tx_rate_limiter.as_ref())?,
        );
        let net = Arc::new(Mutex::new(net));
        let (transport, location) = attach_virtio_device(vm, mmio, cmdline, net.clone(), slots)?;
        let events: Subscriber = Arc::new(Mutex::new(NetEvents::new(net.clone())));
        event_manager.add_subscriber(events);
        devices.add(
            Device::Net {
                device: net,
                transport,
            },
            location,
        );
    }
    Ok(())
}

/// The virtio-mmio devices as the ACPI tables describe them, in the order they were attached.
fn virtio_mmio_devices(devices: &DeviceRegistry) -> Vec<MmioDevice> {
    devices
        .iter()
        .filter(|e| matches!(e.device, Device::Block { .. } | Device::Net { .. }))
        .filter_map(|e| match e.location {
            Location::Mmio {
                base,
                len,
                gsi: Some(gsi),
            } => Some(MmioDevice { base, len, gsi }),
            _ => None,
        })
        .collect()
}

/// Loads the kernel and initrd and writes the boot structures.
fn load_boot_source(
    config: &VmConfig,
    vm: &Vm,
    cmdline: &Cmdline,
    devices: &DeviceRegistry,
) -> Result<LoadedKernel, StartError> {
    let boot = &config.boot_source;
    let kernel = load_kernel_from(vm.memory(), &boot.kernel_image_path)?;
    let initrd = match &boot.initrd_path {
        None => None,
        Some(path) => {
            let mut file = File::open(path).map_err(|source| StartError::InitrdOpen {
                path: path.clone(),
                source,
            })?;
            Some(
                load_initrd(vm.memory(), &mut file, &kernel).map_err(|source| {
                    StartError::Initrd {
                        path: path.clone(),
                        source,
                    }
                })?,
            )
        }
    };
    configure_system(
        vm.memory(),
        &kernel,
        cmdline,
        initrd,
        config.vcpus(),
        &virtio_mmio_devices(devices),
    )?;
    Ok(kernel)
}

/// Restores every device's saved state, then notifies the queues of every running virtio
/// device (a driver with EVENT_IDX may believe it already did).
fn restore_devices(devices: &DeviceRegistry, state: &MicrovmState) -> Result<(), StartError> {
    let bad =
        |what: &str, e: &dyn std::fmt::Display| StartError::DeviceState(format!("{what}: {e}"));
    if let Some(serial) = devices.serial() {
        lock(serial.as_ref())
            .restore(&state.devices.serial)
            .map_err(|e| bad("serial", &e))?;
    }
    if let Some(i8042) = devices.i8042() {
        lock(i8042.as_ref())
            .restore(&state.devices.i8042)
            .map_err(|e| bad("i8042", &e))?;
    }
    let mut blocks = state.devices.blocks.iter();
    let mut nets = state.devices.nets.iter();
    let mut transports = Vec::new();
    for entry in devices.iter() {
        let (saved, transport) = match &entry.device {
            Device::Block { device, transport } => {
                let saved = blocks.next();
                if let Some(limiter) = saved.and_then(|s| s.rate_limiters.first()) {
                    lock(device.as_ref())
                        .restore_rate_limiter(limiter)
                        .map_err(|e| bad("a drive's rate limiter", &e))?;
                }
                (saved, transport)
            }
            Device::Net { device, transport } => {
                let saved = nets.next();
                if let Some([rx, tx]) = saved.map(|s| s.rate_limiters.as_slice()) {
                    lock(device.as_ref())
                        .restore_rate_limiters(rx, tx)
                        .map_err(|e| bad("an interface's rate limiters", &e))?;
                }
                (saved, transport)
            }
            _ => continue,
        };
        let saved = saved.ok_or_else(|| StartError::DeviceState("a device has no state".into()))?;
        lock(transport.as_ref())
            .restore(&saved.transport)
            .map_err(|e| bad(&saved.id, &e))?;
        transports.push(transport);
    }
    for t in transports {
        lock(t.as_ref()).kick_queues();
    }
    Ok(())
}

/// What a VM starts from.
#[derive(Debug)]
enum Boot<'a> {
    /// A kernel, entered through its boot protocol.
    Kernel,
    /// A snapshot's state, with its memory already mapped (and, with the `Uffd` backend,
    /// the page-fault handler that serves it).
    Snapshot {
        state: &'a MicrovmState,
        memory: GuestMemory,
        handler: Option<PageFaultHandler>,
        resume: bool,
    },
}

/// Builds the VM described by `config` and starts its vCPUs.
pub fn build_and_start(config: &VmConfig, opts: &RunOptions) -> Result<Vmm, StartError> {
    build(config, opts, Boot::Kernel)
}

/// Restores the snapshot `params` names into a new VM: the state file is authenticated
/// (with `key`) and checked before use, the memory file mapped privately (or, with the
/// `Uffd` backend, guest memory handed to the page-fault handler first); the VM is left
/// paused unless `resume_vm`.
pub fn restore(
    params: &SnapshotLoadParams,
    opts: &RunOptions,
    key: Option<&Key>,
) -> Result<(Vmm, VmConfig), StartError> {
    let unsupported = |m: &str| Err(StartError::Snapshot(SnapshotError::Unsupported(m.into())));
    if params.vsock_override.is_some() {
        return unsupported("vsock_override: kiln has no vsock device");
    }
    let (backend, mem_path) = match (&params.mem_backend, &params.mem_file_path) {
        (Some(b), None) => (b.backend_type, b.backend_path.clone()),
        (None, Some(p)) => (MemBackendType::File, p.clone()),
        (Some(_), Some(_)) => {
            return unsupported("give either mem_backend or mem_file_path, not both");
        }
        (None, None) => return unsupported("mem_backend: missing"),
    };
    if backend == MemBackendType::Uffd && key.is_some() {
        return unsupported(
            "mem_backend.backend_type Uffd: kiln never reads the memory file, so it cannot check \
             it against the snapshot's keyed digest (--snapshot-key-file): use the File backend, \
             or no key and a page-fault handler that checks the memory itself",
        );
    }
    if backend == MemBackendType::Uffd && params.working_set.is_some() {
        return unsupported(
            "working_set: not with mem_backend.backend_type Uffd: the page-fault handler \
             decides which pages come first",
        );
    }
    // Where restore time goes, logged at the end.
    let started = Instant::now();
    let state = read_state(Path::new(&params.snapshot_path), key)?;
    let t_state = started.elapsed();
    let mut config = state.config.clone();
    apply_overrides(
        &mut config,
        &params.network_overrides,
        &params.drive_overrides,
    )?;
    // Firecracker's rule: the load decides whether the restored VM tracks dirty pages.
    config.machine_config.track_dirty_pages =
        params.track_dirty_pages || params.enable_diff_snapshots;
    config
        .validate()
        .map_err(|e| StartError::Snapshot(SnapshotError::Invalid(e.to_string())))?;
    let (memory, digest, handler) = match backend {
        MemBackendType::File => {
            let (memory, digest) = crate::snapshot::memory::load(&mem_path, &state, key)?;
            (memory, digest, None)
        }
        // Nothing touches guest memory before the handler has it: only the builder, after.
        MemBackendType::Uffd => {
            let (memory, handler) =
                uffd::hand_over(&mem_path, &state.memory).map_err(|source| {
                    SnapshotError::Uffd {
                        path: mem_path.clone(),
                        source,
                    }
                })?;
            (memory, None, Some(handler))
        }
    };
    let t_memory = started.elapsed();
    let recorder = match &params.working_set {
        Some(ws) => working_set(ws, &memory)?,
        None => None,
    };
    let t_working_set = started.elapsed();
    let mut vmm = build(
        &config,
        opts,
        Boot::Snapshot {
            state: &state,
            memory,
            handler,
            resume: params.resume_vm,
        },
    )?;
    vmm.set_memory_digest(digest);
    if let Some((recorder, timer_fd)) = recorder {
        vmm.record_working_set(recorder, timer_fd);
    }
    let t_vm = started.elapsed();
    log::info!(
        "snapshot loaded in {t_vm:?}: state file {t_state:?}, memory {:?} (checked and mapped, or handed to the page-fault handler), working set {:?}, VM, vCPUs and devices {:?}",
        t_memory - t_state,
        t_working_set - t_memory,
        t_vm - t_working_set
    );
    Ok((vmm, config))
}

/// Puts the TAPs and backing files of this host into a saved configuration.
fn apply_overrides(
    config: &mut VmConfig,
    network_overrides: &[NetworkOverride],
    drive_overrides: &[DriveOverride],
) -> Result<(), StartError> {
    for o in network_overrides {
        let Some(iface) = config
            .network_interfaces
            .iter_mut()
            .find(|n| n.iface_id == o.iface_id)
        else {
            return Err(StartError::Snapshot(SnapshotError::Invalid(format!(
                "network_overrides: the snapshot has no network interface `{}`",
                o.iface_id
            ))));
        };
        iface.host_dev_name = o.host_dev_name.clone();
    }
    for o in drive_overrides {
        let Some(drive) = config.drives.iter_mut().find(|d| d.drive_id == o.drive_id) else {
            return Err(StartError::Snapshot(SnapshotError::Invalid(format!(
                "drive_overrides: the snapshot has no drive `{}`",
                o.drive_id
            ))));
        };
        drive.path_on_host = o.path_on_host.clone();
    }
    Ok(())
}

/// Builds and resumes a VM a live migration brought: its state (checked by
/// [`crate::snapshot::parse_state`]) and its memory, filled by the stream. The TAPs and
/// drives are this host's (`network_overrides`, `drive_overrides`), else the source's names.
pub fn restore_migrated(
    state: &MicrovmState,
    memory: GuestMemory,
    network_overrides: &[NetworkOverride],
    drive_overrides: &[DriveOverride],
    opts: &RunOptions,
) -> Result<(Vmm, VmConfig), StartError> {
    let mut config = state.config.clone();
    apply_overrides(&mut config, network_overrides, drive_overrides)?;
    config
        .validate()
        .map_err(|e| StartError::Snapshot(SnapshotError::Invalid(e.to_string())))?;
    let vmm = build(
        &config,
        opts,
        Boot::Snapshot {
            state,
            memory,
            handler: None,
            resume: true,
        },
    )?;
    Ok((vmm, config))
}

/// Whether this host can run a saved VM's vCPUs (the CPU features its guest saw): checked
/// by a migration's destination before the source lets go of the VM.
pub fn check_host_cpu(state: &MicrovmState) -> Result<(), StartError> {
    let kvm = open_kvm(state.config.vcpus())?;
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StartError::Cpuid)?;
    let saved = state.vcpus.first().map_or(&[][..], |v| &v.cpuid[..]);
    let missing = crate::snapshot::cpu::missing_features(saved, supported.as_slice());
    if !missing.is_empty() {
        return Err(StartError::Snapshot(SnapshotError::CpuFeatures(missing)));
    }
    Ok(())
}

/// A load's `working_set`: an existing file is faulted into `memory` now; a missing one is
/// recorded later (the recorder and its timer's descriptor for the VMM).
fn working_set(
    params: &WorkingSetParams,
    memory: &GuestMemory,
) -> Result<Option<(Recorder, OwnedFd)>, StartError> {
    let invalid = |m: String| StartError::Snapshot(SnapshotError::Invalid(m));
    let path = Path::new(&params.path);
    if params.path.is_empty() {
        return Err(invalid("working_set.path: empty".into()));
    }
    let after_ms = params
        .record_after_ms
        .unwrap_or(crate::snapshot::WORKING_SET_RECORD_MS);
    if after_ms > crate::snapshot::WORKING_SET_RECORD_MAX_MS {
        return Err(invalid(format!(
            "working_set.record_after_ms: {after_ms} is over {}",
            crate::snapshot::WORKING_SET_RECORD_MAX_MS
        )));
    }
    let fail = |e: WorkingSetError| invalid(format!("working_set.path {}: {e}", params.path));
    if path.exists() {
        let pages = crate::snapshot::memory::layout(memory)
            .iter()
            .map(|r| r.size / 4096)
            .sum();
        let started = Instant::now();
        let ws = WorkingSet::read(path, pages).map_err(fail)?;
        let faulted = ws.prefault(memory).map_err(fail)?;
        log::info!(
            "working set: {faulted} pages ({} KiB) in {} runs faulted in in {:?}",
            faulted * 4,
            ws.runs().len(),
            started.elapsed()
        );
        return Ok(None);
    }
    Recorder::new(path, after_ms).map(Some).map_err(fail)
}

fn build(config: &VmConfig, opts: &RunOptions, mut boot: Boot<'_>) -> Result<Vmm, StartError> {
    let vcpu_count = config.vcpus();
    let machine = &config.machine_config;
    let handler = match &mut boot {
        Boot::Snapshot { handler, .. } => handler.take(),
        Boot::Kernel => None,
    };

    let migration = migration_thread(opts);

    // KVM, memory, VM.
    let kvm = open_kvm(vcpu_count)?;
    let memory = match &boot {
        Boot::Kernel => create_guest_memory(machine.mem_size_mib)?,
        Boot::Snapshot { memory, .. } => memory.clone(),
    };
    let mut vm = Vm::new(&kvm, memory, machine.track_dirty_pages)?;
    let exit = Arc::new(ExitSignal::new().map_err(event_err("the exit event"))?);

    // Legacy devices on the port bus.
    let mut pio = Bus::new();
    let mut mmio = Bus::new();
    let direct_irq = opts.seccomp.allows_irq_line();
    let serial_irq = legacy_irq_line(&vm, SERIAL_GSI, direct_irq, "the serial IRQ")?;
    let input_ready = EventFd::new(libc::EFD_NONBLOCK).map_err(event_err("the serial input"))?;
    let (serial_out, serial_flusher) = serial_output(&opts.serial_out)?;
    let serial = Arc::new(Mutex::new(SerialDevice::new(
        serial_irq,
        serial_out,
        input_ready
            .try_clone()
            .map_err(event_err("the serial input"))?,
    )));
    pio.insert(serial.clone(), COM1_BASE, UART_PORTS)?;
    let mut devices = DeviceRegistry::default();
    devices.add(
        Device::Serial(serial.clone()),
        Location::Pio {
            base: COM1_BASE,
            len: UART_PORTS,
        },
    );

    let kbd_irq = legacy_irq_line(&vm, I8042_GSI, direct_irq, "the i8042 IRQ")?;
    let i8042 = Arc::new(Mutex::new(I8042Device::new(exit.clone(), kbd_irq)));
    pio.insert(i8042.clone(), I8042_BASE, I8042_PORTS)?;
    devices.add(
        Device::I8042(i8042),
        Location::Pio {
            base: I8042_BASE,
            len: I8042_PORTS,
        },
    );

    if opts.boot_timer {
        let (start, cpu) = opts.start.unwrap_or_else(|| (Instant::now(), 0));
        let timer = Arc::new(Mutex::new(BootTimer::new(start, cpu)));
        mmio.insert(timer.clone(), BOOT_TIMER_START, BOOT_TIMER_SIZE)?;
        devices.add(
            Device::BootTimer(timer),
            Location::Mmio {
                base: BOOT_TIMER_START,
                len: BOOT_TIMER_SIZE,
                gsi: None,
            },
        );
    }

    // The event loop, then the virtio devices it serves.
    let mut event_manager: EventManager<Subscriber> =
        EventManager::new().map_err(StartError::EventManager)?;
    let mut cmdline = base_cmdline(config)?;
    let mut slots = MmioSlots {
        next: 0,
        direct_irq,
    };
    attach_block_devices(
        config,
        &vm,
        &mut mmio,
        &mut cmdline,
        &mut event_manager,
        &mut devices,
        &mut slots,
    )?;
    attach_net_devices(
        config,
        &vm,
        &mut mmio,
        &mut cmdline,
        &mut event_manager,
        &mut devices,
        &mut slots,
    )?;

    // Kernel, initrd, command line, boot structures (a snapshot has them in its memory).
    let kernel = match &boot {
        Boot::Kernel => Some(load_boot_source(config, &vm, &cmdline, &devices)?),
        Boot::Snapshot { .. } => None,
    };

    // vCPUs.
    let pio = Arc::new(pio);
    let mmio = Arc::new(mmio);
    let supported_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(StartError::Cpuid)?;
    let msr_list = Arc::new(
        kvm.get_msr_index_list()
            .map_err(StartError::MsrList)?
            .as_slice()
            .to_vec(),
    );
    if let Boot::Snapshot { state, .. } = &boot {
        let saved = state.vcpus.first().map_or(&[][..], |v| &v.cpuid[..]);
        let missing = crate::snapshot::cpu::missing_features(saved, supported_cpuid.as_slice());
        if !missing.is_empty() {
            return Err(StartError::Snapshot(SnapshotError::CpuFeatures(missing)));
        }
    }
    let topology = CpuTopology::new(vcpu_count, machine.smt);
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::with_capacity(usize::from(vcpu_count));
    for index in 0..vcpu_count {
        let mut vcpu = Vcpu::new(vm.fd(), index, pio.clone(), mmio.clone(), exit.clone())?;
        vcpu.set_msr_list(msr_list.clone());
        match (&boot, &kernel) {
            (Boot::Snapshot { state, .. }, _) => vcpu.restore(&state.vcpus[usize::from(index)])?,
            (Boot::Kernel, Some(kernel)) => vcpu.configure(
                vm.memory(),
                kernel,
                &supported_cpuid,
                topology,
                tsc_deadline,
            )?,
            (Boot::Kernel, None) => return Err(StartError::NotConfigured("no kernel loaded")),
        }
        vcpus.push(vcpu);
    }
    if let Boot::Snapshot { state, .. } = &boot {
        crate::vstate::vm_state::restore(vm.fd(), &state.vm)?;
        restore_devices(&devices, state)?;
    }

    // Event loop housekeeping.
    let watcher: Arc<Mutex<dyn MutEventSubscriber + Send>> =
        Arc::new(Mutex::new(ExitWatcher::new(
            exit.eventfd()
                .try_clone()
                .map_err(event_err("the exit event"))?,
        )));
    event_manager.add_subscriber(watcher);
    if opts.stop_on_signals {
        let signals: Subscriber = Arc::new(Mutex::new(
            SignalWatcher::install(exit.clone()).map_err(event_err("the stop signals"))?,
        ));
        event_manager.add_subscriber(signals);
    }
    if let Some(flusher) = serial_flusher {
        let flusher: Subscriber = Arc::new(Mutex::new(flusher));
        event_manager.add_subscriber(flusher);
    }
    if opts.serial_in {
        let input: Subscriber = Arc::new(Mutex::new(SerialInput::new(
            serial.clone(),
            stdin_source(),
            input_ready,
        )));
        event_manager.add_subscriber(input);
    }

    // The page-fault handler (`Uffd` backend) must have taken the handshake: a handler gone
    // without it would leave the guest's first fault waiting forever.
    if let Some(handler) = handler {
        handler.check().map_err(|source| {
            StartError::Snapshot(SnapshotError::Uffd {
                path: handler.path().to_string(),
                source,
            })
        })?;
        vm.keep_page_fault_handler(handler);
    }

    // Go.
    install_kick_handler()?;
    let vcpu_metrics = vcpus.iter().map(Vcpu::metrics).collect();
    let paused = matches!(boot, Boot::Snapshot { resume: false, .. });
    // The PIT thread asks once the BSP has entered the guest (see `disable_pit_reinjection`).
    let bsp_ran = vcpus.first_mut().map(Vcpu::first_exit);
    let mut handles = Vec::with_capacity(vcpus.len());
    for vcpu in vcpus {
        handles.push(vcpu.start(opts.seccomp.clone(), paused)?);
    }
    if let Some(bsp_ran) = bsp_ran {
        vm.disable_pit_reinjection(opts.seccomp.clone(), bsp_ran);
    }
    let mut vmm = Vmm::new(vm, handles, event_manager, exit, devices, vcpu_metrics);
    if let Some(migration) = migration {
        vmm.adopt_migration(migration);
    }
    if paused {
        vmm.wait_paused();
    }
    Ok(vmm)
}
