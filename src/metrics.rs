//! Metrics: one JSON object per flush, written as one line to the configured file or FIFO —
//! every 60 seconds while the VM runs and on the API's `FlushMetrics`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use serde::Serialize;

use crate::devices::registry::{Device, DeviceRegistry, lock};
use crate::vstate::vcpu::VcpuMetrics;

/// How often metrics are written while the VM runs.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Errors of the metrics system.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The destination could not be opened.
    #[error("metrics_path {path}: {source}")]
    Open {
        /// The path.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// No destination was configured.
    #[error("the metrics system is not configured (PUT /metrics or --metrics-path)")]
    NotConfigured,
    /// Writing failed.
    #[error("cannot write metrics: {0}")]
    Write(#[source] std::io::Error),
}

/// Opens a file or FIFO for appending lines. A FIFO is opened read-write (so open(2) does
/// not wait for a reader) and non-blocking (so a reader that stops reading never blocks
/// kiln: what does not fit is dropped and counted, see [`LineSink`]).
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut options = std::fs::OpenOptions::new();
    let mut flags = libc::O_CLOEXEC;
    if is_fifo {
        options.read(true).write(true);
        flags |= libc::O_NONBLOCK;
    } else {
        options.append(true).create(true);
    }
    options.custom_flags(flags).open(path)
}

/// One write(2) to `out`; `Ok(None)` when it has no room now.
fn write_some(out: &mut impl Write, bytes: &[u8]) -> std::io::Result<Option<usize>> {
    loop {
        match out.write(bytes) {
            Ok(n) => return Ok(Some(n)),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(e),
        }
    }
}

/// What became of a line handed to a [`LineSink`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineOutcome {
    /// Written (or its start written and the rest kept for the next line).
    Written,
    /// Not written at all: the sink had no room. The stream is intact.
    Dropped,
}

/// An operator's sink (a file or FIFO) written one whole line at a time, never blocking on
/// a non-blocking FIFO and never corrupting the stream. A line the sink has no room for is
/// dropped whole (a line up to PIPE_BUF bytes is written to a FIFO all or nothing). If the
/// sink takes only the start of a longer line, the rest is kept and written before
/// anything else; while it is still pending, new lines are dropped. So a reader sees every
/// line it gets complete and in order, and at most one line is held.
#[derive(Debug)]
pub struct LineSink<W: Write> {
    out: W,
    pending: Vec<u8>,
}

impl<W: Write> LineSink<W> {
    /// A sink writing to `out`.
    pub fn new(out: W) -> Self {
        LineSink {
            out,
            pending: Vec::new(),
        }
    }

    /// Bytes of a line started but not yet taken by the sink.
    pub fn pending(&self) -> usize {
        self.pending.len()
    }

    /// Writes what is left of a partly written line; true when nothing is left.
    fn drain_pending(&mut self) -> std::io::Result<bool> {
        while !self.pending.is_empty() {
            match write_some(&mut self.out, &self.pending)? {
                Some(n) if n > 0 => drop(self.pending.drain(..n)),
                _ => return Ok(false),
            }
        }
        Ok(true)
    }

    /// Writes `line` (which ends with a newline) whole, or drops it whole.
    pub fn write_line(&mut self, line: &[u8]) -> std::io::Result<LineOutcome> {
        if !self.drain_pending()? {
            return Ok(LineOutcome::Dropped);
        }
        let mut written = 0;
        while written < line.len() {
            match write_some(&mut self.out, &line[written..])? {
                Some(n) if n > 0 => written += n,
                _ if written == 0 => return Ok(LineOutcome::Dropped),
                _ => {
                    self.pending = line[written..].to_vec();
                    break;
                }
            }
        }
        Ok(LineOutcome::Written)
    }

    /// Flushes the writer (for buffered writers; a file or FIFO has nothing to flush).
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }
}

/// A source of named counters (a device, the API server, ...).
pub type Section = (String, Value);

/// The metrics destination and the counters of what is not a device.
#[derive(Debug, Default)]
pub struct Metrics {
    sink: Option<LineSink<File>>,
    /// Flushes written.
    pub flushes: AtomicU64,
    /// Metrics lines dropped because the sink had no room (a FIFO nobody reads).
    pub missed_metrics_count: AtomicU64,
    /// Metrics lines that could not be written because writing failed.
    pub metrics_fails: AtomicU64,
}

