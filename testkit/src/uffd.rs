//! A page-fault handler for snapshot restores through userfaultfd (the `Uffd` memory
//! backend), written as a user of Firecracker's protocol writes one, from the kernel's
//! userfaultfd interface and Firecracker's documentation alone: it listens on a Unix socket,
//! takes one connection, reads the JSON array of region mappings and the userfaultfd that
//! comes with it (`SCM_RIGHTS`), and serves every missing-page fault of the VMM from the
//! snapshot's memory file — `UFFDIO_COPY` for a page with data, `UFFDIO_ZEROPAGE` for a
//! page of zeroes (the file's holes). It runs on a thread of the test, counts what it
//! served, and stops when the VMM closes the connection or the server is finished.
//!
//! ```ignore
//! let server = PageServer::start(&sock, &mem_file, Mode::Serve)?;
//! // PUT /snapshot/load {"mem_backend": {"backend_type": "Uffd", "backend_path": sock}, ...}
//! let report = server.finish()?;
//! assert!(report.copied > 0);
//! ```

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::error;

/// The page size the handler serves in.
const PAGE: usize = 4096;
/// How long the server waits for the VMM to connect.
const ACCEPT_TIMEOUT: Duration = Duration::from_secs(120);

// include/uapi/linux/userfaultfd.h (x86_64): _IOWR(0xAA, nr, size).
// `libc::Ioctl` is the request type of ioctl(2): unsigned long on glibc, int on musl.
#[allow(clippy::cast_lossless, clippy::unnecessary_cast)]
const UFFDIO_COPY: libc::Ioctl = 0xc028_aa03_u32 as libc::Ioctl;
#[allow(clippy::cast_lossless, clippy::unnecessary_cast)]
const UFFDIO_ZEROPAGE: libc::Ioctl = 0xc020_aa04_u32 as libc::Ioctl;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `sizeof(struct uffd_msg)`.
const UFFD_MSG_LEN: usize = 32;

/// The keys of one mapping in Firecracker 1.11+'s handshake, in its order.
pub const MAPPING_KEYS: [&str; 5] = [
    "base_host_virt_addr",
    "size",
    "offset",
    "page_size",
    "page_size_kib",
];

/// What the server does with the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Take the handshake and serve faults.
    Serve,
    /// Accept the connection and close it at once, reading nothing (a handler that refuses;
    /// the VMM may not have sent its handshake yet, or may have).
    CloseAtOnce,
    /// Accept the connection, wait until the handshake has arrived, and close the
    /// connection without reading it.
    CloseUnread,
}

/// One region as the handshake described it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mapping {
    /// Where the region is mapped in the VMM.
    pub base: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its contents start in the memory file.
    pub offset: u64,
    /// The page size (`page_size`).
    pub page_size: u64,
}

/// What a finished server saw and did.
#[derive(Debug, Clone, Default)]
pub struct Report {
    /// The handshake's JSON, as received.
    pub handshake: String,
    /// The regions it described.
    pub mappings: Vec<Mapping>,
    /// Pages filled with `UFFDIO_COPY`.
    pub copied: u64,
    /// Pages filled with `UFFDIO_ZEROPAGE`.
    pub zeroed: u64,
    /// Faults on addresses outside every region, or other events.
    pub unexpected: u64,
}

#[derive(Debug, Default)]
struct Counters {
    copied: AtomicU64,
    zeroed: AtomicU64,
}

/// A page-fault handler serving on a thread.
#[derive(Debug)]
pub struct PageServer {
    path: PathBuf,
    stop: Arc<AtomicBool>,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<io::Result<Report>>>,
}

impl PageServer {
    /// Listens at `socket` (replacing a stale file) and serves the VMM that connects from
    /// `mem_file`, on a thread. The socket exists when this returns.
    pub fn start(socket: &Path, mem_file: &Path, mode: Mode) -> io::Result<PageServer> {
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket)?;
        listener.set_nonblocking(true)?;
        let file = File::open(mem_file)?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = Arc::new(Counters::default());
        let thread = {
            let (stop, counters) = (stop.clone(), counters.clone());
            std::thread::Builder::new()
                .name("uffd-server".into())
                .spawn(move || serve(listener, file, mode, &stop, &counters))?
        };
        Ok(PageServer {
            path: socket.to_path_buf(),
            stop,
            counters,
            thread: Some(thread),
        })
    }

    /// Pages served so far (copied and zeroed).
    pub fn served(&self) -> u64 {
        self.counters.copied.load(Ordering::Relaxed) + self.counters.zeroed.load(Ordering::Relaxed)
    }

    /// Stops serving (if the VMM has not closed the connection yet) and reports.
    pub fn finish(mut self) -> io::Result<Report> {
        self.stop.store(true, Ordering::Relaxed);
        let thread = self
            .thread
            .take()
            .ok_or_else(|| error("already finished"))?;
        thread
            .join()
            .map_err(|_| error("the page-fault handler thread panicked"))?
    }
}

