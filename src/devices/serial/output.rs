//! Serial output that never blocks a vCPU: bytes the console (stdout, a pipe, a FIFO, a
//! file) does not take at once wait in a bounded buffer that the event loop writes out when
//! the console is writable; what does not fit in the buffer is dropped and counted (the
//! UART's `tx_lost_bytes`).
//!
//! A console that is not a regular file is switched to non-blocking writes while kiln runs
//! (its file status flags are restored when the event loop ends), so neither a vCPU nor
//! the event loop ever waits for a reader.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{self, ErrorKind, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use nix::fcntl::{FcntlArg, OFlag, fcntl};
use vmm_sys_util::eventfd::EventFd;

/// Bytes of guest output kiln holds for a console that is not reading.
pub const OUTPUT_BUFFER: usize = 64 * 1024;

/// The console and what it has not taken yet.
#[derive(Debug)]
struct Pending {
    out: File,
    buf: VecDeque<u8>,
    capacity: usize,
}

impl Pending {
    /// Writes queued bytes until the console would block; an error other than "would block"
    /// drops them (the console is gone) and is returned.
    fn drain(&mut self) -> io::Result<()> {
        while !self.buf.is_empty() {
            let (front, _) = self.buf.as_slices();
            match (&self.out).write(front) {
                Ok(0) => return Ok(()),
                Ok(n) => drop(self.buf.drain(..n)),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(e) => {
                    self.buf.clear();
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

#[derive(Debug)]
struct Shared {
    pending: Mutex<Pending>,
    /// Written when the buffer stops being empty, so the event loop starts flushing.
    wake: EventFd,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Pending> {
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// The UART's writer (used on vCPU threads): writes straight to the console while nothing
/// is queued, else queues; never blocks.
#[derive(Debug)]
pub struct SerialOutput {
    shared: Arc<Shared>,
}

/// The event loop's side: writes the queued bytes out when the console is writable, and
/// restores the console's file status flags when dropped.
#[derive(Debug)]
pub struct OutputFlusher {
    shared: Arc<Shared>,
    out_fd: RawFd,
    /// The console's flags before kiln made it non-blocking.
    restore_flags: Option<OFlag>,
    /// Whether the console is in the epoll set for EPOLLOUT.
    watching: bool,
}

/// Makes `out` non-blocking unless it is a regular file; returns the flags to restore.
fn make_nonblocking(out: &File) -> io::Result<Option<OFlag>> {
    if out.metadata()?.file_type().is_file() {
        return Ok(None);
    }
    let flags = OFlag::from_bits_retain(fcntl(out, FcntlArg::F_GETFL)?);
    if flags.contains(OFlag::O_NONBLOCK) {
        return Ok(None);
    }
    fcntl(out, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(Some(flags))
}

/// The console for guest output when it is kiln's stdout. For a pipe, FIFO or terminal this
/// is, where `/proc` is mounted, a new open file description of the same file, opened
/// non-blocking, so the flag does not reach the description kiln shares with the process
/// that started it; otherwise (a jail without `/proc`, a socket, a regular file) a duplicate
/// of fd 1, whose description [`serial_output`] then makes non-blocking for the run.
pub fn open_stdout() -> io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let stdout = File::from(nix::unistd::dup(io::stdout())?);
    let kind = stdout.metadata()?.file_type();
    if kind.is_fifo() || kind.is_char_device() {
        let reopened = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC | libc::O_NOCTTY)
            .open("/proc/self/fd/1");
        if let Ok(file) = reopened {
            return Ok(file);
        }
    }
    Ok(stdout)
}

/// The two sides of the serial output to `out`, holding at most `capacity` bytes the
/// console has not taken.
pub fn serial_output(out: File, capacity: usize) -> io::Result<(SerialOutput, OutputFlusher)> {
    let restore_flags = make_nonblocking(&out)?;
    let out_fd = out.as_raw_fd();
    let shared = Arc::new(Shared {
        pending: Mutex::new(Pending {
            out,
            buf: VecDeque::new(),
            capacity,
        }),
        wake: EventFd::new(libc::EFD_NONBLOCK)?,
    });
    Ok((
        SerialOutput {
            shared: shared.clone(),
        },
        OutputFlusher {
            shared,
            out_fd,
            restore_flags,
            watching: false,
        },
    ))
}

impl Write for SerialOutput {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut pending = self.shared.lock();
        let mut written = 0;
        if pending.buf.is_empty() {
            match (&pending.out).write(data) {
                Ok(n) if n == data.len() => return Ok(n),
                Ok(n) => written = n,
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {}
                Err(e) => return Err(e),
            }
        }
        let rest = &data[written..];
        let room = pending.capacity.saturating_sub(pending.buf.len());
        let queued = rest.len().min(room);
        if queued == 0 && written == 0 {
            return Err(io::Error::new(
                ErrorKind::WouldBlock,
                "the serial console is not reading and its buffer is full",
            ));
        }
        let was_empty = pending.buf.is_empty();
        pending.buf.extend(&rest[..queued]);
        drop(pending);
        if was_empty && queued > 0 {
            // Best effort: a saturated counter means the flusher is due to run anyway.
            let _ = self.shared.wake.write(1);
        }
        Ok(written + queued)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl OutputFlusher {
    /// Bytes waiting for the console.
    pub fn queued(&self) -> usize {
        self.shared.lock().buf.len()
    }

    fn flush(&mut self, ops: &mut EventOps) {
        let mut pending = self.shared.lock();
        if let Err(e) = pending.drain() {
            log::warn!("serial console: output dropped: {e}");
        }
        let want = !pending.buf.is_empty();
        drop(pending);
        if want != self.watching {
            let events = Events::new_raw(self.out_fd, EventSet::OUT);
            let result = if want {
                ops.add(events)
            } else {
                ops.remove(events)
            };
            match result {
                Ok(()) => self.watching = want,
                // Regular files cannot be polled; they never ask to wait either.
                Err(e) => log::debug!("serial console: cannot watch for room: {e}"),
            }
        }
    }
}

impl MutEventSubscriber for OutputFlusher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.shared.wake, EventSet::IN)) {
            log::warn!("serial console: output beyond what the console takes at once is lost: {e}");
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.shared.wake.as_raw_fd() {
            let _ = self.shared.wake.read();
        }
        self.flush(ops);
    }
}

/// How long the end of the run waits for a slow console to take the last output.
const LAST_OUTPUT_WAIT: Duration = Duration::from_millis(500);

impl Drop for OutputFlusher {
    fn drop(&mut self) {
        let mut pending = self.shared.lock();
        // The guest's last lines (before a reset, say) may still be queued: give a console
        // that is reading, if slowly, a moment to take them; one nobody reads costs at most
        // LAST_OUTPUT_WAIT. (sched_yield: the event loop's filter has no sleep.)
        let start = Instant::now();
        while pending.drain().is_ok()
            && !pending.buf.is_empty()
            && start.elapsed() < LAST_OUTPUT_WAIT
        {
            std::thread::yield_now();
        }
        if let Some(flags) = self.restore_flags {
            // Nothing more to do if it fails: kiln is stopping.
            let _ = fcntl(&pending.out, FcntlArg::F_SETFL(flags));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use super::*;

    fn pipe() -> (File, File) {
        let (r, w) = nix::unistd::pipe().unwrap();
        (File::from(r), File::from(w))
    }

    #[test]
    fn an_unread_pipe_never_blocks_and_drops_past_the_buffer() {
        let (mut reader, writer) = pipe();
        let (mut out, flusher) = serial_output(writer, 1000).unwrap();
        let line = [b'x'; 64];
        let mut accepted = 0;
        let mut refused = 0;
        // Far more than the pipe (64 KiB) and the buffer (1000 bytes) hold.
        for _ in 0..4000 {
            match out.write(&line) {
                Ok(n) => accepted += n,
                Err(e) => {
                    assert_eq!(e.kind(), ErrorKind::WouldBlock);
                    refused += 1;
                }
            }
        }
        assert!(refused > 0);
        assert_eq!(flusher.queued(), 1000);
        // The reader drains the pipe; the flusher's drop writes out what is queued.
        let mut got = vec![0u8; 1 << 17];
        let mut total = 0;
        fcntl(&reader, FcntlArg::F_SETFL(OFlag::O_NONBLOCK)).unwrap();
        loop {
            match reader.read(&mut got) {
                Ok(n) if n > 0 => total += n,
                _ => break,
            }
        }
        drop(flusher);
        loop {
            match reader.read(&mut got) {
                Ok(n) if n > 0 => total += n,
                _ => break,
            }
        }
        assert_eq!(total, accepted);
    }

    #[test]
    fn a_regular_file_takes_everything_and_keeps_its_flags() {
        let path = std::env::temp_dir().join(format!("kiln-serial-out-{}", std::process::id()));
        let file = File::create(&path).unwrap();
        let (mut out, flusher) = serial_output(file, 16).unwrap();
        assert_eq!(flusher.restore_flags, None);
        for _ in 0..1000 {
            out.write_all(b"0123456789").unwrap();
        }
        drop(flusher);
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 10_000);
        std::fs::remove_file(&path).unwrap();
    }
}
