//! See `kiln_fuzz::config` for the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::config::run(data));
