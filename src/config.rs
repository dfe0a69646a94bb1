//! VM configuration in Firecracker's config-file schema (`boot-source`, `machine-config`,
//! `drives`, `network-interfaces`, `logger`, `metrics`): the same objects its API takes.
//! Unknown fields are refused; every error names the field it is about.

use std::collections::HashSet;
use std::fmt;
use std::path::Path;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::arch::x86_64::layout::CMDLINE_MAX_SIZE;

/// Most vCPUs a kiln VM may have (as Firecracker).
pub const MAX_VCPUS: u64 = 32;
/// The kernel path that selects the test guest built into kiln.
pub const BUILTIN_KERNEL: &str = "builtin:test-guest";
/// Command line used when `boot_args` is absent: Firecracker's, with the serial console on.
pub const DEFAULT_BOOT_ARGS: &str =
    "console=ttyS0 reboot=k panic=1 pci=off nomodule i8042.noaux i8042.nomux i8042.dumbkbd";
/// Default vCPU count.
pub const DEFAULT_VCPUS: u64 = 1;
/// Default memory size.
pub const DEFAULT_MEM_MIB: u64 = 128;

/// Largest operator file kiln reads (a config file, a custom seccomp filter): a whole VM's
/// config or Firecracker's own filters take a few tens of KiB. Larger (or endless, as
/// `/dev/zero`) is refused before it fills memory.
pub const MAX_OPERATOR_FILE: u64 = 1024 * 1024;

/// Why an operator file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FileReadError {
    /// Opening or reading failed, or the text is not UTF-8.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// The file is over the limit.
    #[error("larger than {0} bytes, the limit for this file; not read")]
    TooLarge(u64),
}

/// Reads a text file of at most `limit` bytes, never more than `limit + 1` of it.
pub fn read_capped(path: &Path, limit: u64) -> Result<String, FileReadError> {
    use std::io::Read;
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(FileReadError::TooLarge(limit));
    }
    String::from_utf8(bytes)
        .map_err(|e| FileReadError::Io(std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// Configuration errors. The message starts with the field it concerns.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: FileReadError,
    },
    /// The JSON does not match the schema.
    #[error("{path}: {message}")]
    Parse {
        /// Where in the document.
        path: String,
        /// What serde reported.
        message: String,
    },
    /// A value is out of range or inconsistent.
    #[error("{field}: {reason}")]
    Invalid {
        /// The field, e.g. `machine-config.vcpu_count`.
        field: String,
        /// What is wrong.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        reason: reason.into(),
    }
}

/// `boot-source`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSourceConfig {
    /// Kernel image on the host.
    pub kernel_image_path: String,
    /// Initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    /// Kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
}

/// Huge pages backing guest memory.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// Normal pages.
    #[default]
    None,
    /// 2 MiB pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
}

/// `machine-config`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u64,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Two threads per core.
    #[serde(default)]
    pub smt: bool,
    /// Let KVM log dirty pages.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// Huge pages.
    #[serde(default)]
    pub huge_pages: HugePages,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: DEFAULT_VCPUS,
            mem_size_mib: DEFAULT_MEM_MIB,
            smt: false,
            track_dirty_pages: false,
            huge_pages: HugePages::None,
        }
    }
}

/// Block device cache behaviour.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// No FLUSH offered; writes reach the host page cache.
    #[default]
    Unsafe,
    /// FLUSH offered and honoured with fsync.
    Writeback,
}

/// Block I/O engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O on the event thread.
    #[default]
    Sync,
    /// Asynchronous I/O (io_uring in Firecracker).
    Async,
}

/// A token bucket of a rate limiter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucketConfig {
    /// Bucket size (tokens); 0 means no limit.
    pub size: u64,
    /// Initial burst: extra tokens spent first, never refilled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the whole bucket; 0 means no limit.
    pub refill_time: u64,
}

/// A rate limiter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucketConfig>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucketConfig>,
}

