//! See `kiln_fuzz::migration` for the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::migration::run(data));
