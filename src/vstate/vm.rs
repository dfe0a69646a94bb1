//! The KVM VM: capability checks, memory slots, the in-kernel interrupt controllers and PIT,
//! and the TSS / identity-map pages VMX needs.

use std::os::fd::{AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use kvm_bindings::{
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_reinject_control,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_io_nr;

use super::memory::GuestMemory;
use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_START, KVM_TSS_START};
use crate::seccomp::{SeccompFilters, ThreadCategory};
use crate::snapshot::uffd::PageFaultHandler;

ioctl_io_nr!(KVM_REINJECT_CONTROL, kvm_bindings::KVMIO, 0x71);

/// The KVM API version kiln speaks.
const KVM_API_VERSION: i32 = 12;

/// Capabilities kiln relies on.
const REQUIRED_CAPS: [(Cap, &str); 9] = [
    (Cap::Irqchip, "in-kernel irqchip"),
    (Cap::Pit2, "in-kernel PIT"),
    (Cap::Irqfd, "irqfd"),
    (Cap::Ioeventfd, "ioeventfd"),
    (Cap::UserMemory, "user memory regions"),
    (Cap::SetTssAddr, "KVM_SET_TSS_ADDR"),
    (Cap::SetIdentityMapAddr, "KVM_SET_IDENTITY_MAP_ADDR"),
    (Cap::ImmediateExit, "immediate_exit"),
    (Cap::ExtCpuid, "KVM_GET_SUPPORTED_CPUID"),
];

/// Errors creating the VM.
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm: {0}")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// Wrong KVM API version.
    #[error("KVM API version {0} is not supported (need {KVM_API_VERSION})")]
    ApiVersion(i32),
    /// A capability is missing.
    #[error("KVM lacks a required capability: {0}")]
    MissingCap(&'static str),
    /// More vCPUs than KVM allows.
    #[error("machine-config.vcpu_count: KVM allows at most {max} vCPUs, {requested} requested")]
    TooManyVcpus {
        /// Requested count.
        requested: u8,
        /// KVM's limit.
        max: usize,
    },
    /// KVM_CREATE_VM failed.
    #[error("cannot create the VM: {0}")]
    CreateVm(#[source] kvm_ioctls::Error),
    /// A memory slot was refused (typically: more memory than KVM maps in one slot).
    #[error("machine-config.mem_size_mib: KVM refused the guest memory: {0}")]
    MemorySlot(#[source] kvm_ioctls::Error),
    /// More memory regions than slots.
    #[error("guest memory needs more KVM memory slots than the host offers")]
    TooManySlots,
    /// A VM-level ioctl failed.
    #[error("{what}: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

/// Opens /dev/kvm and checks that it can run a kiln VM with `vcpus` vCPUs.
pub fn open_kvm(vcpus: u8) -> Result<Kvm, VmError> {
    let kvm = Kvm::new().map_err(VmError::OpenKvm)?;
    let version = kvm.get_api_version();
    if version != KVM_API_VERSION {
        return Err(VmError::ApiVersion(version));
    }
    for (cap, name) in REQUIRED_CAPS {
        if !kvm.check_extension(cap) {
            return Err(VmError::MissingCap(name));
        }
    }
    let max = kvm.get_max_vcpus();
    if usize::from(vcpus) > max {
        return Err(VmError::TooManyVcpus {
            requested: vcpus,
            max,
        });
    }
    Ok(kvm)
}

/// A VM with its guest memory registered. The memory outlives the slots that point into it:
/// fields drop in declaration order, the VM fd first (after `Drop` has joined the thread
/// that borrows it).
#[derive(Debug)]
pub struct Vm {
    /// The thread turning PIT reinjection off; true once it has.
    pit_reinject_off: Option<JoinHandle<bool>>,
    dirty: DirtyLog,
    /// Dirty-page tracking as configured (`track_dirty_pages`: Diff snapshots allowed).
    track_dirty_pages: bool,
    /// With the `Uffd` snapshot backend: the handler serving the memory's missing pages.
    page_fault_handler: Option<PageFaultHandler>,
}

/// KVM's dirty log and the memory's bitmaps, shareable with the thread that streams a live
/// migration while the VM runs. Holds the VM fd and the memory alive (the VM fd first).
#[derive(Clone, Debug)]
pub struct DirtyLog {
    fd: Arc<VmFd>,
    memory: GuestMemory,
    /// Whether the slots carry KVM_MEM_LOG_DIRTY_PAGES.
    logging: Arc<AtomicBool>,
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Some(thread) = self.pit_reinject_off.take() {
            let _ = thread.join();
        }
    }
}

impl Vm {
    /// Creates the VM, registers `memory`, and sets up the irqchip, PIT, TSS and identity map.
    pub fn new(kvm: &Kvm, memory: GuestMemory, track_dirty_pages: bool) -> Result<Vm, VmError> {
        let fd = kvm.create_vm().map_err(VmError::CreateVm)?;
        if memory.num_regions() > kvm.get_nr_memslots() {
            return Err(VmError::TooManySlots);
        }
        register_slots(&fd, &memory, track_dirty_pages).map_err(VmError::MemorySlot)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_START)
            .map_err(ioctl("cannot set the identity map address"))?;
        fd.set_tss_address(KVM_TSS_START as usize)
            .map_err(ioctl("cannot set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(ioctl("cannot create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit)
            .map_err(ioctl("cannot create the in-kernel PIT"))?;
        Ok(Vm {
            pit_reinject_off: None,
            dirty: DirtyLog {
                fd: Arc::new(fd),
                memory,
                logging: Arc::new(AtomicBool::new(track_dirty_pages)),
            },
            track_dirty_pages,
            page_fault_handler: None,
        })
    }

    /// Turns the PIT's tick reinjection off, on a short-lived thread, while the guest runs.
    ///
    /// Reinjection replays PIT ticks the guest missed; Linux guests keep time with kvm-clock
    /// and the TSC and do not want it (QEMU's `lost_tick_policy=discard`). It also costs
    /// time: the kernel leaves reinjection by unregistering two notifiers, each waiting for an
    /// SRCU grace period, and the second one, coming right after the first, often gets a
    /// normal (slow) one — 0.1 to 20 ms here. With reinjection still on, tearing the VM down
    /// pays that after the guest has reset, in the `close` of the VM fd, delaying kiln's exit
    /// by half of a tiny guest's whole run; done now, on its own thread, it overlaps the boot
    /// and the teardown skips it.
    ///
    /// The kernel holds the PIT's lock for the whole call, and the BSP takes that lock to
    /// move the PIT's timer whenever it runs on another host CPU than before — always on
    /// its first KVM_RUN. So the thread waits for `bsp_ran` ([`Vcpu::first_exit`] of vCPU 0)
    /// before it asks: started earlier, it made the BSP's first entry wait out both grace
    /// periods about half the time (seen with `perf sched`: the vCPU asleep in
    /// `__kvm_migrate_pit_timer`), which delayed the guest's first instruction by ~13 ms.
    /// If the BSP's thread ends without running, the thread leaves reinjection on (the
    /// teardown pays it, as it would now). The thread runs under the vCPU filter, which
    /// allows this one ioctl.
    ///
    /// [`Vcpu::first_exit`]: crate::vstate::vcpu::Vcpu::first_exit
    pub fn disable_pit_reinjection(
        &mut self,
        seccomp: Arc<SeccompFilters>,
        bsp_ran: mpsc::Receiver<()>,
    ) {
        let raw = self.dirty.fd.as_raw_fd();
        let spawned = std::thread::Builder::new()
            .name("kiln_pit".into())
            .spawn(move || {
                if let Err(e) = seccomp.install(ThreadCategory::Vcpu) {
                    log::warn!("PIT reinjection left on: {e}");
                    return false;
                }
                if bsp_ran.recv().is_err() {
                    return false;
                }
                // SAFETY: `Vm` joins this thread before it closes the fd (see `Drop`).
                let fd = unsafe { BorrowedFd::borrow_raw(raw) };
                let control = kvm_reinject_control::default();
                // SAFETY: KVM_REINJECT_CONTROL reads one `kvm_reinject_control` (all zero:
                // reinjection off), which lives across the call; `fd` is a VM fd with a PIT.
                if unsafe { ioctl_with_ref(&fd, KVM_REINJECT_CONTROL(), &control) } < 0 {
                    log::warn!(
                        "PIT reinjection left on: {}",
                        std::io::Error::last_os_error()
                    );
                    return false;
                }
                true
            });
        match spawned {
            Ok(thread) => self.pit_reinject_off = Some(thread),
            Err(e) => log::warn!("PIT reinjection left on: cannot start its thread: {e}"),
        }
    }

    /// The KVM VM fd.
    pub fn fd(&self) -> &VmFd {
        &self.dirty.fd
    }

    /// The KVM VM fd, for an [`IrqLine::direct`] that outlives the borrow.
    ///
    /// [`IrqLine::direct`]: crate::devices::IrqLine::direct
    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.dirty.fd.clone()
    }

    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.dirty.memory
    }

    /// The dirty log, for a thread that reads it while the VM runs.
    pub fn dirty_log(&self) -> &DirtyLog {
        &self.dirty
    }

    /// Keeps the connection to the page-fault handler that serves guest memory (a `Uffd`
    /// restore) for the VM's life.
    pub fn keep_page_fault_handler(&mut self, handler: PageFaultHandler) {
        self.page_fault_handler = Some(handler);
    }

    /// The page-fault handler serving guest memory, if any.
    pub fn page_fault_handler(&self) -> Option<&PageFaultHandler> {
        self.page_fault_handler.as_ref()
    }

    /// Moves KVM's dirty log (the pages vCPUs wrote since the last call) into the regions'
    /// dirty bitmaps, where device emulation marks its own writes. Without KVM logging on
    /// (no tracking, no migration) only the devices' marks are there.
    pub fn sync_dirty_log(&self) -> Result<(), VmError> {
        self.dirty.sync()
    }

    /// Forgets every dirty page (after a snapshot has saved them): KVM's log is read and
    /// dropped, the bitmaps cleared.
    pub fn reset_dirty(&self) -> Result<(), VmError> {
        self.dirty.sync()?;
        self.dirty.clear();
        Ok(())
    }

    /// Whether the VM tracks dirty pages as configured (Diff snapshots allowed).
    pub fn tracks_dirty_pages(&self) -> bool {
        self.track_dirty_pages
    }
}

/// Registers every region of `memory` as a KVM slot (slot number = region index), with
/// KVM's dirty logging when `log_dirty`. Registering an existing slot again with the same
/// range changes only its flags.
fn register_slots(
    fd: &VmFd,
    memory: &GuestMemory,
    log_dirty: bool,
) -> Result<(), kvm_ioctls::Error> {
    let flags = if log_dirty {
        KVM_MEM_LOG_DIRTY_PAGES
    } else {
        0
    };
    for (slot, region) in memory.iter().enumerate() {
        let host = region
            .get_host_address(vm_memory::MemoryRegionAddress(0))
            .map_err(|_| kvm_ioctls::Error::new(libc::EINVAL))?;
        let mem_region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().raw_value(),
            memory_size: region.len(),
            userspace_addr: host as u64,
        };
        // SAFETY: the region is a live mapping of exactly `memory_size` bytes owned by
        // `memory`, which the caller keeps alive for at least as long as `fd` (`Vm` and
        // `DirtyLog` hold both).
        unsafe { fd.set_user_memory_region(mem_region) }?;
    }
    Ok(())
}