/// An element of `drives`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DriveConfig {
    /// Unique id.
    pub drive_id: String,
    /// Backing file on the host.
    pub path_on_host: String,
    /// Whether this is the root device (`root=/dev/vda`).
    pub is_root_device: bool,
    /// Read-only.
    #[serde(default)]
    pub is_read_only: bool,
    /// Root partition UUID (`root=PARTUUID=...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Cache type.
    #[serde(default)]
    pub cache_type: CacheType,
    /// I/O engine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// Rate limiter (bandwidth: data bytes of reads and writes; ops: requests).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// A MAC address, written `aa:bb:cc:dd:ee:ff`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MacAddr(pub [u8; 6]);

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let mut out = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!(
                "`{s}` is not a MAC address (six hex bytes separated by ':')"
            ));
        }
        for (o, p) in out.iter_mut().zip(parts) {
            if p.len() != 2 {
                return Err(format!("`{s}` is not a MAC address"));
            }
            *o = u8::from_str_radix(p, 16).map_err(|_| format!("`{s}` is not a MAC address"))?;
        }
        Ok(MacAddr(out))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// An element of `network-interfaces`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// Unique id.
    pub iface_id: String,
    /// TAP device on the host.
    pub host_dev_name: String,
    /// The guest's MAC address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<MacAddr>,
    /// RX rate limiter (frames to the guest: one op and the frame's bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// TX rate limiter (frames from the guest: one op and the frame's bytes each).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

/// Log levels, spelled as Firecracker's API spells them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings.
    #[default]
    Warning,
    /// Information.
    Info,
    /// Debugging.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// The `log` crate's filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warning => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }

    /// Parses a level, case-insensitively, accepting `warn` for `Warning`.
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" | "warning" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// `logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoggerConfig {
    /// File or FIFO to log to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print the source location in each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log from this module.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// File or FIFO the metrics go to.
    pub metrics_path: String,
}

/// The whole configuration file.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// `boot-source`.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSourceConfig,
    /// `machine-config`.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// `drives`.
    #[serde(default)]
    pub drives: Vec<DriveConfig>,
    /// `network-interfaces`.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetConfig>,
    /// `logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<LoggerConfig>,
    /// `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<MetricsConfig>,
}

/// Parses JSON into `T`, naming the path of the offending field on error.
pub fn from_json<'a, T: Deserialize<'a>>(json: &'a str) -> Result<T, ConfigError> {
    let mut de = serde_json::Deserializer::from_str(json);
    let value: T = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let message = e.into_inner().to_string();
        ConfigError::Parse {
            path: if path == "." {
                "config".to_string()
            } else {
                path
            },
            message,
        }
    })?;
    // Nothing but whitespace may follow the document.
    de.end().map_err(|e| ConfigError::Parse {
        path: "config".to_string(),
        message: e.to_string(),
    })?;
    Ok(value)
}

impl VmConfig {
    /// Reads and validates a config file.
    pub fn from_file(path: &Path) -> Result<VmConfig, ConfigError> {
        let text = read_capped(path, MAX_OPERATOR_FILE).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let config: VmConfig = from_json(&text)?;
        config.validate()?;
        Ok(config)
    }

    /// The vCPU count, validated.
    pub fn vcpus(&self) -> u8 {
        self.machine_config.vcpu_count.min(MAX_VCPUS) as u8
    }

    /// Checks every value; the error names the first bad field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        validate_machine(&self.machine_config)?;
        validate_boot_source(&self.boot_source)?;
        validate_drives(&self.drives)?;
        validate_net(&self.network_interfaces)?;
        Ok(())
    }
}

/// Checks `machine-config`.
pub fn validate_machine(m: &MachineConfig) -> Result<(), ConfigError> {
    if m.vcpu_count == 0 || m.vcpu_count > MAX_VCPUS {
        return Err(invalid(
            "machine-config.vcpu_count",
            format!("must be between 1 and {MAX_VCPUS}, got {}", m.vcpu_count),
        ));
    }
    if m.smt && m.vcpu_count > 1 && !m.vcpu_count.is_multiple_of(2) {
        return Err(invalid(
            "machine-config.vcpu_count",
            format!("must be 1 or even when smt is on, got {}", m.vcpu_count),
        ));
    }
    if m.mem_size_mib == 0 {
        return Err(invalid("machine-config.mem_size_mib", "must be at least 1"));
    }
    if m.huge_pages != HugePages::None {
        return Err(invalid(
            "machine-config.huge_pages",
            "only \"None\" is supported",
        ));
    }
    Ok(())
}

