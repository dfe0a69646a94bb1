//! Architecture support. kiln is KVM-only and x86_64-first.

pub mod x86_64;
