//! See `kiln_fuzz::rate_limiter` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(
    |input: kiln_fuzz::rate_limiter::Input| kiln_fuzz::rate_limiter::run(&input)
);
