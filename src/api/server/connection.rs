//! The API thread's connections: accepting them, reading and parsing requests, handing
//! them to the VMM, and writing the responses back without ever blocking.

use std::collections::HashMap;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Instant;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, recv, send};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::bridge::VmmLink;
use super::{
    ApiMetrics, ERR_TOO_MANY_CONNECTIONS, ERR_VMM_GONE, LISTENER, MAX_CONNECTIONS,
    OUTPUT_HIGH_WATER, READ_CHUNK, Timeouts,
};
use crate::api::VmmResponse;
use crate::api::http::{Event, Request, RequestParser, Response};
use crate::api::routes::route;

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
    /// When bytes last moved either way (or it was accepted).
    last_progress: Instant,
}

impl Connection {
    /// Nothing pending either way: a keep-alive connection between requests.
    fn idle(&self) -> bool {
        self.parser.buffered() == 0 && self.out.is_empty() && !self.closing
    }
}

/// The API thread's state.
#[derive(Debug)]
pub(super) struct ApiServer {
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
    timeouts: Timeouts,
}

impl ApiServer {
    /// The server's state before it serves: `listener` is in `epoll` already.
    pub(super) fn new(
        epoll: Epoll,
        listener: UnixListener,
        vmm: VmmLink,
        max_payload: usize,
        metrics: Arc<ApiMetrics>,
        timeouts: Timeouts,
    ) -> ApiServer {
        ApiServer {
            epoll,
            listener: Some(listener),
            listener_paused: false,
            conns: HashMap::new(),
            next_token: 0,
            vmm,
            vmm_gone: false,
            max_payload,
            metrics,
            timeouts,
        }
    }
}

fn would_block(e: Errno) -> bool {
    e == Errno::EAGAIN || e == Errno::EINTR
}

impl ApiServer {
    pub(super) fn run(mut self) {
        let mut events = vec![EpollEvent::default(); MAX_CONNECTIONS + 1];
        let mut chunk = vec![0u8; READ_CHUNK];
        log::debug!("API server listening");
        while !(self.vmm_gone && self.conns.is_empty()) {
            let n = match self.epoll.wait(self.wait_ms(), &mut events) {
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
            self.close_stalled();
        }
        log::debug!("API server stopped");
    }

    /// How long epoll may sleep: until the first stalled connection's deadline, or for
    /// ever when no connection has anything pending (an idle server never wakes up).
    fn wait_ms(&self) -> i32 {
        let now = Instant::now();
        self.conns
            .values()
            .filter(|c| !c.idle())
            .map(|c| {
                let deadline = c.last_progress + self.timeouts.stall;
                // Rounded up, so the wake-up is not a moment too early.
                deadline.saturating_duration_since(now).as_millis() + 1
            })
            .min()
            .map_or(-1, |ms| i32::try_from(ms).unwrap_or(i32::MAX))
    }

    /// Closes every connection with something pending and no progress for the stall
    /// timeout; a partial request is answered 408 (best effort) first.
    fn close_stalled(&mut self) {
        let now = Instant::now();
        let stalled: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                !c.idle() && now.duration_since(c.last_progress) >= self.timeouts.stall
            })
            .map(|(token, _)| *token)
            .collect();
        for token in stalled {
            let Some(conn) = self.conns.remove(&token) else {
                continue;
            };
            self.metrics.connections_timed_out.inc();
            if conn.parser.buffered() > 0 && conn.out.is_empty() {
                let response =
                    Response::fault(408, "The request was not completed in time.").closing();
                self.metrics.count_status(response.status);
                let _ = send(
                    conn.stream.as_raw_fd(),
                    &response.to_bytes(),
                    MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL,
                );
            }
            log::info!(
                "API: closed a connection stalled for {:?}",
                self.timeouts.stall
            );
            self.close(conn);
        }
    }

    /// The connection a new client may replace when all are open: of those quiet (no bytes
    /// either way) for at least `evict_after`, an idle one (nothing pending) before a
    /// stalled one, the quiet longest first. A connection just accepted or just served is
    /// never taken, so its request cannot be cut off in flight.
    fn evictable(&self) -> Option<u64> {
        let now = Instant::now();
        self.conns
            .iter()
            .filter(|(_, c)| now.duration_since(c.last_progress) >= self.timeouts.evict_after)
            .min_by_key(|(_, c)| (!c.idle(), c.last_progress))
            .map(|(token, _)| *token)
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
            if self.conns.len() >= MAX_CONNECTIONS
                && let Some(conn) = self.evictable().and_then(|t| self.conns.remove(&t))
            {
                self.metrics.connections_evicted.inc();
                log::info!("API: closed the longest idle or stalled connection for a new client");
                self.close(conn);
            }
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
                    last_progress: Instant::now(),
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
                    conn.last_progress = Instant::now();
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
            Err(e) => {
                log::info!(
                    "API: {} {}: {} {e}",
                    request.method,
                    request.path,
                    e.status()
                );
                return Response::fault(e.status(), e.message());
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
            Ok(n) => {
                sent += n;
                conn.last_progress = Instant::now();
            }
            Err(Errno::EINTR) => {}
            Err(Errno::EAGAIN) => break,
            Err(e) => return Err(e),
        }
    }
    conn.out.drain(..sent);
    Ok(())
}
