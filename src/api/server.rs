//! The API thread: the Unix socket, its connections, and the hand-off of each request to the
//! VMM thread.
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
//! - at most [`MAX_CONNECTIONS`] connections are open; one more is answered `503` and closed;
//! - a complete request is routed ([`route`]); a routing error is answered at once, an
//!   action goes to the VMM thread over a channel, the bridge's eventfd is written, and the
//!   thread waits for the VMM's answer. Requests on a connection are answered in order;
//! - a fault in the byte stream (malformed HTTP, a chunked body, a body over the limit) is
//!   answered and closes its connection; EOF or an error closes just that connection;
//! - once the VMM side is gone (the [`ApiBridge`] dropped), requests get `503`, the listener
//!   is closed, and the thread ends when its last connection closes.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::JoinHandle;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, send};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::http::{Event, Request, RequestParser, Response};
use super::routes::{RouteError, abs_path, route};
use super::{VmmAction, VmmResponse};
use crate::devices::Counter;
use crate::seccomp::{SeccompFilters, ThreadCategory};

/// Most connections open at once (as Firecracker).
pub const MAX_CONNECTIONS: usize = 10;
/// Queued response bytes above which a connection is not read until it drains.
pub const OUTPUT_HIGH_WATER: usize = 64 * 1024;
/// Bytes read from a connection per readiness event.
const READ_CHUNK: usize = 16 * 1024;
/// The listener's epoll token; connections count up from 0.
const LISTENER: u64 = u64::MAX;
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

/// The VMM thread's end of the API: actions in, responses out.
#[derive(Debug)]
pub struct ApiBridge {
    actions: Receiver<VmmAction>,
    responses: Sender<VmmResponse>,
    eventfd: EventFd,
}

impl ApiBridge {
    /// Readable when an action may be waiting (for the VMM's event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// The waiting action, if any, without blocking. The eventfd is left alone: whoever
    /// watches it (the event loop) clears it before looking, so an action sent after the
    /// look writes it again and is not missed.
    pub fn try_recv(&self) -> Option<VmmAction> {
        self.actions.try_recv().ok()
    }

    /// Waits for the next action; `None` once the API thread is gone. (Before boot nothing
    /// watches the eventfd; its count is cleared by the first wake-up after boot.)
    pub fn recv(&self) -> Option<VmmAction> {
        self.actions.recv().ok()
    }

    /// Answers the action last received.
    pub fn respond(&self, response: VmmResponse) {
        // If the API thread is gone nobody waits for the answer.
        let _ = self.responses.send(response);
    }
}

/// The API thread's end of the bridge.
#[derive(Debug)]
struct VmmLink {
    actions: Sender<VmmAction>,
    responses: Receiver<VmmResponse>,
    eventfd: EventFd,
}

