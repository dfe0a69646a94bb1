//! See `kiln_fuzz::snapshot` for the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::snapshot::run(data));
