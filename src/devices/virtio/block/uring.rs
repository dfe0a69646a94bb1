//! The io_uring of an `Async` drive, locked down before it takes its first request:
//!
//! - created disabled (`IORING_SETUP_R_DISABLED`), then given its one file (the backing
//!   file, as fixed file 0), the completion eventfd, and a bound on the io-wq workers the
//!   kernel may start for the owning thread;
//! - restricted (`IORING_REGISTER_RESTRICTIONS`) to `READV`, `WRITEV` and `FSYNC`, on fixed
//!   files only (`IOSQE_FIXED_FILE` required, `IOSQE_IO_DRAIN` and `IOSQE_ASYNC` the only
//!   other flags allowed),
//!   and to no `io_uring_register` operation at all once enabled: a ring that leaked to
//!   guest-influenced code could touch no other file and change nothing about itself;
//! - only then enabled.
//!
//! The ring is created, fed and reaped by one thread (kiln's event loop): only that thread's
//! seccomp filter allows `io_uring_setup`, `io_uring_register` and `io_uring_enter`. The
//! kernel's io-wq workers are kernel threads that never return to user space.

use std::os::fd::RawFd;

use io_uring::register::Restriction;
use io_uring::squeue::Flags;
use io_uring::{IoUring, opcode, types};

/// Submission queue entries (one `io_uring_enter` submits at most this many; more wait in
/// kiln for the next one).
pub const SQ_ENTRIES: u32 = 256;
/// Completion queue entries: every part of every request a queue of 256 can have in flight
/// (a chain of at most 4096 buffers is at most 4 parts of `IOV_MAX`), so completions never
/// overflow into the kernel's backlog.
pub const CQ_ENTRIES: u32 = 1024;
/// Most io-wq workers the kernel may run at once for kiln's event thread, for bounded work
/// (regular files and block devices: I/O that cannot complete without blocking) and for
/// unbounded work (I/O that may wait indefinitely: the kernel counts requests on FUSE files
/// there). Shared by every drive of the VM.
pub const IOWQ_MAX_WORKERS: [u32; 2] = [8, 8];
/// The oldest kernel with everything the lock-down needs: restrictions and disabled rings
/// (5.10), the io-wq worker bound (5.15).
pub const MIN_KERNEL: (u32, u32) = (5, 15);

/// Why io_uring cannot serve a drive.
#[derive(Debug, thiserror::Error)]
pub enum UringError {
    /// The kernel was built without io_uring.
    #[error("this kernel has no io_uring (io_uring_setup: ENOSYS)")]
    Missing,
    /// io_uring is switched off (`kernel.io_uring_disabled`) or filtered (a container's
    /// seccomp profile).
    #[error(
        "io_uring is disabled on this host (kernel.io_uring_disabled, or a seccomp profile): {0}"
    )]
    Disabled(#[source] std::io::Error),
    /// The kernel is too old for the restrictions kiln puts on its rings.
    #[error("io_uring needs Linux 5.15 or later for its lock-down; this is {0}")]
    KernelTooOld(String),
    /// A step of creating a ring failed.
    #[error("cannot {step}: {source}")]
    Setup {
        /// The step.
        step: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// Checks, without creating a ring, that this process can use io_uring as kiln does: the
/// system call exists and is allowed, and the kernel is recent enough. An `Async` drive is
/// refused at start-up when this fails.
pub fn probe() -> Result<(), UringError> {
    // io_uring_setup with 0 entries fails with EINVAL where io_uring works, with ENOSYS
    // where it is not built in, with EPERM where it is disabled or filtered; it never
    // creates anything.
    let mut params = [0u8; 120];
    // SAFETY: io_uring_setup reads and writes at most size_of::<io_uring_params>() = 120
    // bytes at the pointer, a live local array of that size.
    let r = unsafe { libc::syscall(libc::SYS_io_uring_setup, 0u32, params.as_mut_ptr()) };
    if r >= 0 {
        // Cannot happen (0 entries is invalid); close what we got.
        // SAFETY: a file descriptor the call just returned, owned by nobody else.
        unsafe { libc::close(r as libc::c_int) };
    } else {
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINVAL) => {}
            Some(libc::ENOSYS) => return Err(UringError::Missing),
            _ => return Err(UringError::Disabled(err)),
        }
    }
    let release = nix::sys::utsname::uname()
        .map(|u| u.release().to_string_lossy().into_owned())
        .unwrap_or_default();
    if kernel_version(&release).is_some_and(|v| v < MIN_KERNEL) {
        return Err(UringError::KernelTooOld(release));
    }
    Ok(())
}

