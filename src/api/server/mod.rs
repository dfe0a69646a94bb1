//! The API thread: the Unix socket, its connections, and the hand-off of each request to the
//! VMM thread. This file starts the thread and holds its counters; `connection.rs` serves
//! the connections, `bridge.rs` is the channel to the VMM thread.
//!
//! [`start_api_server`] binds the socket on the calling thread (so a bad path is a start-up
//! error), then spawns `kiln_api`, which installs its seccomp filter first and then serves
//! the socket from an epoll set:
//! - the listener and every connection are non-blocking, and a connection's bytes go through
//!   its own [`RequestParser`], so a client that sends half a request and stalls holds only
//!   its own slot;
//! - responses are queued per connection and written when the socket takes them (EPOLLOUT);
//!   a connection stops being read while more than [`OUTPUT_HIGH_WATER`] bytes of responses
//!   wait, so a client that does not read cannot grow the queue or block the thread;
//! - at most [`MAX_CONNECTIONS`] connections are open; a new client beyond them takes the
//!   place of one quiet for [`EVICT_AFTER`] (an idle keep-alive connection before a
//!   stalled one), else it is answered `503` and closed;
//! - a connection that holds a partial request, or answers its client does not read,
//!   without progress for [`STALL_TIMEOUT`] is closed (a partial request is answered 408);
//! - a complete request is routed ([`route`]); a routing error is answered at once, an
//!   action goes to the VMM thread over a channel, the bridge's eventfd is written, and the
//!   thread waits for the VMM's answer. Requests on a connection are answered in order;
//! - a fault in the byte stream (malformed HTTP, a chunked body, a body over the limit) is
//!   answered and closes its connection; EOF or an error closes just that connection;
//! - once the VMM side is gone (the [`ApiBridge`] dropped), requests get `503`, the listener
//!   is closed, and the thread ends when its last connection closes.

mod bridge;
mod connection;

pub use bridge::ApiBridge;

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::VmmAction;
use super::http::{Event, RequestParser};
use super::routes::{RouteError, abs_path, route};
use crate::devices::Counter;
use crate::seccomp::{SeccompFilters, ThreadCategory};
use connection::ApiServer;

/// Most connections open at once (as Firecracker).
pub const MAX_CONNECTIONS: usize = 10;
/// Queued response bytes above which a connection is not read until it drains.
pub const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Bytes read from a connection per readiness event.
pub(crate) const READ_CHUNK: usize = 16 * 1024;
/// The listener's epoll token; connections count up from 0.
pub(crate) const LISTENER: u64 = u64::MAX;
/// How long a connection may hold a partial request, or answers its client does not read,
/// without any progress before it is closed (a partial request is answered 408).
pub const STALL_TIMEOUT: Duration = Duration::from_secs(10);
/// When all [`MAX_CONNECTIONS`] are open, a new client takes the place of a connection
/// quiet (no bytes either way) for at least this long — an idle keep-alive connection
/// before a stalled one; only if there is none is it refused 503.
pub const EVICT_AFTER: Duration = Duration::from_secs(2);
/// Firecracker's message to a connection over the limit.
pub const ERR_TOO_MANY_CONNECTIONS: &str = "Too many open connections";
/// The message once the VMM thread is gone.
pub const ERR_VMM_GONE: &str = "The VMM is not running: the API server is shutting down.";

