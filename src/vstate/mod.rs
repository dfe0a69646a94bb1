//! KVM state: the VM (memory slots, in-kernel irqchip and PIT), guest memory and vCPUs.

pub mod emulation;
pub mod memory;
pub mod vcpu;
pub mod vcpu_state;
pub mod vm;
pub mod vm_state;
