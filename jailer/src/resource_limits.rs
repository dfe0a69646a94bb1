//! `--resource-limit`: the rlimits the jailed process starts with.

use std::io;

use crate::sys;

/// Open file descriptors allowed when `--resource-limit no-file=` is not given
/// (Firecracker's default).
pub const DEFAULT_NO_FILE: u64 = 2048;

/// The limits to install; each sets the soft and the hard limit alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResourceLimits {
    /// `RLIMIT_FSIZE`, largest file the process may write (bytes); unchanged when `None`.
    pub fsize: Option<u64>,
    /// `RLIMIT_NOFILE`, one more than the highest file descriptor number.
    pub no_file: u64,
}

impl Default for ResourceLimits {
    fn default() -> Self {
        ResourceLimits {
            fsize: None,
            no_file: DEFAULT_NO_FILE,
        }
    }
}

/// A limit the kernel refused.
#[derive(Debug, thiserror::Error)]
#[error("set {resource} to {value}: {source}")]
pub struct RlimitError {
    resource: &'static str,
    value: u64,
    source: io::Error,
}

impl ResourceLimits {
    /// Installs the limits on the calling process; they carry over to exec.
    pub fn install(&self) -> Result<(), RlimitError> {
        if let Some(fsize) = self.fsize {
            set("RLIMIT_FSIZE", libc::RLIMIT_FSIZE, fsize)?;
        }
        set("RLIMIT_NOFILE", libc::RLIMIT_NOFILE, self.no_file)
    }
}

fn set(resource: &'static str, id: sys::Resource, value: u64) -> Result<(), RlimitError> {
    sys::setrlimit(id, value).map_err(|source| RlimitError {
        resource,
        value,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn install_sets_soft_and_hard_limits() {
        // Lowering limits is allowed to anyone and only affects this test
        // process, whose tests need few files and write nothing large.
        let limits = ResourceLimits {
            fsize: Some(1 << 40),
            no_file: 1000,
        };
        limits.install().unwrap();
        assert_eq!(sys::getrlimit(libc::RLIMIT_NOFILE).unwrap(), (1000, 1000));
        assert_eq!(
            sys::getrlimit(libc::RLIMIT_FSIZE).unwrap(),
            (1 << 40, 1 << 40)
        );
    }

    #[test]
    fn refused_limit_names_the_resource() {
        // RLIMIT_NOFILE may not exceed fs.nr_open, whoever asks.
        let err = ResourceLimits {
            fsize: None,
            no_file: u64::MAX - 1,
        }
        .install()
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("set RLIMIT_NOFILE to "), "{msg}");
        assert!(msg.contains("os error"), "{msg}");
    }
}
