//! Metrics: one JSON object per flush, written as one line to the configured file or FIFO —
//! every 60 seconds while the VM runs and on the API's `FlushMetrics`.

use std::fs::File;
use std::io::Write;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};

use crate::vmm::Vmm;

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

/// Opens a file or FIFO for appending lines without blocking on a FIFO with no reader yet.
pub fn open_sink(path: &Path) -> std::io::Result<File> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let is_fifo = std::fs::metadata(path).is_ok_and(|m| m.file_type().is_fifo());
    let mut options = std::fs::OpenOptions::new();
    if is_fifo {
        // Read-write keeps open(2) from waiting for a reader.
        options.read(true).write(true);
    } else {
        options.append(true).create(true);
    }
    options.custom_flags(libc::O_CLOEXEC).open(path)
}

/// A source of named counters (a device, the API server, ...).
pub type Section = (String, Value);

/// The metrics destination and the counters of what is not a device.
#[derive(Debug, Default)]
pub struct Metrics {
    sink: Option<File>,
    /// Flushes written.
    pub flushes: AtomicU64,
}

impl Metrics {
    /// Sends metrics to `path`.
    pub fn set_sink(&mut self, path: &Path) -> Result<(), MetricsError> {
        let file = open_sink(path).map_err(|source| MetricsError::Open {
            path: path.display().to_string(),
            source,
        })?;
        self.sink = Some(file);
        Ok(())
    }

    /// Whether a destination is configured.
    pub fn configured(&self) -> bool {
        self.sink.is_some()
    }

    /// Writes one JSON line made of `sections` (plus a timestamp).
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
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        sink.write_all(line.as_bytes())
            .map_err(MetricsError::Write)?;
        self.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// The counters of a running VM, one section per device (Firecracker's naming:
/// `block_<drive_id>`, `net_<iface_id>`, `vcpu`, `uart`, `i8042`).
pub fn vmm_sections(vmm: &Vmm) -> Vec<Section> {
    let d = vmm.devices();
    let mut out = Vec::new();
    let mut vcpu = Map::new();
    let sum = |f: fn(&crate::vstate::vcpu::VcpuMetrics) -> u64| -> u64 {
        d.vcpu_metrics.iter().map(|m| f(m)).sum()
    };
    vcpu.insert("exit_io_in".into(), json!(sum(|m| m.exit_io_in.get())));
    vcpu.insert("exit_io_out".into(), json!(sum(|m| m.exit_io_out.get())));
    vcpu.insert(
        "exit_mmio_read".into(),
        json!(sum(|m| m.exit_mmio_read.get())),
    );
    vcpu.insert(
        "exit_mmio_write".into(),
        json!(sum(|m| m.exit_mmio_write.get())),
    );
    vcpu.insert(
        "unhandled_access".into(),
        json!(sum(|m| m.unhandled_access.get())),
    );
    vcpu.insert("interrupted".into(), json!(sum(|m| m.interrupted.get())));
    vcpu.insert("failures".into(), json!(sum(|m| m.failures.get())));
    vcpu.insert(
        "emulation_completions".into(),
        json!(sum(|m| m.emulation_completions.get())),
    );
    out.push(("vcpu".to_string(), Value::Object(vcpu)));

    let serial = d
        .serial
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .metrics();
    out.push((
        "uart".to_string(),
        json!({
            "tx_bytes": serial.tx_bytes.get(),
            "tx_lost_bytes": serial.tx_lost_bytes.get(),
            "rx_bytes": serial.rx_bytes.get(),
            "irq_failures": serial.irq_failures.get(),
            "bad_accesses": serial.bad_accesses.get(),
        }),
    ));
    let i8042 = d
        .i8042
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .metrics();
    out.push((
        "i8042".to_string(),
        json!({
            "reset_count": i8042.reset_count.get(),
            "missed_bytes": i8042.missed_bytes.get(),
            "irq_failures": i8042.irq_failures.get(),
            "bad_accesses": i8042.bad_accesses.get(),
        }),
    ));
    for block in &d.blocks {
        let b = block.lock().unwrap_or_else(PoisonError::into_inner);
        let m = b.metrics();
        out.push((
            format!("block_{}", b.config().drive_id),
            json!({
                "queue_events": m.queue_events.get(),
                "read_count": m.read_count.get(),
                "read_bytes": m.read_bytes.get(),
                "write_count": m.write_count.get(),
                "write_bytes": m.write_bytes.get(),
                "flush_count": m.flush_count.get(),
                "get_id_count": m.get_id_count.get(),
                "invalid_requests": m.invalid_requests.get(),
                "io_errors": m.io_errors.get(),
                "unsupported": m.unsupported.get(),
                "dropped_chains": m.dropped_chains.get(),
                "queue_errors": m.queue_errors.get(),
                "interrupts": m.interrupts.get(),
            }),
        ));
    }
    for net in &d.nets {
        let n = net.lock().unwrap_or_else(PoisonError::into_inner);
        let m = n.metrics();
        out.push((
            format!("net_{}", n.config().iface_id),
            json!({
                "rx_frames": m.rx_frames.get(),
                "rx_bytes": m.rx_bytes.get(),
                "rx_zero_copy": m.rx_zero_copy.get(),
                "rx_bounced": m.rx_bounced.get(),
                "rx_dropped": m.rx_dropped.get(),
                "rx_bad_chains": m.rx_bad_chains.get(),
                "rx_errors": m.rx_errors.get(),
                "tx_frames": m.tx_frames.get(),
                "tx_bytes": m.tx_bytes.get(),
                "tx_dropped": m.tx_dropped.get(),
                "tx_errors": m.tx_errors.get(),
                "tx_retries": m.tx_retries.get(),
                "tap_failures": m.tap_failures.get(),
                "queue_errors": m.queue_errors.get(),
                "interrupts": m.interrupts.get(),
            }),
        ));
    }
    out.push(("seccomp".to_string(), json!({ "num_faults": 0 })));
    out
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
}
