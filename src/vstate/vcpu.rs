//! vCPUs: boot-state configuration, one thread per vCPU running KVM_RUN, the dispatch of
//! exits to the buses, and the run-state machine the VMM drives (run, pause, stop).
//!
//! A vCPU thread is kicked out of KVM_RUN with a real-time signal whose handler sets the
//! thread's `kvm_run.immediate_exit`, so a kick that lands just before KVM_RUN is not lost.

use std::cell::Cell;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError, mpsc};
use std::thread::JoinHandle;

use kvm_bindings::{CpuId, KVM_SYSTEM_EVENT_RESET, KVM_SYSTEM_EVENT_SHUTDOWN, kvm_mp_state};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{Killable, register_signal_handler};

use crate::arch::x86_64::cpuid::{CpuTopology, normalize};
use crate::arch::x86_64::loader::LoadedKernel;
use crate::arch::x86_64::regs::{
    RegsError, boot_fpu, boot_msrs, boot_regs, setup_lint, setup_sregs,
};
use crate::devices::Counter;
use crate::devices::bus::Bus;
use crate::exit::{ExitReason, ExitSignal};
use crate::seccomp::{SeccompFilters, ThreadCategory};
use crate::vstate::emulation::{BP_VECTOR, Completion, completion_for};
use crate::vstate::memory::GuestMemory;
use crate::vstate::vcpu_state::{self, VcpuSnapshot};

/// Errors creating, configuring or starting a vCPU.
#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    /// KVM_CREATE_VCPU failed.
    #[error("cannot create vCPU {0}: {1}")]
    Create(u8, #[source] kvm_ioctls::Error),
    /// A state ioctl failed.
    #[error("cannot configure vCPU {cpu} ({what}): {source}")]
    Configure {
        /// vCPU index.
        cpu: u8,
        /// The failed step.
        what: &'static str,
        /// Why.
        source: kvm_ioctls::Error,
    },
    /// KVM accepted fewer boot MSRs than given.
    /// The snapshot's TSC frequency differs from this host's and KVM cannot scale it.
    #[error(
        "vCPU {cpu}: the snapshot's guest ran with a TSC of {saved} kHz, this host's is {host} kHz, and KVM cannot scale it (KVM_SET_TSC_KHZ: {source}); restore on a host with the same TSC frequency or with TSC scaling"
    )]
    TscScaling {
        /// The vCPU.
        cpu: u8,
        /// The frequency the guest saw.
        saved: u32,
        /// This host's.
        host: u32,
        /// Why KVM refused.
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {cpu}: KVM set {set} of {wanted} boot MSRs")]
    Msrs {
        /// vCPU index.
        cpu: u8,
        /// MSRs set.
        set: usize,
        /// MSRs given.
        wanted: usize,
    },
    /// Boot-state construction failed.
    #[error(transparent)]
    Regs(#[from] RegsError),
    /// The CPUID list could not be built.
    #[error("cannot build the CPUID list: {0}")]
    CpuidList(vmm_sys_util::fam::Error),
    /// An MSR list could not be built.
    #[error("cannot build an MSR list: {0}")]
    MsrList(vmm_sys_util::fam::Error),
    /// The vCPU was not parked when its state was asked for.
    #[error("vCPU {0} is not paused")]
    NotPaused(u8),
    /// The kick signal handler could not be installed.
    #[error("cannot install the vCPU kick signal handler: {0}")]
    SignalHandler(#[source] vmm_sys_util::errno::Error),
    /// The thread could not be spawned.
    #[error("cannot spawn the thread of vCPU {0}: {1}")]
    Spawn(u8, #[source] std::io::Error),
}

/// Per-vCPU exit counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct VcpuMetrics {
    /// Port reads.
    pub exit_io_in: Counter,
    /// Port writes.
    pub exit_io_out: Counter,
    /// MMIO reads.
    pub exit_mmio_read: Counter,
    /// MMIO writes.
    pub exit_mmio_write: Counter,
    /// Accesses no device claimed.
    pub unhandled_access: Counter,
    /// KVM_RUN returns caused by kicks or signals.
    pub interrupted: Counter,
    /// Exits that stopped the vCPU with an error.
    pub failures: Counter,
    /// Instructions the host's KVM could not emulate, completed by kiln.
    pub emulation_completions: Counter,
}

// ---- kicking a vCPU out of KVM_RUN -------------------------------------------------------

thread_local! {
    /// `kvm_run.immediate_exit` of the vCPU running on this thread (null elsewhere).
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let ptr = IMMEDIATE_EXIT.with(Cell::get);
    if !ptr.is_null() {
        // SAFETY: the pointer is set by this thread's vCPU loop to the `immediate_exit` byte
        // of its mapped `kvm_run`, and cleared before that mapping goes away; the signal runs
        // on the same thread, so the mapping is live.
        unsafe { std::ptr::write_volatile(ptr, 1) };
    }
}

/// The signal that kicks vCPU threads.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick handler (process-wide, idempotent).
pub fn install_kick_handler() -> Result<(), VcpuError> {
    register_signal_handler(kick_signal(), kick_handler).map_err(VcpuError::SignalHandler)
}

// ---- the run-state machine -----------------------------------------------------------------

/// What the VMM wants a vCPU to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum VcpuRequest {
    /// Run the guest.
    Run = 0,
    /// Stop at a safe point (outside KVM_RUN) and wait.
    Pause = 1,
    /// Leave the thread.
    Stop = 2,
}

/// Where a vCPU thread is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VcpuState {
    /// Created, thread not yet running the guest.
    Created,
    /// Running guest code (or handling an exit).
    Running,
    /// Parked at a safe point.
    Paused,
    /// The thread has left its loop.
    Exited,
}

