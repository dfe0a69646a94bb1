//! Live migration (a kiln extension; Firecracker has none): a running VM moves to a fresh
//! kiln on this or another host while its guest keeps running, apart from a short pause.
//!
//! - `protocol.rs`: the stream — versioned, length-prefixed messages, each bounds-checked
//!   and authenticated (a keyed MAC with `--snapshot-key-file`);
//! - `send.rs`: the source — pre-copy rounds driven by the dirty log on the migration
//!   thread, then stop-and-copy;
//! - `receive.rs`: the destination — memory filled by the stream, the VM built from the
//!   received state (a snapshot state) and resumed;
//! - `worker.rs`: the migration thread (its own seccomp category), started before the VMM
//!   thread jails itself;
//! - this file: the API's parameters, the endpoints, the errors and the outcome.
//!
//! Failure is never loss: until the destination says it runs the guest, the source can
//! resume it — a broken connection, a refusal or a bad message resumes it on the source.
//! Once the destination resumed, the source releases its TAPs and drives and exits 0.

pub mod protocol;
pub mod receive;
pub mod send;
pub mod worker;

use std::io;
use std::os::unix::net::UnixStream;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use crate::devices::registry::lock;
use crate::devices::virtio::block::Block;
use crate::devices::virtio::net::Net;
use crate::snapshot::{DriveOverride, NetworkOverride};
use protocol::{ProtocolError, Stream};

/// `PUT /migration/send`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendParams {
    /// `unix:PATH` or `tcp:HOST:PORT` (HOST an IP address).
    pub destination: String,
    /// The pause the guest may see, in milliseconds (default 300).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_downtime_ms: Option<u64>,
    /// Pre-copy rounds after the first before giving up (default 30).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u32>,
}

/// `PUT /migration/receive`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveParams {
    /// `unix:PATH` or `tcp:HOST:PORT` to listen on.
    pub listen: String,
    /// TAPs on this host (default: the same names).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// Backing files on this host (default: the same paths).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub drive_overrides: Vec<DriveOverride>,
}

/// The outcome of a migration the source reports (`PUT /migration/send`'s 200 body).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Memory rounds, the first full pass included (the last dirty pages are not a round).
    pub rounds: u32,
    /// Bytes written to the stream.
    pub bytes_sent: u64,
    /// From the pause to the destination's word that it resumed the guest.
    pub downtime_ms: u64,
    /// From the request to the end.
    pub total_ms: u64,
}

/// Progress of the migration under way (the `migration` metrics section).
#[derive(Debug, Default)]
pub struct MigrationMetrics {
    /// Rounds sent so far.
    pub rounds: AtomicU64,
    /// Bytes sent so far.
    pub bytes_sent: AtomicU64,
    /// Migrations that completed (source side).
    pub completed: AtomicU64,
    /// Migrations that failed with the guest resumed here.
    pub failed: AtomicU64,
}

impl MigrationMetrics {
    /// The metrics section.
    pub fn to_json(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering::Relaxed;
        serde_json::json!({
            "rounds": self.rounds.load(Relaxed),
            "bytes_sent": self.bytes_sent.load(Relaxed),
            "completed": self.completed.load(Relaxed),
            "failed": self.failed.load(Relaxed),
        })
    }
}

/// This process's migration counters.
pub static METRICS: MigrationMetrics = MigrationMetrics {
    rounds: AtomicU64::new(0),
    bytes_sent: AtomicU64::new(0),
    completed: AtomicU64::new(0),
    failed: AtomicU64::new(0),
};

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// An endpoint string is not `unix:PATH` or `tcp:IP:PORT`.
    #[error("{field}: `{value}` is not unix:PATH or tcp:IP:PORT")]
    Endpoint {
        /// The field.
        field: &'static str,
        /// Its value.
        value: String,
    },
    /// Connecting, listening or accepting failed.
    #[error("{what} {endpoint}: {source}")]
    Connect {
        /// What was done.
        what: &'static str,
        /// Where.
        endpoint: String,
        /// Why.
        source: io::Error,
    },
    /// The stream failed.
    #[error(transparent)]
    Protocol(#[from] ProtocolError),
    /// KVM's dirty log could not be used.
    #[error(transparent)]
    Vm(#[from] crate::vstate::vm::VmError),
    /// The guest dirties memory faster than the link carries it.
    #[error(
        "the migration did not converge: {dirty_pages} pages still dirty after {rounds} rounds (raise max_downtime_ms or max_rounds)"
    )]
    NotConverged {
        /// Rounds sent.
        rounds: u32,
        /// Pages dirty after the last.
        dirty_pages: usize,
    },
    /// The VM's state could not be saved.
    #[error("cannot save the VM's state: {0}")]
    Save(String),
    /// A TAP or drive could not be released.
    #[error("cannot release {0}")]
    Release(String),
    /// The destination refused the VM (it keeps running here).
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The connection broke after `Go` was sent: the destination may run the guest.
    #[error(
        "the connection broke after the destination was told to take the VM ({0}): it may be running the guest, so it stays paused here with its TAPs and drives released; resume it (PATCH /vm) only if the destination is not running it"
    )]
    InDoubt(String),
    /// A migration is already under way, or the migration thread is missing.
    #[error("{0}")]
    Busy(&'static str),
    /// The VMM thread went away.
    #[error("the VMM thread stopped")]
    VmmGone,
    /// Anything else.
    #[error("{0}")]
    Internal(String),
}