/// Errors starting the API server.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// Another process accepts connections on the socket.
    #[error("API socket {}: another process is serving it", .0.display())]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("API socket {}: the path exists and is not a socket", .0.display())]
    NotASocket(PathBuf),
    /// Checking, removing or binding the socket failed.
    #[error("API socket {}: {source}", path.display())]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The epoll set or the eventfd could not be created.
    #[error("API server set-up: {0}")]
    Setup(#[source] io::Error),
    /// The thread could not be spawned.
    #[error("cannot start the API thread: {0}")]
    Spawn(#[source] io::Error),
}

/// The API server's counters; the VMM writes them into the metrics.
#[derive(Debug, Default)]
pub struct ApiMetrics {
    /// Complete requests received.
    pub requests: Counter,
    /// `GET /` and `GET /version`.
    pub instance_info: Counter,
    /// `/machine-config`.
    pub machine_config: Counter,
    /// `/boot-source`.
    pub boot_source: Counter,
    /// `/drives/...`.
    pub drives: Counter,
    /// `/network-interfaces/...`.
    pub network_interfaces: Counter,
    /// `/actions`.
    pub actions: Counter,
    /// `/vm` and `/vm/config`.
    pub vm: Counter,
    /// `/logger`.
    pub logger: Counter,
    /// `/metrics`.
    pub metrics: Counter,
    /// Any other path.
    pub other_paths: Counter,
    /// Responses with a 4xx status.
    pub errors_4xx: Counter,
    /// Responses with a 5xx status.
    pub errors_5xx: Counter,
    /// Byte streams that were not acceptable HTTP (answered 400 and closed).
    pub bad_http: Counter,
    /// Bodies over the payload limit (answered 413 and closed).
    pub payload_too_large: Counter,
    /// Connections accepted.
    pub connections_accepted: Counter,
    /// Connections refused because [`MAX_CONNECTIONS`] were open (answered 503).
    pub connections_refused: Counter,
    /// Accepted connections closed.
    pub connections_closed: Counter,
    /// Connections closed to make room for a new client (quiet for [`EVICT_AFTER`]).
    pub connections_evicted: Counter,
    /// Connections closed after [`STALL_TIMEOUT`] without progress.
    pub connections_timed_out: Counter,
}

impl ApiMetrics {
    /// The counters as a JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "requests": self.requests.get(),
            "instance_info": self.instance_info.get(),
            "machine_config": self.machine_config.get(),
            "boot_source": self.boot_source.get(),
            "drives": self.drives.get(),
            "network_interfaces": self.network_interfaces.get(),
            "actions": self.actions.get(),
            "vm": self.vm.get(),
            "logger": self.logger.get(),
            "metrics": self.metrics.get(),
            "other_paths": self.other_paths.get(),
            "errors_4xx": self.errors_4xx.get(),
            "errors_5xx": self.errors_5xx.get(),
            "bad_http": self.bad_http.get(),
            "payload_too_large": self.payload_too_large.get(),
            "connections_accepted": self.connections_accepted.get(),
            "connections_refused": self.connections_refused.get(),
            "connections_closed": self.connections_closed.get(),
            "connections_evicted": self.connections_evicted.get(),
            "connections_timed_out": self.connections_timed_out.get(),
        })
    }

    /// Connections open now.
    pub fn open_connections(&self) -> u64 {
        self.connections_accepted
            .get()
            .saturating_sub(self.connections_closed.get())
    }

    fn count_path(&self, target: &str) {
        let first = abs_path(target)
            .trim_start_matches('/')
            .split('/')
            .next()
            .unwrap_or("");
        match first {
            "" | "version" => &self.instance_info,
            "machine-config" => &self.machine_config,
            "boot-source" => &self.boot_source,
            "drives" => &self.drives,
            "network-interfaces" => &self.network_interfaces,
            "actions" => &self.actions,
            "vm" => &self.vm,
            "logger" => &self.logger,
            "metrics" => &self.metrics,
            _ => &self.other_paths,
        }
        .inc();
    }

    fn count_status(&self, status: u16) {
        match status {
            400..=499 => self.errors_4xx.inc(),
            500.. => self.errors_5xx.inc(),
            _ => {}
        }
    }
}
/// Binds the API socket at `path` (non-blocking), replacing a stale socket file.
fn bind(path: &Path) -> Result<UnixListener, ApiError> {
    let socket_error = |source| ApiError::Socket {
        path: path.to_path_buf(),
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => match UnixStream::connect(path) {
            Ok(_) => return Err(ApiError::InUse(path.to_path_buf())),
            // Nothing accepts on it: left over by a process that is gone.
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                std::fs::remove_file(path).map_err(socket_error)?;
            }
            Err(e) => return Err(socket_error(e)),
        },
        Ok(_) => return Err(ApiError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(socket_error(e)),
    }
    let listener = UnixListener::bind(path).map_err(socket_error)?;
    listener.set_nonblocking(true).map_err(socket_error)?;
    Ok(listener)
}

/// Binds the API socket at `path` and starts the API thread (`kiln_api`). Requests with a
/// body over `max_payload` bytes are refused with 413. The thread installs the `api` seccomp
/// filter of `seccomp` before it serves anything; if that fails it logs the error and ends,
/// which the VMM sees as a disconnected bridge.
pub fn start_api_server(
    path: &Path,
    max_payload: usize,
    seccomp: Arc<SeccompFilters>,
    metrics: Arc<ApiMetrics>,
) -> Result<(ApiBridge, JoinHandle<()>), ApiError> {
    start_with_timeouts(
        path,
        max_payload,
        seccomp,
        metrics,
        Timeouts {
            stall: STALL_TIMEOUT,
            evict_after: EVICT_AFTER,
        },
    )
}

/// How long connections may stall ([`STALL_TIMEOUT`], [`EVICT_AFTER`]; shorter in tests).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timeouts {
    pub(crate) stall: Duration,
    pub(crate) evict_after: Duration,
}

/// [`start_api_server`] with other timeouts.
pub(crate) fn start_with_timeouts(
    path: &Path,
    max_payload: usize,
    seccomp: Arc<SeccompFilters>,
    metrics: Arc<ApiMetrics>,
    timeouts: Timeouts,
) -> Result<(ApiBridge, JoinHandle<()>), ApiError> {
    let listener = bind(path)?;
    let cleanup = |e: ApiError| {
        let _ = std::fs::remove_file(path);
        e
    };
    let epoll = Epoll::new().map_err(ApiError::Setup).map_err(cleanup)?;
    epoll
        .ctl(
            ControlOperation::Add,
            listener.as_raw_fd(),
            EpollEvent::new(EventSet::IN, LISTENER),
        )
        .map_err(ApiError::Setup)
        .map_err(cleanup)?;
    let eventfd = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(ApiError::Setup)
        .map_err(cleanup)?;
    let api_eventfd = eventfd
        .try_clone()
        .map_err(ApiError::Setup)
        .map_err(cleanup)?;
    let (bridge, vmm) = bridge::pair(eventfd, api_eventfd);
    let server = ApiServer::new(epoll, listener, vmm, max_payload, metrics, timeouts);
    let handle = std::thread::Builder::new()
        .name("kiln_api".into())
        .spawn(move || {
            if let Err(e) = seccomp.install(ThreadCategory::Api) {
                log::error!("{e}; the API server stops");
                return;
            }
            server.run();
        })
        .map_err(ApiError::Spawn)
        .map_err(cleanup)?;
    Ok((bridge, handle))
}

/// Raw HTTP bytes → parse → route, without a socket or a VMM: one entry per request (or
/// per fault, which ends the stream), as the API thread would see them. For fuzzing.
pub fn handle_bytes(input: &[u8], max_payload: usize) -> Vec<Result<VmmAction, RouteError>> {
    let mut out = Vec::new();
    for event in RequestParser::new(max_payload).feed(input) {
        match event {
            Event::Continue => {}
            Event::Fault { status, message } => out.push(Err(RouteError::Http { status, message })),
            Event::Request(request) => {
                out.push(route(&request.method, &request.path, &request.body));
                if !request.keep_alive {
                    break;
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
