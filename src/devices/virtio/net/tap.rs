//! The host side of a virtio-net device: a TAP opened with IFF_TAP | IFF_NO_PI |
//! IFF_VNET_HDR, non-blocking, with the virtio-net header size set and offloads matching
//! what the guest negotiated. Frames are read and written with readv/writev straight on
//! guest buffers.
//!
//! Anything with TAP semantics (one frame per read/write, non-blocking) can stand in: tests
//! and fuzz targets use one end of a datagram socket pair.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use super::VNET_HDR_LEN;
use crate::devices::virtio::queue::HostBuffer;

/// Errors opening a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// No interface of that name exists.
    #[error("TAP `{0}` does not exist")]
    Missing(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0}")]
    OpenTun(#[source] std::io::Error),
    /// TUNSETIFF failed.
    #[error("cannot attach to TAP `{name}`: {source}")]
    Attach {
        /// The interface.
        name: String,
        /// Why.
        source: std::io::Error,
    },
    /// A TAP ioctl failed.
    #[error("TAP `{name}`: {what}: {source}")]
    Ioctl {
        /// The interface.
        name: String,
        /// The operation.
        what: &'static str,
        /// Why.
        source: std::io::Error,
    },
}

/// The TAP, or a stand-in with the same semantics.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// Whether offloads can be set (a real TAP).
    is_tap: bool,
}

fn last_err() -> std::io::Error {
    std::io::Error::last_os_error()
}

impl Tap {
    /// Opens the existing TAP `name`.
    pub fn open(name: &str) -> Result<Tap, TapError> {
        // TUNSETIFF would silently create a missing interface: look it up first.
        if nix::net::if_::if_nametoindex(name).is_err() {
            return Err(TapError::Missing(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        // struct ifreq: 16-byte name, then the flags (short) in the union.
        let mut ifreq = [0u8; 40];
        let bytes = name.as_bytes();
        ifreq[..bytes.len().min(15)].copy_from_slice(&bytes[..bytes.len().min(15)]);
        let flags = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as i16;
        ifreq[16..18].copy_from_slice(&flags.to_ne_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`, which `ifreq` is large enough
        // to hold (40 bytes); the fd is the open /dev/net/tun.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETIFF, ifreq.as_mut_ptr()) } < 0 {
            return Err(TapError::Attach {
                name: name.to_string(),
                source: last_err(),
            });
        }
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer given.
        if unsafe { libc::ioctl(file.as_raw_fd(), libc::TUNSETVNETHDRSZ, &hdr_len) } < 0 {
            return Err(TapError::Ioctl {
                name: name.to_string(),
                what: "TUNSETVNETHDRSZ",
                source: last_err(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
            is_tap: true,
        };
        tap.set_offload(0)?;
        Ok(tap)
    }

    /// Wraps a non-blocking fd with TAP semantics (for tests and fuzzing).
    pub fn from_fd(fd: OwnedFd, name: &str) -> Tap {
        Tap {
            file: File::from(fd),
            name: name.to_string(),
            is_tap: false,
        }
    }

    /// Lets go of the interface (a live migration hands it to the destination kiln): the
    /// TAP's descriptor is closed and an eventfd that is never ready stands in for it until
    /// [`Tap::reattach`].
    pub fn release(&mut self) -> std::io::Result<()> {
        // SAFETY: eventfd(2) with constant flags; the result is checked before use.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(last_err());
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        self.file = unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) };
        Ok(())
    }

    /// Opens the interface again by name (after [`Tap::release`]) with `offloads`.
    pub fn reattach(&mut self, offloads: libc::c_uint) -> Result<(), TapError> {
        let tap = Tap::open(&self.name)?;
        tap.set_offload(offloads)?;
        *self = tap;
        Ok(())
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Tells the TAP which offloads the guest accepts (TUN_F_* flags).
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), TapError> {
        if !self.is_tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes the flags by value.
        if unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                libc::c_ulong::from(flags),
            )
        } < 0
        {
            return Err(TapError::Ioctl {
                name: self.name.clone(),
                what: "TUNSETOFFLOAD",
                source: last_err(),
            });
        }
        Ok(())
    }

    /// Reads one frame into the buffers; returns its length.
    ///
    /// # Safety
    /// Every buffer must be valid for writes of its length for the duration of the call.
    pub unsafe fn read_frame(&self, bufs: &[HostBuffer]) -> std::io::Result<usize> {
        let iovs = HostBuffer::as_iovecs(bufs);
        let count = iovs.len().min(1024) as libc::c_int;
        // SAFETY: the iovecs describe buffers the caller guarantees writable.
        let n = unsafe { libc::readv(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            Err(last_err())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame gathered from the buffers.
    ///
    /// # Safety
    /// Every buffer must be valid for reads of its length for the duration of the call.
    pub unsafe fn write_frame(&self, bufs: &[HostBuffer]) -> std::io::Result<usize> {
        let iovs = HostBuffer::as_iovecs(bufs);
        let count = iovs.len().min(1024) as libc::c_int;
        // SAFETY: the iovecs describe buffers the caller guarantees readable.
        let n = unsafe { libc::writev(self.file.as_raw_fd(), iovs.as_ptr(), count) };
        if n < 0 {
            Err(last_err())
        } else {
            Ok(n as usize)
        }
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_tap_is_refused_by_name() {
        let err = Tap::open("kiln-nope0").unwrap_err();
        assert_eq!(err.to_string(), "TAP `kiln-nope0` does not exist");
    }

    #[test]
    fn an_interface_that_is_not_a_tap() {
        // `lo` exists in every network namespace.
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, TapError::Attach { .. }), "{err}");
    }
}
