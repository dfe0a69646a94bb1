//! HTTP/1.1 for the API socket: an incremental request parser ([`RequestParser`], with
//! `httparse` underneath) and response serialization ([`Response`]).
//!
//! The parser is fed whatever bytes a connection delivers and hands back, in order, the
//! complete requests they contain (pipelining and keep-alive included). It never holds more
//! than one request head (at most [`MAX_HEAD_BYTES`], [`MAX_HEADERS`] headers) plus one body
//! (at most the payload limit) plus the bytes of one read, so a client cannot make it grow
//! without bound. Bodies are delimited by `Content-Length` only: a chunked transfer encoding
//! is refused. A body larger than the limit is refused from its `Content-Length` alone,
//! before any of it is read.
//!
//! A request stream that is not valid HTTP cannot be resynchronised: the parser reports one
//! [`Event::Fault`] and ignores everything after it; the server answers it and closes.

/// Firecracker's default limit on a request body (`--http-api-max-payload-size`).
pub const DEFAULT_MAX_PAYLOAD: usize = 51200;
/// Most header fields a request may carry.
pub const MAX_HEADERS: usize = 32;
/// Most bytes a request line plus its header fields may take.
pub const MAX_HEAD_BYTES: usize = 8192;

/// One complete request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT`, `PATCH`, ...).
    pub method: String,
    /// The request target, as sent (normally an absolute path such as `/drives/rootfs`).
    pub path: String,
    /// The body (empty when there was none).
    pub body: Vec<u8>,
    /// Whether the connection stays open after the response.
    pub keep_alive: bool,
}

/// What the bytes fed so far contain, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete request.
    Request(Request),
    /// The client announced a body with `Expect: 100-continue`: send
    /// [`Response::continue_100`] so that it sends the body.
    Continue,
    /// Bytes the server will not serve (malformed HTTP, headers too large, a chunked body, a
    /// body over the limit): answer with this status and message, then close.
    Fault {
        /// HTTP status (400 or 413).
        status: u16,
        /// The `fault_message`.
        message: String,
    },
}

/// Where the parser is in the current request.
#[derive(Debug)]
enum State {
    /// Waiting for (the rest of) a request line and headers.
    Head,
    /// Headers done; waiting for `len` bytes of body.
    Body { request: Request, len: usize },
    /// A fault was reported; nothing more is parsed.
    Failed,
}

/// The head of a request, checked.
struct Head {
    method: String,
    path: String,
    keep_alive: bool,
    content_length: usize,
    expect_continue: bool,
}

/// An incremental HTTP/1.1 request parser for one connection.
#[derive(Debug)]
pub struct RequestParser {
    buf: Vec<u8>,
    /// Start of the unparsed bytes in `buf`.
    pos: usize,
    state: State,
    max_payload: usize,
}

fn fault(status: u16, message: impl Into<String>) -> Event {
    Event::Fault {
        status,
        message: message.into(),
    }
}

impl RequestParser {
    /// A parser that refuses bodies over `max_payload` bytes.
    pub fn new(max_payload: usize) -> Self {
        RequestParser {
            buf: Vec::new(),
            pos: 0,
            state: State::Head,
            max_payload,
        }
    }

    /// Bytes held for a request not yet complete.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// Whether a fault ended the stream.
    pub fn failed(&self) -> bool {
        matches!(self.state, State::Failed)
    }

    /// Adds `bytes` from the connection; returns the events they complete, in order.
    pub fn feed(&mut self, bytes: &[u8]) -> Vec<Event> {
        let mut events = Vec::new();
        if self.failed() {
            return events;
        }
        self.buf.extend_from_slice(bytes);
        loop {
            match std::mem::replace(&mut self.state, State::Failed) {
                State::Failed => break,
                State::Head => match self.parse_head() {
                    Ok(None) => {
                        self.state = State::Head;
                        break;
                    }
                    Ok(Some(head)) => {
                        let request = Request {
                            method: head.method,
                            path: head.path,
                            body: Vec::new(),
                            keep_alive: head.keep_alive,
                        };
                        if head.content_length == 0 {
                            events.push(Event::Request(request));
                            self.state = State::Head;
                        } else {
                            if head.expect_continue {
                                events.push(Event::Continue);
                            }
                            self.state = State::Body {
                                request,
                                len: head.content_length,
                            };
                        }
                    }
                    Err(event) => {
                        events.push(event);
                        break;
                    }
                },
                State::Body { mut request, len } => {
                    if self.buffered() < len {
                        self.state = State::Body { request, len };
                        break;
                    }
                    request.body = self.buf[self.pos..self.pos + len].to_vec();
                    self.pos += len;
                    events.push(Event::Request(request));
                    self.state = State::Head;
                }
            }
        }
        if self.failed() {
            self.buf = Vec::new();
            self.pos = 0;
        } else {
            self.buf.drain(..self.pos);
            self.pos = 0;
        }
        events
    }

