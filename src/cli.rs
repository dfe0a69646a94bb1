//! Command-line arguments: Firecracker's flags (`--config-file`, `--no-api`, `--api-sock`,
//! `--id`, `--level`, ...) plus quick flags for booting without a config file.

use std::path::PathBuf;

use crate::config::{
    BUILTIN_KERNEL, BootSourceConfig, DEFAULT_MEM_MIB, DEFAULT_VCPUS, LogLevel, MachineConfig,
    VmConfig,
};

/// Default API socket path.
pub const DEFAULT_API_SOCK: &str = "/run/kiln.socket";

/// Errors in the arguments.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CliError {
    /// An unknown flag.
    #[error("unknown argument `{0}` (see --help)")]
    Unknown(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(String),
    /// A value that does not parse.
    #[error("{flag}: `{value}` is not {what}")]
    BadValue {
        /// The flag.
        flag: String,
        /// Its value.
        value: String,
        /// What was expected.
        what: &'static str,
    },
    /// Flags that exclude each other.
    #[error("{0}")]
    Conflict(&'static str),
}

/// Parsed arguments.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Args {
    /// `--config-file`.
    pub config_file: Option<PathBuf>,
    /// `--no-api`.
    pub no_api: bool,
    /// `--api-sock`.
    pub api_sock: Option<PathBuf>,
    /// `--http-api-max-payload-size`: the largest request body the API accepts, in bytes.
    pub http_api_max_payload_size: Option<usize>,
    /// `--kernel`.
    pub kernel: Option<String>,
    /// `--initrd`.
    pub initrd: Option<String>,
    /// `--cmdline` / `--boot-args`.
    pub cmdline: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u64>,
    /// `--mem-mib`.
    pub mem_mib: Option<u64>,
    /// `--serial-out`.
    pub serial_out: Option<PathBuf>,
    /// `--id`.
    pub id: Option<String>,
    /// `--level` / `--log-level`.
    pub level: Option<LogLevel>,
    /// `--log-path`.
    pub log_path: Option<PathBuf>,
    /// `--show-level`.
    pub show_level: bool,
    /// `--show-log-origin`.
    pub show_log_origin: bool,
    /// `--metrics-path`.
    pub metrics_path: Option<PathBuf>,
    /// `--start-time-us` (passed by the jailer).
    pub start_time_us: Option<u64>,
    /// `--start-time-cpu-us` (passed by the jailer).
    pub start_time_cpu_us: Option<u64>,
    /// `--parent-cpu-time-us` (passed by the jailer).
    pub parent_cpu_time_us: Option<u64>,
    /// `--boot-timer`.
    pub boot_timer: bool,
    /// `--no-seccomp`.
    pub no_seccomp: bool,
    /// `--seccomp-filter`.
    pub seccomp_filter: Option<PathBuf>,
    /// `--print-seccomp`.
    pub print_seccomp: bool,
    /// `--restore-snapshot`: a state file to restore at start.
    pub restore_snapshot: Option<PathBuf>,
    /// `--restore-mem`: its memory file.
    pub restore_mem: Option<PathBuf>,
    /// `--working-set`: prefault (or record) the restored guest's working set.
    pub working_set: Option<PathBuf>,
    /// `--snapshot-key-file`: 32 bytes authenticating snapshot state files.
    pub snapshot_key_file: Option<PathBuf>,
    /// `--describe-snapshot`: print a state file's summary and exit.
    pub describe_snapshot: Option<PathBuf>,
    /// `--enable-pci` (Firecracker 1.13+): accepted; kiln has no PCI.
    pub enable_pci: bool,
    /// `--help`.
    pub help: bool,
    /// `--version`.
    pub version: bool,
}

/// The usage text.
pub const USAGE: &str = "\
kiln - a minimal, security-focused microVM monitor

USAGE:
    kiln --no-api [--kernel PATH] [--initrd PATH] [--cmdline ARGS] [--vcpus N] [--mem-mib N]
    kiln --config-file FILE --no-api
    kiln [--api-sock PATH] [--config-file FILE]

With --no-api and no kernel, kiln boots its built-in test guest.

VM:
    --config-file FILE     Firecracker-format JSON: boot-source, machine-config, drives,
                           network-interfaces, logger, metrics
    --kernel PATH          kernel image (ELF vmlinux, PVH ELF or bzImage)
    --initrd PATH          initial ramdisk
    --cmdline ARGS         kernel command line (alias --boot-args)
    --vcpus N              vCPUs, 1-32 (default 1)
    --mem-mib N            guest memory in MiB (default 128)
    --serial-out PATH      write the serial console to PATH instead of stdout
    --boot-timer           log the guest boot time when it writes 123 to MMIO 0xc0000000

API:
    --enable-pci           accepted for Firecracker 1.13+ clients; kiln has no PCI bus, its
                           virtio devices stay on virtio-mmio (a warning is logged)
    --api-sock PATH        API socket (default /run/kiln.socket)
    --no-api               do not serve the API; needs a VM from flags or --config-file
    --http-api-max-payload-size N
                           largest API request body in bytes (default 51200); larger
                           ones are answered 413