impl VmmLink {
    /// Hands `action` to the VMM and waits for its answer; `None` if the VMM side is gone.
    fn call(&self, action: VmmAction) -> Option<VmmResponse> {
        self.actions.send(action).ok()?;
        if let Err(e) = self.eventfd.write(1) {
            log::warn!("API: cannot signal the VMM thread: {e}");
        }
        self.responses.recv().ok()
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
    let (action_tx, action_rx) = mpsc::channel();
    let (response_tx, response_rx) = mpsc::channel();
    let server = ApiServer {
        epoll,
        listener: Some(listener),
        listener_paused: false,
        conns: HashMap::new(),
        next_token: 0,
        vmm: VmmLink {
            actions: action_tx,
            responses: response_rx,
            eventfd: api_eventfd,
        },
        vmm_gone: false,
        max_payload,
        metrics,
    };
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
    let bridge = ApiBridge {
        actions: action_rx,
        responses: response_tx,
        eventfd,
    };
    Ok((bridge, handle))
}

/// Raw HTTP bytes → parse → route, without a socket or a VMM: one entry per request (or
/// per fault, which ends the stream), as the API thread would see them. For fuzzing.
pub fn handle_bytes(input: &[u8], max_payload: usize) -> Vec<Result<VmmAction, RouteError>> {
    let mut out = Vec::new();
    for event in RequestParser::new(max_payload).feed(input) {
        match event {
            Event::Continue => {}
            Event::Fault { status, message } => out.push(Err((status, message))),
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

/// One client connection.
#[derive(Debug)]
struct Connection {
    stream: UnixStream,
    parser: RequestParser,
    /// Response bytes not yet taken by the socket.
    out: Vec<u8>,
    /// No more requests are read; the connection closes once `out` is sent.
    closing: bool,
    /// The events it is registered for.
    interest: EventSet,
}

/// The API thread's state.
#[derive(Debug)]
struct ApiServer {
    epoll: Epoll,
    listener: Option<UnixListener>,
    /// The listener is out of the epoll set after an accept error (e.g. no fds left).
    listener_paused: bool,
    conns: HashMap<u64, Connection>,
    next_token: u64,
    vmm: VmmLink,
    vmm_gone: bool,
    max_payload: usize,
    metrics: Arc<ApiMetrics>,
}

fn would_block(e: Errno) -> bool {
    e == Errno::EAGAIN || e == Errno::EINTR
}

impl ApiServer {
    fn run(mut self) {
        let mut events = vec![EpollEvent::default(); MAX_CONNECTIONS + 1];
        let mut chunk = vec![0u8; READ_CHUNK];
        log::debug!("API server listening");
        while !(self.vmm_gone && self.conns.is_empty()) {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::error!("API server: epoll_wait failed: {e}; the API server stops");
                    return;
                }
            };
            for event in &events[..n] {
                let set = EventSet::from_bits_truncate(event.events());
                match event.data() {
                    LISTENER => self.accept_all(),
                    token => self.serve(token, set, &mut chunk),
                }
            }
        }
        log::debug!("API server stopped");
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let stream = match listener.accept() {
                Ok((stream, _)) => stream,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted | io::ErrorKind::ConnectionAborted
                    ) =>
                {
                    continue;
                }
                Err(e) => {
                    log::warn!("API socket: accept failed: {e}; waiting for a connection to close");
                    self.pause_listener();
                    return;
                }
            };
            if self.conns.len() >= MAX_CONNECTIONS {
                self.metrics.connections_refused.inc();
                let response = Response::fault(503, ERR_TOO_MANY_CONNECTIONS).closing();
                self.metrics.count_status(response.status);
                // Best effort: the connection is dropped (closed) either way.
                let _ = send(
                    stream.as_raw_fd(),
                    &response.to_bytes(),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                );
                continue;
            }
            let token = self.next_token;
            self.next_token += 1;
            if let Err(e) = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN, token),
            ) {
                log::warn!("API socket: cannot watch a new connection: {e}");
                continue;
            }
            self.metrics.connections_accepted.inc();
            self.conns.insert(
                token,
                Connection {
                    stream,
                    parser: RequestParser::new(self.max_payload),
                    out: Vec::new(),
                    closing: false,
                    interest: EventSet::IN,
                },
            );
        }
    }

    fn pause_listener(&mut self) {
        if let Some(listener) = &self.listener {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                listener.as_raw_fd(),
                EpollEvent::default(),
            );
            self.listener_paused = true;
        }
    }

    fn resume_listener(&mut self) {
        if let (Some(listener), true) = (&self.listener, self.listener_paused) {
            self.listener_paused = self
                .epoll
                .ctl(
                    ControlOperation::Add,
                    listener.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, LISTENER),
                )
                .is_err();
        }
    }

    /// Readiness on connection `token`: read one chunk and answer what it completes, write
    /// what is queued, then close or re-register as needed.
    fn serve(&mut self, token: u64, set: EventSet, chunk: &mut [u8]) {
        let Some(mut conn) = self.conns.remove(&token) else {
            return;
        };
        let readable = set.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR);
        if readable && !conn.closing && conn.out.len() < OUTPUT_HIGH_WATER {
            match recv(conn.stream.as_raw_fd(), chunk, MsgFlags::MSG_DONTWAIT) {
                // The client closed its side: send what is owed, then close.
                Ok(0) => conn.closing = true,
                Ok(n) => {
                    for event in conn.parser.feed(&chunk[..n]) {
                        if conn.closing {
                            break;
                        }
                        self.handle_event(&mut conn, event);
                    }
                }
                Err(e) if would_block(e) => {}
                Err(_) => return self.close(conn),
            }
        }
        if flush(&mut conn).is_err() || (conn.closing && conn.out.is_empty()) {
            return self.close(conn);
        }
        let interest = if conn.closing || conn.out.len() >= OUTPUT_HIGH_WATER {
            EventSet::OUT
        } else if conn.out.is_empty() {
            EventSet::IN
        } else {
            EventSet::IN | EventSet::OUT
        };
        if interest != conn.interest {
            let event = EpollEvent::new(interest, token);
            if let Err(e) = self
                .epoll
                .ctl(ControlOperation::Modify, conn.stream.as_raw_fd(), event)
            {
                log::warn!("API socket: cannot re-register a connection: {e}");
                return self.close(conn);
            }
            conn.interest = interest;
        }
        self.conns.insert(token, conn);
    }

    fn close(&mut self, conn: Connection) {
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        drop(conn);
        self.metrics.connections_closed.inc();
        self.resume_listener();
    }

    fn handle_event(&mut self, conn: &mut Connection, event: Event) {
        let response = match event {
            Event::Continue => Response::continue_100(),
            Event::Fault { status, message } => {
                if status == 413 {
                    self.metrics.payload_too_large.inc();
                } else {
                    self.metrics.bad_http.inc();
                }
                log::warn!("API: refused a request: {message}");
                Response::fault(status, &message).closing()
            }
            Event::Request(request) => {
                let response = self.answer(&request);
                if request.keep_alive && !self.vmm_gone {
                    response
                } else {
                    response.closing()
                }
            }
        };
        conn.closing |= response.close;
        self.metrics.count_status(response.status);
        response.write_to(&mut conn.out);
    }

    fn answer(&mut self, request: &Request) -> Response {
        self.metrics.requests.inc();
        self.metrics.count_path(&request.path);
        log::debug!("API request: {} {}", request.method, request.path);
        let action = match route(&request.method, &request.path, &request.body) {
            Ok(action) => action,
            Err((status, message)) => {
                log::info!(
                    "API: {} {}: {status} {message}",
                    request.method,
                    request.path
                );
                return Response::fault(status, &message);
            }
        };
        if self.vmm_gone {
            return Response::fault(503, ERR_VMM_GONE);
        }
        match self.vmm.call(action) {
            Some(VmmResponse::NoContent) => Response::no_content(),
            Some(VmmResponse::Json(body)) => Response::json(body),
            Some(VmmResponse::Error(status, message)) => Response::fault(status, &message),
            None => {
                self.stop_accepting();
                Response::fault(503, ERR_VMM_GONE)
            }
        }
    }

    /// The VMM side is gone: close the listener; connections close after their next answer.
    fn stop_accepting(&mut self) {
        log::warn!("API: the VMM thread is gone; closing the API socket");
        self.vmm_gone = true;
        if let Some(listener) = self.listener.take() {
            let _ = self.epoll.ctl(
                ControlOperation::Delete,
                listener.as_raw_fd(),
                EpollEvent::default(),
            );
        }
    }
}