impl Metrics {
    /// Sends metrics to `path`.
    pub fn set_sink(&mut self, path: &Path) -> Result<(), MetricsError> {
        let file = open_sink(path).map_err(|source| MetricsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        self.sink = Some(LineSink::new(file));
        Ok(())
    }

    /// Whether a destination is configured.
    pub fn configured(&self) -> bool {
        self.sink.is_some()
    }

    /// Writes one JSON line made of `sections` (plus a timestamp and the `logger` section:
    /// lines of logs and metrics dropped or failed, as Firecracker's). A line the sink has no
    /// room for is dropped and counted in `missed_metrics_count`; this never blocks.
    pub fn flush(&mut self, sections: Vec<Section>) -> Result<(), MetricsError> {
        let Some(sink) = self.sink.as_mut() else {
            return Err(MetricsError::NotConfigured);
        };
        let mut obj = Map::new();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as u64;
        obj.insert("utc_timestamp_ms".into(), json!(now));
        for (name, value) in sections {
            obj.insert(name, value);
        }
        obj.insert(
            "logger".into(),
            json!({
                "missed_metrics_count": self.missed_metrics_count.load(Ordering::Relaxed),
                "metrics_fails": self.metrics_fails.load(Ordering::Relaxed),
                "missed_log_count": crate::logger::missed_log_count(),
                "log_fails": crate::logger::log_fails(),
            }),
        );
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        match sink.write_line(line.as_bytes()) {
            Ok(LineOutcome::Written) => {
                self.flushes.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Ok(LineOutcome::Dropped) => {
                self.missed_metrics_count.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            Err(e) => {
                self.metrics_fails.fetch_add(1, Ordering::Relaxed);
                Err(MetricsError::Write(e))
            }
        }
    }
}

/// The counters of a running VM, one section per device (Firecracker's naming:
/// `block_<drive_id>`, `net_<iface_id>`, `vcpu` (summed over the vCPUs), `uart`, `i8042`).
/// Each section is its device's metrics struct serialized as it is defined, so a counter
/// added to a device is reported under its field name.
pub fn device_sections(devices: &DeviceRegistry, vcpus: &[Arc<VcpuMetrics>]) -> Vec<Section> {
    // Starting from zeroes keeps every key present whatever the vCPU count.
    let zero = section(&VcpuMetrics::default());
    let vcpu = sum(std::iter::once(zero).chain(vcpus.iter().map(|m| section(m.as_ref()))));
    let mut out = vec![("vcpu".to_string(), vcpu)];
    for entry in devices.iter() {
        match &entry.device {
            Device::Serial(d) => {
                out.push(("uart".into(), section(lock(d.as_ref()).metrics().as_ref())))
            }
            Device::I8042(d) => {
                out.push(("i8042".into(), section(lock(d.as_ref()).metrics().as_ref())))
            }
            Device::Block { device, .. } => {
                let b = lock(device.as_ref());
                out.push((
                    format!("block_{}", b.config().drive_id),
                    section(b.metrics().as_ref()),
                ));
            }
            Device::Net { device, .. } => {
                let n = lock(device.as_ref());
                out.push((
                    format!("net_{}", n.config().iface_id),
                    section(n.metrics().as_ref()),
                ));
            }
            Device::BootTimer(_) => {}
        }
    }
    out.push(("seccomp".to_string(), json!({ "num_faults": 0 })));
    out
}

/// A metrics struct as a JSON object.
fn section<T: Serialize>(metrics: &T) -> Value {
    serde_json::to_value(metrics).unwrap_or_else(|_| Value::Object(Map::new()))
}

/// The field-by-field sum of sections of the same shape.
fn sum(sections: impl Iterator<Item = Value>) -> Value {
    let mut total = Map::new();
    for s in sections {
        if let Value::Object(fields) = s {
            for (k, v) in fields {
                let add = v.as_u64().unwrap_or(0);
                let slot = total.entry(k).or_insert(json!(0));
                *slot = json!(slot.as_u64().unwrap_or(0).saturating_add(add));
            }
        }
    }
    Value::Object(total)
}

/// Shared flag type for wake-ups of the VMM loop.
pub type Flag = Arc<std::sync::atomic::AtomicBool>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_of_json() {
        let dir = std::env::temp_dir().join(format!("kiln-metrics-{}", std::process::id()));
        let mut m = Metrics::default();
        assert!(matches!(m.flush(vec![]), Err(MetricsError::NotConfigured)));
        m.set_sink(&dir).unwrap();
        m.flush(vec![("api_server".into(), json!({"requests": 3}))])
            .unwrap();
        m.flush(vec![]).unwrap();
        let text = std::fs::read_to_string(&dir).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2);
        let first: Value = serde_json::from_str(lines[0]).unwrap();
        assert_eq!(first["api_server"]["requests"], 3);
        assert!(first["utc_timestamp_ms"].as_u64().unwrap() > 0);
        std::fs::remove_file(&dir).unwrap();
        assert!(
            Metrics::default()
                .set_sink(Path::new("/nonexistent/dir/m.json"))
                .is_err()
        );
    }

    /// The keys each section has always had (Firecracker-compatible layout): a counter
    /// renamed or dropped from a device's metrics struct changes what users parse.
    #[test]
    fn section_keys_are_the_published_ones() {
        fn keys(v: Value) -> Vec<String> {
            v.as_object().unwrap().keys().cloned().collect()
        }
        use crate::devices::i8042::I8042Metrics;
        use crate::devices::serial::SerialMetrics;
        use crate::devices::virtio::block::BlockMetrics;
        use crate::devices::virtio::net::NetMetrics;
        let vcpu = keys(sum(vec![section(&VcpuMetrics::default())].into_iter()));
        assert_eq!(
            vcpu,
            [
                "emulation_completions",
                "exit_io_in",
                "exit_io_out",
                "exit_mmio_read",
                "exit_mmio_write",
                "failures",
                "interrupted",
                "unhandled_access"
            ]
        );
        assert_eq!(
            keys(section(&SerialMetrics::default())),
            [
                "bad_accesses",
                "irq_failures",
                "rx_bytes",
                "tx_bytes",
                "tx_lost_bytes"
            ]
        );
        assert_eq!(
            keys(section(&I8042Metrics::default())),
            [
                "bad_accesses",
                "irq_failures",
                "missed_bytes",
                "reset_count"
            ]
        );
        assert_eq!(
            keys(section(&BlockMetrics::default())),
            [
                "dropped_chains",
                "flush_count",
                "get_id_count",
                "interrupts",
                "invalid_requests",
                "io_engine_errors",
                "io_errors",
                "queue_errors",
                "queue_events",
                "rate_limiter_admitted_bytes",
                "rate_limiter_admitted_ops",
                "rate_limiter_event_count",
                "rate_limiter_throttled_events",
                "read_bytes",
                "read_count",
                "unsupported",
                "write_bytes",
                "write_count"
            ]
        );
        assert_eq!(
            keys(section(&NetMetrics::default())),
            [
                "interrupts",
                "queue_errors",
                "rx_bad_chains",
                "rx_bounced",
                "rx_bytes",
                "rx_dropped",
                "rx_errors",
                "rx_frames",
                "rx_rate_limiter_admitted_bytes",
                "rx_rate_limiter_admitted_frames",
                "rx_rate_limiter_event_count",
                "rx_rate_limiter_throttled",
                "rx_zero_copy",
                "tap_failures",
                "tx_bytes",
                "tx_dropped",
                "tx_errors",
                "tx_frames",
                "tx_rate_limiter_admitted_bytes",
                "tx_rate_limiter_admitted_frames",
                "tx_rate_limiter_event_count",
                "tx_rate_limiter_throttled",
                "tx_retries"
            ]
        );
    }

    #[test]
    fn vcpu_counters_are_summed() {
        let a = Arc::new(VcpuMetrics::default());
        let b = Arc::new(VcpuMetrics::default());
        a.exit_io_out.add(3);
        b.exit_io_out.add(4);
        b.failures.inc();
        let s = device_sections(&DeviceRegistry::default(), &[a, b]);
        assert_eq!(s[0].0, "vcpu");
        assert_eq!(s[0].1["exit_io_out"], 7);
        assert_eq!(s[0].1["failures"], 1);
        assert_eq!(s[0].1["exit_io_in"], 0);
        assert_eq!(s.last().unwrap().0, "seccomp");
    }

    #[test]
    fn fifo_opens_without_a_reader() {
        let p = std::env::temp_dir().join(format!("kiln-metrics-fifo-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut m = Metrics::default();
        m.set_sink(&p).unwrap();
        m.flush(vec![]).unwrap();
        std::fs::remove_file(&p).unwrap();
    }

    /// Takes `room` bytes per call, then reports "would block" until given more room.
    struct Narrow {
        taken: Vec<u8>,
        room: usize,
    }

    impl Write for Narrow {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            if self.room == 0 {
                return Err(std::io::ErrorKind::WouldBlock.into());
            }
            let n = buf.len().min(self.room);
            self.room -= n;
            self.taken.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn line_sink_writes_whole_lines_or_drops_them() {
        let mut sink = LineSink::new(Narrow {
            taken: Vec::new(),
            room: 10,
        });
        assert_eq!(sink.write_line(b"first\n").unwrap(), LineOutcome::Written);
        // Only the start fits: the rest is kept, the next line is dropped.
        assert_eq!(sink.write_line(b"second\n").unwrap(), LineOutcome::Written);
        assert_eq!(sink.pending(), 3);
        assert_eq!(sink.write_line(b"third\n").unwrap(), LineOutcome::Dropped);
        // Room again: the rest goes first, then the new line.
        sink.out.room = 100;
        assert_eq!(sink.write_line(b"fourth\n").unwrap(), LineOutcome::Written);
        assert_eq!(sink.pending(), 0);
        assert_eq!(sink.out.taken, b"first\nsecond\nfourth\n");
        // No room at all: dropped whole.
        sink.out.room = 0;
        assert_eq!(sink.write_line(b"fifth\n").unwrap(), LineOutcome::Dropped);
        assert_eq!(sink.out.taken, b"first\nsecond\nfourth\n");
    }

    /// Security case 27: a metrics FIFO nobody reads never blocks a flush; lines that do
    /// not fit are dropped and counted, and what the reader finally gets is whole JSON
    /// lines, even for lines longer than PIPE_BUF.
    #[test]
    fn unread_fifo_never_blocks_and_keeps_lines_whole() {
        use std::io::Read;
        use std::os::unix::fs::OpenOptionsExt;
        let p = std::env::temp_dir().join(format!("kiln-metrics-full-{}", std::process::id()));
        let _ = std::fs::remove_file(&p);
        nix::unistd::mkfifo(&p, nix::sys::stat::Mode::S_IRWXU).unwrap();
        let mut m = Metrics::default();
        m.set_sink(&p).unwrap();
        let big = || vec![("pad".to_string(), json!("x".repeat(10_000)))];
        let start = std::time::Instant::now();
        for _ in 0..100 {
            m.flush(big()).unwrap();
        }
        assert!(start.elapsed() < Duration::from_secs(10));
        let missed = m.missed_metrics_count.load(Ordering::Relaxed);
        let written = m.flushes.load(Ordering::Relaxed);
        assert!(missed > 50, "missed {missed}");
        assert_eq!(missed + written, 100);
        // A reader drains the FIFO; the next flush completes the line cut short first.
        let mut reader = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&p)
            .unwrap();
        let mut text = Vec::new();
        let mut buf = vec![0u8; 1 << 16];
        let mut drain = |text: &mut Vec<u8>| {
            while let Ok(n) = reader.read(&mut buf) {
                if n == 0 {
                    break;
                }
                text.extend_from_slice(&buf[..n]);
            }
        };
        drain(&mut text);
        m.flush(vec![]).unwrap();
        drain(&mut text);
        let text = String::from_utf8(text).unwrap();
        assert!(text.ends_with('\n'));
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len() as u64, m.flushes.load(Ordering::Relaxed));
        for line in &lines {
            let v: Value = serde_json::from_str(line).unwrap();
            assert!(v["logger"]["missed_metrics_count"].as_u64().is_some());
        }
        let last: Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
        assert_eq!(last["logger"]["missed_metrics_count"], missed);
        std::fs::remove_file(&p).unwrap();
    }
}
