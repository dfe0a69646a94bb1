//! The `Uffd` memory backend of `PUT /snapshot/load` (Firecracker's): guest memory is
//! anonymous, a userfaultfd watches it for missing pages, and a page-fault handler in
//! another process, listening on the Unix socket `mem_backend.backend_path`, is handed the
//! userfaultfd and the regions' layout. It then serves every page the guest, KVM or kiln
//! touches first (`UFFDIO_COPY`, `UFFDIO_ZEROPAGE`), typically from the snapshot's memory
//! file; kiln never reads that file.
//!
//! The handshake is Firecracker's (1.11 to 1.17), so handlers written for Firecracker work
//! unchanged: the userfaultfd comes from `/dev/userfaultfd` (`USERFAULTFD_IOC_NEW`) when the
//! host has it, else from `userfaultfd(2)`; it is close-on-exec and non-blocking, handles
//! kernel-mode faults too (KVM's, and kiln's own system calls on guest buffers), and
//! negotiates `UFFD_FEATURE_EVENT_REMOVE`; every region is registered for missing pages;
//! then one `sendmsg` on a stream connection carries the JSON array of
//! [`GuestRegionUffdMapping`]s with the userfaultfd as `SCM_RIGHTS`. Before the vCPUs start
//! kiln waits (briefly, usually not at all) until the handler has read it, and fails the
//! load if the handler hung up without reading it. kiln keeps its own copy
//! of the userfaultfd and the connection open for the VM's life, as Firecracker does, so the
//! handler can tell kiln's end (the connection closes) and memory never silently turns into
//! zero pages.

use std::fs::OpenOptions;
use std::io::{self, IoSlice};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use nix::sys::socket::{ControlMessage, MsgFlags, getsockopt, sendmsg, sockopt};
use serde::{Deserialize, Serialize};
use vm_memory::mmap::MmapRegionBuilder;
use vm_memory::{
    GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion, GuestRegionMmap,
    MemoryRegionAddress,
};
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_val};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

use super::memory::RegionInfo;
use crate::vstate::memory::{GuestMemory, new_bitmap};

/// `/dev/userfaultfd` (Linux 6.1+): access to it is access to userfaultfd.
const DEV_USERFAULTFD: &str = "/dev/userfaultfd";
/// The page size kiln's guest memory uses (no huge pages).
const PAGE_SIZE: usize = 4096;
/// How long the load waits, at most, for the handler to read the handshake.
pub const HANDSHAKE_WAIT: Duration = Duration::from_secs(2);

// include/uapi/linux/userfaultfd.h
const UFFDIO: u32 = 0xAA;
const UFFD_API: u64 = 0xAA;
const UFFD_FEATURE_EVENT_REMOVE: u64 = 1 << 3;
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// Bit of `_UFFDIO_COPY` (0x03) in the `ioctls` UFFDIO_REGISTER reports.
const UFFDIO_COPY_BIT: u64 = 1 << 0x03;

#[repr(C)]
#[derive(Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRange {
    start: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

ioctl_io_nr!(USERFAULTFD_IOC_NEW, UFFDIO, 0x00);
ioctl_iowr_nr!(UFFDIO_REGISTER, UFFDIO, 0x00, UffdioRegister);
ioctl_iowr_nr!(UFFDIO_API, UFFDIO, 0x3F, UffdioApi);

/// One region of guest memory as a page-fault handler sees it: where it is mapped in kiln
/// and where its contents are in the memory file. Firecracker's `GuestRegionUffdMapping`,
/// field for field (names, order, JSON types).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRegionUffdMapping {
    /// Start of the region in kiln's address space.
    pub base_host_virt_addr: u64,
    /// Length in bytes.
    pub size: usize,
    /// Where the region's contents start in the memory file.
    pub offset: u64,
    /// Page size in bytes.
    pub page_size: usize,
    /// The page size again, in bytes despite its name: Firecracker 1.11+ still sends this
    /// deprecated field, and older handlers read only it.
    pub page_size_kib: usize,
}