impl VcpuState {
    /// The state a vCPU moves to when it observes `request` in `self`; `None` if the
    /// request does not apply (the explicit transition table).
    pub fn on_request(self, request: VcpuRequest) -> Option<VcpuState> {
        use VcpuRequest as R;
        use VcpuState as S;
        match (self, request) {
            (S::Exited, _) => None,
            (_, R::Stop) => Some(S::Exited),
            (S::Created | S::Paused, R::Run) => Some(S::Running),
            (S::Running | S::Created, R::Pause) => Some(S::Paused),
            (S::Running, R::Run) | (S::Paused, R::Pause) => None,
        }
    }
}

/// Work a parked vCPU thread does for the VMM (its fd is the thread's own).
#[derive(Debug)]
enum Job {
    /// Asked: save the state.
    Save,
    /// Done: the saved state, or why not.
    Saved(Box<Result<VcpuSnapshot, VcpuError>>),
}

/// State shared between a vCPU thread and the VMM.
#[derive(Debug)]
pub struct VcpuControl {
    request: AtomicU8,
    state: Mutex<VcpuState>,
    changed: Condvar,
    job: Mutex<Option<Job>>,
}

impl VcpuControl {
    fn new() -> Self {
        VcpuControl {
            request: AtomicU8::new(VcpuRequest::Run as u8),
            state: Mutex::new(VcpuState::Created),
            changed: Condvar::new(),
            job: Mutex::new(None),
        }
    }

    /// Takes a save request, if one is waiting.
    fn take_save_request(&self) -> bool {
        let mut job = self.job.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(*job, Some(Job::Save)) {
            *job = None;
            true
        } else {
            false
        }
    }

    fn finish_save(&self, result: Result<VcpuSnapshot, VcpuError>) {
        *self.job.lock().unwrap_or_else(PoisonError::into_inner) =
            Some(Job::Saved(Box::new(result)));
        // Taking the state lock orders this with a waiter between its check and its wait.
        let _state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        self.changed.notify_all();
    }

    fn request(&self) -> VcpuRequest {
        match self.request.load(Ordering::SeqCst) {
            0 => VcpuRequest::Run,
            1 => VcpuRequest::Pause,
            _ => VcpuRequest::Stop,
        }
    }

    fn set_request(&self, request: VcpuRequest) {
        // Hold the state lock so a parked thread cannot miss the change.
        let _state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if self.request() != VcpuRequest::Stop {
            self.request.store(request as u8, Ordering::SeqCst);
        }
        self.changed.notify_all();
    }

