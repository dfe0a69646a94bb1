//! See `kiln_fuzz::loader` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::loader::Input| kiln_fuzz::loader::run(&input));
