//! See `kiln_fuzz::net` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::net::Input| kiln_fuzz::net::run(&input));