/// `(major, minor)` of a kernel release string such as `6.1.0-13-amd64`.
fn kernel_version(release: &str) -> Option<(u32, u32)> {
    let mut parts = release.split(|c: char| !c.is_ascii_digit());
    let major = parts.next()?.parse().ok()?;
    let minor = parts.next()?.parse().ok()?;
    Some((major, minor))
}

/// One operation on the ring's only file.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `preadv` at `offset` into the `len` iovecs at `iov`.
    Read {
        /// The iovecs (they must stay valid until the operation completes).
        iov: *const libc::iovec,
        /// How many.
        len: u32,
        /// File offset.
        offset: u64,
    },
    /// `pwritev` at `offset` from the `len` iovecs at `iov`.
    Write {
        /// The iovecs (they must stay valid until the operation completes).
        iov: *const libc::iovec,
        /// How many.
        len: u32,
        /// File offset.
        offset: u64,
    },
    /// `fdatasync`, started only once every operation submitted before it has completed
    /// (and holding back every later one until it has: `IOSQE_IO_DRAIN`).
    Flush,
}

/// A locked-down ring over one file.
pub struct Ring {
    ring: IoUring,
    /// Send reads and writes to the io-wq workers at once (`IOSQE_ASYNC`): the file's
    /// filesystem may block the submitting thread even in a non-blocking attempt.
    punt: bool,
    /// Operations handed to the kernel whose completion was not taken yet.
    in_flight: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

fn step(step: &'static str) -> impl FnOnce(std::io::Error) -> UringError {
    move |source| UringError::Setup { step, source }
}

impl Ring {
    /// A ring whose only file is `file`, signalling `completion` (an eventfd) whenever it
    /// posts a completion. With `punt`, reads and writes never run on the submitting thread
    /// (for files whose filesystem may block there regardless).
    pub fn new(file: RawFd, completion: RawFd, punt: bool) -> Result<Ring, UringError> {
        let ring = IoUring::builder()
            .setup_r_disabled()
            .setup_cqsize(CQ_ENTRIES)
            .build(SQ_ENTRIES)
            .map_err(step("create an io_uring"))?;
        let s = ring.submitter();
        s.register_files(&[file])
            .map_err(step("register the backing file with its io_uring"))?;
        s.register_eventfd(completion)
            .map_err(step("register the completion eventfd"))?;
        let mut workers = IOWQ_MAX_WORKERS;
        s.register_iowq_max_workers(&mut workers)
            .map_err(step("bound the io-wq workers"))?;
        let mut restrictions = [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(
                (Flags::FIXED_FILE | Flags::IO_DRAIN | Flags::ASYNC).bits(),
            ),
            Restriction::sqe_flags_required(Flags::FIXED_FILE.bits()),
        ];
        s.register_restrictions(&mut restrictions)
            .map_err(step("restrict the io_uring"))?;
        s.register_enable_rings()
            .map_err(step("enable the io_uring"))?;
        Ok(Ring {
            ring,
            punt,
            in_flight: 0,
        })
    }

    /// Operations submitted (or queued for submission) and not completed yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// How many more operations can be queued without risking a completion-queue overflow.
    pub fn room(&self) -> usize {
        (CQ_ENTRIES as usize).saturating_sub(self.in_flight)
    }

