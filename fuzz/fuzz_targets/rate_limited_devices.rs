//! See `kiln_fuzz::rate_limited` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(
    |input: kiln_fuzz::rate_limited::Input| kiln_fuzz::rate_limited::run(&input)
);