impl Drop for PageServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Waits up to `timeout` for `fd` to be readable (or hung up); false on timeout.
fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(timeout.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: one valid pollfd, for the duration of the call.
    let n = unsafe { libc::poll(&mut pfd, 1, ms) };
    match n {
        -1 => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            }
        }
        0 => Ok(false),
        _ => Ok(true),
    }
}

fn accept(listener: &UnixListener, stop: &AtomicBool) -> io::Result<UnixStream> {
    let deadline = Instant::now() + ACCEPT_TIMEOUT;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                stream.set_nonblocking(false)?;
                return Ok(stream);
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e),
        }
        if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
            return Err(error("no VMM connected to the page-fault handler"));
        }
        wait_readable(listener.as_raw_fd(), Duration::from_millis(50))?;
    }
}

/// Receives the handshake: its bytes and the one descriptor that came with them.
fn receive_handshake(stream: &UnixStream) -> io::Result<(String, OwnedFd)> {
    let mut data = vec![0u8; 64 * 1024];
    // Room for one control message with one int; u64s keep it aligned for cmsghdr.
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: data.as_mut_ptr().cast(),
        iov_len: data.len(),
    };
    // SAFETY: an all-zero msghdr is a valid empty one; the fields are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = size_of_val(&control) as _;
    // SAFETY: `msg` points at `iov` (into `data`) and `control`, all alive across the call.
    let n = unsafe { libc::recvmsg(stream.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    data.truncate(n as usize);
    let mut fd = None;
    // SAFETY: `msg` was filled by recvmsg; the CMSG macros walk its control buffer.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        // SAFETY: `cmsg` is a header inside the control buffer (CMSG_FIRSTHDR/NXTHDR).
        let hdr = unsafe { &*cmsg };
        if hdr.cmsg_level == libc::SOL_SOCKET && hdr.cmsg_type == libc::SCM_RIGHTS {
            // SAFETY: `cmsg` is a header inside the control buffer; its data follows it.
            let data = unsafe { libc::CMSG_DATA(cmsg) };
            // SAFETY: an SCM_RIGHTS payload holds ints; the first one is read unaligned.
            let raw = unsafe { std::ptr::read_unaligned(data.cast::<RawFd>()) };
            // SAFETY: the kernel installed this descriptor for us; nothing else owns it.
            fd = Some(unsafe { OwnedFd::from_raw_fd(raw) });
        }
        // SAFETY: as above.
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    let fd = fd.ok_or_else(|| error("the handshake carried no file descriptor"))?;
    let text = String::from_utf8(data).map_err(|_| error("the handshake is not UTF-8"))?;
    Ok((text, fd))
}

/// The mappings of a handshake, checked against Firecracker's field set.
pub fn parse_handshake(text: &str) -> io::Result<Vec<Mapping>> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| error(format!("handshake {text:?}: {e}")))?;
    let list = value
        .as_array()
        .ok_or_else(|| error(format!("handshake {text:?}: not an array")))?;
    let mut out = Vec::with_capacity(list.len());
    for m in list {
        let obj = m
            .as_object()
            .ok_or_else(|| error(format!("handshake {text:?}: not an object")))?;
        let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
        let mut want = MAPPING_KEYS.to_vec();
        want.sort_unstable();
        let mut got = keys.clone();
        got.sort_unstable();
        if got != want {
            return Err(error(format!(
                "handshake keys {keys:?}, want {MAPPING_KEYS:?}"
            )));
        }
        let num = |k: &str| {
            obj[k]
                .as_u64()
                .ok_or_else(|| error(format!("handshake {k}: not an unsigned integer")))
        };
        if num("page_size_kib")? != num("page_size")? {
            return Err(error("page_size_kib differs from page_size"));
        }
        out.push(Mapping {
            base: num("base_host_virt_addr")?,
            size: num("size")?,
            offset: num("offset")?,
            page_size: num("page_size")?,
        });
    }
    Ok(out)
}

/// What one fault asks: the page's address, and where its contents are in the file.
fn locate(mappings: &[Mapping], addr: u64) -> Option<(u64, u64)> {
    let page = addr & !(PAGE as u64 - 1);
    mappings
        .iter()
        .find(|m| page >= m.base && page - m.base < m.size)
        .map(|m| (page, m.offset + (page - m.base)))
}