/// Checks `boot-source`.
pub fn validate_boot_source(b: &BootSourceConfig) -> Result<(), ConfigError> {
    if b.kernel_image_path.is_empty() {
        return Err(invalid(
            "boot-source.kernel_image_path",
            "must not be empty",
        ));
    }
    if let Some(args) = &b.boot_args {
        // The whole line, NUL included, must fit; devices add their own entries later.
        if args.len() >= CMDLINE_MAX_SIZE {
            return Err(invalid(
                "boot-source.boot_args",
                format!(
                    "{} bytes, over the {} byte limit of the command line",
                    args.len(),
                    CMDLINE_MAX_SIZE - 1
                ),
            ));
        }
        if let Some(c) = args.chars().find(|c| !(' '..='~').contains(c)) {
            return Err(invalid(
                "boot-source.boot_args",
                format!("contains {c:?}: only printable ASCII is allowed"),
            ));
        }
        // What linux-loader cannot turn into the line the kernel reads (for example init
        // arguments after "--" with no kernel argument before them).
        if let Err(e) = linux_loader::cmdline::Cmdline::try_from(args, CMDLINE_MAX_SIZE)
            .and_then(|c| c.as_cstring().map(drop))
        {
            return Err(invalid("boot-source.boot_args", e.to_string()));
        }
    }
    if b.initrd_path.as_deref() == Some("") {
        return Err(invalid("boot-source.initrd_path", "must not be empty"));
    }
    Ok(())
}

/// Whether an id is acceptable (as Firecracker: non-empty, letters, digits, `_`, `-`, `.`).
pub fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
}

/// Checks `drives`.
pub fn validate_drives(drives: &[DriveConfig]) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    let mut roots = 0;
    for (i, d) in drives.iter().enumerate() {
        let field = |f: &str| format!("drives[{i}].{f}");
        if !valid_id(&d.drive_id) {
            return Err(invalid(
                field("drive_id"),
                format!(
                    "`{}` is not a valid id (1-64 of [A-Za-z0-9_.-])",
                    d.drive_id
                ),
            ));
        }
        if !ids.insert(d.drive_id.as_str()) {
            return Err(invalid(
                field("drive_id"),
                format!("`{}` is used twice", d.drive_id),
            ));
        }
        if d.path_on_host.is_empty() {
            return Err(invalid(field("path_on_host"), "must not be empty"));
        }
        if d.is_root_device {
            roots += 1;
            if roots > 1 {
                return Err(invalid(
                    field("is_root_device"),
                    "only one drive can be the root device",
                ));
            }
        }
        if let Some(p) = &d.partuuid
            && (p.is_empty() || !p.chars().all(|c| c.is_ascii_hexdigit() || c == '-'))
        {
            return Err(invalid(field("partuuid"), format!("`{p}` is not a UUID")));
        }
    }
    Ok(())
}

