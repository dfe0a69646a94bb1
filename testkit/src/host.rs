//! What the host must offer: KVM and root. Tests that need them fail without them, they
//! never skip.

use std::io;

/// Opens `/dev/kvm` read-write (as a VMM does), or says why it cannot.
pub fn check_kvm() -> io::Result<()> {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            let why = if e.kind() == io::ErrorKind::NotFound {
                "/dev/kvm is missing: this host has no KVM"
            } else {
                "/dev/kvm cannot be opened (run as root)"
            };
            io::Error::new(e.kind(), format!("{why}: {e}"))
        })
}

/// Panics unless `/dev/kvm` opens read-write: tests that boot VMs need KVM and root.
pub fn require_kvm() {
    if let Err(e) = check_kvm() {
        panic!("{e}. These tests boot VMs: run them as root on a host with KVM");
    }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    // SAFETY: geteuid takes no arguments and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Panics unless running as root.
pub fn require_root() {
    assert!(is_root(), "these tests must run as root");
}
