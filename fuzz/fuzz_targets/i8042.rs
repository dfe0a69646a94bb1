//! See `kiln_fuzz::i8042` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::i8042::Input| kiln_fuzz::i8042::run(&input));
