//! See `kiln_fuzz::serial` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::serial::Input| kiln_fuzz::serial::run(&input));
