//! SIGINT, SIGTERM and SIGHUP stop the VM in order (vCPUs joined, terminal restored) instead
//! of killing the process mid-flight: the handler only records the signal and writes an
//! eventfd the event loop watches.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicI32, Ordering};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::register_signal_handler;

use crate::exit::{ExitReason, ExitSignal};

static SIGNAL_EVENTFD: AtomicI32 = AtomicI32::new(-1);
static RECEIVED: AtomicI32 = AtomicI32::new(0);

/// The signals that stop the VM.
pub const STOP_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

extern "C" fn on_stop_signal(signum: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    RECEIVED.store(signum, Ordering::SeqCst);
    let fd = SIGNAL_EVENTFD.load(Ordering::SeqCst);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; `one` is a valid 8-byte buffer and `fd` is
        // the eventfd kept open by the `SignalWatcher` for the life of the process.
        unsafe { libc::write(fd, (&raw const one).cast::<libc::c_void>(), 8) };
    }
}

/// Ignores SIGXFSZ for the whole process, so that a write past RLIMIT_FSIZE (the jailer's
/// `--resource-limit fsize=`) fails with EFBIG — which virtio-blk answers IOERR and counts —
/// instead of killing kiln. Must run before any thread starts.
pub fn ignore_file_size_signal() -> std::io::Result<()> {
    // SAFETY: sets the disposition of SIGXFSZ to SIG_IGN; no handler code is involved.
    let previous = unsafe { libc::signal(libc::SIGXFSZ, libc::SIG_IGN) };
    if previous == libc::SIG_ERR {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Turns stop signals into [`ExitReason::Signal`].
#[derive(Debug)]
pub struct SignalWatcher {
    evt: EventFd,
    exit: std::sync::Arc<ExitSignal>,
}

impl SignalWatcher {
    /// Installs the handlers; the watcher must then join the event loop.
    pub fn install(exit: std::sync::Arc<ExitSignal>) -> std::io::Result<Self> {
        let evt = EventFd::new(libc::EFD_NONBLOCK)?;
        SIGNAL_EVENTFD.store(evt.as_raw_fd(), Ordering::SeqCst);
        for sig in STOP_SIGNALS {
            register_signal_handler(sig, on_stop_signal)
                .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        }
        Ok(SignalWatcher { evt, exit })
    }
}

impl MutEventSubscriber for SignalWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.evt, EventSet::IN)) {
            log::warn!("stop signals will end kiln abruptly: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        let signum = RECEIVED.load(Ordering::SeqCst);
        self.exit.post(ExitReason::Signal { signum });
    }
}
