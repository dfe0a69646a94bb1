//! kiln's jailer as a library: the binary (`main.rs`) is a thin wrapper around [`env::run`].
//! The argument parser ([`args::parse`]) and the exec-file check ([`args::check_static_elf`])
//! are public so that the fuzz targets in `fuzz/` drive them directly.

pub mod args;
mod cgroup;
mod chroot;
pub mod env;
mod resource_limits;
mod sys;

pub use cgroup::{CgroupSetting, CgroupVersion};
pub use resource_limits::ResourceLimits;
/// The resource type of `setrlimit(2)` on the libc kiln is built against.
pub use sys::Resource as RlimitResource;
