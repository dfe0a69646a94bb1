//! virtio-blk request handling on the `Async` engine (io_uring): see `kiln_fuzz::blk`.
#![no_main]
libfuzzer_sys::fuzz_target!(|input: kiln_fuzz::blk::Input| kiln_fuzz::blk::run_async(&input));