    /// Queues `op` with `user_data`, submitting what is queued first if the submission queue
    /// is full. `false` when there is no room (see [`Ring::room`]) or the queue stays full.
    ///
    /// # Safety
    /// The iovecs of a read or write, and the memory they describe, must stay valid (and,
    /// for a read, not be used otherwise) until its completion is taken with [`Ring::pop`]
    /// (or the ring is dropped after [`Ring::wait_all`]).
    pub unsafe fn push(&mut self, op: Op, user_data: u64) -> bool {
        if self.room() == 0 {
            return false;
        }
        let file = types::Fixed(0);
        let transfer = if self.punt {
            Flags::ASYNC
        } else {
            Flags::empty()
        };
        let entry = match op {
            Op::Read { iov, len, offset } => opcode::Readv::new(file, iov, len)
                .offset(offset)
                .build()
                .flags(transfer),
            Op::Write { iov, len, offset } => opcode::Writev::new(file, iov, len)
                .offset(offset)
                .build()
                .flags(transfer),
            // The kernel never runs an fsync inline.
            Op::Flush => opcode::Fsync::new(file)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(Flags::IO_DRAIN),
        }
        .user_data(user_data);
        for _ in 0..2 {
            // SAFETY: the entry names fixed file 0 (registered) and buffers the caller keeps
            // valid until completion.
            if unsafe { self.ring.submission().push(&entry) }.is_ok() {
                self.in_flight += 1;
                return true;
            }
            // The submission queue is full: hand it to the kernel and try once more.
            if self.submit().is_err() {
                break;
            }
        }
        false
    }