impl DirtyLog {
    /// Guest memory.
    pub fn memory(&self) -> &GuestMemory {
        &self.memory
    }

    /// Turns KVM's dirty logging on or off on every slot; turning it on starts the log
    /// empty.
    pub fn set_logging(&self, on: bool) -> Result<(), VmError> {
        if self.logging.load(Ordering::SeqCst) == on {
            return Ok(());
        }
        register_slots(&self.fd, &self.memory, on)
            .map_err(ioctl("cannot switch dirty-page logging"))?;
        self.logging.store(on, Ordering::SeqCst);
        Ok(())
    }

    /// Moves KVM's dirty log into the bitmaps (see [`Vm::sync_dirty_log`]).
    pub fn sync(&self) -> Result<(), VmError> {
        if !self.logging.load(Ordering::SeqCst) {
            return Ok(());
        }
        for (slot, region) in self.memory.iter().enumerate() {
            let bitmap = std::ops::Deref::deref(region).bitmap();
            let log = self
                .fd
                .get_dirty_log(slot as u32, region.len() as usize)
                .map_err(ioctl("cannot read the dirty-page log"))?;
            for (word, bits) in log.iter().enumerate() {
                let mut bits = *bits;
                while bits != 0 {
                    let bit = bits.trailing_zeros() as usize;
                    bitmap.set_bit(word * 64 + bit);
                    bits &= bits - 1;
                }
            }
        }
        Ok(())
    }

