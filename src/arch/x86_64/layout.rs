//! The x86_64 guest physical memory layout.
//!
//! kiln uses Firecracker's layout, a convention guests and tools already rely on: boot
//! structures in the first megabyte, RAM from 1 MiB up to the 32-bit MMIO gap at 3 GiB and
//! continuing above 4 GiB, devices inside the gap.

/// Start of the boot GDT.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_MAX: usize = 4;
/// Start of the (empty) boot IDT.
pub const BOOT_IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`, followed by the module list and the memory map.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (the initrd), right after `hvm_start_info`.
pub const MODLIST_START: u64 = 0x6040;
/// PVH memory map entries (PVH boot writes no zero page, so they share the page).
pub const MEMMAP_START: u64 = 0x7000;
/// The Linux zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer of the boot CPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Level 4 page table of the boot identity map.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table of the boot identity map.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory of the boot identity map (512 x 2 MiB = the first 1 GiB).
pub const PDE_START: u64 = 0xb000;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line kiln passes (Linux's `COMMAND_LINE_SIZE` on x86, as Firecracker).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the Extended BIOS Data Area; RAM below it is usable.
pub const EBDA_START: u64 = 0x9fc00;
/// The MP table lives at the start of the EBDA, where Linux looks for it.
pub const MPTABLE_START: u64 = EBDA_START;
/// First address of "high" memory (1 MiB); kernels are loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO gap (3 GiB).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// First address past the 32-bit space (4 GiB): RAM resumes here.
pub const FIRST_ADDR_PAST_32BITS: u64 = 0x1_0000_0000;
/// Size of the MMIO gap.
pub const MMIO_GAP_SIZE: u64 = FIRST_ADDR_PAST_32BITS - MMIO_GAP_START;
/// Firecracker's boot-timer device address (first page of the gap).
pub const BOOT_TIMER_START: u64 = MMIO_GAP_START;
/// virtio-mmio devices: one 4 KiB window each, starting after the boot timer.
pub const VIRTIO_MMIO_START: u64 = MMIO_GAP_START + 0x1000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// The IOAPIC's MMIO base.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO base.
pub const APIC_START: u64 = 0xfee0_0000;
/// KVM's identity-map page (needed by VMX for real mode), one page below the TSS.
pub const KVM_IDENTITY_MAP_START: u64 = 0xfffb_c000;
/// KVM's three-page TSS area (KVM_SET_TSS_ADDR).
pub const KVM_TSS_START: u64 = 0xfffb_d000;

/// Legacy interrupt lines (GSIs).
pub const I8042_GSI: u32 = 1;
/// GSI of COM1.
pub const SERIAL_GSI: u32 = 4;
/// First GSI handed to virtio-mmio devices.
pub const VIRTIO_GSI_START: u32 = 5;
/// Last GSI the IOAPIC routes (24 pins).
pub const GSI_MAX: u32 = 23;

/// Page size used for alignment decisions.
pub const PAGE_SIZE: u64 = 0x1000;
