//! See `kiln_fuzz::api` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::api::Input| kiln_fuzz::api::run(&input));
