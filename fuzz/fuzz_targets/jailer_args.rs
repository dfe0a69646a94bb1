//! See `kiln_fuzz::jailer` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::jailer::Input| kiln_fuzz::jailer::run(&input));