/// Where to connect or listen.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(std::path::PathBuf),
    /// An IP address and port.
    Tcp(std::net::SocketAddr),
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Endpoint::Unix(p) => write!(f, "unix:{}", p.display()),
            Endpoint::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

impl Endpoint {
    /// Parses `unix:PATH` or `tcp:IP:PORT`; `field` names the API field in errors.
    pub fn parse(value: &str, field: &'static str) -> Result<Endpoint, MigrationError> {
        let bad = || MigrationError::Endpoint {
            field,
            value: value.to_string(),
        };
        if let Some(path) = value.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            return Ok(Endpoint::Unix(path.into()));
        }
        if let Some(addr) = value.strip_prefix("tcp:") {
            return addr.parse().map(Endpoint::Tcp).map_err(|_| bad());
        }
        Err(bad())
    }

    /// Connects, with [`send::IO_TIMEOUT`] on every read and write.
    pub fn connect(&self) -> Result<Box<dyn Stream>, MigrationError> {
        let err = |source| MigrationError::Connect {
            what: "cannot connect to",
            endpoint: self.to_string(),
            source,
        };
        let t = Some(send::IO_TIMEOUT);
        Ok(match self {
            Endpoint::Unix(p) => {
                let s = UnixStream::connect(p).map_err(err)?;
                s.set_read_timeout(t).map_err(err)?;
                s.set_write_timeout(t).map_err(err)?;
                Box::new(s)
            }
            Endpoint::Tcp(a) => {
                let s = std::net::TcpStream::connect_timeout(a, send::IO_TIMEOUT).map_err(err)?;
                s.set_nodelay(true).map_err(err)?;
                s.set_read_timeout(t).map_err(err)?;
                s.set_write_timeout(t).map_err(err)?;
                Box::new(s)
            }
        })
    }
}

/// How long a failed migration keeps trying to take its TAPs and drives back.
const REACQUIRE_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

fn retry(
    deadline: std::time::Instant,
    mut f: impl FnMut() -> Result<(), String>,
) -> Result<(), String> {
    loop {
        match f() {
            Ok(()) => return Ok(()),
            Err(e) if std::time::Instant::now() >= deadline => return Err(e),
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(20)),
        }
    }
}

/// The TAPs and drives a destination takes over.
#[derive(Default)]
pub struct Backends {
    /// Network devices.
    pub nets: Vec<Arc<Mutex<Net>>>,
    /// Block devices.
    pub blocks: Vec<Arc<Mutex<Block>>>,
    released: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for Backends {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backends")
            .field("nets", &self.nets.len())
            .field("blocks", &self.blocks.len())
            .finish_non_exhaustive()
    }
}

impl Backends {
    /// The devices of `registry`.
    pub fn of(registry: &crate::devices::registry::DeviceRegistry) -> Self {
        use crate::devices::registry::Device;
        let mut b = Backends::default();
        for entry in registry.iter() {
            match &entry.device {
                Device::Block { device, .. } => b.blocks.push(device.clone()),
                Device::Net { device, .. } => b.nets.push(device.clone()),
                _ => {}
            }
        }
        b
    }

    /// Syncs and unlocks every drive and closes every TAP (the VM is paused).
    pub fn release(&self) -> Result<(), MigrationError> {
        use std::sync::atomic::Ordering::SeqCst;
        self.released.store(true, SeqCst);
        for b in &self.blocks {
            let d = lock(b.as_ref());
            d.disk().release().map_err(|e| {
                MigrationError::Release(format!("drive {}: {e}", d.config().drive_id))
            })?;
        }
        for n in &self.nets {
            let mut d = lock(n.as_ref());
            d.release_tap().map_err(|e| {
                MigrationError::Release(format!("TAP of {}: {e}", d.config().iface_id))
            })?;
        }
        Ok(())
    }

    /// Takes back what [`Backends::release`] let go (each failure is logged: the guest
    /// runs on here regardless, a TAP missing as after its deletion).
    pub fn reacquire(&self) {
        use std::sync::atomic::Ordering::SeqCst;
        if !self.released.swap(false, SeqCst) {
            return;
        }
        // A destination that refused after `Go` may still be closing what it opened: try
        // for a while.
        let deadline = std::time::Instant::now() + REACQUIRE_WAIT;
        for b in &self.blocks {
            let d = lock(b.as_ref());
            let r = retry(deadline, || d.disk().relock().map_err(|e| e.to_string()));
            if let Err(e) = r {
                log::error!(
                    "drive {}: cannot take its lock back: {e}",
                    d.config().drive_id
                );
            }
        }
        for n in &self.nets {
            let mut d = lock(n.as_ref());
            let r = retry(deadline, || d.reattach_tap().map_err(|e| e.to_string()));
            if let Err(e) = r {
                log::error!(
                    "interface {}: cannot take its TAP back: {e}",
                    d.config().iface_id
                );
            }
        }
    }
}