    /// Hands every queued operation to the kernel. An error leaves them queued (the next
    /// call tries again); `EINTR` is retried at once.
    pub fn submit(&mut self) -> std::io::Result<()> {
        loop {
            if self.ring.submission().is_empty() {
                return Ok(());
            }
            match self.ring.submit() {
                Ok(_) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Takes the next completion: `(user_data, result)` (bytes transferred, or `-errno`).
    pub fn pop(&mut self) -> Option<(u64, i32)> {
        let cqe = self.ring.completion().next()?;
        self.in_flight = self.in_flight.saturating_sub(1);
        Some((cqe.user_data(), cqe.result()))
    }

    /// Submits what is queued and blocks until at least one completion is there (or the
    /// ring has nothing in flight).
    pub fn wait_one(&mut self) -> std::io::Result<()> {
        if self.in_flight == 0 || !self.ring.completion().is_empty() {
            return Ok(());
        }
        loop {
            match self.ring.submit_and_wait(1) {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Blocks until every operation in flight has completed, discarding the completions.
    /// For a ring about to be dropped: the kernel must not touch the buffers afterwards.
    pub fn wait_all(&mut self) -> std::io::Result<()> {
        while self.in_flight > 0 {
            self.wait_one()?;
            while self.pop().is_some() {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsRawFd;
    use vmm_sys_util::eventfd::EventFd;

    fn file(len: usize) -> std::fs::File {
        let fd = nix::sys::memfd::memfd_create(c"kiln-uring", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        let mut f = std::fs::File::from(fd);
        f.write_all(&(0..len).map(|i| (i % 251) as u8).collect::<Vec<_>>())
            .unwrap();
        f
    }

    fn iov(buf: &mut [u8]) -> libc::iovec {
        libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        }
    }

    fn wait_for(ring: &mut Ring, n: usize) -> Vec<(u64, i32)> {
        let mut got = Vec::new();
        while got.len() < n {
            ring.wait_one().unwrap();
            while let Some(c) = ring.pop() {
                got.push(c);
            }
        }
        got
    }

    #[test]
    fn probe_finds_io_uring_here() {
        probe().unwrap();
        assert_eq!(kernel_version("6.1.0-13-amd64"), Some((6, 1)));
        assert_eq!(kernel_version("5.15"), Some((5, 15)));
        assert_eq!(kernel_version("garbage"), None);
    }

    #[test]
    fn reads_writes_and_flushes_signal_the_eventfd() {
        let mut f = file(8192);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ring = Ring::new(f.as_raw_fd(), evt.as_raw_fd(), false).unwrap();
        let mut a = vec![0u8; 100];
        let mut b = vec![0u8; 412];
        let iovs = [iov(&mut a), iov(&mut b)];
        let mut data = vec![0xabu8; 512];
        let wiov = [iov(&mut data)];
        let read = Op::Read {
            iov: iovs.as_ptr(),
            len: 2,
            offset: 512,
        };
        let write = Op::Write {
            iov: wiov.as_ptr(),
            len: 1,
            offset: 4096,
        };
        // SAFETY: the buffers and iovecs live until the completions are taken below.
        assert!(unsafe { ring.push(read, 7) });
        // SAFETY: as above.
        assert!(unsafe { ring.push(write, 8) });
        // SAFETY: a flush carries no buffer.
        assert!(unsafe { ring.push(Op::Flush, 9) });
        assert_eq!(ring.in_flight(), 3);
        ring.submit().unwrap();
        let mut got = wait_for(&mut ring, 3);
        got.sort_unstable();
        assert_eq!(got, vec![(7, 512), (8, 512), (9, 0)]);
        assert_eq!(ring.in_flight(), 0);
        assert!(evt.read().unwrap() >= 1);
        assert!(
            a.iter()
                .enumerate()
                .all(|(i, x)| *x == ((512 + i) % 251) as u8)
        );
        assert_eq!(b[0], ((612) % 251) as u8);
        let mut back = vec![0u8; 8192];
        f.rewind().unwrap();
        f.read_exact(&mut back).unwrap();
        assert!(back[4096..4608].iter().all(|x| *x == 0xab));
    }

    #[test]
    fn errors_come_back_as_negative_results() {
        // A read-only file: writes fail with EBADF, the ring goes on.
        let f = file(4096);
        let path = format!("/proc/self/fd/{}", f.as_raw_fd());
        let ro = std::fs::File::open(path).unwrap();
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ring = Ring::new(ro.as_raw_fd(), evt.as_raw_fd(), true).unwrap();
        let mut data = vec![1u8; 512];
        let v = [iov(&mut data)];
        // SAFETY: as above.
        unsafe {
            assert!(ring.push(
                Op::Write {
                    iov: v.as_ptr(),
                    len: 1,
                    offset: 0
                },
                1
            ));
        }
        ring.submit().unwrap();
        assert_eq!(wait_for(&mut ring, 1), vec![(1, -libc::EBADF)]);
    }

    #[test]
    fn the_ring_refuses_everything_but_its_lock_down() {
        let f = file(4096);
        let other = file(4096);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ring = Ring::new(f.as_raw_fd(), evt.as_raw_fd(), false).unwrap();
        let mut buf = vec![0u8; 64];
        let v = [iov(&mut buf)];
        let refused = [
            // A file descriptor that is not the registered file.
            opcode::Readv::new(types::Fd(other.as_raw_fd()), v.as_ptr(), 1).build(),
            // An operation outside READV, WRITEV, FSYNC.
            opcode::Read::new(types::Fixed(0), buf.as_mut_ptr(), 8).build(),
            opcode::Nop::new().build(),
            // A flag outside FIXED_FILE | IO_DRAIN | ASYNC.
            opcode::Readv::new(types::Fixed(0), v.as_ptr(), 1)
                .build()
                .flags(Flags::IO_LINK),
        ];
        for (i, e) in refused.iter().enumerate() {
            // SAFETY: the buffer outlives the completion taken below.
            unsafe { ring.ring.submission().push(&e.clone().user_data(i as u64)) }.unwrap();
            ring.in_flight += 1;
            ring.submit().unwrap();
            assert_eq!(
                wait_for(&mut ring, 1),
                vec![(i as u64, -libc::EACCES)],
                "{i}"
            );
        }
        // No register operation is allowed once enabled.
        let s = ring.ring.submitter();
        let e = s
            .register_files_update(0, &[other.as_raw_fd()])
            .unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
        let mut w = [64u32, 64];
        let e = s.register_iowq_max_workers(&mut w).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::EACCES));
    }

    #[test]
    fn no_room_beyond_the_completion_queue() {
        let f = file(4096);
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut ring = Ring::new(f.as_raw_fd(), evt.as_raw_fd(), false).unwrap();
        let mut n = 0;
        // SAFETY: flushes carry no buffers.
        while unsafe { ring.push(Op::Flush, n) } {
            n += 1;
        }
        assert_eq!(n, u64::from(CQ_ENTRIES));
        ring.wait_all().unwrap();
        assert_eq!(ring.in_flight(), 0);
        assert_eq!(ring.room(), CQ_ENTRIES as usize);
    }
}
