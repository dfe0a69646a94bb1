//! A disk whose reads wait until the test lets them go: one file, `disk.img`, on a FUSE file
//! system this process serves (with the `fuser` crate; root mounts it directly, no helper).
//! The file is opened in `direct_io` mode, so every read of it reaches the server. While the
//! gate is closed, reads are held: their replies are kept, not sent, and the server goes on
//! taking requests; opening the gate answers them.
//! Every request is logged in order, so a test can tell what reached the "disk" when.
//!
//! The mount is undone when the value is dropped (the session unmounts, lazily if busy).

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    BackgroundSession, Config, Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags,
    Generation, INodeNo, LockOwner, MountOption, OpenFlags, ReplyAttr, ReplyData, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyWrite, Request, WriteFlags,
};

/// The file's name in the mount.
pub const FILE_NAME: &str = "disk.img";
const FILE_INO: INodeNo = INodeNo(2);
const TTL: Duration = Duration::from_secs(3600);

/// What reached the file system, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A read of `len` bytes at `offset` arrived.
    Read {
        /// File offset.
        offset: u64,
        /// Bytes asked for.
        len: u32,
    },
    /// The read at `offset` was answered.
    ReadAnswered {
        /// File offset.
        offset: u64,
    },
    /// A write of `len` bytes at `offset` (answered at once).
    Write {
        /// File offset.
        offset: u64,
        /// Bytes written.
        len: usize,
    },
    /// An fsync or fdatasync (answered at once).
    Fsync,
}

struct State {
    data: Vec<u8>,
    holding: bool,
    held: Vec<(u64, u32, ReplyData)>,
    events: Vec<Event>,
    /// With a latency: reads waiting for their time, in arrival (= due) order.
    latency: Option<Duration>,
    due: std::collections::VecDeque<(Instant, u64, u32, ReplyData)>,
    stopping: bool,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

fn lock(s: &Shared) -> MutexGuard<'_, State> {
    s.0.lock().unwrap_or_else(PoisonError::into_inner)
}

fn answer(state: &mut State, offset: u64, len: u32, reply: ReplyData) {
    let start = usize::try_from(offset)
        .unwrap_or(usize::MAX)
        .min(state.data.len());
    let end = start.saturating_add(len as usize).min(state.data.len());
    reply.data(&state.data[start..end]);
    state.events.push(Event::ReadAnswered { offset });
}

/// The latency thread: answers each read when its time comes (and every one left when the
/// disk goes).
fn answer_when_due(shared: &Shared) {
    let mut s = lock(shared);
    loop {
        let now = Instant::now();
        while s.due.front().is_some_and(|d| d.0 <= now || s.stopping) {
            if let Some((_, offset, len, reply)) = s.due.pop_front() {
                answer(&mut s, offset, len, reply);
            }
        }
        if s.stopping {
            return;
        }
        let wait = s.due.front().map_or(Duration::from_secs(1), |d| {
            d.0.saturating_duration_since(now)
        });
        s = shared
            .1
            .wait_timeout(s, wait)
            .unwrap_or_else(PoisonError::into_inner)
            .0;
    }
}

struct GateFs {
    shared: Shared,
}

impl GateFs {
    fn attr(&self, ino: INodeNo) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == INodeNo::ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            (
                FileType::RegularFile,
                0o644,
                lock(&self.shared).data.len() as u64,
                1,
            )
        };
        FileAttr {
            ino,
            size,
            blocks: size.div_ceil(512),
            atime: UNIX_EPOCH,
            mtime: UNIX_EPOCH,
            ctime: UNIX_EPOCH,
            crtime: UNIX_EPOCH,
            kind,
            perm,
            nlink,
            // SAFETY: getuid and getgid cannot fail and touch no memory.
            uid: unsafe { libc::getuid() },
            // SAFETY: as above.
            gid: unsafe { libc::getgid() },
            rdev: 0,
            flags: 0,
            blksize: 4096,
        }
    }
}

impl Filesystem for GateFs {
    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent == INodeNo::ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE_INO), Generation(0));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        if ino == INodeNo::ROOT || ino == FILE_INO {
            reply.attr(&TTL, &self.attr(ino));
        } else {
            reply.error(Errno::ENOENT);
        }
    }

    fn open(&self, _req: &Request, _ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        reply.opened(FileHandle(0), FopenFlags::FOPEN_DIRECT_IO);
    }

    fn read(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut s = lock(&self.shared);
        s.events.push(Event::Read { offset, len: size });
        if s.holding {
            s.held.push((offset, size, reply));
        } else if let Some(latency) = s.latency {
            // Answered by the latency thread, so that the session goes on taking requests:
            // reads in flight at once overlap, as on a network block store.
            s.due
                .push_back((Instant::now() + latency, offset, size, reply));
        } else {
            answer(&mut s, offset, size, reply);
        }
        self.shared.1.notify_all();
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let mut s = lock(&self.shared);
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        if start.saturating_add(data.len()) > s.data.len() {
            reply.error(Errno::ENOSPC);
            return;
        }
        s.data[start..start + data.len()].copy_from_slice(data);
        s.events.push(Event::Write {
            offset,
            len: data.len(),
        });
        reply.written(data.len() as u32);
        self.shared.1.notify_all();
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        lock(&self.shared).events.push(Event::Fsync);
        reply.ok();
        self.shared.1.notify_all();
    }
}