    fn transition(&self, to: VcpuState) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        *state = to;
        self.changed.notify_all();
    }

    /// The current state.
    pub fn state(&self) -> VcpuState {
        *self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Blocks the calling vCPU thread while the request is `Pause` and no job waits;
    /// returns whether a save was asked for.
    fn wait_while_paused(&self) -> bool {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while self.request() == VcpuRequest::Pause {
            if self.take_save_request() {
                return true;
            }
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
        false
    }

    /// Waits until the vCPU is in a state accepted by `done`.
    pub fn wait_for(&self, done: impl Fn(VcpuState) -> bool) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        while !done(*state) {
            state = self
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }
}

// ---- the vCPU -----------------------------------------------------------------------------

/// What one KVM_RUN produced.
#[derive(Debug, PartialEq, Eq)]
pub enum RunOutcome {
    /// Exit handled; run again.
    Continue,
    /// KVM_RUN was interrupted (kick or signal); look at the request, then run again.
    Interrupted,
    /// The VM must stop.
    Stop(ExitReason),
}

/// A configured vCPU, before its thread starts.
#[derive(Debug)]
pub struct Vcpu {
    index: u8,
    fd: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<ExitSignal>,
    metrics: Arc<VcpuMetrics>,
    /// KVM's MSR index list: what a saved state holds.
    msr_list: Arc<Vec<u32>>,
    /// The CPUID kiln gave the vCPU (what the guest sees on a faithful KVM): saved as is,
    /// since a KVM that emulates CPUID may not read back what it was given.
    cpuid: Vec<kvm_bindings::kvm_cpuid_entry2>,
    /// Told once when KVM_RUN first returns (see [`Vcpu::first_exit`]).
    first_exit: Option<mpsc::Sender<()>>,
}

impl Vcpu {
    /// Creates vCPU `index` of `vm`.
    pub fn new(
        vm: &VmFd,
        index: u8,
        pio: Arc<Bus>,
        mmio: Arc<Bus>,
        exit: Arc<ExitSignal>,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| VcpuError::Create(index, e))?;
        Ok(Vcpu {
            index,
            fd,
            pio,
            mmio,
            exit,
            metrics: Arc::new(VcpuMetrics::default()),
            msr_list: Arc::new(Vec::new()),
            cpuid: Vec::new(),
            first_exit: None,
        })
    }

    /// A receiver told when this vCPU's KVM_RUN first returns to kiln, that is once KVM
    /// has done the work of the vCPU's first entry (for the BSP, moving the PIT's timer to
    /// its CPU under the PIT's lock). It hangs up, untold, if the thread ends first.
    pub fn first_exit(&mut self) -> mpsc::Receiver<()> {
        let (tx, rx) = mpsc::channel();
        self.first_exit = Some(tx);
        rx
    }

    /// Sets the MSRs a saved state holds (KVM's MSR index list).
    pub fn set_msr_list(&mut self, list: Arc<Vec<u32>>) {
        self.msr_list = list;
    }

    /// Restores a saved state (instead of [`Vcpu::configure`]).
    pub fn restore(&mut self, state: &VcpuSnapshot) -> Result<(), VcpuError> {
        vcpu_state::restore(&self.fd, state)?;
        self.cpuid = state.cpuid.clone();
        Ok(())
    }

    /// The vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The exit counters.
    pub fn metrics(&self) -> Arc<VcpuMetrics> {
        self.metrics.clone()
    }

    /// The KVM vCPU fd.
    pub fn fd(&mut self) -> &mut VcpuFd {
        &mut self.fd
    }

    fn step(&self, what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VcpuError {
        let cpu = self.index;
        move |source| VcpuError::Configure { cpu, what, source }
    }

    /// Sets CPUID, MSRs, registers, FPU and LAPIC for entry into `kernel`.
    pub fn configure(
        &mut self,
        mem: &GuestMemory,
        kernel: &LoadedKernel,
        supported_cpuid: &CpuId,
        topology: CpuTopology,
        tsc_deadline: bool,
    ) -> Result<(), VcpuError> {
        let mut entries = supported_cpuid.as_slice().to_vec();
        normalize(&mut entries, self.index, topology, tsc_deadline);
        let cpuid = CpuId::from_entries(&entries).map_err(VcpuError::CpuidList)?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(self.step("KVM_SET_CPUID2"))?;
        self.cpuid = entries;

        let msrs = boot_msrs()?;
        let set = self.fd.set_msrs(&msrs).map_err(self.step("KVM_SET_MSRS"))?;
        if set != msrs.as_slice().len() {
            return Err(VcpuError::Msrs {
                cpu: self.index,
                set,
                wanted: msrs.as_slice().len(),
            });
        }

        self.fd
            .set_regs(&boot_regs(kernel.protocol, kernel.entry.0))
            .map_err(self.step("KVM_SET_REGS"))?;
        let mut sregs = self.fd.get_sregs().map_err(self.step("KVM_GET_SREGS"))?;
        setup_sregs(mem, &mut sregs, kernel.protocol)?;
        self.fd
            .set_sregs(&sregs)
            .map_err(self.step("KVM_SET_SREGS"))?;
        self.fd
            .set_fpu(&boot_fpu())
            .map_err(self.step("KVM_SET_FPU"))?;

        let mut lapic = self.fd.get_lapic().map_err(self.step("KVM_GET_LAPIC"))?;
        setup_lint(&mut lapic.regs);
        self.fd
            .set_lapic(&lapic)
            .map_err(self.step("KVM_SET_LAPIC"))?;
        Ok(())
    }

    /// The vCPU's multiprocessing state (BSP runnable, APs waiting for INIT/SIPI).
    pub fn mp_state(&self) -> Result<kvm_mp_state, VcpuError> {
        self.fd
            .get_mp_state()
            .map_err(self.step("KVM_GET_MP_STATE"))
    }

    /// Runs the guest once and handles the exit.
    pub fn run_once(&mut self) -> RunOutcome {
        let cpu = self.index;
        match self.fd.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                self.metrics.exit_io_in.inc();
                if !self.pio.read(u64::from(port), data) {
                    self.metrics.unhandled_access.inc();
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                self.metrics.exit_io_out.inc();
                if !self.pio.write(u64::from(port), data) {
                    self.metrics.unhandled_access.inc();
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                self.metrics.exit_mmio_read.inc();
                if !self.mmio.read(addr, data) {
                    self.metrics.unhandled_access.inc();
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                self.metrics.exit_mmio_write.inc();
                if !self.mmio.write(addr, data) {
                    self.metrics.unhandled_access.inc();
                }
                RunOutcome::Continue
            }
            Ok(VcpuExit::Intr) => RunOutcome::Interrupted,
            Ok(VcpuExit::Shutdown) => RunOutcome::Stop(ExitReason::TripleFault {
                cpu,
                state: self.cpu_state(),
            }),
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => RunOutcome::Stop(ExitReason::GuestShutdown),
                KVM_SYSTEM_EVENT_RESET => RunOutcome::Stop(ExitReason::GuestReset),
                other => self.fail(format!("unexpected system event {other}")),
            },
            Ok(VcpuExit::InternalError) => self.internal_error(),
            Ok(VcpuExit::FailEntry(reason, hw_cpu)) => self.fail(format!(
                "KVM entry failed: hardware reason {reason:#x} on host CPU {hw_cpu}"
            )),
            Ok(other) => {
                let detail = format!("unexpected exit {other:?}");
                self.fail(detail)
            }
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => RunOutcome::Interrupted,
            Err(e) => self.fail(format!("KVM_RUN failed: {e}")),
        }
    }

    /// The registers that locate a failure, for the log line.
    pub fn cpu_state(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                "rip={:#x} rsp={:#x} cr0={:#x} cr3={:#x} cr4={:#x} efer={:#x} cs={:#x}",
                r.rip, r.rsp, s.cr0, s.cr3, s.cr4, s.efer, s.cs.selector
            ),
            _ => "registers unavailable".to_string(),
        }
    }

    fn fail(&self, detail: String) -> RunOutcome {
        self.metrics.failures.inc();
        RunOutcome::Stop(ExitReason::VcpuError {
            cpu: self.index,
            detail,
        })
    }

    /// Handles KVM_EXIT_INTERNAL_ERROR: an emulation failure on one of the few instructions
    /// kiln knows how to complete is completed and the guest goes on; anything else stops
    /// the VM with the failure described.
    fn internal_error(&mut self) -> RunOutcome {
        let cpu = self.index;
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason was KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        let data = &internal.data[..n];
        let completion = emulation_failure_bytes(internal.suberror, data)
            .and_then(|bytes| completion_for(&bytes).map(|c| (c, bytes)));
        if let Some((completion, bytes)) = completion {
            match self.complete_emulation(completion) {
                Ok(()) => {
                    self.metrics.emulation_completions.inc();
                    log::debug!(
                        "vCPU {cpu}: completed {completion:?} for instruction bytes {bytes:02x?}"
                    );
                    return RunOutcome::Continue;
                }
                Err(e) => log::debug!("vCPU {cpu}: cannot complete {completion:?}: {e}"),
            }
        }
        self.metrics.failures.inc();
        let detail = emulation_failure_detail(internal.suberror, data)
            .unwrap_or_else(|| format!("data {data:x?}"));
        RunOutcome::Stop(ExitReason::InternalError {
            cpu,
            suberror: internal.suberror,
            detail,
        })
    }

    /// Advances RIP past a failed instruction (and injects #BP for int3).
    fn complete_emulation(&mut self, completion: Completion) -> Result<(), kvm_ioctls::Error> {
        let mut regs = self.fd.get_regs()?;
        let len = match completion {
            Completion::Skip(n) => n,
            Completion::Breakpoint => 1,
        };
        regs.rip = regs.rip.wrapping_add(u64::from(len));
        self.fd.set_regs(&regs)?;
        if completion == Completion::Breakpoint {
            let mut events = self.fd.get_vcpu_events()?;
            events.exception.injected = 1;
            events.exception.nr = BP_VECTOR;
            events.exception.has_error_code = 0;
            events.exception.error_code = 0;
            self.fd.set_vcpu_events(&events)?;
        }
        Ok(())
    }

    /// Spawns the vCPU thread, which installs the vCPU seccomp filter before anything else;
    /// with `paused`, the thread parks before it first enters the guest.
    pub fn start(
        self,
        seccomp: Arc<SeccompFilters>,
        paused: bool,
    ) -> Result<VcpuHandle, VcpuError> {
        let control = Arc::new(VcpuControl::new());
        if paused {
            control.set_request(VcpuRequest::Pause);
        }
        let thread_control = control.clone();
        let index = self.index;
        let thread = std::thread::Builder::new()
            .name(format!("kiln_vcpu{index}"))
            .spawn(move || self.thread_main(&thread_control, &seccomp))
            .map_err(|e| VcpuError::Spawn(index, e))?;
        Ok(VcpuHandle {
            index,
            thread: Some(thread),
            control,
        })
    }

    /// The thread: filter first, then the run loop. The vCPU goes back to the VMM thread
    /// when it ends, so its fd and mapping are released there, outside this filter.
    fn thread_main(mut self, control: &VcpuControl, seccomp: &SeccompFilters) -> Vcpu {
        if let Err(e) = seccomp.install(ThreadCategory::Vcpu) {
            self.exit.post(ExitReason::Runtime {
                detail: e.to_string(),
            });
            control.transition(VcpuState::Exited);
            return self;
        }
        let immediate_exit: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        IMMEDIATE_EXIT.with(|p| p.set(immediate_exit));
        self.run_loop(control);
        IMMEDIATE_EXIT.with(|p| p.set(std::ptr::null_mut()));
        control.transition(VcpuState::Exited);
        self
    }

    fn run_loop(&mut self, control: &VcpuControl) {
        let mut state = VcpuState::Created;
        loop {
            if let Some(next) = state.on_request(control.request()) {
                if next == VcpuState::Paused && state == VcpuState::Running {
                    // Tell a kvm-clock guest it was stopped, so the time it missed is not
                    // taken for a soft lockup (EINVAL when the guest does not use kvm-clock).
                    let _ = self.fd.kvmclock_ctrl();
                }
                state = next;
                control.transition(state);
            }
            match state {
                VcpuState::Exited => return,
                VcpuState::Paused => {
                    if control.wait_while_paused() {
                        let saved =
                            vcpu_state::save(&self.fd, self.index, &self.msr_list, &self.cpuid);
                        control.finish_save(saved);
                    }
                    continue;
                }
                VcpuState::Created | VcpuState::Running => {}
            }
            let outcome = self.run_once();
            if let Some(first) = self.first_exit.take() {
                let _ = first.send(());
            }
            match outcome {
                // A device may just have ended the VM (the i8042 reset line): do not go
                // back into the guest.
                RunOutcome::Continue if self.exit.posted() => return,
                RunOutcome::Continue => {}
                RunOutcome::Interrupted => {
                    self.metrics.interrupted.inc();
                    // Re-arm before the request is looked at again, so a kick arriving now
                    // still interrupts the next KVM_RUN.
                    self.fd.set_kvm_immediate_exit(0);
                }
                RunOutcome::Stop(reason) => {
                    self.exit.post(reason);
                    return;
                }
            }
        }
    }
}

