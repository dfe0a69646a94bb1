//! ACPI tables: RSDP, XSDT, FADT, MADT and a DSDT describing the virtio-mmio devices, COM1
//! and the i8042, built with rust-vmm's `acpi_tables` crate the way Firecracker builds its
//! own (src/vmm/src/acpi/ there).
//!
//! Where they live, as in Firecracker: the RSDP at [`RSDP_START`] (0xe0000, the BIOS area
//! where the ACPI spec says to look for it), the other tables packed from the end of the MP
//! table (which starts the EBDA at 0x9fc00) in the order DSDT, FADT, MADT, XSDT. All of it
//! lies in the e820 range kiln reserves from the EBDA to 1 MiB. The zero page's
//! `acpi_rsdp_addr` and PVH's `rsdp_paddr` point at the RSDP, so Linux does not scan for it.
//!
//! What they say, as in Firecracker 1.12: a hardware-reduced ACPI platform (no SCI, no
//! PM timer, no fixed power or sleep button), no VGA, no MSI, no PCIe ASPM; one enabled
//! local APIC per vCPU (APIC id = processor uid = vCPU index) and the IOAPIC (id 0, GSI base
//! 0) at 0xfec00000; in the DSDT one `LNRO0005` device per virtio-mmio window (`_UID` and
//! name from its GSI, `_CCA`, `_CRS`: the 4 KiB window and the GSI, edge-triggered, active
//! high), COM1 (`PNP0501`) and the i8042 (`PNP0303`). kiln has no other legacy UART, GED or
//! VMGenID, so the DSDT does not describe Firecracker's COM2-4 or those.

use acpi_tables::aml::{self, Device, EISAName, IO, Interrupt, Memory32Fixed, Name};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::madt::{EnabledStatus, IoApic, ProcessorLocalApic};
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::{Aml, AmlSink};
use vm_memory::{Bytes, GuestAddress};

use super::layout::{APIC_START, IOAPIC_START, VIRTIO_GSI_START};
use crate::devices::i8042::I8042_BASE;
use crate::devices::serial::{COM1_BASE, UART_PORTS};
use crate::vstate::memory::GuestMemory;

/// Where the RSDP is written (Firecracker's `RSDP_ADDR`): the start of the 0xe0000-0xfffff
/// range the spec has an OS search on 16-byte boundaries.
pub const RSDP_START: u64 = 0x000e_0000;
/// Size of an ACPI 2.0+ RSDP.
pub const RSDP_SIZE: usize = 36;

/// OEM id in every table (kiln's own, as the MP table's OEM id is).
const OEM_ID: [u8; 6] = *b"KILN  ";
/// OEM revision of every table.
const OEM_REVISION: u32 = 0;
/// The FADT's hypervisor vendor identity.
const HYPERVISOR_VENDOR_ID: [u8; 8] = *b"KILNVMM ";
/// The DSDT's revision: 2, for 64-bit AML integers (as Firecracker's).
const DSDT_REVISION: u8 = 2;
/// The MADT's revision, as Firecracker's (ACPI 6.5).
const MADT_REVISION: u8 = 6;
/// Size of the common table header.
const HEADER_SIZE: u32 = 36;
/// Size of the MADT's fixed part (header, local APIC address, flags).
const MADT_FIXED_SIZE: u32 = 44;
/// IA-PC boot architecture flags (FADT `IAPC_BOOT_ARCH`) Firecracker sets: VGA not present
/// (bit 2), MSI not supported (bit 3), PCIe ASPM controls (bit 4). Neither "legacy devices"
/// (bit 0) nor "8042" (bit 1): the DSDT describes the i8042 instead.
const IAPC_BOOT_ARCH: u16 = (1 << 2) | (1 << 3) | (1 << 4);
/// The i8042's command/status port (Firecracker describes it so Linux does not complain).
const I8042_COMMAND_PORT: u16 = 0x64;
/// The i8042's interrupt line.
const I8042_GSI: u32 = super::layout::I8042_GSI;
/// COM1's interrupt line.
const COM1_GSI: u32 = super::layout::SERIAL_GSI;

