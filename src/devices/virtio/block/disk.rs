//! The backing file of a drive: opened read-only or read-write, locked against a second
//! writer, and read and written with preadv/pwritev directly on guest buffers.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::Path;

use super::{SECTOR_SHIFT, SECTOR_SIZE};
use crate::devices::virtio::queue::HostBuffer;

/// Most iovecs one preadv/pwritev accepts (IOV_MAX).
const IOV_MAX: usize = 1024;

/// Errors opening a backing file.
#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    /// open(2) failed.
    #[error("cannot open: {0}")]
    Open(#[source] std::io::Error),
    /// Not a regular file or block device.
    #[error("not a regular file or block device")]
    NotAFile,
    /// Its size could not be read.
    #[error("cannot read its size: {0}")]
    Size(#[source] std::io::Error),
    /// Another process holds it.
    #[error("it is locked by another drive or process")]
    Locked,
}

/// Locks a writable image exclusively, a read-only one shared, without waiting.
fn lock_file(file: &File, read_only: bool) -> Result<(), DiskError> {
    let lock = if read_only {
        libc::LOCK_SH
    } else {
        libc::LOCK_EX
    };
    // SAFETY: flock on a file descriptor the caller owns; no memory is involved.
    if unsafe { libc::flock(file.as_raw_fd(), lock | libc::LOCK_NB) } != 0 {
        return Err(DiskError::Locked);
    }
    Ok(())
}

/// Filesystems whose reads and writes honour `IOCB_NOWAIT` (they return `EAGAIN` rather
/// than block), so io_uring may try a request on the submitting thread first: ext2/3/4,
/// XFS, Btrfs, F2FS, tmpfs (and memfd). On any other (FUSE, NFS, CIFS, overlayfs, ...) a
/// request may block that thread even so — FUSE's direct I/O does — and goes to the
/// kernel's workers straight away.
const NOWAIT_FILESYSTEMS: [i64; 5] = [0xEF53, 0x5846_5342, 0x9123_683E, 0xF2F5_2010, 0x0102_1994];

/// The backing file.
#[derive(Debug)]
pub struct DiskFile {
    file: File,
    read_only: bool,
    sectors: u64,
    /// A request may block the thread that submits it (see [`NOWAIT_FILESYSTEMS`]).
    may_block: bool,
}

impl DiskFile {
    /// Opens `path`; a writable image is locked exclusively, a read-only one shared.
    pub fn open(path: &Path, read_only: bool) -> Result<DiskFile, DiskError> {
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(DiskError::Open)?;
        Self::from_file(file, read_only)
    }

    /// Wraps an open file (tests and fuzzing use a memfd).
    pub fn from_file(mut file: File, read_only: bool) -> Result<DiskFile, DiskError> {
        let meta = file.metadata().map_err(DiskError::Size)?;
        use std::os::unix::fs::FileTypeExt;
        if !(meta.is_file() || meta.file_type().is_block_device()) {
            return Err(DiskError::NotAFile);
        }
        lock_file(&file, read_only)?;
        use std::io::Seek;
        let size = file
            .seek(std::io::SeekFrom::End(0))
            .map_err(DiskError::Size)?;
        if size % SECTOR_SIZE != 0 {
            log::warn!(
                "disk image size {size} is not a multiple of {SECTOR_SIZE}: the last {} bytes are not visible to the guest",
                size % SECTOR_SIZE
            );
        }
        let may_block = meta.is_file() && !on_nowait_filesystem(&file);
        Ok(DiskFile {
            file,
            read_only,
            sectors: size >> SECTOR_SHIFT,
            may_block,
        })
    }

    /// Makes written data durable and drops the lock, so that a live migration's destination
    /// can open the drive (the VM is paused).
    pub fn release(&self) -> std::io::Result<()> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        // SAFETY: flock on a file descriptor this struct owns; no memory is involved.
        if unsafe { libc::flock(self.file.as_raw_fd(), libc::LOCK_UN) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Takes the lock back after [`DiskFile::release`] (a failed live migration).
    pub fn relock(&self) -> Result<(), DiskError> {
        lock_file(&self.file, self.read_only)
    }

    /// Whether an I/O request may block the thread that submits it even when asked not to
    /// (the file is not on a filesystem known to honour `IOCB_NOWAIT`; block devices do).
    pub fn may_block(&self) -> bool {
        self.may_block
    }

    /// Capacity in sectors.
    pub fn sectors(&self) -> u64 {
        self.sectors
    }

    /// Whether the file was opened read-only.
    pub fn read_only(&self) -> bool {
        self.read_only
    }

    /// Reads from `offset` into the buffers, filling them completely.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    pub unsafe fn read_at(&self, offset: u64, bufs: &[HostBuffer]) -> std::io::Result<()> {
        // SAFETY: forwarded from the caller.
        unsafe { self.vectored(offset, bufs, false) }
    }

    /// Writes the buffers at `offset`, completely.
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    pub unsafe fn write_at(&self, offset: u64, bufs: &[HostBuffer]) -> std::io::Result<()> {
        if self.read_only {
            return Err(std::io::Error::from_raw_os_error(libc::EBADF));
        }
        // SAFETY: forwarded from the caller.
        unsafe { self.vectored(offset, bufs, true) }
    }

    /// Makes written data durable.
    pub fn flush(&self) -> std::io::Result<()> {
        self.file.sync_data()
    }

    /// preadv/pwritev over all buffers, in IOV_MAX chunks, resuming after short transfers.
    unsafe fn vectored(
        &self,
        offset: u64,
        bufs: &[HostBuffer],
        write: bool,
    ) -> std::io::Result<()> {
        let mut iovs: Vec<libc::iovec> = HostBuffer::as_iovecs(bufs)
            .iter()
            .filter(|v| v.iov_len > 0)
            .copied()
            .collect();
        let mut offset = offset;
        let mut first = 0;
        while first < iovs.len() {
            let chunk = &iovs[first..iovs.len().min(first + IOV_MAX)];
            let off = libc::off_t::try_from(offset)
                .map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))?;
            let fd = self.file.as_raw_fd();
            let n = if write {
                // SAFETY: the iovecs describe buffers the caller guarantees readable.
                unsafe { libc::pwritev(fd, chunk.as_ptr(), chunk.len() as libc::c_int, off) }
            } else {
                // SAFETY: the iovecs describe buffers the caller guarantees writable.
                unsafe { libc::preadv(fd, chunk.as_ptr(), chunk.len() as libc::c_int, off) }
            };
            if n < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if n == 0 {
                // End of file inside the capacity: the image shrank under us.
                return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
            }
            let mut done = n as usize;
            offset += done as u64;
            // Skip the iovecs completed, trim a partly completed one.
            while done > 0 && first < iovs.len() {
                let iov = &mut iovs[first];
                if done >= iov.iov_len {
                    done -= iov.iov_len;
                    first += 1;
                } else {
                    iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(done).cast();
                    iov.iov_len -= done;
                    done = 0;
                }
            }
        }
        Ok(())
    }
}

