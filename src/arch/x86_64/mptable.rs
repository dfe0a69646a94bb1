//! The Intel MultiProcessor Specification 1.4 table that tells the guest about its vCPUs,
//! the IOAPIC and how the ISA interrupts are wired (the table Linux reads when there is no
//! ACPI).

use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, GSI_MAX, HIMEM_START, IOAPIC_START, MPTABLE_START};
use crate::vstate::memory::GuestMemory;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPC_SPEC: u8 = 4;
const MPC_OEM: &[u8; 8] = b"KILN    ";
const MPC_PRODUCT_ID: &[u8; 12] = b"MICROVM     ";
const APIC_VERSION: u8 = 0x14;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const MPC_APIC_USABLE: u8 = 1;
const MP_IRQPOL_DEFAULT: u16 = 0;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_INTSRC: u8 = 3;
const ENTRY_LINTSRC: u8 = 4;

/// Size of the floating pointer structure.
pub const MPF_SIZE: usize = 16;
/// Size of the configuration table header.
pub const MPC_HEADER_SIZE: usize = 44;
/// Size of a processor entry.
pub const MPC_CPU_SIZE: usize = 20;
/// Size of every other entry.
pub const MPC_ENTRY_SIZE: usize = 8;

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IOAPIC's.
    #[error("{0} vCPUs do not fit in the MP table")]
    TooManyCpus(u8),
    /// The table does not fit below 1 MiB.
    #[error("the MP table does not fit in the BIOS area")]
    TooLarge,
    /// The guest memory write failed.
    #[error("cannot write the MP table: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// The APIC id given to the IOAPIC: right after the vCPUs' (as Firecracker).
pub fn ioapic_id(num_cpus: u8) -> u8 {
    num_cpus + 1
}

/// Builds the floating pointer and the configuration table, as they lie in memory from
/// [`MPTABLE_START`].
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus == 0 || num_cpus >= 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let ioapic = ioapic_id(num_cpus);
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;

    for cpu in 0..num_cpus {
        let mut e = [0u8; MPC_CPU_SIZE];
        e[0] = ENTRY_PROCESSOR;
        e[1] = cpu;
        e[2] = APIC_VERSION;
        e[3] = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        e[4..8].copy_from_slice(&CPU_STEPPING.to_le_bytes());
        e[8..12].copy_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&e);
        count += 1;
    }

    let mut bus = [0u8; MPC_ENTRY_SIZE];
    bus[0] = ENTRY_BUS;
    bus[1] = 0;
    bus[2..8].copy_from_slice(b"ISA   ");
    entries.extend_from_slice(&bus);
    count += 1;

    let mut io = [0u8; MPC_ENTRY_SIZE];
    io[0] = ENTRY_IOAPIC;
    io[1] = ioapic;
    io[2] = APIC_VERSION;
    io[3] = MPC_APIC_USABLE;
    io[4..8].copy_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    entries.extend_from_slice(&io);
    count += 1;

    for irq in 0..=GSI_MAX as u8 {
        let mut e = [0u8; MPC_ENTRY_SIZE];
        e[0] = ENTRY_INTSRC;
        e[1] = MP_INT;
        e[2..4].copy_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
        e[4] = 0; // source bus: ISA
        e[5] = irq;
        e[6] = ioapic;
        e[7] = irq;
        entries.extend_from_slice(&e);
        count += 1;
    }

    // LINT0: ExtINT from the 8259 to the BSP; LINT1: NMI to every CPU.
    for (kind, dest_apic, lint) in [(MP_EXTINT, 0u8, 0u8), (MP_NMI, 0xff, 1)] {
        let mut e = [0u8; MPC_ENTRY_SIZE];
        e[0] = ENTRY_LINTSRC;
        e[1] = kind;
        e[2..4].copy_from_slice(&MP_IRQPOL_DEFAULT.to_le_bytes());
        e[4] = 0;
        e[5] = 0;
        e[6] = dest_apic;
        e[7] = lint;
        entries.extend_from_slice(&e);
        count += 1;
    }

    let table_len = MPC_HEADER_SIZE + entries.len();
    let mut table = vec![0u8; MPF_SIZE + table_len];
    if MPTABLE_START + table.len() as u64 > HIMEM_START {
        return Err(MptableError::TooLarge);
    }

    // Floating pointer.
    let mpc_addr = MPTABLE_START as u32 + MPF_SIZE as u32;
    table[0..4].copy_from_slice(MPF_SIGNATURE);
    table[4..8].copy_from_slice(&mpc_addr.to_le_bytes());
    table[8] = 1; // length in 16-byte paragraphs
    table[9] = MPC_SPEC;
    table[10] = checksum(&table[0..MPF_SIZE]);

    // Configuration table header + entries.
    let mpc = &mut table[MPF_SIZE..];
    mpc[0..4].copy_from_slice(MPC_SIGNATURE);
    mpc[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    mpc[6] = MPC_SPEC;
    mpc[8..16].copy_from_slice(MPC_OEM);
    mpc[16..28].copy_from_slice(MPC_PRODUCT_ID);
    mpc[34..36].copy_from_slice(&count.to_le_bytes());
    mpc[36..40].copy_from_slice(&(APIC_START as u32).to_le_bytes());
    mpc[MPC_HEADER_SIZE..].copy_from_slice(&entries);
    mpc[7] = checksum(mpc);
    Ok(table)
}