/// Errors building or writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than a MADT local APIC entry (8-bit APIC id) describes.
    #[error("{0} vCPUs do not fit in the MADT")]
    TooManyCpus(usize),
    /// A virtio-mmio window or GSI the DSDT cannot describe (above 4 GiB, or not one of the
    /// GSIs kiln hands to virtio devices).
    #[error("virtio-mmio device at {base:#x} (GSI {gsi}) cannot be described in the DSDT")]
    BadDevice {
        /// The window's base.
        base: u64,
        /// Its GSI.
        gsi: u32,
    },
    /// The tables do not fit between the MP table and the RSDP.
    #[error("the ACPI tables ({len} bytes from {start:#x}) run into the RSDP at {RSDP_START:#x}")]
    TooLarge {
        /// Where they start.
        start: u64,
        /// Their total length.
        len: usize,
    },
    /// The guest memory write failed.
    #[error("cannot write the ACPI tables: {0}")]
    Write(#[from] vm_memory::GuestMemoryError),
}

/// A virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its register window.
    pub base: u64,
    /// Size of the window.
    pub len: u64,
    /// Its interrupt line.
    pub gsi: u32,
}

/// One table at its guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Table {
    /// Where it goes.
    pub addr: u64,
    /// Its bytes, checksum included.
    pub bytes: Vec<u8>,
}

/// Every table, ready to be written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AcpiTables {
    /// DSDT, FADT, MADT, XSDT, contiguous from the start address, in that order.
    pub tables: Vec<Table>,
    /// The RSDP, at [`RSDP_START`].
    pub rsdp: Table,
}

fn aml_bytes(item: &dyn Aml) -> Vec<u8> {
    let mut bytes = Vec::new();
    item.to_aml_bytes(&mut bytes);
    bytes
}

/// The DSDT's AML for one virtio-mmio device, named and numbered as Firecracker does
/// (`V000` for the first GSI handed to virtio devices).
fn virtio_aml(dev: &MmioDevice, sink: &mut dyn AmlSink) -> Result<(), AcpiError> {
    let bad = || AcpiError::BadDevice {
        base: dev.base,
        gsi: dev.gsi,
    };
    let id = dev.gsi.checked_sub(VIRTIO_GSI_START).ok_or_else(bad)?;
    if id > 999 {
        return Err(bad());
    }
    let base = u32::try_from(dev.base).map_err(|_| bad())?;
    let len = u32::try_from(dev.len).map_err(|_| bad())?;
    let name = format!("V{id:03}");
    let window = Memory32Fixed::new(true, base, len);
    let irq = Interrupt::new(true, true, false, false, dev.gsi);
    let crs = aml::ResourceTemplate::new(vec![&window, &irq]);
    Device::new(
        name.as_str().into(),
        vec![
            &Name::new("_HID".into(), &"LNRO0005"),
            &Name::new("_UID".into(), &id),
            &Name::new("_CCA".into(), &aml::ONE),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(sink);
    Ok(())
}

/// COM1 and the i8042, as Firecracker describes its legacy devices.
fn legacy_aml(sink: &mut dyn AmlSink) {
    let com1_irq = Interrupt::new(true, true, false, false, COM1_GSI);
    let com1_ports = IO::new(COM1_BASE as u16, COM1_BASE as u16, 1, UART_PORTS as u8);
    let com1_crs = aml::ResourceTemplate::new(vec![&com1_irq, &com1_ports]);
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_DDN".into(), &"COM1"),
            &Name::new("_CRS".into(), &com1_crs),
        ],
    )
    .to_aml_bytes(sink);

    let data = IO::new(I8042_BASE as u16, I8042_BASE as u16, 1, 1);
    let command = IO::new(I8042_COMMAND_PORT, I8042_COMMAND_PORT, 1, 1);
    let kbd_irq = Interrupt::new(true, true, false, false, I8042_GSI);
    let ps2_crs = aml::ResourceTemplate::new(vec![&data, &command, &kbd_irq]);
    let present = aml::Return::new(&0x0fu8);
    Device::new(
        "_SB_.PS2_".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &aml::Method::new("_STA".into(), 0, false, vec![&present]),
            &Name::new("_CRS".into(), &ps2_crs),
        ],
    )
    .to_aml_bytes(sink);
}