/// Whether `file` lives on one of [`NOWAIT_FILESYSTEMS`] (unknown when fstatfs fails:
/// no).
fn on_nowait_filesystem(file: &File) -> bool {
    // SAFETY: a zeroed statfs is a valid value of this plain C struct.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: fstatfs writes one statfs into `st`, which lives for the call.
    if unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) } != 0 {
        return false;
    }
    // `f_type` is a signed long on glibc and an unsigned one on musl.
    #[allow(clippy::unnecessary_cast)]
    NOWAIT_FILESYSTEMS.contains(&(st.f_type as i64))
}

impl AsRawFd for DiskFile {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    pub(crate) fn memfd(contents: &[u8]) -> File {
        let fd = nix::sys::memfd::memfd_create(c"kiln-disk", nix::sys::memfd::MFdFlags::empty())
            .unwrap();
        let mut f = File::from(fd);
        f.write_all(contents).unwrap();
        f
    }

    fn buf(v: &mut [u8]) -> HostBuffer {
        HostBuffer {
            ptr: v.as_mut_ptr(),
            len: v.len(),
        }
    }

    #[test]
    fn capacity_and_round_trip() {
        let disk = DiskFile::from_file(memfd(&[7u8; 4096 + 100]), false).unwrap();
        assert_eq!(disk.sectors(), 8);
        let mut a = vec![1u8; 700];
        let mut b = vec![2u8; 324];
        // SAFETY: the buffers are live vectors.
        unsafe { disk.write_at(512, &[buf(&mut a), buf(&mut b)]) }.unwrap();
        let mut back = vec![0u8; 1024];
        // SAFETY: as above.
        unsafe { disk.read_at(512, &[buf(&mut back)]) }.unwrap();
        assert_eq!(&back[..700], &a[..]);
        assert_eq!(&back[700..], &b[..]);
        disk.flush().unwrap();
    }

