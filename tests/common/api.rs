//! A minimal client for kiln's API socket, and a kiln process whose serial output can be
//! waited on line by line.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{Output, exit_code, wait_until};

/// One HTTP/1.1 request on a fresh connection; returns (status, body).
pub fn request(sock: &Path, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let mut s = UnixStream::connect(sock).expect("connect to the API socket");
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
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
    }
    parse_response(&String::from_utf8_lossy(&resp))
}

/// Splits a raw response into (status, body).
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

/// A kiln process serving an API socket, its serial output collected line by line.
pub struct ApiKiln {
    pub sock: PathBuf,
    child: Option<Child>,
    lines: Arc<Mutex<Vec<String>>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl ApiKiln {
    /// Starts `cmd` (kiln with `--api-sock sock` among its arguments) and waits until the
    /// socket accepts connections.
    pub fn spawn(mut cmd: Command, sock: &Path) -> ApiKiln {
        let _ = std::fs::remove_file(sock);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn kiln");
        let lines = Arc::new(Mutex::new(Vec::new()));
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        let reader = std::thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                match line {
                    Ok(l) => sink.lock().unwrap().push(l),
                    Err(_) => break,
                }
            }
        });
        let mut err = child.stderr.take().unwrap();
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            s
        });
        let start = Instant::now();
        while UnixStream::connect(sock).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the API socket never accepted"
            );
            if let Ok(Some(status)) = child.try_wait() {
                panic!("kiln exited early with {status}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        ApiKiln {
            sock: sock.to_path_buf(),
            child: Some(child),
            lines,
            stderr: Some(stderr),
            reader: Some(reader),
        }
    }

    /// `request` on this instance's socket.
    pub fn api(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        request(&self.sock, method, path, body)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// Waits for a serial line starting with `prefix`; returns it.
    pub fn wait_line(&self, prefix: &str, timeout: Duration) -> String {
        let start = Instant::now();
        loop {
            if let Some(l) = self
                .lines
                .lock()
                .unwrap()
                .iter()
                .find(|l| l.starts_with(prefix))
            {
                return l.clone();
            }
            assert!(
                start.elapsed() < timeout,
                "no `{prefix}` line within {timeout:?}; so far: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Waits for the process to end and returns everything it printed.
    pub fn finish(mut self, timeout: Duration) -> Output {
        let mut child = self.child.take().unwrap();
        // stdout is read by our thread: give the helper an empty pipe.
        let start = Instant::now();
        let Some(status) = wait_until(&mut child, start + timeout) else {
            panic!(
                "kiln did not exit within {timeout:?}; serial: {:?}",
                self.lines.lock().unwrap()
            );
        };
        let _ = self.reader.take().map(std::thread::JoinHandle::join);
        let stderr = self
            .stderr
            .take()
            .map(|h| h.join().unwrap_or_default())
            .unwrap_or_default();
        let mut stdout = self.lines.lock().unwrap().join("\n");
        stdout.push('\n');
        Output {
            status: exit_code(status),
            stdout,
            stderr,
            wall: start.elapsed(),
        }
    }
}

impl Drop for ApiKiln {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_file(&self.sock);
    }
}
