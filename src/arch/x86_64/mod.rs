//! x86_64 support: the memory layout, kernel loading and everything the boot protocols put
//! into guest memory and vCPU registers before the first instruction runs.

pub mod acpi;
pub mod boot;
pub mod cpuid;
pub mod layout;
pub mod loader;
pub mod mptable;
pub mod pvh;
pub mod regs;

use linux_loader::cmdline::Cmdline;
use vm_memory::GuestAddress;

use self::acpi::{AcpiError, MmioDevice};
use self::boot::{BootError, LinuxBootInfo, build_zero_page, e820_map, write_zero_page};
use self::layout::CMDLINE_START;
use self::loader::LoadedKernel;
use self::mptable::MptableError;
use self::pvh::{PvhError, build_start_info, write_start_info};
use self::regs::BootProtocol;
use crate::vstate::memory::GuestMemory;

/// Errors writing the boot structures.
#[derive(Debug, thiserror::Error)]
pub enum ConfigureError {
    /// The command line could not be written.
    #[error("cannot write the kernel command line: {0}")]
    Cmdline(#[from] linux_loader::loader::Error),
    /// The command line cannot be turned into the string the kernel reads (for example
    /// init arguments after `--` with no kernel argument before them).
    #[error("the kernel command line cannot be built: {0}")]
    CmdlineForm(#[source] linux_loader::cmdline::Error),
    /// The command line exceeds what the kernel's header accepts.
    #[error("the command line is {len} bytes, over the kernel's limit of {max}")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The kernel's `cmdline_size`.
        max: u32,
    },
    /// The zero page could not be built or written.
    #[error(transparent)]
    Boot(#[from] BootError),
    /// The PVH start info could not be written.
    #[error(transparent)]
    Pvh(#[from] PvhError),
    /// The MP table could not be written.
    #[error(transparent)]
    Mptable(#[from] MptableError),
    /// The ACPI tables could not be built or written.
    #[error(transparent)]
    Acpi(#[from] AcpiError),
}

/// Writes the command line, the MP table, the ACPI tables (describing `devices`, the
/// virtio-mmio devices in the order they were attached) and the boot-protocol structures.
pub fn configure_system(
    mem: &GuestMemory,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    initrd: Option<(u64, u64)>,
    num_cpus: u8,
    devices: &[MmioDevice],
) -> Result<(), ConfigureError> {
    let cstring = cmdline.as_cstring().map_err(ConfigureError::CmdlineForm)?;
    let len = cstring.as_bytes().len();
    if let Some(hdr) = kernel.setup_header {
        let max = hdr.cmdline_size;
        if hdr.version >= 0x0206 && len > max as usize {
            return Err(ConfigureError::CmdlineTooLong { len, max });
        }
    }
    linux_loader::loader::load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)?;

    // The MP table for kernels without ACPI (or booted with `acpi=off`), the ACPI tables
    // right after it, as Firecracker lays them out.
    let mptable_end = mptable::setup_mptable(mem, num_cpus)?;
    let rsdp = acpi::setup_acpi(mem, num_cpus, devices, mptable_end)?;

    let e820 = e820_map(mem);
    match kernel.protocol {
        BootProtocol::Linux64 => {
            let info = LinuxBootInfo {
                cmdline_addr: CMDLINE_START,
                cmdline_size: len as u32 + 1,
                initrd,
                setup_header: kernel.setup_header,
                acpi_rsdp: Some(rsdp),
            };
            write_zero_page(mem, &build_zero_page(&e820, &info)?)?;
        }
        BootProtocol::Pvh => {
            write_start_info(
                mem,
                &build_start_info(&e820, CMDLINE_START, initrd, Some(rsdp)),
            )?;
        }
    }
    Ok(())
}
