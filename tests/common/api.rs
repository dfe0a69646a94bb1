//! A minimal client for kiln's API socket, and a kiln process whose serial output can be
//! waited on line by line.
#![allow(dead_code)]

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use testkit::LineReader;

#[allow(unused_imports)]
pub use testkit::http::{parse_response, request};

use super::{Output, exit_code, read_all, wait_until};

/// A kiln process serving an API socket, its serial output collected line by line.
pub struct ApiKiln {
    pub sock: PathBuf,
    child: Option<Child>,
    /// The serial lines read so far.
    lines: Mutex<Vec<String>>,
    stderr: Option<std::thread::JoinHandle<String>>,
    reader: Option<LineReader>,
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
        let reader = LineReader::spawn(child.stdout.take().unwrap());
        let stderr = read_all(child.stderr.take().unwrap());
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
            lines: Mutex::new(Vec::new()),
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
        let deadline = Instant::now() + timeout;
        let reader = self.reader.as_ref().unwrap();
        let mut lines = self.lines.lock().unwrap();
        loop {
            if let Some(l) = lines.iter().find(|l| l.starts_with(prefix)) {
                return l.clone();
            }
            match reader.recv_until(deadline) {
                Ok(line) => lines.push(line.text),
                Err(_) => panic!("no `{prefix}` line within {timeout:?}; so far: {lines:?}"),
            }
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
        let rest = self.reader.take().map(LineReader::rest).unwrap_or_default();
        self.lines
            .lock()
            .unwrap()
            .extend(rest.into_iter().map(|l| l.text));
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
