//! A minimal HTTP/1.1 client on a Unix socket (for an API server such as kiln's).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// One HTTP/1.1 request on a fresh connection (JSON body, `Connection: close`); the raw
/// response. It ends where the response says it ends (its headers, then `Content-Length`
/// bytes; a 204 or 304 has no body), so a server that keeps the connection open (as
/// Firecracker does) answers as fast as one that closes it; without a length it is
/// everything the server sent before closing. 30 s of silence also ends it. Panics if the
/// socket does not accept the connection.
pub fn request_raw(sock: &Path, method: &str, path: &str, body: Option<&str>) -> String {
    let mut s =
        UnixStream::connect(sock).unwrap_or_else(|e| panic!("connect to {}: {e}", sock.display()));
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    let body = body.unwrap_or("");
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    // The server may answer and close before reading everything (413): keep what it said.
    let _ = s.write_all(req.as_bytes());
    let mut resp = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => resp.extend_from_slice(&buf[..n]),
        }
        if complete(&resp) {
            break;
        }
    }
    String::from_utf8_lossy(&resp).into_owned()
}

/// Whether `resp` holds a whole response whose end its headers give.
fn complete(resp: &[u8]) -> bool {
    let Some(end) = resp.windows(4).position(|w| w == b"\r\n\r\n") else {
        return false;
    };
    let head = String::from_utf8_lossy(&resp[..end]);
    let status = head.split_whitespace().nth(1).unwrap_or("");
    let length = head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse::<usize>().ok())?
    });
    match (status, length) {
        ("204" | "304", _) => true,
        (_, Some(len)) => resp.len() >= end + 4 + len,
        (_, None) => false,
    }
}

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    parse_response(&request_raw(sock, method, path, body))
}

/// Splits a raw response into (status, body); status 0 when there is none.
pub fn parse_response(resp: &str) -> (u16, String) {
    let status = resp
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = resp
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

#[cfg(test)]
mod tests {
    use super::complete;

    #[test]
    fn a_response_ends_where_its_headers_say() {
        assert!(!complete(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n"));
        assert!(!complete(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc"
        ));
        assert!(complete(
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabcde"
        ));
        assert!(complete(b"HTTP/1.1 204 No Content\r\n\r\n"));
        // No length: only the close ends it.
        assert!(!complete(b"HTTP/1.1 400 Bad Request\r\n\r\n{}"));
    }
}