    /// Marks every page dirty (a failed migration consumed the marks a later Diff
    /// snapshot needs: it then saves everything).
    pub fn mark_all(&self) {
        for region in self.memory.iter() {
            std::ops::Deref::deref(region)
                .bitmap()
                .set_addr_range(0, region.len() as usize);
        }
    }

    /// Clears every bitmap.
    pub fn clear(&self) {
        for region in self.memory.iter() {
            std::ops::Deref::deref(region).bitmap().reset();
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn pit_reinjection_is_turned_off_under_the_vcpu_filter() {
        let kvm = open_kvm(1).expect("/dev/kvm is needed by this test");
        let mut vm = Vm::new(&kvm, create_guest_memory(16).unwrap(), false).unwrap();
        // The thread jails itself with the built-in vCPU filter (a kill would end the test
        // process with SIGSYS), then asks KVM.
        let (bsp_ran, first_exit) = mpsc::channel();
        vm.disable_pit_reinjection(Arc::new(SeccompFilters::builtin()), first_exit);
        let thread = vm.pit_reinject_off.take().unwrap();
        // Not before the BSP has run: KVM holds the PIT's lock for the whole call, and the
        // BSP's first entry takes it.
        std::thread::sleep(std::time::Duration::from_millis(200));
        assert!(!thread.is_finished(), "asked before the BSP ran");
        bsp_ran.send(()).unwrap();
        assert!(thread.join().unwrap(), "KVM refused KVM_REINJECT_CONTROL");
    }

    #[test]
    fn pit_reinjection_is_left_on_when_the_bsp_never_runs() {
        let kvm = open_kvm(1).expect("/dev/kvm is needed by this test");
        let mut vm = Vm::new(&kvm, create_guest_memory(16).unwrap(), false).unwrap();
        let (bsp_ran, first_exit) = mpsc::channel::<()>();
        vm.disable_pit_reinjection(Arc::new(SeccompFilters::builtin()), first_exit);
        drop(bsp_ran);
        let thread = vm.pit_reinject_off.take().unwrap();
        assert!(!thread.join().unwrap(), "asked without the BSP");
    }
}