    /// Parses the head at `pos`: `Ok(None)` when it is not complete yet.
    fn parse_head(&mut self) -> Result<Option<Head>, Event> {
        let data = &self.buf[self.pos..];
        if data.is_empty() {
            return Ok(None);
        }
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut headers);
        let len = match req.parse(data) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => {
                if data.len() > MAX_HEAD_BYTES {
                    return Err(head_too_large());
                }
                return Ok(None);
            }
            Err(httparse::Error::TooManyHeaders) => {
                return Err(fault(
                    400,
                    format!("Invalid HTTP request: more than {MAX_HEADERS} header fields."),
                ));
            }
            Err(e) => return Err(fault(400, format!("Invalid HTTP request: {e}."))),
        };
        if len > MAX_HEAD_BYTES {
            return Err(head_too_large());
        }
        // A complete parse always sets the method, path and version.
        let (Some(method), Some(path), Some(version)) = (req.method, req.path, req.version) else {
            return Err(fault(400, "Invalid HTTP request."));
        };
        let mut keep_alive = version == 1;
        let mut content_length: Option<&str> = None;
        let mut expect_continue = false;
        for header in req.headers.iter() {
            let value = std::str::from_utf8(header.value)
                .map(str::trim)
                .map_err(|_| {
                    fault(
                        400,
                        format!("Invalid HTTP request: header {} is not UTF-8.", header.name),
                    )
                })?;
            let name = header.name;
            if name.eq_ignore_ascii_case("content-length") {
                if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(fault(
                        400,
                        format!("Invalid HTTP request: Content-Length `{value}` is not a number."),
                    ));
                }
                if content_length.is_some_and(|prev| prev != value) {
                    return Err(fault(
                        400,
                        "Invalid HTTP request: conflicting Content-Length headers.",
                    ));
                }
                content_length = Some(value);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                if !value.eq_ignore_ascii_case("identity") {
                    return Err(fault(
                        400,
                        format!(
                            "Transfer-Encoding `{value}` is not supported: send the body with \
                             a Content-Length header."
                        ),
                    ));
                }
            } else if name.eq_ignore_ascii_case("connection") {
                for token in value.split(',').map(str::trim) {
                    if token.eq_ignore_ascii_case("close") {
                        keep_alive = false;
                    } else if token.eq_ignore_ascii_case("keep-alive") {
                        keep_alive = true;
                    }
                }
            } else if name.eq_ignore_ascii_case("expect") {
                expect_continue = value.eq_ignore_ascii_case("100-continue");
            }
        }
        let content_length = match content_length {
            None => 0,
            Some(digits) => match digits.parse::<usize>() {
                Ok(n) if n <= self.max_payload => n,
                _ => {
                    let size = digits.trim_start_matches('0');
                    return Err(fault(
                        413,
                        format!(
                            "Request payload with size {size} is larger than the limit of {} \
                             allowed by server.",
                            self.max_payload
                        ),
                    ));
                }
            },
        };
        let head = Head {
            method: method.to_string(),
            path: path.to_string(),
            keep_alive,
            content_length,
            expect_continue,
        };
        self.pos += len;
        Ok(Some(head))
    }
}

fn head_too_large() -> Event {
    fault(
        400,
        format!(
            "Invalid HTTP request: the request line and headers exceed {MAX_HEAD_BYTES} bytes."
        ),
    )
}

/// A response to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Response {
    /// Status code (100..=599; anything else is sent as 500).
    pub status: u16,
    /// JSON body (none for 1xx and 204).
    pub body: Option<String>,
    /// Close the connection after this response (`Connection: close`).
    pub close: bool,
}

