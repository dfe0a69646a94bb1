//! Shared code of kiln's fuzz targets.
//!
//! Every target's input is a structured value decoded from the fuzzer's bytes with
//! `arbitrary` ([`wire`]); each input type also has an encoder, so the seed generator
//! (`examples/seeds.rs`) writes valid, meaningful inputs built with kiln's own types.
//! Each surface has one module holding its input type and its `run` function, which drives
//! kiln's code and panics when an invariant breaks; `fuzz_targets/*.rs` only call `run`.

pub mod guest;
pub mod virtq;
pub mod wire;

pub mod api;
pub mod blk;
pub mod blk_model;
pub mod config;
pub mod i8042;
pub mod jailer;
pub mod loader;
pub mod migration;
pub mod mmio;
pub mod net;
pub mod rate_limited;
pub mod rate_limiter;
pub mod seccomp;
pub mod serial;
pub mod snapshot;