/// The instruction bytes of an emulation failure (suberror 1 with
/// KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES): `kvm_run.emulation_failure` puts
/// the flags in data[0], then `insn_size` (one byte) and up to 15 instruction bytes.
pub fn emulation_failure_bytes(suberror: u32, data: &[u64]) -> Option<Vec<u8>> {
    const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;
    const FLAG_INSTRUCTION_BYTES: u64 = 1;
    if suberror != KVM_INTERNAL_ERROR_EMULATION
        || data.len() < 3
        || data[0] & FLAG_INSTRUCTION_BYTES == 0
    {
        return None;
    }
    let raw: Vec<u8> = data[1..3].iter().flat_map(|w| w.to_le_bytes()).collect();
    let len = usize::from(raw[0]).min(15);
    Some(raw[1..=len].to_vec())
}

/// A readable description of an emulation failure.
pub fn emulation_failure_detail(suberror: u32, data: &[u64]) -> Option<String> {
    if suberror != 1 {
        return None;
    }
    let Some(bytes) = emulation_failure_bytes(suberror, data) else {
        return Some("emulation failure".to_string());
    };
    let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
    Some(format!(
        "emulation failure, instruction bytes {}",
        hex.join(" ")
    ))
}

/// The VMM's handle on a running vCPU thread.
#[derive(Debug)]
pub struct VcpuHandle {
    index: u8,
    thread: Option<JoinHandle<Vcpu>>,
    control: Arc<VcpuControl>,
}

