//! Why a VM stops, and the process exit code each reason maps to.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};

use vmm_sys_util::eventfd::EventFd;

/// kiln's process exit codes (documented in README.md).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i32)]
pub enum ExitCode {
    /// The guest reset or shut down the machine (i8042 reset, or a clean stop).
    Ok = 0,
    /// kiln could not start the VM (KVM, memory, kernel loading, devices).
    StartFailure = 1,
    /// Invalid command-line arguments or configuration.
    BadConfiguration = 2,
    /// A vCPU triple-faulted (KVM_EXIT_SHUTDOWN).
    TripleFault = 3,
    /// KVM reported an internal error (for example an emulation failure).
    KvmInternalError = 4,
    /// A vCPU failed: KVM_RUN returned an error, entry failed, or an unexpected exit.
    VcpuError = 5,
    /// kiln itself failed while the VM ran (event loop or device back-end).
    RuntimeError = 6,
    /// A thread made a system call outside its seccomp filter (as Firecracker's 148).
    BadSyscall = 148,
}

impl ExitCode {
    /// The numeric exit status.
    pub fn code(self) -> i32 {
        self as i32
    }
}

/// Why the VM stopped.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest pulsed the reset line through the i8042 controller.
    GuestReset,
    /// The guest asked for power-off / reset through a KVM system event.
    GuestShutdown,
    /// vCPU `cpu` triple-faulted.
    TripleFault {
        /// Index of the vCPU.
        cpu: u8,
        /// Where it was (registers).
        state: String,
    },
    /// KVM could not continue running vCPU `cpu`.
    InternalError {
        /// Index of the vCPU.
        cpu: u8,
        /// `kvm_run.internal.suberror`.
        suberror: u32,
        /// Human-readable detail (instruction bytes and the like).
        detail: String,
    },
    /// vCPU `cpu` failed for another reason.
    VcpuError {
        /// Index of the vCPU.
        cpu: u8,
        /// What went wrong.
        detail: String,
    },
    /// The VMM itself failed while the guest ran.
    Runtime {
        /// What went wrong.
        detail: String,
    },
    /// The VMM was asked to stop (API).
    Stopped,
    /// The VM moved to another kiln (live migration) and runs there.
    Migrated,
    /// A stop signal (SIGINT, SIGTERM, SIGHUP) arrived.
    Signal {
        /// The signal number.
        signum: i32,
    },
}

impl ExitReason {
    /// The process exit status for this reason: 128 + N for signal N, else the code.
    pub fn status(&self) -> i32 {
        match self {
            ExitReason::Signal { signum } => 128 + signum,
            other => other.exit_code().code(),
        }
    }

    /// The exit code for this reason.
    pub fn exit_code(&self) -> ExitCode {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestShutdown
            | ExitReason::Stopped
            | ExitReason::Migrated
            | ExitReason::Signal { .. } => ExitCode::Ok,
            ExitReason::TripleFault { .. } => ExitCode::TripleFault,
            ExitReason::InternalError { .. } => ExitCode::KvmInternalError,
            ExitReason::VcpuError { .. } => ExitCode::VcpuError,
            ExitReason::Runtime { .. } => ExitCode::RuntimeError,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestReset => write!(f, "guest reset through the i8042 controller"),
            ExitReason::GuestShutdown => write!(f, "guest shut down"),
            ExitReason::TripleFault { cpu, state } => {
                write!(f, "vCPU {cpu} triple-faulted ({state})")
            }
            ExitReason::InternalError {
                cpu,
                suberror,
                detail,
            } => write!(
                f,
                "KVM internal error on vCPU {cpu} (suberror {suberror}){}{detail}",
                if detail.is_empty() { "" } else { ": " }
            ),
            ExitReason::VcpuError { cpu, detail } => write!(f, "vCPU {cpu} failed: {detail}"),
            ExitReason::Runtime { detail } => write!(f, "VMM failure: {detail}"),
            ExitReason::Stopped => write!(f, "stopped on request"),
            ExitReason::Migrated => write!(f, "the VM was migrated and runs on the destination"),
            ExitReason::Signal { signum } => write!(f, "stopped by signal {signum}"),
        }
    }
}

/// The one-shot "the VM must stop" signal, shared by vCPU threads and devices. The first
/// reason posted wins; the event loop wakes on the eventfd.
#[derive(Debug)]
pub struct ExitSignal {
    evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    /// Set with the reason: a lock-free check for the vCPU loop.
    posted: AtomicBool,
}

impl ExitSignal {
    /// A fresh signal.
    pub fn new() -> std::io::Result<Self> {
        Ok(ExitSignal {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            posted: AtomicBool::new(false),
        })
    }

    /// Records `reason` unless another one came first, and wakes the event loop.
    pub fn post(&self, reason: ExitReason) {
        let mut slot = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if slot.is_none() {
            *slot = Some(reason);
        }
        self.posted.store(true, Ordering::SeqCst);
        drop(slot);
        // A full eventfd counter still wakes the loop, so a failed write loses nothing.
        let _ = self.evt.write(1);
    }

    /// Whether a reason was posted (cheap: no lock).
    pub fn posted(&self) -> bool {
        self.posted.load(Ordering::Relaxed)
    }

    /// The reason posted, if any.
    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The eventfd the event loop watches.
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_reason_wins() {
        let s = ExitSignal::new().unwrap();
        assert_eq!(s.reason(), None);
        assert!(!s.posted());
        s.post(ExitReason::TripleFault {
            cpu: 1,
            state: String::new(),
        });
        s.post(ExitReason::GuestReset);
        assert!(matches!(
            s.reason(),
            Some(ExitReason::TripleFault { cpu: 1, .. })
        ));
        assert_eq!(s.eventfd().read().unwrap(), 2);
        assert!(s.posted());
    }

    #[test]
    fn codes_are_distinct() {
        let reasons = [
            ExitReason::GuestReset,
            ExitReason::TripleFault {
                cpu: 0,
                state: String::new(),
            },
            ExitReason::InternalError {
                cpu: 0,
                suberror: 1,
                detail: String::new(),
            },
            ExitReason::VcpuError {
                cpu: 0,
                detail: String::new(),
            },
            ExitReason::Runtime {
                detail: String::new(),
            },
        ];
        let mut codes: Vec<i32> = reasons.iter().map(|r| r.exit_code().code()).collect();
        codes.push(ExitCode::StartFailure.code());
        codes.push(ExitCode::BadConfiguration.code());
        codes.push(ExitCode::BadSyscall.code());
        let n = codes.len();
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), n);
        assert_eq!(ExitReason::GuestReset.exit_code().code(), 0);
    }
}
