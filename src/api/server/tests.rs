//! Tests of the API server: a real socket, a fake VMM thread, and every client case.

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
            r#"{"id":"test","state":"Not started","vmm_version":"0.1.0","app_name":"kiln"}"#.into(),
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
fn start(name: &str, filters: SeccompFilters, max_payload: usize, event_loop: bool) -> TestServer {
    let timeouts = Timeouts {
        stall: STALL_TIMEOUT,
        evict_after: EVICT_AFTER,
    };
    start_timed(name, filters, max_payload, event_loop, timeouts)
}

/// `start` with other connection timeouts.
fn start_timed(
    name: &str,
    filters: SeccompFilters,
    max_payload: usize,
    event_loop: bool,
    timeouts: Timeouts,
) -> TestServer {
    let path = sock_path(name);
    let _ = std::fs::remove_file(&path);
    let metrics = Arc::new(ApiMetrics::default());
    let (bridge, api) = start_with_timeouts(
        &path,
        max_payload,
        Arc::new(filters),
        metrics.clone(),
        timeouts,
    )
    .unwrap();
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
                    let body = String::from_utf8(self.buf[len..len + body_len].to_vec()).unwrap();
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
    c.send(b"PUT /actions HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n");
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

/// Short timeouts for the tests of stalled and idle connections.
const SHORT: Timeouts = Timeouts {
    stall: Duration::from_millis(2500),
    evict_after: Duration::from_millis(1000),
};

/// Ten keep-alive connections between requests do not lock a new client out: once they
/// have been quiet for `evict_after`, it takes the place of the one idle the longest (and
/// before that it gets 503, as an 11th active connection does).
fn check_idle_connections_make_room(s: &TestServer) {
    let mut idle: Vec<Client> = (0..MAX_CONNECTIONS)
        .map(|_| {
            let mut c = Client::connect(&s.path);
            assert_eq!(c.request("GET", "/", None).status, 200);
            c
        })
        .collect();
    let mut early = Client::connect(&s.path);
    assert_eq!(early.reply().unwrap().status, 503);
    std::thread::sleep(SHORT.evict_after);
    let evicted = s.metrics.connections_evicted.get();
    let mut fresh = Client::connect(&s.path);
    assert_eq!(fresh.request("GET", "/version", None).status, 200);
    assert_eq!(s.metrics.connections_evicted.get(), evicted + 1);
    // The oldest was closed; the others still work.
    assert!(idle[0].at_eof());
    assert_eq!(idle[1].request("GET", "/", None).status, 200);
    drop(fresh);
    idle.clear();
}

/// Security case 29: ten clients that each send half a request and stall lock nobody out
/// for long: once the oldest has stalled for `evict_after`, a fresh client takes its place;
/// after `stall` without progress the others are answered 408 and closed.
fn check_stalled_clients_make_room_then_time_out(s: &TestServer) {
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
    std::thread::sleep(SHORT.evict_after);
    let mut fresh = Client::connect(&s.path);
    assert_eq!(fresh.request("GET", "/", None).status, 200);
    assert!(s.metrics.connections_evicted.get() >= 1);
    // The rest time out: 408 and closed (the evicted one was closed without an answer).
    let timed_out = stalled
        .iter_mut()
        .filter_map(|c| c.reply())
        .inspect(|r| assert_eq!(r.status, 408))
        .count();
    assert_eq!(timed_out, MAX_CONNECTIONS - 1);
    assert!(stalled.iter_mut().all(|c| c.at_eof()));
    assert_eq!(
        s.metrics.connections_timed_out.get(),
        MAX_CONNECTIONS as u64 - 1
    );
    // The fresh client was idle, not stalled: it still works.
    assert_eq!(fresh.request("GET", "/", None).status, 200);
}

// ---- tests ---------------------------------------------------------------------------

#[test]
fn idle_and_stalled_connections_never_lock_a_client_out() {
    let s = start_timed(
        "stall",
        SeccompFilters::disabled(),
        DEFAULT_MAX_PAYLOAD,
        false,
        SHORT,
    );
    check_idle_connections_make_room(&s);
    wait_until("no connection open", || s.metrics.open_connections() == 0);
    check_stalled_clients_make_room_then_time_out(&s);
}

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
    let err =
        start_api_server(&path, DEFAULT_MAX_PAYLOAD, filters.clone(), metrics.clone()).unwrap_err();
    assert!(matches!(err, ApiError::InUse(_)), "{err}");
    // ...and it still serves.
    assert_eq!(Client::connect(&path).request("GET", "/", None).status, 200);
    std::fs::remove_file(&path).unwrap();

    // A regular file is never removed.
    let file = sock_path("file");
    std::fs::write(&file, b"data").unwrap();
    let err =
        start_api_server(&file, DEFAULT_MAX_PAYLOAD, filters.clone(), metrics.clone()).unwrap_err();
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
    assert!(matches!(&out[1], Err(e) if e.status() == 400));
    assert_eq!(out[2], Ok(VmmAction::Resume));
    assert_eq!(out[3], Ok(VmmAction::GetVersion));
    let out = handle_bytes(b"PUT / HTTP/1.1\r\nContent-Length: 11\r\n\r\n", 10);
    assert!(matches!(&out[..], [Err(e)] if e.status() == 413));
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