/// A mounted gated disk.
pub struct GatedDisk {
    shared: Shared,
    session: Option<BackgroundSession>,
    mountpoint: PathBuf,
    answerer: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for GatedDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GatedDisk")
            .field("mountpoint", &self.mountpoint)
            .finish_non_exhaustive()
    }
}

impl GatedDisk {
    /// Mounts a file system at `mountpoint` (an empty directory) holding `disk.img` with
    /// `contents`; reads are answered at once until [`GatedDisk::hold`].
    pub fn mount(mountpoint: &Path, contents: Vec<u8>) -> std::io::Result<GatedDisk> {
        GatedDisk::mount_with(mountpoint, contents, None)
    }

    /// Like [`GatedDisk::mount`], but every read is answered `latency` after it arrived (a
    /// slow disk: a cold network-backed image), reads in flight overlapping.
    pub fn mount_with_latency(
        mountpoint: &Path,
        contents: Vec<u8>,
        latency: Duration,
    ) -> std::io::Result<GatedDisk> {
        GatedDisk::mount_with(mountpoint, contents, Some(latency))
    }

    fn mount_with(
        mountpoint: &Path,
        contents: Vec<u8>,
        latency: Option<Duration>,
    ) -> std::io::Result<GatedDisk> {
        let shared: Shared = Arc::new((
            Mutex::new(State {
                data: contents,
                holding: false,
                held: Vec::new(),
                events: Vec::new(),
                latency,
                due: std::collections::VecDeque::new(),
                stopping: false,
            }),
            Condvar::new(),
        ));
        let answerer = latency.map(|_| {
            let shared = shared.clone();
            std::thread::spawn(move || answer_when_due(&shared))
        });
        let mut config = Config::default();
        config.mount_options = vec![
            MountOption::FSName("kiln-gated".into()),
            MountOption::RW,
            MountOption::NoAtime,
        ];
        let fs = GateFs {
            shared: shared.clone(),
        };
        let session = fuser::spawn_mount(fs, mountpoint, &config)?;
        Ok(GatedDisk {
            shared,
            session: Some(session),
            mountpoint: mountpoint.to_path_buf(),
            answerer,
        })
    }

    /// The file.
    pub fn file(&self) -> PathBuf {
        self.mountpoint.join(FILE_NAME)
    }

    /// Closes the gate: reads from now on wait.
    pub fn hold(&self) {
        lock(&self.shared).holding = true;
    }

    /// Opens the gate and answers every held read.
    pub fn release(&self) {
        let mut s = lock(&self.shared);
        s.holding = false;
        let held = std::mem::take(&mut s.held);
        for (offset, len, reply) in held {
            answer(&mut s, offset, len, reply);
        }
        self.shared.1.notify_all();
    }

    /// Reads held right now.
    pub fn held(&self) -> usize {
        lock(&self.shared).held.len()
    }

    /// Waits until at least `n` reads are held (at most `timeout`); returns how many are.
    pub fn wait_held(&self, n: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        let mut s = lock(&self.shared);
        while s.held.len() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            s = self
                .shared
                .1
                .wait_timeout(s, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        s.held.len()
    }

    /// Everything that reached the file system so far, in order.
    pub fn events(&self) -> Vec<Event> {
        lock(&self.shared).events.clone()
    }
}

impl Drop for GatedDisk {
    fn drop(&mut self) {
        // Nothing may stay blocked on us; then the mount goes, lazily, so a file still open
        // on it (a VMM that is not gone yet) does not keep it in the mount table.
        self.release();
        lock(&self.shared).stopping = true;
        self.shared.1.notify_all();
        if let Some(t) = self.answerer.take() {
            let _ = t.join();
        }
        if let Ok(path) = std::ffi::CString::new(self.mountpoint.as_os_str().as_encoded_bytes()) {
            // SAFETY: umount2 reads a NUL-terminated path that lives for the call.
            unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) };
        }
        // The session finds the file system unmounted; its thread ends with the last file.
        drop(self.session.take());
    }
}