fn dsdt(devices: &[MmioDevice]) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    for dev in devices {
        virtio_aml(dev, &mut body)?;
    }
    legacy_aml(&mut body);
    let mut dsdt = Sdt::new(
        *b"DSDT",
        HEADER_SIZE,
        DSDT_REVISION,
        OEM_ID,
        *b"KILNDSDT",
        OEM_REVISION,
    );
    dsdt.append_slice(&body);
    Ok(dsdt.as_slice().to_vec())
}

fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut fadt = FADTBuilder::new(OEM_ID, *b"KILNFADT", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    fadt.iapc_boot_arch = IAPC_BOOT_ARCH.into();
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR_ID).into();
    aml_bytes(&fadt.finalize())
}

fn madt(num_cpus: u8) -> Vec<u8> {
    let mut structures = Vec::new();
    IoApic::new(0, IOAPIC_START as u32, 0).to_aml_bytes(&mut structures);
    for cpu in 0..num_cpus {
        ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled).to_aml_bytes(&mut structures);
    }
    let mut madt = Sdt::new(
        *b"APIC",
        MADT_FIXED_SIZE,
        MADT_REVISION,
        OEM_ID,
        *b"KILNMADT",
        OEM_REVISION,
    );
    madt.write_u32(36, APIC_START as u32);
    madt.write_u32(40, 0); // flags: no PC-AT 8259 pair described (as Firecracker)
    madt.append_slice(&structures);
    madt.as_slice().to_vec()
}

fn xsdt(entries: &[u64]) -> Vec<u8> {
    let mut xsdt = XSDT::new(OEM_ID, *b"KILNXSDT", OEM_REVISION);
    for entry in entries {
        xsdt.add_entry(*entry);
    }
    aml_bytes(&xsdt)
}

/// Builds the tables for `num_cpus` vCPUs and the given virtio-mmio devices (in the order
/// they were attached: the root drive first), laid out from `start`.
pub fn build(num_cpus: u8, devices: &[MmioDevice], start: u64) -> Result<AcpiTables, AcpiError> {
    // APIC ids 0..num_cpus; 0xff is the broadcast id.
    if num_cpus == 0 || num_cpus == u8::MAX {
        return Err(AcpiError::TooManyCpus(usize::from(num_cpus)));
    }
    let mut tables = Vec::new();
    let mut next = start;
    let mut place = |bytes: Vec<u8>| {
        let addr = next;
        next += bytes.len() as u64;
        tables.push(Table { addr, bytes });
        addr
    };
    let dsdt_addr = place(dsdt(devices)?);
    let fadt_addr = place(fadt(dsdt_addr));
    let madt_addr = place(madt(num_cpus));
    let xsdt_addr = place(xsdt(&[fadt_addr, madt_addr]));
    if next > RSDP_START {
        return Err(AcpiError::TooLarge {
            start,
            len: (next - start) as usize,
        });
    }
    let rsdp = Table {
        addr: RSDP_START,
        bytes: aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr)),
    };
    Ok(AcpiTables { tables, rsdp })
}

/// Builds the tables from `start` and writes them; returns the RSDP's address.
pub fn setup_acpi(
    mem: &GuestMemory,
    num_cpus: u8,
    devices: &[MmioDevice],
    start: u64,
) -> Result<u64, AcpiError> {
    let tables = build(num_cpus, devices, start)?;
    for table in tables.tables.iter().chain([&tables.rsdp]) {
        mem.write_slice(&table.bytes, GuestAddress(table.addr))?;
    }
    Ok(tables.rsdp.addr)
}