/// Writes the MP table for `num_cpus` vCPUs into guest memory; returns the first address
/// past it.
pub fn setup_mptable(mem: &GuestMemory, num_cpus: u8) -> Result<u64, MptableError> {
    let table = build(num_cpus)?;
    mem.write_slice(&table, GuestAddress(MPTABLE_START))?;
    Ok(MPTABLE_START + table.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_header() {
        let t = build(2).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(
            u32::from_le_bytes(t[4..8].try_into().unwrap()),
            0x9fc00 + 16
        );
        assert_eq!(t[8], 1);
        assert_eq!(t[9], 4);
        assert_eq!(sum(&t[0..16]), 0);
        let mpc = &t[16..];
        assert_eq!(&mpc[0..4], b"PCMP");
        let len = u16::from_le_bytes(mpc[4..6].try_into().unwrap()) as usize;
        assert_eq!(len, mpc.len());
        assert_eq!(len, 44 + 2 * 20 + 8 + 8 + 24 * 8 + 2 * 8);
        assert_eq!(sum(mpc), 0);
        assert_eq!(
            u16::from_le_bytes(mpc[34..36].try_into().unwrap()),
            2 + 1 + 1 + 24 + 2
        );
        assert_eq!(
            u32::from_le_bytes(mpc[36..40].try_into().unwrap()),
            0xfee0_0000
        );
    }

    #[test]
    fn processor_entries() {
        let t = build(3).unwrap();
        let e = &t[16 + 44..];
        for cpu in 0..3u8 {
            let p = &e[cpu as usize * 20..(cpu as usize + 1) * 20];
            assert_eq!(p[0], 0);
            assert_eq!(p[1], cpu);
            assert_eq!(p[3], if cpu == 0 { 3 } else { 1 });
        }
        let io = &e[3 * 20 + 8..3 * 20 + 16];
        assert_eq!(io[0], 2);
        assert_eq!(io[1], 4);
        assert_eq!(
            u32::from_le_bytes(io[4..8].try_into().unwrap()),
            0xfec0_0000
        );
        // Interrupt source for IRQ 4 goes to IOAPIC pin 4.
        let irq4 = &e[3 * 20 + 16 + 4 * 8..3 * 20 + 16 + 5 * 8];
        assert_eq!(irq4, &[3, 0, 0, 0, 0, 4, 4, 4]);
    }

    #[test]
    fn every_size_checksums_and_fits() {
        for n in 1..=32u8 {
            let t = build(n).unwrap();
            assert_eq!(sum(&t[0..16]), 0, "mpf for {n}");
            assert_eq!(sum(&t[16..]), 0, "mpc for {n}");
            assert!(0x9fc00 + t.len() as u64 <= 0x10_0000);
        }
        assert!(build(0).is_err());
        assert!(build(254).is_err());
    }

    #[test]
    fn written_where_linux_scans() {
        let mem = create_guest_memory(16).unwrap();
        let end = setup_mptable(&mem, 1).unwrap();
        assert_eq!(end, 0x9fc00 + build(1).unwrap().len() as u64);
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(0x9fc00)).unwrap();
        assert_eq!(&sig, b"_MP_");
    }
}
