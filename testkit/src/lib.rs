//! kiln's test support: the generic helpers its end-to-end tests (`tests/`), benchmarks
//! (`benches/`) and the jailer's tests share, one implementation each. Not published: a
//! dev-dependency of the kiln and jailer packages.
//!
//! - [`tmp`]: unique names and temporary directories removed on drop;
//! - [`host`]: the `/dev/kvm` and root checks (tests fail, they never skip);
//! - [`http`]: one HTTP/1.1 request on a Unix socket (kiln's API);
//! - [`netns`]: network namespaces with TAP devices, and pinging from inside one;
//! - [`fuse`]: a disk whose reads wait until the test lets them go (a FUSE file system);
//! - [`process`]: reading a child's output line by line with deadlines, waiting, signals;
//! - [`procfs`]: per-thread CPU time (schedstat) and memory (smaps, status) of a process;
//! - [`stats`]: median, minimum and maximum, and how the benchmarks print them;
//! - [`uffd`]: a page-fault handler for snapshot restores through userfaultfd (Firecracker's
//!   handshake), serving from the memory file on a thread and counting what it served.
//!
//! Fallible helpers return `std::io::Result`: benchmarks report the error, tests unwrap.
//! kiln-specific helpers (the kiln binary, the test guest, a kiln serving its API) stay in
//! `tests/common` and `benches/common`.

pub mod fuse;
pub mod host;
pub mod http;
pub mod netns;
pub mod process;
pub mod procfs;
pub mod stats;
pub mod tmp;
pub mod uffd;

pub use host::{check_kvm, is_root, require_kvm, require_root};
pub use netns::NetNs;
pub use process::{Line, LineReader, exit_code, read_all, signal, wait_until};
pub use tmp::{TempDir, unique};

/// An `std::io::Error` of kind `Other` saying `msg`.
pub(crate) fn error(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::other(msg.into())
}