/// Why a `Uffd` load could not hand guest memory to its page-fault handler.
#[derive(Debug, thiserror::Error)]
pub enum UffdError {
    /// The guest memory could not be mapped.
    #[error("cannot map {size} bytes of guest memory: {reason}")]
    Map {
        /// The region's size.
        size: u64,
        /// What failed.
        reason: String,
    },
    /// No userfaultfd could be had.
    #[error("cannot create a userfaultfd ({how}): {source}")]
    Create {
        /// `/dev/userfaultfd` or the system call.
        how: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel refused the API handshake or a region.
    #[error("userfaultfd {what}: {source}")]
    Ioctl {
        /// The operation.
        what: &'static str,
        /// Why.
        source: io::Error,
    },
    /// The kernel cannot let a handler copy pages into guest memory.
    #[error("userfaultfd: the kernel offers no UFFDIO_COPY for guest memory")]
    NoCopy,
    /// The handler's socket could not be reached.
    #[error("cannot connect to the page-fault handler: {0}")]
    Connect(#[source] io::Error),
    /// The handshake could not be sent.
    #[error("cannot send the handshake to the page-fault handler: {0}")]
    Send(#[source] io::Error),
    /// The handler hung up without reading the handshake.
    #[error("the page-fault handler closed the connection without taking the handshake")]
    Refused,
}

fn ioctl_err(what: &'static str) -> impl FnOnce(io::Error) -> UffdError {
    move |source| UffdError::Ioctl { what, source }
}

/// Anonymous, private guest memory laid out as `regions` (what [`super::memory::map`] would
/// give, without the file; with dirty-page bitmaps), never touched here.
pub fn anonymous_memory(regions: &[RegionInfo]) -> Result<GuestMemory, UffdError> {
    let map_err = |size: u64, reason: String| UffdError::Map { size, reason };
    let mut mapped = Vec::with_capacity(regions.len());
    for r in regions {
        let size = usize::try_from(r.size).map_err(|e| map_err(r.size, e.to_string()))?;
        let region = MmapRegionBuilder::new_with_bitmap(size, new_bitmap(size))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE)
            .build()
            .map_err(|e| map_err(r.size, e.to_string()))?;
        let region = GuestRegionMmap::new(region, GuestAddress(r.guest_addr))
            .ok_or_else(|| map_err(r.size, "the region wraps".into()))?;
        mapped.push(region);
    }
    GuestMemoryMmap::from_regions(mapped).map_err(|e| map_err(0, e.to_string()))
}

/// The handshake's mappings: each region of `memory` with its offset in the memory file.
pub fn mappings(memory: &GuestMemory, regions: &[RegionInfo]) -> Vec<GuestRegionUffdMapping> {
    memory
        .iter()
        .zip(regions)
        .map(|(region, info)| GuestRegionUffdMapping {
            base_host_virt_addr: region
                .get_host_address(MemoryRegionAddress(0))
                .map_or(0, |p| p as u64),
            size: region.len() as usize,
            offset: info.file_offset,
            page_size: PAGE_SIZE,
            page_size_kib: PAGE_SIZE,
        })
        .collect()
}

/// A new userfaultfd (close-on-exec, non-blocking, kernel faults included), from
/// `/dev/userfaultfd` when the host has it, else from the system call.
fn create_userfaultfd() -> Result<OwnedFd, UffdError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    match OpenOptions::new()
        .read(true)
        .write(true)
        .open(DEV_USERFAULTFD)
    {
        Ok(dev) => {
            // SAFETY: USERFAULTFD_IOC_NEW takes the flags by value and returns a new fd.
            let fd = unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW(), flags as libc::c_ulong) };
            if fd < 0 {
                return Err(UffdError::Create {
                    how: DEV_USERFAULTFD,
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: the ioctl returned a new descriptor that nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd) })
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            // SAFETY: userfaultfd(2) takes a flag word and returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
            if fd < 0 {
                return Err(UffdError::Create {
                    how: "userfaultfd(2), as there is no /dev/userfaultfd: it needs \
                          CAP_SYS_PTRACE or vm.unprivileged_userfaultfd=1",
                    source: io::Error::last_os_error(),
                });
            }
            // SAFETY: the system call returned a new descriptor (an int) nothing else owns.
            Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
        }
        Err(source) => Err(UffdError::Create {
            how: DEV_USERFAULTFD,
            source,
        }),
    }
}

