//! See `kiln_fuzz::seccomp` for the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::seccomp::run(data));