impl VcpuHandle {
    /// The vCPU's index.
    pub fn index(&self) -> u8 {
        self.index
    }

    /// Its run state.
    pub fn state(&self) -> VcpuState {
        self.control.state()
    }

    fn kick(&self) {
        if let Some(thread) = &self.thread {
            // The thread may already have left its loop; a failed kick then changes nothing.
            let _ = thread.kill(kick_signal());
        }
    }

    /// Asks the vCPU to stop at a safe point; `wait_paused` then waits for it.
    pub fn pause(&self) {
        self.control.set_request(VcpuRequest::Pause);
        self.kick();
    }

    /// Waits until the vCPU is parked (or gone).
    pub fn wait_paused(&self) {
        self.control
            .wait_for(|s| matches!(s, VcpuState::Paused | VcpuState::Exited));
    }

    /// The state of a paused vCPU, saved by its own thread.
    pub fn save_state(&self) -> Result<VcpuSnapshot, VcpuError> {
        if self.state() != VcpuState::Paused {
            return Err(VcpuError::NotPaused(self.index));
        }
        *self
            .control
            .job
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Job::Save);
        {
            let _state = self
                .control
                .state
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            self.control.changed.notify_all();
        }
        let mut state = self
            .control
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        loop {
            {
                let mut job = self
                    .control
                    .job
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                if matches!(*job, Some(Job::Saved(_)))
                    && let Some(Job::Saved(result)) = job.take()
                {
                    return *result;
                }
            }
            if *state == VcpuState::Exited {
                return Err(VcpuError::NotPaused(self.index));
            }
            state = self
                .control
                .changed
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// Lets a paused vCPU run again.
    pub fn resume(&self) {
        self.control.set_request(VcpuRequest::Run);
    }

    /// Asks the thread to leave its loop.
    pub fn stop(&self) {
        self.control.set_request(VcpuRequest::Stop);
        self.kick();
    }

    /// Waits for the thread to end.
    pub fn join(&mut self) {
        if let Some(thread) = self.thread.take() {
            // With panic=abort a vCPU thread never ends in a panic.
            let _ = thread.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn transition_table() {
        use VcpuRequest as R;
        use VcpuState as S;
        assert_eq!(S::Created.on_request(R::Run), Some(S::Running));
        assert_eq!(S::Running.on_request(R::Pause), Some(S::Paused));
        assert_eq!(S::Paused.on_request(R::Run), Some(S::Running));
        assert_eq!(S::Paused.on_request(R::Stop), Some(S::Exited));
        assert_eq!(S::Running.on_request(R::Stop), Some(S::Exited));
        assert_eq!(S::Running.on_request(R::Run), None);
        assert_eq!(S::Paused.on_request(R::Pause), None);
        for r in [R::Run, R::Pause, R::Stop] {
            assert_eq!(S::Exited.on_request(r), None);
        }
    }

    #[test]
    fn stop_is_final() {
        let c = VcpuControl::new();
        c.set_request(VcpuRequest::Stop);
        c.set_request(VcpuRequest::Run);
        assert_eq!(c.request(), VcpuRequest::Stop);
    }

    #[test]
    fn paused_thread_waits_for_resume() {
        let c = Arc::new(VcpuControl::new());
        c.set_request(VcpuRequest::Pause);
        let t = {
            let c = c.clone();
            std::thread::spawn(move || {
                c.transition(VcpuState::Paused);
                c.wait_while_paused();
                c.transition(VcpuState::Running);
            })
        };
        c.wait_for(|s| s == VcpuState::Paused);
        c.set_request(VcpuRequest::Run);
        t.join().unwrap();
        assert_eq!(c.state(), VcpuState::Running);
    }

    /// The BSP's first exit is told once KVM_RUN has returned, not before: a guest spinning
    /// in its first instruction never leaves KVM_RUN until the thread is kicked.
    #[test]
    fn first_exit_is_told_when_kvm_run_first_returns() {
        use std::time::Duration;
        use vm_memory::{Bytes, GuestAddress};

        use crate::vstate::memory::create_guest_memory;
        use crate::vstate::vm::{Vm, open_kvm};

        let kvm = open_kvm(1).expect("/dev/kvm is needed by this test");
        let memory = create_guest_memory(16).unwrap();
        // jmp $ (real mode, at 0:0x1000)
        memory
            .write_slice(&[0xeb, 0xfe], GuestAddress(0x1000))
            .unwrap();
        let vm = Vm::new(&kvm, memory, false).unwrap();
        let bus = Arc::new(Bus::new());
        let exit = Arc::new(ExitSignal::new().unwrap());
        let mut vcpu = Vcpu::new(vm.fd(), 0, bus.clone(), bus, exit).unwrap();
        let mut sregs = vcpu.fd.get_sregs().unwrap();
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.fd.set_sregs(&sregs).unwrap();
        let mut regs = vcpu.fd.get_regs().unwrap();
        regs.rip = 0x1000;
        regs.rflags = 2;
        vcpu.fd.set_regs(&regs).unwrap();

        let first_exit = vcpu.first_exit();
        install_kick_handler().unwrap();
        let mut handle = vcpu
            .start(Arc::new(SeccompFilters::builtin()), false)
            .unwrap();
        handle.control.wait_for(|s| s == VcpuState::Running);
        assert_eq!(
            first_exit.recv_timeout(Duration::from_millis(300)),
            Err(mpsc::RecvTimeoutError::Timeout),
            "told while the vCPU was still in its first KVM_RUN"
        );
        handle.stop();
        assert_eq!(
            first_exit.recv_timeout(Duration::from_secs(10)),
            Ok(()),
            "not told when the kicked KVM_RUN returned"
        );
        handle.join();
    }

    #[test]
    fn emulation_failure_instruction_bytes() {
        // insn_size 3, then 0f 57 c0 (xorps), as kvm_run.emulation_failure lays them out.
        let data = [1u64, 0xc057_0f03, 0, 0];
        assert_eq!(
            emulation_failure_detail(1, &data).unwrap(),
            "emulation failure, instruction bytes 0f 57 c0"
        );
        assert_eq!(
            emulation_failure_bytes(1, &data),
            Some(vec![0x0f, 0x57, 0xc0])
        );
        assert_eq!(emulation_failure_detail(2, &data), None);
        assert_eq!(
            emulation_failure_detail(1, &[0, 0, 0]).unwrap(),
            "emulation failure"
        );
        // A length beyond 15 is clamped.
        let b = emulation_failure_bytes(1, &[1, 0xff, u64::MAX]).unwrap();
        assert_eq!(b.len(), 15);
    }
}