/// A userfaultfd past its API handshake, watching every region of `memory` for missing
/// pages.
pub fn register(memory: &GuestMemory) -> Result<OwnedFd, UffdError> {
    let uffd = create_userfaultfd()?;
    let mut api = UffdioApi {
        api: UFFD_API,
        features: UFFD_FEATURE_EVENT_REMOVE,
        ioctls: 0,
    };
    // SAFETY: UFFDIO_API reads and writes one `uffdio_api`, which lives across the call.
    if unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_API(), &mut api) } < 0 {
        return Err(ioctl_err("UFFDIO_API")(io::Error::last_os_error()));
    }
    for region in memory.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| ioctl_err("UFFDIO_REGISTER")(io::Error::other(e.to_string())))?;
        let mut reg = UffdioRegister {
            range: UffdioRange {
                start: host as u64,
                len: region.len(),
            },
            mode: UFFDIO_REGISTER_MODE_MISSING,
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER reads and writes one `uffdio_register`, which lives across
        // the call; the range is a live anonymous mapping `memory` owns.
        if unsafe { ioctl_with_mut_ref(&uffd, UFFDIO_REGISTER(), &mut reg) } < 0 {
            return Err(ioctl_err("UFFDIO_REGISTER")(io::Error::last_os_error()));
        }
        if reg.ioctls & UFFDIO_COPY_BIT == 0 {
            return Err(UffdError::NoCopy);
        }
    }
    Ok(uffd)
}

/// The `Uffd` backend's memory: anonymous, laid out as `regions`, registered with a new
/// userfaultfd, which goes with the layout to the page-fault handler listening at `socket`.
pub fn hand_over(
    socket: &str,
    regions: &[RegionInfo],
) -> Result<(GuestMemory, PageFaultHandler), UffdError> {
    let memory = anonymous_memory(regions)?;
    let userfaultfd = register(&memory)?;
    let handler = PageFaultHandler::connect(socket, userfaultfd, &mappings(&memory, regions))?;
    Ok((memory, handler))
}

/// The connection to a page-fault handler that holds the guest memory's userfaultfd.
#[derive(Debug)]
pub struct PageFaultHandler {
    /// kiln's copy: while it is open, the registration stays (a gone handler leaves faults
    /// waiting, never memory silently zeroed).
    _uffd: OwnedFd,
    /// Open for the VM's life: its end tells the handler that kiln is gone.
    socket: UnixStream,
    /// `mem_backend.backend_path`.
    path: String,
    /// When the handshake went.
    sent: Instant,
}