/// Writes as much of the queued output as the socket takes.
fn flush(conn: &mut Connection) -> Result<(), Errno> {
    let mut sent = 0;
    while sent < conn.out.len() {
        match send(
            conn.stream.as_raw_fd(),
            &conn.out[sent..],
            MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
        ) {
            Ok(0) => break,
            Ok(n) => sent += n,
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e),
        }
    }
    conn.out.drain(..sent);
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::io::{Read, Write};
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use super::*;
    use crate::api::http::DEFAULT_MAX_PAYLOAD;
    use crate::api::{ERR_BEFORE_BOOT, VmmResponse};
    use crate::config::MetricsConfig;

    /// The environment variable that makes `seccomp_child` run (in a child process).
    const SECCOMP_CHILD: &str = "KILN_API_SECCOMP_CHILD";

    fn sock_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("kiln-api-{}-{name}.sock", std::process::id()))
    }

    /// The fake VMM's answers; `PUT /metrics` with path "quit" makes it drop the bridge.
    fn answer(action: &VmmAction) -> Option<VmmResponse> {
        Some(match action {
            VmmAction::GetInstanceInfo => VmmResponse::Json(
                r#"{"id":"test","state":"Not started","vmm_version":"0.1.0","app_name":"kiln"}"#
                    .into(),
            ),
            VmmAction::GetVersion => VmmResponse::Json(r#"{"firecracker_version":"0.1.0"}"#.into()),
            VmmAction::GetMachineConfig => {
                VmmResponse::Json(r#"{"vcpu_count":1,"mem_size_mib":128}"#.into())
            }
            VmmAction::SendCtrlAltDel => VmmResponse::bad_request(ERR_BEFORE_BOOT),
            VmmAction::PutMetrics(MetricsConfig { metrics_path }) if metrics_path == "quit" => {
                return None;
            }
            _ => VmmResponse::NoContent,
        })
    }

    struct TestServer {
        path: PathBuf,
        metrics: Arc<ApiMetrics>,
        seen: Arc<Mutex<Vec<VmmAction>>>,
        api: Option<JoinHandle<()>>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.path);
        }
    }

    /// Starts the API thread on a fresh socket with a fake VMM thread answering through
    /// `recv` (or, with `event_loop`, through the eventfd and `try_recv`).
    fn start(
        name: &str,
        filters: SeccompFilters,
        max_payload: usize,
        event_loop: bool,
    ) -> TestServer {
        let path = sock_path(name);
        let _ = std::fs::remove_file(&path);
        let metrics = Arc::new(ApiMetrics::default());
        let (bridge, api) =
            start_api_server(&path, max_payload, Arc::new(filters), metrics.clone()).unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            let next = |bridge: &ApiBridge| -> Option<VmmAction> {
                if !event_loop {
                    return bridge.recv();
                }
                let epoll = Epoll::new().unwrap();
                let fd = bridge.eventfd().as_raw_fd();
                epoll
                    .ctl(ControlOperation::Add, fd, EpollEvent::new(EventSet::IN, 0))
                    .unwrap();
                let mut events = [EpollEvent::default(); 1];
                loop {
                    if let Some(action) = bridge.try_recv() {
                        return Some(action);
                    }
                    epoll.wait(1000, &mut events).unwrap();
                    // As the VMM's event loop does: clear, then look again.
                    let _ = bridge.eventfd().read();
                }
            };
            while let Some(action) = next(&bridge) {
                log.lock().unwrap().push(action.clone());
                match answer(&action) {
                    Some(response) => bridge.respond(response),
                    None => return,
                }
            }
        });
        TestServer {
            path,
            metrics,
            seen,
            api: Some(api),
        }
    }

    fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
        let start = Instant::now();
        while !cond() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "timed out: {what}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    #[derive(Debug)]
    struct Reply {
        status: u16,
        headers: Vec<(String, String)>,
        body: String,
    }

    impl Reply {
        fn header(&self, name: &str) -> Option<&str> {
            self.headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.as_str())
        }

        fn fault(&self) -> String {
            let v: serde_json::Value = serde_json::from_str(&self.body).unwrap();
            assert_eq!(v.as_object().map(|o| o.len()), Some(1), "{}", self.body);
            v["fault_message"].as_str().unwrap().to_string()
        }
    }

    struct Client {
        stream: UnixStream,
        buf: Vec<u8>,
    }

    impl Client {
        fn connect(path: &Path) -> Client {
            let stream = UnixStream::connect(path).unwrap();
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .unwrap();
            Client {
                stream,
                buf: Vec::new(),
            }
        }

        fn send(&mut self, bytes: &[u8]) {
            self.stream.write_all(bytes).unwrap();
        }

        fn send_request(&mut self, method: &str, path: &str, body: Option<&str>) {
            let mut req = format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n");
            if let Some(body) = body {
                req.push_str(&format!(
                    "Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                ));
            } else {
                req.push_str("\r\n");
            }
            self.send(req.as_bytes());
        }

        fn request(&mut self, method: &str, path: &str, body: Option<&str>) -> Reply {
            self.send_request(method, path, body);
            self.reply().expect("a response")
        }

        /// The next response, or `None` at EOF.
        fn reply(&mut self) -> Option<Reply> {
            loop {
                let mut headers = [httparse::EMPTY_HEADER; 16];
                let mut resp = httparse::Response::new(&mut headers);
                if let httparse::Status::Complete(len) = resp.parse(&self.buf).unwrap() {
                    let status = resp.code.unwrap();
                    let headers: Vec<(String, String)> = resp
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_string(),
                                String::from_utf8(h.value.to_vec()).unwrap(),
                            )
                        })
                        .collect();
                    let body_len: usize = headers
                        .iter()
                        .find(|(n, _)| n == "Content-Length")
                        .map_or(0, |(_, v)| v.parse().unwrap());
                    if self.buf.len() >= len + body_len {
                        let body =
                            String::from_utf8(self.buf[len..len + body_len].to_vec()).unwrap();
                        self.buf.drain(..len + body_len);
                        return Some(Reply {
                            status,
                            headers,
                            body,
                        });
                    }
                }
                let mut chunk = [0u8; 4096];
                let n = self.stream.read(&mut chunk).unwrap_or(0);
                if n == 0 {
                    assert!(self.buf.is_empty(), "EOF inside a response");
                    return None;
                }
                self.buf.extend_from_slice(&chunk[..n]);
            }
        }

        /// Whether the server closed the connection (after any responses already read).
        fn at_eof(&mut self) -> bool {
            self.reply().is_none()
        }
    }

    // ---- checks, each run on a server with no connection open ----------------------------

    fn check_formats_and_codes(s: &TestServer) {
        let mut c = Client::connect(&s.path);
        let r = c.request("GET", "/", None);
        assert_eq!(r.status, 200);
        assert_eq!(r.header("Server"), Some("kiln"));
        assert_eq!(r.header("Content-Type"), Some("application/json"));
        let info: serde_json::Value = serde_json::from_str(&r.body).unwrap();
        assert_eq!(info["app_name"], "kiln");
        assert_eq!(r.header("Connection"), None);

        let r = c.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "FlushMetrics"}"#),
        );
        assert_eq!((r.status, r.body.as_str()), (204, ""));
        assert_eq!(r.header("Content-Length"), None);
        assert_eq!(r.header("Content-Type"), None);

        // An error the VMM reports keeps its code and message.
        let r = c.request(
            "PUT",
            "/actions",
            Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        );
        assert_eq!((r.status, r.fault()), (400, ERR_BEFORE_BOOT.to_string()));

        // Routing errors never reach the VMM.
        let before = s.seen.lock().unwrap().len();
        let r = c.request("GET", "/nope", None);
        assert_eq!(r.status, 400);
        assert_eq!(r.fault(), "Invalid request method and/or path: GET nope.");
        let r = c.request("PUT", "/boot-source", None);
        assert_eq!(
            (r.status, r.fault()),
            (400, "Empty PUT request.".to_string())
        );
        let r = c.request("DELETE", "/drives/rootfs", None);
        assert_eq!(r.status, 400);
        assert_eq!(s.seen.lock().unwrap().len(), before);

        // The connection stayed open through all of that (keep-alive).
        let r = c.request("GET", "/version", None);
        assert_eq!(r.status, 200);
        // Connection: close is honoured.
        c.send(b"GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n");
        let r = c.reply().unwrap();
        assert_eq!((r.status, r.header("Connection")), (200, Some("close")));
        assert!(c.at_eof());
    }

    fn check_pipelined_in_order(s: &TestServer) {
        let mut c = Client::connect(&s.path);
        let body = r#"{"action_type": "FlushMetrics"}"#;
        let mut batch = String::new();
        batch.push_str("GET /version HTTP/1.1\r\n\r\n");
        batch.push_str(&format!(
            "PUT /actions HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        ));
        batch.push_str("GET /nope HTTP/1.1\r\n\r\n");
        batch.push_str("GET /machine-config HTTP/1.1\r\n\r\n");
        c.send(batch.as_bytes());
        let statuses: Vec<(u16, String)> = (0..4)
            .map(|_| {
                let r = c.reply().unwrap();
                (r.status, r.body)
            })
            .collect();
        assert_eq!(statuses[0].0, 200);
        assert!(statuses[0].1.contains("firecracker_version"));
        assert_eq!(statuses[1], (204, String::new()));
        assert_eq!(statuses[2].0, 400);
        assert_eq!(statuses[3].0, 200);
        assert!(statuses[3].1.contains("mem_size_mib"));
        let seen = s.seen.lock().unwrap();
        assert_eq!(
            seen[seen.len() - 3..],
            [
                VmmAction::GetVersion,
                VmmAction::FlushMetrics,
                VmmAction::GetMachineConfig
            ]
        );
    }

    fn check_payload_limit(s: &TestServer) {
        let base = r#"{"kernel_image_path": "/k"}"#;
        let fits = format!("{base}{}", " ".repeat(DEFAULT_MAX_PAYLOAD - base.len()));
        let mut c = Client::connect(&s.path);
        let r = c.request("PUT", "/boot-source", Some(&fits));
        assert_eq!(r.status, 204);
        let too_big = format!("{fits} ");
        let before = s.metrics.payload_too_large.get();
        let r = c.request("PUT", "/boot-source", Some(&too_big));
        assert_eq!(r.status, 413);
        assert_eq!(
            r.fault(),
            "Request payload with size 51201 is larger than the limit of 51200 allowed by server."
        );
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(c.at_eof());
        assert_eq!(s.metrics.payload_too_large.get(), before + 1);

        // Refused from the header alone: no body needs to be sent.
        let mut c = Client::connect(&s.path);
        c.send(b"PUT /boot-source HTTP/1.1\r\nContent-Length: 1000000000\r\n\r\n");
        assert_eq!(c.reply().unwrap().status, 413);
        assert!(c.at_eof());
    }

    fn check_bad_bodies(s: &TestServer) {
        let mut c = Client::connect(&s.path);
        let r = c.request("PUT", "/boot-source", Some(r#"{"kernel_image_path": "/k""#));
        assert_eq!(r.status, 400);
        assert!(
            r.fault()
                .starts_with("An error occurred when deserializing the json body of a request: ")
        );
        let r = c.request(
            "PUT",
            "/boot-source",
            Some(r#"{"kernel_image_path": "/k", "color": "red"}"#),
        );
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("unknown field `color`"), "{}", r.fault());
        let r = c.request(
            "PUT",
            "/drives/rootfs",
            Some(r#"{"drive_id": "other", "path_on_host": "/d", "is_root_device": true}"#),
        );
        assert_eq!(
            (r.status, r.fault()),
            (
                400,
                "The id from the path does not match the id from the body!".to_string()
            )
        );
        let r = c.request(
            "PATCH",
            "/network-interfaces/eth0",
            Some(r#"{"iface_id": "eth1"}"#),
        );
        assert_eq!(r.status, 400);
        // All of those keep the connection.
        assert_eq!(c.request("GET", "/", None).status, 200);

        // A chunked body is refused and closes the connection.
        c.send(
            b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        );
        let r = c.reply().unwrap();
        assert_eq!(r.status, 400);
        assert!(r.fault().contains("Transfer-Encoding"), "{}", r.fault());
        assert!(c.at_eof());
        // So does a stream that is not HTTP.
        let mut c = Client::connect(&s.path);
        c.send(b"\x16\x03\x01 hello\r\n\r\n");
        assert_eq!(c.reply().unwrap().status, 400);
        assert!(c.at_eof());
    }

    fn check_expect_continue(s: &TestServer) {
        let mut c = Client::connect(&s.path);
        let body = r#"{"action_type": "FlushMetrics"}"#;
        c.send(
            format!(
                "PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .as_bytes(),
        );
        assert_eq!(c.reply().unwrap().status, 100);
        c.send(body.as_bytes());
        assert_eq!(c.reply().unwrap().status, 204);
    }

    fn check_stalled_client_does_not_block(s: &TestServer) {
        let mut stalled = Client::connect(&s.path);
        stalled.send(b"PUT /actions HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"act");
        let mut half_head = Client::connect(&s.path);
        half_head.send(b"GET /vers");
        let mut c = Client::connect(&s.path);
        assert_eq!(c.request("GET", "/", None).status, 200);
        // The stalled requests complete later.
        half_head.send(b"ion HTTP/1.1\r\n\r\n");
        assert_eq!(half_head.reply().unwrap().status, 200);
        stalled.send(format!("ion_type\": \"FlushMetrics\"}}{}", " ".repeat(70)).as_bytes());
        assert_eq!(stalled.reply().unwrap().status, 204);
    }

    fn check_slow_reader_does_not_block(s: &TestServer) {
        const N: usize = 5000;
        let mut reader = Client::connect(&s.path);
        let mut writer = reader.stream.try_clone().unwrap();
        // Far more responses than the socket buffers hold, and nobody reads them for now.
        let sender = std::thread::spawn(move || {
            let batch = "GET /version HTTP/1.1\r\n\r\n".repeat(N);
            writer.write_all(batch.as_bytes()).unwrap();
        });
        let base = s.metrics.requests.get();
        let mut other = Client::connect(&s.path);
        wait_until("the pipelining client is served", || {
            s.metrics.requests.get() > base + 200
        });
        for _ in 0..3 {
            assert_eq!(other.request("GET", "/machine-config", None).status, 200);
        }
        for i in 0..N {
            let r = reader.reply().unwrap_or_else(|| panic!("response {i}"));
            assert_eq!(r.status, 200);
        }
        sender.join().unwrap();
    }

    fn check_client_gone_early(s: &TestServer) {
        // Requests whose answers nobody reads: the writes fail, only that connection closes.
        let mut c = Client::connect(&s.path);
        c.send("GET /machine-config HTTP/1.1\r\n\r\n".repeat(50).as_bytes());
        drop(c);
        let mut c = Client::connect(&s.path);
        c.send(b"PUT /actions HTTP/1.1\r\nContent-Length: 10\r\n\r\n{");
        drop(c);
        let mut c = Client::connect(&s.path);
        assert_eq!(c.request("GET", "/", None).status, 200);
    }

    fn check_connection_limit(s: &TestServer) {
        let half = b"PUT /actions HTTP/1.1\r\nContent-Length: 40\r\n\r\n{";
        let mut stalled: Vec<Client> = (0..MAX_CONNECTIONS)
            .map(|_| {
                let mut c = Client::connect(&s.path);
                c.send(half);
                c
            })
            .collect();
        wait_until("10 connections accepted", || {
            s.metrics.open_connections() == MAX_CONNECTIONS as u64
        });
        let refused = s.metrics.connections_refused.get();
        let mut eleventh = Client::connect(&s.path);
        let r = eleventh.reply().unwrap();
        assert_eq!(r.status, 503);
        assert_eq!(r.fault(), ERR_TOO_MANY_CONNECTIONS);
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(eleventh.at_eof());
        assert_eq!(s.metrics.connections_refused.get(), refused + 1);
        // Once one closes, a new client is served.
        stalled.pop();
        wait_until("a connection closed", || {
            s.metrics.open_connections() < MAX_CONNECTIONS as u64
        });
        let mut c = Client::connect(&s.path);
        assert_eq!(c.request("GET", "/", None).status, 200);
        drop(c);
        drop(stalled);
    }

    fn check_all(s: &TestServer) {
        type Check = fn(&TestServer);
        let checks: [(&str, Check); 9] = [
            ("formats and codes", check_formats_and_codes),
            ("pipelining", check_pipelined_in_order),
            ("payload limit", check_payload_limit),
            ("bad bodies", check_bad_bodies),
            ("expect 100-continue", check_expect_continue),
            ("stalled client", check_stalled_client_does_not_block),
            ("slow reader", check_slow_reader_does_not_block),
            ("client gone early", check_client_gone_early),
            ("connection limit", check_connection_limit),
        ];
        for (name, check) in checks {
            wait_until(&format!("no connection open before {name}"), || {
                s.metrics.open_connections() == 0
            });
            check(s);
        }
    }

    /// Ends the fake VMM from a request: that request and later ones get 503, the socket
    /// stops accepting, and the API thread ends once its connections are closed.
    fn check_vmm_gone(s: &mut TestServer) {
        wait_until("no connection open", || s.metrics.open_connections() == 0);
        let mut idle = Client::connect(&s.path);
        let mut c = Client::connect(&s.path);
        let r = c.request("PUT", "/metrics", Some(r#"{"metrics_path": "quit"}"#));
        assert_eq!((r.status, r.fault()), (503, ERR_VMM_GONE.to_string()));
        assert_eq!(r.header("Connection"), Some("close"));
        assert!(c.at_eof());
        let r = idle.request("GET", "/", None);
        assert_eq!(r.status, 503);
        assert!(idle.at_eof());
        assert!(UnixStream::connect(&s.path).is_err());
        s.api.take().unwrap().join().unwrap();
    }

    // ---- tests ---------------------------------------------------------------------------

    #[test]
    fn serves_every_case_without_seccomp() {
        let mut s = start(
            "all",
            SeccompFilters::disabled(),
            DEFAULT_MAX_PAYLOAD,
            false,
        );
        check_all(&s);
        check_vmm_gone(&mut s);
    }

    #[test]
    fn vmm_event_loop_through_the_eventfd() {
        let s = start(
            "evloop",
            SeccompFilters::disabled(),
            DEFAULT_MAX_PAYLOAD,
            true,
        );
        check_formats_and_codes(&s);
        check_pipelined_in_order(&s);
    }

    #[test]
    fn configurable_payload_limit() {
        let s = start("limit", SeccompFilters::disabled(), 10, false);
        let mut c = Client::connect(&s.path);
        let r = c.request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
        assert_eq!(r.status, 413);
        assert_eq!(
            r.fault(),
            "Request payload with size 19 is larger than the limit of 10 allowed by server."
        );
        let mut c = Client::connect(&s.path);
        assert_eq!(c.request("PUT", "/metrics", Some("{}")).status, 400);
        assert_eq!(s.metrics.payload_too_large.get(), 1);
        assert_eq!(s.metrics.errors_4xx.get(), 2);
        let json = s.metrics.to_json();
        assert_eq!(json["payload_too_large"], 1);
        assert_eq!(json["metrics"], 1);
        assert_eq!(json["requests"], 1);
    }

    #[test]
    fn stale_socket_replaced_live_socket_refused() {
        // A socket file nobody accepts on.
        let path = sock_path("stale");
        let _ = std::fs::remove_file(&path);
        drop(UnixListener::bind(&path).unwrap());
        assert!(path.exists());
        let metrics = Arc::new(ApiMetrics::default());
        let filters = Arc::new(SeccompFilters::disabled());
        let (bridge, _api) =
            start_api_server(&path, DEFAULT_MAX_PAYLOAD, filters.clone(), metrics.clone()).unwrap();
        std::thread::spawn(move || {
            while let Some(a) = bridge.recv() {
                bridge.respond(answer(&a).unwrap_or(VmmResponse::NoContent));
            }
        });
        assert_eq!(Client::connect(&path).request("GET", "/", None).status, 200);

        // The same path again: a server is live there.
        let err = start_api_server(&path, DEFAULT_MAX_PAYLOAD, filters.clone(), metrics.clone())
            .unwrap_err();
        assert!(matches!(err, ApiError::InUse(_)), "{err}");
        // ...and it still serves.
        assert_eq!(Client::connect(&path).request("GET", "/", None).status, 200);
        std::fs::remove_file(&path).unwrap();

        // A regular file is never removed.
        let file = sock_path("file");
        std::fs::write(&file, b"data").unwrap();
        let err = start_api_server(&file, DEFAULT_MAX_PAYLOAD, filters.clone(), metrics.clone())
            .unwrap_err();
        assert!(matches!(err, ApiError::NotASocket(_)), "{err}");
        assert_eq!(std::fs::read(&file).unwrap(), b"data");
        std::fs::remove_file(&file).unwrap();

        // A directory that does not exist.
        let err = start_api_server(
            Path::new("/nonexistent-kiln-dir/api.sock"),
            DEFAULT_MAX_PAYLOAD,
            filters,
            metrics,
        )
        .unwrap_err();
        assert!(matches!(err, ApiError::Socket { .. }), "{err}");
        assert!(
            err.to_string()
                .starts_with("API socket /nonexistent-kiln-dir/api.sock: ")
        );
    }

    #[test]
    fn handle_bytes_without_a_socket() {
        let out = handle_bytes(
            b"GET / HTTP/1.1\r\n\r\nPUT /actions HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}\
              PATCH /vm HTTP/1.1\r\nContent-Length: 22\r\n\r\n{\"state\": \"Resumed\"}  \
              GET /version HTTP/1.1\r\nConnection: close\r\n\r\nGET / HTTP/1.1\r\n\r\n",
            DEFAULT_MAX_PAYLOAD,
        );
        assert_eq!(out.len(), 4);
        assert_eq!(out[0], Ok(VmmAction::GetInstanceInfo));
        assert!(matches!(out[1], Err((400, _))));
        assert_eq!(out[2], Ok(VmmAction::Resume));
        assert_eq!(out[3], Ok(VmmAction::GetVersion));
        let out = handle_bytes(b"PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 10);
        assert!(matches!(out[..], [Err((413, _))]));
        // Random edits of valid requests never panic.
        let corpus: &[u8] = b"PUT /drives/rootfs HTTP/1.1\r\nContent-Length: 68\r\n\r\n\
            {\"drive_id\": \"rootfs\", \"path_on_host\": \"/d\", \"is_root_device\": true}\
            GET /vm/config HTTP/1.1\r\n\r\n";
        assert_eq!(
            handle_bytes(corpus, DEFAULT_MAX_PAYLOAD)
                .iter()
                .filter(|r| r.is_ok())
                .count(),
            2
        );
        let mut seed = 0x1234_5678_u32;
        let mut random = move |below: usize| {
            seed = seed.wrapping_mul(1_103_515_245).wrapping_add(12345);
            (seed >> 8) as usize % below.max(1)
        };
        for _ in 0..5000 {
            let mut bytes = corpus.to_vec();
            for _ in 0..=random(4) {
                let pos = random(bytes.len());
                let byte = b"{}\":, \r\n/0aZ\xff"[random(13)];
                match random(3) {
                    0 if pos < bytes.len() => bytes[pos] = byte,
                    1 => bytes.insert(pos, byte),
                    _ => bytes.truncate(pos),
                }
            }
            let _ = handle_bytes(&bytes, 80);
        }
    }

    /// Runs the whole scenario with the API thread under the built-in `api` filter, in a
    /// child process: a missing syscall ends that process with exit code 148.
    #[test]
    fn api_thread_under_the_real_seccomp_filter() {
        let exe = std::env::current_exe().unwrap();
        let out = std::process::Command::new(exe)
            .args([
                "--exact",
                "api::server::tests::seccomp_child",
                "--test-threads=1",
                "--nocapture",
            ])
            .env(SECCOMP_CHILD, "1")
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.success(),
            "child: {:?}\nstdout:\n{stdout}\nstderr:\n{stderr}",
            out.status
        );
        assert!(stdout.contains("1 passed"), "stdout:\n{stdout}");
        assert!(!stderr.contains("kiln: seccomp:"), "stderr:\n{stderr}");
    }

    /// The child's part of `api_thread_under_the_real_seccomp_filter` (passes at once when
    /// not run as that child).
    #[test]
    fn seccomp_child() {
        if std::env::var_os(SECCOMP_CHILD).is_none() {
            return;
        }
        crate::seccomp::install_panic_hook();
        crate::seccomp::install_sigsys_handler().unwrap();
        // Log lines from the API thread are written under its filter too.
        crate::logger::init(log::LevelFilter::Info, "seccomp-test");
        let mut s = start(
            "seccomp",
            SeccompFilters::builtin(),
            DEFAULT_MAX_PAYLOAD,
            false,
        );
        // The API thread runs with a filter (once it has installed it).
        wait_until("the API thread's filter", || {
            std::fs::read_dir("/proc/self/task")
                .unwrap()
                .flatten()
                .any(|task| {
                    let read = |f| std::fs::read_to_string(task.path().join(f)).unwrap_or_default();
                    read("comm").trim() == "kiln_api"
                        && read("status").lines().any(|l| l == "Seccomp:\t2")
                })
        });
        check_all(&s);
        check_vmm_gone(&mut s);
    }
}