Snapshots:
    --restore-snapshot FILE --restore-mem FILE
                           restore a snapshot at start and run it (instead of a kernel;
                           with the API, PUT /snapshot/load does the same)
    --working-set FILE     with --restore-snapshot: fault the pages FILE lists in before the
                           guest runs; without FILE, record there the pages the guest touches
                           in its first second (PUT /snapshot/load's working_set)
    --snapshot-key-file FILE
                           32 bytes (the file's first 32) authenticating snapshot state files:
                           snapshots are written with a keyed MAC, and a state file without
                           it, or changed in any way, is refused
    --describe-snapshot FILE
                           print a state file's version and summary and exit

Sandboxing:
    --seccomp-filter FILE  per-thread filters from a JSON file (seccompiler format, categories
                           vmm, vcpu and api) instead of the built-in ones
    --no-seccomp           run without seccomp filters (prints a warning)
    --print-seccomp        print each thread category's allowed syscalls and exit

Logging and identity:
    --id ID                instance id (default anonymous-instance)
    --level LEVEL          Off, Error, Warning (default), Info, Debug, Trace
    --log-path PATH        log to a file or FIFO instead of stderr
    --show-level           print the level in log lines (default on)
    --show-log-origin      print file:line in log lines
    --metrics-path PATH    write metrics to a file or FIFO
    --start-time-us N, --start-time-cpu-us N, --parent-cpu-time-us N
                           start-up timestamps passed by the jailer

    --version, --help
";

fn number(flag: &str, value: &str) -> Result<u64, CliError> {
    value.parse().map_err(|_| CliError::BadValue {
        flag: flag.to_string(),
        value: value.to_string(),
        what: "a non-negative integer",
    })
}

/// Parses the arguments (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Args, CliError> {
    let mut out = Args::default();
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        let value = |it: &mut I::IntoIter| -> Result<String, CliError> {
            match inline.clone() {
                Some(v) => Ok(v),
                None => it
                    .next()
                    .ok_or_else(|| CliError::MissingValue(flag.clone())),
            }
        };
        match flag.as_str() {
            "--config-file" => out.config_file = Some(value(&mut it)?.into()),
            "--no-api" => out.no_api = true,
            "--api-sock" => out.api_sock = Some(value(&mut it)?.into()),
            "--http-api-max-payload-size" => {
                let v = value(&mut it)?;
                out.http_api_max_payload_size = Some(number(&flag, &v).and_then(|n| {
                    usize::try_from(n).map_err(|_| CliError::BadValue {
                        flag: flag.clone(),
                        value: v.clone(),
                        what: "a payload size",
                    })
                })?);
            }
            "--kernel" => out.kernel = Some(value(&mut it)?),
            "--initrd" => out.initrd = Some(value(&mut it)?),
            "--cmdline" | "--boot-args" => out.cmdline = Some(value(&mut it)?),
            "--vcpus" => out.vcpus = Some(number(&flag, &value(&mut it)?)?),
            "--mem-mib" | "--mem" => out.mem_mib = Some(number(&flag, &value(&mut it)?)?),
            "--serial-out" => out.serial_out = Some(value(&mut it)?.into()),
            "--id" => out.id = Some(value(&mut it)?),
            "--level" | "--log-level" => {
                let v = value(&mut it)?;
                out.level = Some(LogLevel::parse(&v).ok_or(CliError::BadValue {
                    flag: flag.clone(),
                    value: v,
                    what: "a log level (Off, Error, Warning, Info, Debug, Trace)",
                })?);
            }
            "--log-path" => out.log_path = Some(value(&mut it)?.into()),
            "--show-level" => out.show_level = true,
            "--show-log-origin" => out.show_log_origin = true,
            "--metrics-path" => out.metrics_path = Some(value(&mut it)?.into()),
            "--start-time-us" => out.start_time_us = Some(number(&flag, &value(&mut it)?)?),
            "--start-time-cpu-us" => out.start_time_cpu_us = Some(number(&flag, &value(&mut it)?)?),
            "--parent-cpu-time-us" => {
                out.parent_cpu_time_us = Some(number(&flag, &value(&mut it)?)?)
            }
            "--boot-timer" => out.boot_timer = true,
            "--no-seccomp" => out.no_seccomp = true,
            "--seccomp-filter" => out.seccomp_filter = Some(value(&mut it)?.into()),
            "--print-seccomp" => out.print_seccomp = true,
            "--restore-snapshot" => out.restore_snapshot = Some(value(&mut it)?.into()),
            "--restore-mem" => out.restore_mem = Some(value(&mut it)?.into()),
            "--working-set" => out.working_set = Some(value(&mut it)?.into()),
            "--snapshot-key-file" => out.snapshot_key_file = Some(value(&mut it)?.into()),
            "--describe-snapshot" => out.describe_snapshot = Some(value(&mut it)?.into()),
            "--enable-pci" => out.enable_pci = true,
            "--help" | "-h" => out.help = true,
            "--version" | "-V" => out.version = true,
            _ => return Err(CliError::Unknown(arg)),
        }
    }
    let quick = out.kernel.is_some()
        || out.initrd.is_some()
        || out.cmdline.is_some()
        || out.vcpus.is_some()
        || out.mem_mib.is_some();
    if out.no_seccomp && out.seccomp_filter.is_some() {
        return Err(CliError::Conflict(
            "--no-seccomp and --seccomp-filter cannot be combined",
        ));
    }
    if out.restore_snapshot.is_some() != out.restore_mem.is_some() {
        return Err(CliError::Conflict(
            "--restore-snapshot and --restore-mem go together",
        ));
    }
    if out.working_set.is_some() && out.restore_snapshot.is_none() {
        return Err(CliError::Conflict(
            "--working-set goes with --restore-snapshot",
        ));
    }
    if out.restore_snapshot.is_some() && (quick || out.config_file.is_some()) {
        return Err(CliError::Conflict(
            "--restore-snapshot replaces --config-file and the --kernel/--vcpus/... flags",
        ));
    }
    if quick && out.config_file.is_some() {
        return Err(CliError::Conflict(
            "--kernel, --initrd, --cmdline, --vcpus and --mem-mib cannot be combined with --config-file",
        ));
    }
    Ok(out)
}