/// Firecracker's error body: `{"fault_message": "..."}`.
pub fn fault_body(message: &str) -> String {
    serde_json::json!({ "fault_message": message }).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        409 => "Conflict",
        413 => "Payload Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "",
    }
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Response {
            status: 204,
            body: None,
            close: false,
        }
    }

    /// 200 OK with a JSON body.
    pub fn json(body: String) -> Self {
        Response {
            status: 200,
            body: Some(body),
            close: false,
        }
    }

    /// An error with a `fault_message` body.
    pub fn fault(status: u16, message: &str) -> Self {
        Response {
            status,
            body: Some(fault_body(message)),
            close: false,
        }
    }

    /// The interim `100 Continue`.
    pub fn continue_100() -> Self {
        Response {
            status: 100,
            body: None,
            close: false,
        }
    }

    /// The same response, closing the connection after it.
    pub fn closing(mut self) -> Self {
        self.close = true;
        self
    }

    /// Appends the response's bytes to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let status = if (100..=599).contains(&self.status) {
            self.status
        } else {
            500
        };
        out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason(status)).as_bytes());
        if status < 200 {
            out.extend_from_slice(b"\r\n");
            return;
        }
        out.extend_from_slice(b"Server: kiln\r\n");
        if self.close {
            out.extend_from_slice(b"Connection: close\r\n");
        }
        match (&self.body, status) {
            (_, 204) | (None, _) => {}
            (Some(body), _) => {
                out.extend_from_slice(b"Content-Type: application/json\r\n");
                out.extend_from_slice(format!("Content-Length: {}\r\n", body.len()).as_bytes());
            }
        }
        out.extend_from_slice(b"\r\n");
        if let (Some(body), false) = (&self.body, status == 204) {
            out.extend_from_slice(body.as_bytes());
        }
    }

    /// The response's bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        self.write_to(&mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn requests(events: &[Event]) -> Vec<&Request> {
        events
            .iter()
            .filter_map(|e| match e {
                Event::Request(r) => Some(r),
                _ => None,
            })
            .collect()
    }

    fn fault_status(events: &[Event]) -> Option<u16> {
        events.iter().find_map(|e| match e {
            Event::Fault { status, .. } => Some(*status),
            _ => None,
        })
    }

    #[test]
    fn one_request_without_body() {
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n");
        assert_eq!(
            ev,
            vec![Event::Request(Request {
                method: "GET".into(),
                path: "/".into(),
                body: vec![],
                keep_alive: true,
            })]
        );
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn byte_by_byte_and_pipelined() {
        let input = b"PUT /actions HTTP/1.1\r\nContent-Length: 31\r\n\r\n{\"action_type\": \"FlushMetrics\"}\
                      GET /version HTTP/1.1\r\n\r\nGET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n";
        // All at once.
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(input);
        let reqs = requests(&ev);
        assert_eq!(reqs.len(), 3);
        assert_eq!(reqs[0].body, br#"{"action_type": "FlushMetrics"}"#);
        assert_eq!(reqs[1].path, "/version");
        assert!(reqs[1].keep_alive);
        assert!(!reqs[2].keep_alive);
        // One byte at a time gives the same requests.
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let mut all = Vec::new();
        for b in input {
            all.extend(p.feed(std::slice::from_ref(b)));
        }
        assert_eq!(all, ev);
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn http10_closes_unless_keep_alive() {
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(b"GET / HTTP/1.0\r\n\r\nGET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n");
        let reqs = requests(&ev);
        assert!(!reqs[0].keep_alive);
        assert!(reqs[1].keep_alive);
    }

    #[test]
    fn payload_limit_is_checked_before_the_body() {
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(b"PUT /drives/x HTTP/1.1\r\nContent-Length: 51201\r\n\r\n");
        assert_eq!(
            ev,
            vec![Event::Fault {
                status: 413,
                message: "Request payload with size 51201 is larger than the limit of 51200 \
                          allowed by server."
                    .into()
            }]
        );
        assert!(p.failed());
        // Nothing after a fault is parsed or kept.
        assert!(p.feed(b"GET / HTTP/1.1\r\n\r\n").is_empty());
        assert_eq!(p.buffered(), 0);

        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let mut input = b"PUT /x HTTP/1.1\r\nContent-Length: 51200\r\n\r\n".to_vec();
        input.resize(input.len() + 51200, b' ');
        let ev = p.feed(&input);
        assert_eq!(requests(&ev)[0].body.len(), 51200);

        // A length that does not fit in usize is too large, not malformed.
        let mut p = RequestParser::new(10);
        let ev = p.feed(b"PUT /x HTTP/1.1\r\nContent-Length: 99999999999999999999999\r\n\r\n");
        assert_eq!(fault_status(&ev), Some(413));
    }

    #[test]
    fn chunked_and_bad_lengths_are_refused() {
        for head in [
            "PUT /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "PUT /x HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "PUT /x HTTP/1.1\r\nContent-Length: -1\r\n\r\n",
            "PUT /x HTTP/1.1\r\nContent-Length: 1e3\r\n\r\n",
            "PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
            "GET / HTTP/2.0\r\n\r\n",
            "GET\r\n\r\n",
            "\x00\x01\x02garbage\r\n\r\n",
        ] {
            let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
            let ev = p.feed(head.as_bytes());
            assert_eq!(fault_status(&ev), Some(400), "{head:?}: {ev:?}");
        }
        // Identity is no transfer coding at all.
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p
            .feed(b"PUT /x HTTP/1.1\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(requests(&ev)[0].body, b"{}");
        // The same Content-Length twice is harmless.
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(b"PUT /x HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}");
        assert_eq!(requests(&ev)[0].body, b"{}");
    }

    #[test]
    fn heads_are_bounded() {
        // Too many headers.
        let mut head = String::from("GET / HTTP/1.1\r\n");
        for i in 0..=MAX_HEADERS {
            head.push_str(&format!("X-{i}: y\r\n"));
        }
        head.push_str("\r\n");
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        assert_eq!(fault_status(&p.feed(head.as_bytes())), Some(400));

        // A head that never ends stops growing the buffer at MAX_HEAD_BYTES.
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        assert!(p.feed(b"GET / HTTP/1.1\r\nX-Long: ").is_empty());
        let mut faulted = false;
        for _ in 0..100 {
            let ev = p.feed(&[b'a'; 1000]);
            assert!(p.buffered() <= MAX_HEAD_BYTES + 1000);
            if fault_status(&ev) == Some(400) {
                faulted = true;
                break;
            }
        }
        assert!(faulted);
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn expect_continue() {
        let mut p = RequestParser::new(DEFAULT_MAX_PAYLOAD);
        let ev = p.feed(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(ev, vec![Event::Continue]);
        let ev = p.feed(b"{}");
        assert_eq!(requests(&ev)[0].body, b"{}");
        // Over the limit: no 100, a 413 straight away.
        let mut p = RequestParser::new(1);
        let ev = p.feed(b"PUT /x HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 2\r\n\r\n");
        assert_eq!(fault_status(&ev), Some(413));
        assert_eq!(ev.len(), 1);
    }

    #[test]
    fn response_formats() {
        assert_eq!(
            Response::no_content().to_bytes(),
            b"HTTP/1.1 204 No Content\r\nServer: kiln\r\n\r\n"
        );
        assert_eq!(
            Response::json("{\"a\":1}".into()).to_bytes(),
            b"HTTP/1.1 200 OK\r\nServer: kiln\r\nContent-Type: application/json\r\n\
              Content-Length: 7\r\n\r\n{\"a\":1}"
        );
        assert_eq!(
            String::from_utf8(Response::fault(400, "bad \"x\"").closing().to_bytes()).unwrap(),
            "HTTP/1.1 400 Bad Request\r\nServer: kiln\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: 29\r\n\r\n\
             {\"fault_message\":\"bad \\\"x\\\"\"}"
        );
        assert_eq!(
            Response::continue_100().to_bytes(),
            b"HTTP/1.1 100 Continue\r\n\r\n"
        );
        // An out-of-range status from the VMM is sent as 500.
        let r = Response::fault(1000, "x").to_bytes();
        assert!(r.starts_with(b"HTTP/1.1 500 Internal Server Error\r\n"));
    }
}