/// Checks `network-interfaces`.
pub fn validate_net(ifaces: &[NetConfig]) -> Result<(), ConfigError> {
    let mut ids = HashSet::new();
    let mut taps = HashSet::new();
    let mut macs = HashSet::new();
    for (i, n) in ifaces.iter().enumerate() {
        let field = |f: &str| format!("network-interfaces[{i}].{f}");
        if !valid_id(&n.iface_id) {
            return Err(invalid(
                field("iface_id"),
                format!(
                    "`{}` is not a valid id (1-64 of [A-Za-z0-9_.-])",
                    n.iface_id
                ),
            ));
        }
        if !ids.insert(n.iface_id.as_str()) {
            return Err(invalid(
                field("iface_id"),
                format!("`{}` is used twice", n.iface_id),
            ));
        }
        // IFNAMSIZ is 16 including the NUL.
        if n.host_dev_name.is_empty() || n.host_dev_name.len() > 15 {
            return Err(invalid(
                field("host_dev_name"),
                format!(
                    "`{}` is not a valid interface name (1-15 bytes)",
                    n.host_dev_name
                ),
            ));
        }
        if !taps.insert(n.host_dev_name.as_str()) {
            return Err(invalid(
                field("host_dev_name"),
                format!("`{}` is used twice", n.host_dev_name),
            ));
        }
        if let Some(mac) = n.guest_mac {
            if mac.0[0] & 1 == 1 {
                return Err(invalid(
                    field("guest_mac"),
                    format!("{mac} is a multicast address"),
                ));
            }
            if !macs.insert(mac) {
                return Err(invalid(field("guest_mac"), format!("{mac} is used twice")));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<VmConfig, ConfigError> {
        let c: VmConfig = from_json(json)?;
        c.validate()?;
        Ok(c)
    }

    fn err(json: &str) -> String {
        parse(json).unwrap_err().to_string()
    }

    #[test]
    fn firecracker_example_config() {
        let c = parse(
            r#"{
              "boot-source": {"kernel_image_path": "vmlinux.bin", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
              "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}],
              "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false},
              "network-interfaces": [{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0"}]
            }"#,
        )
        .unwrap();
        assert_eq!(c.vcpus(), 2);
        assert_eq!(c.machine_config.mem_size_mib, 1024);
        assert_eq!(c.drives[0].cache_type, CacheType::Unsafe);
        assert_eq!(
            c.network_interfaces[0].guest_mac,
            Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1]))
        );
        // Round trip through JSON.
        let back: VmConfig = from_json(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn defaults() {
        let c = parse(r#"{"boot-source": {"kernel_image_path": "k"}}"#).unwrap();
        assert_eq!(c.machine_config, MachineConfig::default());
        assert!(c.drives.is_empty());
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 0, "mem_size_mib": 128}}"#,
                "machine-config.vcpu_count: must be between 1 and 32, got 0",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 33, "mem_size_mib": 128}}"#,
                "machine-config.vcpu_count: must be between 1 and 32, got 33",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 1, "mem_size_mib": 0}}"#,
                "machine-config.mem_size_mib: must be at least 1",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": 3, "mem_size_mib": 64, "smt": true}}"#,
                "machine-config.vcpu_count: must be 1 or even",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": ""}}"#,
                "boot-source.kernel_image_path: must not be empty",
            ),
            (
                r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 1}}"#,
                "missing field `boot-source`",
            ),
            (
                r#"{"boot-source": {}}"#,
                "boot-source: missing field `kernel_image_path`",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k", "kernel": 1}}"#,
                "boot-source.kernel: unknown field `kernel`",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "vsock": {}}"#,
                "vsock: unknown field `vsock`",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "machine-config": {"vcpu_count": "2", "mem_size_mib": 1}}"#,
                "machine-config.vcpu_count: invalid type",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k", "boot_args": "a\nb"}}"#,
                "boot-source.boot_args: contains '\\n'",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", "path_on_host": "x", "is_root_device": true}, {"drive_id": "a", "path_on_host": "y", "is_root_device": false}]}"#,
                "drives[1].drive_id: `a` is used twice",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "drives": [{"drive_id": "a", "path_on_host": "x", "is_root_device": true}, {"drive_id": "b", "path_on_host": "y", "is_root_device": true}]}"#,
                "drives[1].is_root_device: only one",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:00:00:00:01"}]}"#,
                "network-interfaces[0].guest_mac: 01:00:00:00:00:01 is a multicast address",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}, "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "zz"}]}"#,
                "network-interfaces[0].guest_mac: `zz` is not a MAC address",
            ),
            (
                r#"{"boot-source": {"kernel_image_path": "k"}"#,
                "EOF while parsing",
            ),
        ];
        for (json, want) in cases {
            let got = err(json);
            assert!(got.contains(want), "for {json}\n got: {got}\nwant: {want}");
            assert!(!got.contains('\n'), "one line: {got}");
        }
    }

    #[test]
    fn command_line_limit() {
        let long = "a".repeat(CMDLINE_MAX_SIZE);
        let json =
            format!(r#"{{"boot-source": {{"kernel_image_path": "k", "boot_args": "{long}"}}}}"#);
        assert!(err(&json).starts_with("boot-source.boot_args: 2048 bytes, over the 2047"));
        let ok = "a".repeat(CMDLINE_MAX_SIZE - 1);
        let json =
            format!(r#"{{"boot-source": {{"kernel_image_path": "k", "boot_args": "{ok}"}}}}"#);
        assert!(parse(&json).is_ok());
    }

    #[test]
    fn ids() {
        assert!(valid_id("rootfs"));
        assert!(valid_id("eth0.1-a_b"));
        assert!(!valid_id(""));
        assert!(!valid_id("a/b"));
        assert!(!valid_id(&"x".repeat(65)));
    }

    #[test]
    fn log_levels() {
        assert_eq!(LogLevel::parse("WARN"), Some(LogLevel::Warning));
        assert_eq!(LogLevel::parse("Debug"), Some(LogLevel::Debug));
        assert_eq!(LogLevel::parse("loud"), None);
    }
}
