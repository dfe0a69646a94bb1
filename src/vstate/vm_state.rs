//! The VM-wide KVM state a snapshot holds: the PIT, the kvm-clock, and the in-kernel
//! interrupt controllers (PIC master, PIC slave, IOAPIC).

use kvm_bindings::{
    KVM_CLOCK_TSC_STABLE, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    kvm_clock_data, kvm_irqchip, kvm_pit_state2,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use super::vm::VmError;

/// The VM's interrupt controllers, PIT and clock.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The in-kernel PIT.
    pub pit: kvm_pit_state2,
    /// kvm-clock.
    pub clock: kvm_clock_data,
    /// PIC master.
    pub pic_master: kvm_irqchip,
    /// PIC slave.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
}

fn ioctl(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::Ioctl { what, source }
}

fn get_chip(fd: &VmFd, chip_id: u32) -> Result<kvm_irqchip, VmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(ioctl("KVM_GET_IRQCHIP"))?;
    Ok(chip)
}

/// Saves the VM-wide state (the vCPUs are parked).
pub fn save(fd: &VmFd) -> Result<VmSnapshot, VmError> {
    Ok(VmSnapshot {
        pit: fd.get_pit2().map_err(ioctl("KVM_GET_PIT2"))?,
        clock: fd.get_clock().map_err(ioctl("KVM_GET_CLOCK"))?,
        pic_master: get_chip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(fd, KVM_IRQCHIP_IOAPIC)?,
    })
}

/// Restores the VM-wide state into a VM whose irqchip and PIT exist and whose vCPUs have
/// not run.
pub fn restore(fd: &VmFd, s: &VmSnapshot) -> Result<(), VmError> {
    fd.set_pit2(&s.pit).map_err(ioctl("KVM_SET_PIT2"))?;
    let mut clock = s.clock;
    // KVM_SET_CLOCK refuses flags it only reports.
    clock.flags &= !KVM_CLOCK_TSC_STABLE;
    fd.set_clock(&clock).map_err(ioctl("KVM_SET_CLOCK"))?;
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        let mut c = *chip;
        c.chip_id = id;
        fd.set_irqchip(&c).map_err(ioctl("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}