#[cfg(test)]
mod tests {
    //! The tables read back with the ACPI specification's layout (6.5, chapter 5.2): the
    //! offsets below are the spec's, not the builder's.
    use super::*;
    use crate::vstate::memory::create_guest_memory;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }
    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }
    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// Reads guest memory as the OS would: the table at `addr`, as long as its header says.
    fn table_at(mem: &GuestMemory, addr: u64) -> Vec<u8> {
        let mut header = [0u8; 36];
        mem.read_slice(&mut header, GuestAddress(addr)).unwrap();
        let len = u32_at(&header, 4) as usize;
        assert!(len >= 36, "table at {addr:#x} is {len} bytes");
        let mut table = vec![0u8; len];
        mem.read_slice(&mut table, GuestAddress(addr)).unwrap();
        assert_eq!(sum(&table), 0, "checksum of {:?}", &table[0..4]);
        table
    }

    fn count(haystack: &[u8], needle: &[u8]) -> usize {
        haystack
            .windows(needle.len())
            .filter(|w| *w == needle)
            .count()
    }

    const DEVICES: [MmioDevice; 2] = [
        MmioDevice {
            base: 0xc000_1000,
            len: 0x1000,
            gsi: 5,
        },
        MmioDevice {
            base: 0xc000_2000,
            len: 0x1000,
            gsi: 6,
        },
    ];

    #[test]
    fn tables_parse_as_the_spec_says() {
        let mem = create_guest_memory(128).unwrap();
        let start = 0x9fc00 + 0x144;
        let rsdp_addr = setup_acpi(&mem, 2, &DEVICES, start).unwrap();
        assert_eq!(rsdp_addr, 0xe0000);

        // RSDP (5.2.5.3): "RSD PTR ", checksum over the first 20 bytes, revision 2, length
        // 36, XSDT address at 24, extended checksum over the whole length.
        let mut rsdp = [0u8; 36];
        mem.read_slice(&mut rsdp, GuestAddress(0xe0000)).unwrap();
        assert_eq!(&rsdp[0..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[0..20]), 0);
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(&rsdp, 20), 36);
        assert_eq!(sum(&rsdp), 0);
        assert_eq!(u32_at(&rsdp, 16), 0, "no RSDT");

        // XSDT (5.2.8): 64-bit pointers after the header, first the FADT then the MADT.
        let xsdt = table_at(&mem, u64_at(&rsdp, 24));
        assert_eq!(&xsdt[0..4], b"XSDT");
        assert_eq!(xsdt.len(), 36 + 2 * 8);
        let fadt = table_at(&mem, u64_at(&xsdt, 36));
        let madt = table_at(&mem, u64_at(&xsdt, 44));

        // FADT (5.2.9): 276 bytes in revision 6, flags at 112, X_DSDT at 140, IAPC_BOOT_ARCH
        // at 109, minor version at 131.
        assert_eq!(&fadt[0..4], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6);
        assert_eq!(fadt[131], 5);
        let flags = u32_at(&fadt, 112);
        assert_eq!(
            flags,
            (1 << 20) | (1 << 4) | (1 << 5),
            "HW_REDUCED_ACPI, no buttons"
        );
        assert_eq!(u16::from_le_bytes([fadt[109], fadt[110]]), 0b11100);
        assert_eq!(u32_at(&fadt, 40), 0, "only the 64-bit DSDT pointer");
        let dsdt_addr = u64_at(&fadt, 140);
        assert_eq!(
            dsdt_addr, start,
            "the DSDT comes first, right after the MP table"
        );

        // MADT (5.2.12): local APIC address at 36, flags at 40, then the structures.
        assert_eq!(&madt[0..4], b"APIC");
        assert_eq!(u32_at(&madt, 36), 0xfee0_0000);
        let mut lapics = Vec::new();
        let mut ioapics = Vec::new();
        let mut off = 44;
        while off < madt.len() {
            let (kind, len) = (madt[off], madt[off + 1] as usize);
            assert!(len >= 2 && off + len <= madt.len());
            match kind {
                0 => {
                    assert_eq!(len, 8);
                    assert_eq!(u32_at(&madt, off + 4) & 1, 1, "enabled");
                    lapics.push((madt[off + 2], madt[off + 3]));
                }
                1 => {
                    assert_eq!(len, 12);
                    ioapics.push((
                        madt[off + 2],
                        u32_at(&madt, off + 4),
                        u32_at(&madt, off + 8),
                    ));
                }
                other => panic!("unexpected MADT structure {other}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len());
        assert_eq!(lapics, [(0, 0), (1, 1)]);
        assert_eq!(ioapics, [(0, 0xfec0_0000, 0)]);

        // DSDT (5.2.11.1): AML after the header; one LNRO0005 per device, with its window
        // (Memory32Fixed, 6.4.3.4) and its GSI (Extended Interrupt, 6.4.3.6).
        let dsdt = table_at(&mem, dsdt_addr);
        assert_eq!(&dsdt[0..4], b"DSDT");
        assert_eq!(dsdt[8], 2);
        assert_eq!(count(&dsdt, b"\x0dLNRO0005\x00"), 2);
        for (i, dev) in DEVICES.iter().enumerate() {
            let mut window = vec![0x86, 9, 0, 1];
            window.extend_from_slice(&(dev.base as u32).to_le_bytes());
            window.extend_from_slice(&0x1000u32.to_le_bytes());
            assert_eq!(count(&dsdt, &window), 1, "window of device {i}");
            let mut irq = vec![0x89, 6, 0, 0b0011, 1];
            irq.extend_from_slice(&dev.gsi.to_le_bytes());
            assert_eq!(count(&dsdt, &irq), 1, "GSI of device {i}");
            assert_eq!(count(&dsdt, format!("V00{i}").as_bytes()), 1);
        }
        // COM1: EISA id PNP0501 (0x0105d041) and its eight ports at 0x3f8.
        assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x05, 0x01]), 1);
        assert_eq!(count(&dsdt, &[0x47, 1, 0xf8, 3, 0xf8, 3, 1, 8]), 1);
        // The i8042: PNP0303 (0x0303d041).
        assert_eq!(count(&dsdt, &[0x0c, 0x41, 0xd0, 0x03, 0x03]), 1);

        // The tables are packed, in the order DSDT, FADT, MADT, XSDT.
        assert_eq!(u64_at(&xsdt, 36), start + dsdt.len() as u64);
        assert_eq!(u64_at(&xsdt, 44), start + (dsdt.len() + fadt.len()) as u64);
        assert_eq!(
            u64_at(&rsdp, 24),
            start + (dsdt.len() + fadt.len() + madt.len()) as u64
        );
    }

    #[test]
    fn every_vcpu_count_and_device_count_fits() {
        let devices: Vec<MmioDevice> = (0..19)
            .map(|i| MmioDevice {
                base: 0xc000_1000 + 0x1000 * i,
                len: 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        for cpus in [1u8, 32, 254] {
            let t = build(cpus, &devices, 0x9fc00 + 0x400).unwrap();
            for table in &t.tables {
                assert_eq!(sum(&table.bytes), 0);
                assert_eq!(u32_at(&table.bytes, 4) as usize, table.bytes.len());
            }
            let madt = &t.tables[2].bytes;
            assert_eq!(madt.len(), 44 + 12 + 8 * usize::from(cpus));
            assert_eq!(count(&t.tables[0].bytes, b"LNRO0005"), 19);
            let last = t.tables.last().unwrap();
            assert!(last.addr + last.bytes.len() as u64 <= RSDP_START);
        }
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(matches!(
            build(0, &[], 0x9fd00),
            Err(AcpiError::TooManyCpus(0))
        ));
        assert!(matches!(
            build(255, &[], 0x9fd00),
            Err(AcpiError::TooManyCpus(255))
        ));
        let high = MmioDevice {
            base: 0x1_0000_0000,
            len: 0x1000,
            gsi: 5,
        };
        assert!(matches!(
            build(1, &[high], 0x9fd00),
            Err(AcpiError::BadDevice { .. })
        ));
        let legacy_gsi = MmioDevice {
            gsi: 4,
            ..DEVICES[0]
        };
        assert!(matches!(
            build(1, &[legacy_gsi], 0x9fd00),
            Err(AcpiError::BadDevice { .. })
        ));
        assert!(matches!(
            build(1, &[], 0xdff00),
            Err(AcpiError::TooLarge { .. })
        ));
    }
}
