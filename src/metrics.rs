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
}