impl Args {
    /// Whether the VM is described by flags rather than a config file.
    pub fn has_quick_vm(&self) -> bool {
        self.kernel.is_some()
            || self.initrd.is_some()
            || self.cmdline.is_some()
            || self.vcpus.is_some()
            || self.mem_mib.is_some()
    }

    /// The VM the quick flags describe (the built-in test guest when no kernel is given).
    pub fn quick_config(&self) -> VmConfig {
        VmConfig {
            boot_source: BootSourceConfig {
                kernel_image_path: self
                    .kernel
                    .clone()
                    .unwrap_or_else(|| BUILTIN_KERNEL.to_string()),
                initrd_path: self.initrd.clone(),
                boot_args: self.cmdline.clone(),
            },
            machine_config: MachineConfig {
                vcpu_count: self.vcpus.unwrap_or(DEFAULT_VCPUS),
                mem_size_mib: self.mem_mib.unwrap_or(DEFAULT_MEM_MIB),
                ..MachineConfig::default()
            },
            ..VmConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(args: &[&str]) -> Result<Args, CliError> {
        parse(args.iter().map(|s| s.to_string()))
    }

    #[test]
    fn firecracker_style_flags() {
        let a = p(&[
            "--config-file",
            "vm.json",
            "--no-api",
            "--id",
            "vm1",
            "--level=Debug",
        ])
        .unwrap();
        assert_eq!(a.config_file, Some("vm.json".into()));
        assert!(a.no_api);
        assert_eq!(a.id.as_deref(), Some("vm1"));
        assert_eq!(a.level, Some(LogLevel::Debug));
        let a = p(&[
            "--start-time-us",
            "12",
            "--start-time-cpu-us=3",
            "--parent-cpu-time-us",
            "4",
        ])
        .unwrap();
        assert_eq!(
            (a.start_time_us, a.start_time_cpu_us, a.parent_cpu_time_us),
            (Some(12), Some(3), Some(4))
        );
        let a = p(&[
            "--api-sock",
            "/tmp/k.sock",
            "--http-api-max-payload-size",
            "4096",
        ])
        .unwrap();
        assert_eq!(a.http_api_max_payload_size, Some(4096));
        assert!(matches!(
            p(&["--http-api-max-payload-size", "big"]),
            Err(CliError::BadValue { .. })
        ));
    }

    #[test]
    fn quick_flags() {
        let a = p(&[
            "--no-api",
            "--kernel",
            "k",
            "--vcpus",
            "2",
            "--mem-mib",
            "256",
            "--cmdline",
            "a=b c",
        ])
        .unwrap();
        let c = a.quick_config();
        assert_eq!(c.boot_source.kernel_image_path, "k");
        assert_eq!(c.boot_source.boot_args.as_deref(), Some("a=b c"));
        assert_eq!(
            (c.machine_config.vcpu_count, c.machine_config.mem_size_mib),
            (2, 256)
        );
        let c = p(&["--no-api"]).unwrap().quick_config();
        assert_eq!(c.boot_source.kernel_image_path, BUILTIN_KERNEL);
    }

    #[test]
    fn errors() {
        assert_eq!(p(&["--bogus"]), Err(CliError::Unknown("--bogus".into())));
        assert_eq!(
            p(&["--kernel"]),
            Err(CliError::MissingValue("--kernel".into()))
        );
        assert!(matches!(
            p(&["--vcpus", "two"]),
            Err(CliError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["--vcpus", "-1"]),
            Err(CliError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["--level", "loud"]),
            Err(CliError::BadValue { .. })
        ));
        assert!(matches!(
            p(&["--config-file", "x", "--kernel", "k"]),
            Err(CliError::Conflict(_))
        ));
    }
}
