//! kiln: a minimal, security-focused microVM monitor.
//!
//! Start-up is one linear function ([`builder::build_and_start`]); the running VM is a
//! [`vmm::Vmm`] whose event loop runs on the main thread while each vCPU runs on its own.

pub mod api;
pub mod arch;
pub mod builder;
pub mod cli;
pub mod config;
pub mod controller;
pub mod devices;
pub mod exit;
pub mod logger;
pub mod metrics;
pub mod seccomp;
pub mod signals;
pub mod terminal;
pub mod test_guest;
pub mod vmm;
pub mod vstate;