impl PageFaultHandler {
    /// Connects to the handler listening at `path` and sends it `mappings` with `uffd`.
    pub fn connect(
        path: &str,
        uffd: OwnedFd,
        mappings: &[GuestRegionUffdMapping],
    ) -> Result<PageFaultHandler, UffdError> {
        let json = serde_json::to_vec(mappings)
            .map_err(|e| UffdError::Send(io::Error::other(e.to_string())))?;
        let socket = UnixStream::connect(path).map_err(UffdError::Connect)?;
        let fds = [uffd.as_raw_fd()];
        let sent = sendmsg::<()>(
            socket.as_raw_fd(),
            &[IoSlice::new(&json)],
            &[ControlMessage::ScmRights(&fds)],
            MsgFlags::MSG_NOSIGNAL,
            None,
        )
        .map_err(|e| match e {
            // The handler closed the connection before kiln could send.
            nix::errno::Errno::EPIPE | nix::errno::Errno::ECONNRESET => UffdError::Refused,
            e => UffdError::Send(e.into()),
        })?;
        if sent != json.len() {
            return Err(UffdError::Send(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("{sent} of {} bytes sent", json.len()),
            )));
        }
        Ok(PageFaultHandler {
            _uffd: uffd,
            socket,
            path: path.to_string(),
            sent: Instant::now(),
        })
    }

    /// The handler's socket, as the load named it.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Waits until the handler has read the handshake, and fails if it hung up without
    /// reading it (the kernel then marks kiln's end ECONNRESET); a handler that read it may
    /// close the connection. A handler still not reading [`HANDSHAKE_WAIT`] after the send
    /// is trusted to read it later, as Firecracker trusts every handler. Called as late as
    /// possible before the vCPUs start, so a prompt handler costs no wait at all.
    pub fn check(&self) -> Result<(), UffdError> {
        loop {
            // Bytes of the handshake the handler has not read: the skb is freed when it is
            // read, or dropped (after kiln's end is marked ECONNRESET) when the handler
            // closes without reading it.
            let mut unread: libc::c_int = 0;
            // vmm-sys-util takes the request as an unsigned long; libc declares TIOCOUTQ an
            // int on musl.
            #[allow(clippy::unnecessary_cast)]
            let request = libc::TIOCOUTQ as libc::c_ulong;
            // SAFETY: SIOCOUTQ (TIOCOUTQ) writes one int, which lives across the call, for
            // a socket this struct owns.
            if unsafe { ioctl_with_mut_ref(&self.socket, request, &mut unread) } < 0 {
                return Err(UffdError::Send(io::Error::last_os_error()));
            }
            match getsockopt(&self.socket, sockopt::SocketError) {
                Ok(0) => {}
                Ok(e) if e == libc::ECONNRESET => return Err(UffdError::Refused),
                Ok(e) => return Err(UffdError::Send(io::Error::from_raw_os_error(e))),
                Err(e) => return Err(UffdError::Send(e.into())),
            }
            if unread == 0 {
                return Ok(());
            }
            if self.sent.elapsed() >= HANDSHAKE_WAIT {
                log::warn!(
                    "mem_backend.backend_path {}: the page-fault handler has not read the \
                     handshake after {HANDSHAKE_WAIT:?}; going on (guest memory waits for it)",
                    self.path
                );
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::memory::layout;
    use crate::vstate::memory::{create_guest_memory, resident_bytes};

    #[test]
    fn ioctl_numbers_are_the_kernels() {
        // The values of include/uapi/linux/userfaultfd.h's macros on x86_64.
        assert_eq!(USERFAULTFD_IOC_NEW(), 0xaa00);
        assert_eq!(UFFDIO_API(), 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER(), 0xc020_aa00);
    }

    #[test]
    fn the_handshake_is_firecrackers_json() {
        let m = GuestRegionUffdMapping {
            base_host_virt_addr: 0x7f00_0000_0000,
            size: 0x800_0000,
            offset: 0,
            page_size: 4096,
            page_size_kib: 4096,
        };
        assert_eq!(
            serde_json::to_string(&[m]).unwrap(),
            r#"[{"base_host_virt_addr":139637976727552,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#
        );
    }

    #[test]
    fn memory_is_laid_out_as_the_snapshot_says_and_left_untouched() {
        // 3 GiB + 64 MiB: two regions, the second at 4 GiB, its contents right after the
        // first's in the file.
        let regions = layout(&create_guest_memory(3072 + 64).unwrap());
        let mem = anonymous_memory(&regions).unwrap();
        assert_eq!(layout(&mem), regions);
        assert_eq!(resident_bytes(&mem), 0, "kiln touched guest memory");
        let maps = mappings(&mem, &regions);
        assert_eq!(maps.len(), 2);
        assert_eq!(maps[1].offset, 3 << 30);
        assert_eq!(maps[1].size, 64 << 20);
        for (m, r) in maps.iter().zip(mem.iter()) {
            assert_eq!(
                m.base_host_virt_addr,
                r.get_host_address(MemoryRegionAddress(0)).unwrap() as u64
            );
        }
    }

    /// 4 MiB of guest memory laid out as a snapshot's, and a memory file for it holding a
    /// pattern in two pages (the rest holes).
    fn guest_and_file(dir: &testkit::TempDir) -> (Vec<RegionInfo>, std::path::PathBuf) {
        let regions = layout(&create_guest_memory(4).unwrap());
        let mut bytes = vec![0u8; 4 << 20];
        bytes[0x1000..0x1008].copy_from_slice(&0x1122_3344_5566_7788_u64.to_le_bytes());
        bytes[0x3f_f000] = 0x5a;
        (regions, dir.file("vm.mem", &bytes))
    }

    #[test]
    fn a_handler_is_handed_the_memory_and_serves_what_kiln_reads() {
        use vm_memory::Bytes;
        let dir = testkit::TempDir::new("uffd-unit");
        let (regions, mem_file) = guest_and_file(&dir);
        let sock = dir.path().join("uffd.sock");
        let server =
            testkit::uffd::PageServer::start(&sock, &mem_file, testkit::uffd::Mode::Serve).unwrap();
        let mem = anonymous_memory(&regions).unwrap();
        let uffd = register(&mem).unwrap();
        let handler =
            PageFaultHandler::connect(sock.to_str().unwrap(), uffd, &mappings(&mem, &regions))
                .unwrap();
        // kiln's own reads (as a device's) wait for the handler, which serves them.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(0x1000)).unwrap(),
            0x1122_3344_5566_7788
        );
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x3f_f000)).unwrap(), 0x5a);
        assert_eq!(mem.read_obj::<u64>(GuestAddress(0x2000)).unwrap(), 0);
        handler.check().unwrap();
        drop(handler);
        let report = server.finish().unwrap();
        assert_eq!((report.copied, report.zeroed), (2, 1), "{report:?}");
        assert_eq!(report.mappings.len(), 1);
        assert_eq!(report.mappings[0].size, 4 << 20);
    }

    #[test]
    fn a_handler_that_closes_without_reading_the_handshake_is_a_refusal() {
        let dir = testkit::TempDir::new("uffd-unit-close");
        let (regions, mem_file) = guest_and_file(&dir);
        let sock = dir.path().join("uffd.sock");
        let server =
            testkit::uffd::PageServer::start(&sock, &mem_file, testkit::uffd::Mode::CloseUnread)
                .unwrap();
        let mem = anonymous_memory(&regions).unwrap();
        let uffd = register(&mem).unwrap();
        let handler =
            PageFaultHandler::connect(sock.to_str().unwrap(), uffd, &mappings(&mem, &regions))
                .unwrap();
        server.finish().unwrap();
        let err = handler.check().unwrap_err();
        assert!(matches!(err, UffdError::Refused), "{err}");
    }

    #[test]
    fn a_handler_slow_to_read_is_waited_for_then_trusted() {
        let dir = testkit::TempDir::new("uffd-unit-slow");
        let (regions, _) = guest_and_file(&dir);
        let sock = dir.path().join("uffd.sock");
        // Listening, never accepting: the handshake waits in the socket, unread.
        let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        let mem = anonymous_memory(&regions).unwrap();
        let uffd = register(&mem).unwrap();
        let handler =
            PageFaultHandler::connect(sock.to_str().unwrap(), uffd, &mappings(&mem, &regions))
                .unwrap();
        let t = Instant::now();
        handler.check().unwrap();
        assert!(t.elapsed() >= HANDSHAKE_WAIT - Duration::from_millis(50));
        assert!(t.elapsed() < HANDSHAKE_WAIT * 2, "{:?}", t.elapsed());
    }

    #[test]
    fn registered_memory_waits_for_the_handler_and_a_missing_socket_is_named() {
        let regions = layout(&create_guest_memory(4).unwrap());
        let mem = anonymous_memory(&regions).unwrap();
        let uffd = register(&mem).unwrap();
        assert_eq!(resident_bytes(&mem), 0);
        let err = PageFaultHandler::connect("/nonexistent/kiln-uffd.sock", uffd, &[]).unwrap_err();
        assert!(matches!(err, UffdError::Connect(_)), "{err}");
    }
}
