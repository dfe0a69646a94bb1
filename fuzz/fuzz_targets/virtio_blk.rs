//! virtio-blk request handling: see `kiln_fuzz::blk` for the input and the invariants.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::blk::Input| kiln_fuzz::blk::run(&input));
