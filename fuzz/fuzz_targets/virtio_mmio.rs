//! See `kiln_fuzz::mmio` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::mmio::Input| kiln_fuzz::mmio::run(&input));