/// Fills the page at `dst` in the VMM: a copy of `data`, or the zero page. Ok(false) when
/// it was already there (another fault on the same page got it first).
fn fill(uffd: &OwnedFd, dst: u64, data: &[u8; PAGE]) -> io::Result<bool> {
    loop {
        let ret = if data.iter().all(|b| *b == 0) {
            // struct uffdio_zeropage { uffdio_range range; u64 mode; s64 zeropage; }
            let mut z: [u64; 4] = [dst, PAGE as u64, 0, 0];
            // SAFETY: UFFDIO_ZEROPAGE reads and writes one uffdio_zeropage (`z`), alive
            // across the call.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_ZEROPAGE, z.as_mut_ptr()) }
        } else {
            // struct uffdio_copy { u64 dst; u64 src; u64 len; u64 mode; s64 copy; }
            let mut c: [u64; 5] = [dst, data.as_ptr() as u64, PAGE as u64, 0, 0];
            // SAFETY: UFFDIO_COPY reads and writes one uffdio_copy (`c`) and reads PAGE
            // bytes at `src` (`data`), all alive across the call.
            unsafe { libc::ioctl(uffd.as_raw_fd(), UFFDIO_COPY, c.as_mut_ptr()) }
        };
        if ret == 0 {
            return Ok(true);
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EEXIST) => return Ok(false),
            Some(libc::EAGAIN) => continue,
            _ => return Err(e),
        }
    }
}

fn serve(
    listener: UnixListener,
    file: File,
    mode: Mode,
    stop: &AtomicBool,
    counters: &Counters,
) -> io::Result<Report> {
    let stream = accept(&listener, stop)?;
    match mode {
        Mode::CloseAtOnce => return Ok(Report::default()),
        Mode::CloseUnread => {
            let deadline = Instant::now() + ACCEPT_TIMEOUT;
            while !wait_readable(stream.as_raw_fd(), Duration::from_millis(50))? {
                if stop.load(Ordering::Relaxed) || Instant::now() > deadline {
                    return Err(error("no handshake came"));
                }
            }
            return Ok(Report::default());
        }
        Mode::Serve => {}
    }
    let (handshake, uffd) = receive_handshake(&stream)?;
    let mappings = parse_handshake(&handshake)?;
    let mut report = Report {
        handshake,
        mappings: mappings.clone(),
        ..Report::default()
    };
    let mut page = [0u8; PAGE];
    let mut msg = [0u8; UFFD_MSG_LEN];
    loop {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // The VMM closing the connection is its end: stop serving.
        let mut pfds = [
            libc::pollfd {
                fd: uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stream.as_raw_fd(),
                events: libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        // SAFETY: two valid pollfds, for the duration of the call.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, 50) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if pfds[1].revents != 0 {
            break;
        }
        if pfds[0].revents & libc::POLLIN == 0 {
            continue;
        }
        // SAFETY: reads at most UFFD_MSG_LEN bytes into `msg`.
        let r = unsafe { libc::read(uffd.as_raw_fd(), msg.as_mut_ptr().cast(), UFFD_MSG_LEN) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r as usize != UFFD_MSG_LEN || msg[0] != UFFD_EVENT_PAGEFAULT {
            report.unexpected += 1;
            continue;
        }
        // struct uffd_msg: u8 event; ...; at 8: u64 flags; at 16: u64 address.
        let mut addr = [0u8; 8];
        addr.copy_from_slice(&msg[16..24]);
        let Some((dst, at)) = locate(&mappings, u64::from_le_bytes(addr)) else {
            report.unexpected += 1;
            continue;
        };
        page.fill(0);
        // A read past the file's end leaves the rest zero (a short file is the VMM's
        // concern, not the handler's).
        let mut done = 0;
        while done < PAGE {
            match file.read_at(&mut page[done..], at + done as u64)? {
                0 => break,
                n => done += n,
            }
        }
        let zero = page.iter().all(|b| *b == 0);
        match fill(&uffd, dst, &page) {
            Ok(true) if zero => counters.zeroed.fetch_add(1, Ordering::Relaxed),
            Ok(true) => counters.copied.fetch_add(1, Ordering::Relaxed),
            Ok(false) => 0,
            // The VMM's memory is gone (it exited): nothing left to serve.
            Err(e) if e.raw_os_error() == Some(libc::ESRCH) => break,
            Err(e) => return Err(e),
        };
    }
    report.copied = counters.copied.load(Ordering::Relaxed);
    report.zeroed = counters.zeroed.load(Ordering::Relaxed);
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshakes_are_read_with_firecrackers_fields_only() {
        let good = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
        assert_eq!(
            parse_handshake(good).unwrap(),
            vec![Mapping {
                base: 4096,
                size: 8192,
                offset: 0,
                page_size: 4096
            }]
        );
        let old = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        assert!(parse_handshake(old).is_err());
        assert!(parse_handshake("{}").is_err());
        assert_eq!(
            locate(&parse_handshake(good).unwrap(), 4096 + 5000),
            Some((8192, 4096))
        );
        assert_eq!(locate(&parse_handshake(good).unwrap(), 4096 * 3), None);
    }
}
