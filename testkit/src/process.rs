//! Child processes: their output read on threads (line by line, time-stamped as each line
//! arrives, or all at once), waiting with a deadline, exit codes, signals.

use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One line of a child's output.
#[derive(Debug)]
pub struct Line<X = ()> {
    /// The line without its end (`\n`, `\r\n`); invalid UTF-8 replaced.
    pub text: String,
    /// When the reader got it.
    pub at: Instant,
    /// What the reader's hook returned for it, on the reader thread, as it arrived.
    pub extra: X,
}

/// Reads a pipe line by line on a thread and hands the lines over through a channel, each
/// time-stamped as it arrives: a test follows a guest's console with deadlines.
#[derive(Debug)]
pub struct LineReader<X = ()> {
    rx: Receiver<Line<X>>,
    thread: Option<JoinHandle<()>>,
}

impl LineReader {
    /// Starts reading `r`.
    pub fn spawn(r: impl Read + Send + 'static) -> LineReader {
        LineReader::spawn_with(r, |_| ())
    }
}

impl<X: Send + 'static> LineReader<X> {
    /// Starts reading `r`; `hook` runs on the reader thread for each line as soon as it
    /// arrives (a benchmark samples the child's CPU time right at a marker line).
    pub fn spawn_with(
        r: impl Read + Send + 'static,
        mut hook: impl FnMut(&str) -> X + Send + 'static,
    ) -> LineReader<X> {
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
                let at = Instant::now();
                let text = String::from_utf8_lossy(&buf)
                    .trim_end_matches(['\r', '\n'])
                    .to_string();
                let extra = hook(&text);
                if tx.send(Line { text, at, extra }).is_err() {
                    return;
                }
            }
        });
        LineReader {
            rx,
            thread: Some(thread),
        }
    }

    /// The next line, waiting at most `timeout`: `Timeout` when none came, `Disconnected`
    /// once the pipe closed (the child ended) and every line was taken.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Line<X>, RecvTimeoutError> {
        self.rx.recv_timeout(timeout)
    }

    /// The next line, waiting until `deadline` at the latest.
    pub fn recv_until(&self, deadline: Instant) -> Result<Line<X>, RecvTimeoutError> {
        self.recv_timeout(deadline.saturating_duration_since(Instant::now()))
    }

    /// The lines already read, without waiting.
    pub fn try_iter(&self) -> impl Iterator<Item = Line<X>> + '_ {
        self.rx.try_iter()
    }

    /// Waits for the pipe to close and returns every line not taken yet.
    pub fn rest(mut self) -> Vec<Line<X>> {
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.rx.try_iter().collect()
    }
}

/// Reads `r` to its end on a thread (a child's stderr); the text, invalid UTF-8 replaced.
pub fn read_all(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = r.read_to_end(&mut buf);
        String::from_utf8_lossy(&buf).into_owned()
    })
}

/// Waits for `child` to exit until `deadline`; past it, kills and reaps it and returns None.
pub fn wait_until(child: &mut Child, deadline: Instant) -> Option<ExitStatus> {
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return Some(status),
            Ok(None) => {}
            Err(e) => panic!("cannot wait for pid {}: {e}", child.id()),
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// A process's exit status as a shell reports it: the exit code, or 128 + the signal that
/// killed it.
pub fn exit_code(status: ExitStatus) -> i32 {
    status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Sends `sig` to process `pid`.
pub fn signal(pid: u32, sig: libc::c_int) -> io::Result<()> {
    let pid =
        libc::pid_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: kill(2) takes plain integers; the callers signal their own children.
    if unsafe { libc::kill(pid, sig) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::process::{Command, Stdio};

    use super::*;

    #[test]
    fn lines_as_they_come_then_the_rest() {
        let mut child = Command::new("sh")
            .args([
                "-c",
                "printf 'one\\r\\ntwo\\n'; sleep 0.2; printf 'three'; exit 3",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sh");
        let start = Instant::now();
        let lines = LineReader::spawn_with(child.stdout.take().expect("stdout"), str::len);
        let err = read_all(child.stderr.take().expect("stderr"));
        let first = lines.recv_timeout(Duration::from_secs(10)).expect("a line");
        assert_eq!((first.text.as_str(), first.extra), ("one", 3));
        assert!(first.at >= start);
        let status = wait_until(&mut child, Instant::now() + Duration::from_secs(10));
        assert_eq!(status.map(exit_code), Some(3));
        let rest: Vec<String> = lines.rest().into_iter().map(|l| l.text).collect();
        assert_eq!(rest, ["two", "three"]);
        assert_eq!(err.join().expect("stderr reader"), "");
    }

    #[test]
    fn a_child_past_its_deadline_is_killed() {
        let mut child = Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("spawn sleep");
        assert!(wait_until(&mut child, Instant::now() + Duration::from_millis(50)).is_none());
    }
}
