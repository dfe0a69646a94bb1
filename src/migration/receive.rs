//! The destination: listens once, fills fresh guest memory from the stream, and checks the
//! VM's state the way a snapshot load does (authenticated, bounds-checked, parsed, then
//! validated) before the caller builds and resumes the VM from it.

use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixListener;
use std::path::PathBuf;

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::protocol::{Channel, Hello, Kind, ProtocolError, apply_pages};
use super::{Endpoint, MigrationError};
use crate::snapshot::{Key, MicrovmState, memory::layout, parse_state};
use crate::vstate::memory::{GuestMemory, arch_memory_regions, create_guest_memory};

const MIB: u64 = 1 << 20;

/// A bound listener, waiting for the source.
#[derive(Debug)]
pub enum Listener {
    /// A Unix socket (its file is removed once the source connected).
    Unix(UnixListener, PathBuf),
    /// A TCP socket.
    Tcp(std::net::TcpListener),
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, path) = self {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What arrived: the VM's checked state, its memory, and the stream to answer on.
#[derive(Debug)]
pub struct Incoming {
    /// The VM's state.
    pub state: MicrovmState,
    /// Its memory.
    pub memory: GuestMemory,
    /// The stream.
    pub channel: Channel,
    /// Pages received.
    pub pages: u64,
}

/// Binds `listen` (`unix:PATH`, a stale socket file replaced; or `tcp:IP:PORT`).
pub fn listen(listen: &str) -> Result<Listener, MigrationError> {
    let endpoint = Endpoint::parse(listen, "listen")?;
    let err = |source| MigrationError::Connect {
        what: "cannot listen on",
        endpoint: endpoint.to_string(),
        source,
    };
    match &endpoint {
        Endpoint::Unix(path) => {
            if std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_socket()) {
                let _ = std::fs::remove_file(path);
            }
            let l = UnixListener::bind(path).map_err(err)?;
            Ok(Listener::Unix(l, path.clone()))
        }
        Endpoint::Tcp(addr) => Ok(Listener::Tcp(
            std::net::TcpListener::bind(addr).map_err(err)?,
        )),
    }
}

/// Waits for the source and receives the VM up to its state.
pub fn receive(listener: &Listener, key: Option<Key>) -> Result<Incoming, MigrationError> {
    let t = Some(super::send::IO_TIMEOUT);
    let stream: Box<dyn super::protocol::Stream> = match listener {
        Listener::Unix(l, path) => {
            let err = |source| MigrationError::Connect {
                what: "cannot accept on",
                endpoint: format!("unix:{}", path.display()),
                source,
            };
            let (s, _) = l.accept().map_err(err)?;
            s.set_read_timeout(t).map_err(err)?;
            s.set_write_timeout(t).map_err(err)?;
            Box::new(s)
        }
        Listener::Tcp(l) => {
            let err = |source| MigrationError::Connect {
                what: "cannot accept on",
                endpoint: "tcp".into(),
                source,
            };
            let (s, _) = l.accept().map_err(err)?;
            s.set_nodelay(true).map_err(err)?;
            s.set_read_timeout(t).map_err(err)?;
            s.set_write_timeout(t).map_err(err)?;
            Box::new(s)
        }
    };
    let mut channel = Channel::new(stream, key);
    match receive_on(&mut channel, key.as_ref()) {
        Ok((state, memory, pages)) => Ok(Incoming {
            state,
            memory,
            channel,
            pages,
        }),
        Err(e) => {
            channel.abort(&e.to_string());
            Err(e)
        }
    }
}

/// Reads `Hello`, the pages, and the state from `channel` (the receiving side the fuzz
/// target drives).
pub fn receive_on(
    channel: &mut Channel,
    key: Option<&Key>,
) -> Result<(MicrovmState, GuestMemory, u64), MigrationError> {
    let mut buf = Vec::new();
    let kind = channel.recv(&mut buf)?;
    if kind != Kind::Hello {
        return Err(ProtocolError::Unexpected {
            found: kind,
            wanted: "Hello",
        }
        .into());
    }
    let hello: Hello =
        serde_json::from_slice(&buf).map_err(|e| ProtocolError::Invalid(format!("Hello: {e}")))?;
    let memory = memory_for(&hello)?;
    let mut pages = 0u64;
    loop {
        match channel.recv(&mut buf)? {
            Kind::Pages => pages += apply_pages(&memory, &buf)? as u64,
            Kind::Sync => channel.send(Kind::Synced, &[])?,
            Kind::State => break,
            other => {
                return Err(ProtocolError::Unexpected {
                    found: other,
                    wanted: "Pages or State",
                }
                .into());
            }
        }
    }
    let state = parse_state(&buf, key, "migration stream")
        .map_err(|e| ProtocolError::Invalid(e.to_string()))?;
    if state.memory != layout(&memory) {
        return Err(ProtocolError::Invalid(
            "the state's memory layout is not the one announced".into(),
        )
        .into());
    }
    Ok((state, memory, pages))
}

/// This host's RAM in bytes (u64::MAX when unknown).
fn host_ram() -> u64 {
    // SAFETY: sysinfo(2) fills the struct it is given; an all-zero `sysinfo` is valid.
    let mut info: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable `sysinfo` for the duration of the call.
    if unsafe { libc::sysinfo(&mut info) } != 0 {
        return u64::MAX;
    }
    info.totalram.saturating_mul(u64::from(info.mem_unit))
}

/// Fresh memory for the layout the source announced (only a layout kiln itself makes).
fn memory_for(hello: &Hello) -> Result<GuestMemory, MigrationError> {
    let invalid = |m: String| MigrationError::Protocol(ProtocolError::Invalid(m));
    let total = hello
        .regions
        .iter()
        .try_fold(0u64, |acc, (_, len)| acc.checked_add(*len))
        .ok_or_else(|| invalid("memory size overflows".into()))?;
    if total == 0 || total % MIB != 0 {
        return Err(invalid(format!("memory of {total} bytes")));
    }
    // A guest larger than this host's RAM is refused before anything is reserved for it.
    let host = host_ram();
    if total > host {
        return Err(invalid(format!(
            "a guest of {} MiB does not fit this host's {} MiB of RAM",
            total / MIB,
            host / MIB
        )));
    }
    let expected: Vec<(u64, u64)> = arch_memory_regions(total)
        .iter()
        .map(|(a, l)| (a.0, *l))
        .collect();
    if expected != hello.regions {
        return Err(invalid("a memory layout kiln does not make".into()));
    }
    let memory = create_guest_memory(total / MIB).map_err(|e| invalid(e.to_string()))?;
    debug_assert_eq!(memory.num_regions(), hello.regions.len());
    debug_assert!(memory.iter().all(|r| r.len() > 0));
    Ok(memory)
}
