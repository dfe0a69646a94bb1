//! kiln: a minimal, security-focused microVM monitor.
//!
//! The boot path, in order: `main.rs` (arguments → configuration) → [`config`] and
//! [`resources`] (what to boot) → [`builder::build_and_start`] (one linear start-up) →
//! [`vmm::Vmm::run`] (the one loop, on the main thread, while each vCPU runs on its own) →
//! [`exit::ExitReason`] (the process exit code).

/// Firecracker's HTTP API: parsing, routing, the API thread, and the actions it applies.
pub mod api;
/// x86_64: memory layout, kernel loading, boot structures, CPUID, registers.
pub mod arch;
/// The linear start-up: KVM, memory, VM, devices, kernel, vCPUs, event loop.
pub mod builder;
/// Command-line flags.
pub mod cli;
/// Firecracker's config-file schema and its validation.
pub mod config;
/// Device models (serial, i8042, boot timer, virtio-mmio, block, net) and their registry.
pub mod devices;
/// Why a VM ends and the exit code each reason maps to.
pub mod exit;
/// The logger (stderr, or a file or FIFO).
pub mod logger;
/// Metrics: one JSON line per flush, one section per device.
pub mod metrics;
/// Live migration between two kiln processes: the stream, the source and the destination.
pub mod migration;
/// Token-bucket rate limiters for device I/O, with an exact wake-up timer.
pub mod rate_limiter;
/// The resources configured before boot, validated change by change.
pub mod resources;
/// Per-thread seccomp filters: loading, installing, the SIGSYS report.
pub mod seccomp;
/// SIGINT, SIGTERM and SIGHUP as an orderly stop.
pub mod signals;
/// Snapshots: the state file (authenticated before it is parsed) and the memory file.
pub mod snapshot;
/// Raw mode for a terminal on stdin (serial console).
pub mod terminal;
/// The built-in test guest image.
pub mod test_guest;
/// The running VM: the one owner of vCPUs, memory, devices and the event loop.
pub mod vmm;
/// KVM state: the VM, guest memory, vCPU threads.
pub mod vstate;
