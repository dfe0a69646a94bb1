//! The freestanding test guest (tests/guest), built by build.rs and embedded as the default
//! kernel so a microVM boots with no files of the user's own.

/// The guest ELF (Linux 64-bit boot protocol), when built with the `test-guest` feature.
#[cfg(feature = "test-guest")]
pub const ELF: Option<&[u8]> = Some(include_bytes!(concat!(
    env!("KILN_TEST_GUEST_DIR"),
    "/kiln-guest.elf"
)));

/// The guest ELF (not built in).
#[cfg(not(feature = "test-guest"))]
pub const ELF: Option<&[u8]> = None;