    #[test]
    fn which_files_may_block_their_submitter() {
        // A memfd is tmpfs: requests may be tried inline.
        let disk = DiskFile::from_file(memfd(&[0u8; 512]), false).unwrap();
        assert!(!disk.may_block());
        // /proc is none of the known filesystems.
        let proc = File::open("/proc/self/status").unwrap();
        assert!(!on_nowait_filesystem(&proc));
    }

    #[test]
    fn many_iovecs_are_chunked() {
        let disk = DiskFile::from_file(memfd(&vec![0u8; 4 * 4096]), false).unwrap();
        let mut data: Vec<u8> = (0..3000u32).map(|i| i as u8).collect();
        let bufs: Vec<HostBuffer> = data
            .chunks_mut(1)
            .map(|c| HostBuffer {
                ptr: c.as_mut_ptr(),
                len: 1,
            })
            .collect();
        // SAFETY: every buffer is one byte of `data`.
        unsafe { disk.write_at(0, &bufs) }.unwrap();
        let mut back = vec![0u8; 3000];
        // SAFETY: a live vector.
        unsafe { disk.read_at(0, &[buf(&mut back)]) }.unwrap();
        assert_eq!(back, (0..3000u32).map(|i| i as u8).collect::<Vec<_>>());
    }

    #[test]
    fn read_only_refuses_writes() {
        let disk = DiskFile::from_file(memfd(&[0u8; 512]), true).unwrap();
        let mut a = [1u8; 512];
        // SAFETY: a live array.
        assert!(unsafe { disk.write_at(0, &[buf(&mut a)]) }.is_err());
    }

    #[test]
    fn reading_past_the_end_fails() {
        let disk = DiskFile::from_file(memfd(&[0u8; 512]), false).unwrap();
        let mut a = [1u8; 1024];
        // SAFETY: a live array.
        assert!(unsafe { disk.read_at(0, &[buf(&mut a)]) }.is_err());
    }

    #[test]
    fn second_writer_is_refused() {
        let dir = std::env::temp_dir().join(format!("kiln-disk-lock-{}", std::process::id()));
        std::fs::write(&dir, [0u8; 512]).unwrap();
        let first = DiskFile::open(&dir, false).unwrap();
        assert!(matches!(
            DiskFile::open(&dir, false),
            Err(DiskError::Locked)
        ));
        assert!(matches!(DiskFile::open(&dir, true), Err(DiskError::Locked)));
        drop(first);
        let r1 = DiskFile::open(&dir, true).unwrap();
        let _r2 = DiskFile::open(&dir, true).unwrap();
        drop(r1);
        std::fs::remove_file(&dir).unwrap();
        assert!(matches!(
            DiskFile::open(&dir, true),
            Err(DiskError::Open(_))
        ));
        assert!(matches!(
            DiskFile::open(Path::new("/"), true),
            Err(DiskError::NotAFile)
        ));
    }
}
