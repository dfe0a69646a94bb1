//! Kernel loading and the boot structures: an ELF vmlinux (with or without a PVH note), a
//! bzImage or any bytes, an initrd, and the kernel command line built as kiln's builder
//! builds it (the user's `boot_args` when the config accepts them, one
//! `virtio_mmio.device=` per device, `root=` and `ro`/`rw` for a root drive).
//!
//! Invariants: nothing panics; a kernel that loads has its entry where its boot protocol
//! can enter it and leaves the first MiB (the boot structures' area) untouched; an initrd
//! that loads lies page-aligned, in RAM below the MMIO gap, after the kernel's end, and holds
//! exactly the file's bytes; once the boot structures are written, the command line in guest
//! memory is exactly the one built, and the zero page (Linux boot) or start info (PVH)
//! points at it and at the initrd.

use std::io::Cursor;

use kiln::arch::x86_64::configure_system;
use kiln::arch::x86_64::layout::{
    CMDLINE_MAX_SIZE, CMDLINE_START, HIMEM_START, MMIO_GAP_START, PAGE_SIZE, PVH_INFO_START,
    VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START, ZERO_PAGE_START,
};
use kiln::arch::x86_64::loader::{load_initrd, load_kernel};
use kiln::arch::x86_64::regs::BootProtocol;
use kiln::config::{BootSourceConfig, validate_boot_source};
use kiln::vstate::memory::create_guest_memory;
use linux_loader::cmdline::Cmdline;
use vm_memory::{Bytes, GuestAddress};

use crate::wire::{self, Enc, U, Wire};

/// One ELF program header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Phdr {
    pub kind: u32,
    pub offset: u64,
    pub paddr: u64,
    pub filesz: u64,
    pub memsz: u64,
}

impl Wire for Phdr {
    fn decode(u: &mut U<'_>) -> Self {
        Phdr {
            kind: wire::u32(u),
            offset: wire::u64(u),
            paddr: wire::u64(u),
            filesz: wire::u64(u),
            memsz: wire::u64(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u32(self.kind)
            .u64(self.offset)
            .u64(self.paddr)
            .u64(self.filesz)
            .u64(self.memsz);
    }
}

/// The kernel image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// Any bytes.
    Raw(Vec<u8>),
    /// An ELF64 x86-64 executable: entry, program headers, then the file's tail.
    Elf {
        class: u8,
        machine: u16,
        entry: u64,
        phdrs: Vec<Phdr>,
        tail: Vec<u8>,
    },
    /// A bzImage: setup header fields, then the protected-mode code.
    BzImage {
        setup_sects: u8,
        version: u16,
        loadflags: u8,
        code32_start: u32,
        initrd_addr_max: u32,
        xloadflags: u16,
        cmdline_size: u32,
        init_size: u32,
        payload: Vec<u8>,
    },
}

impl Wire for Kernel {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 3 {
            0 => Kernel::Raw(wire::bytes(u, 8192)),
            1 => Kernel::Elf {
                class: wire::u8(u),
                machine: wire::u16(u),
                entry: wire::u64(u),
                phdrs: wire::list(u, 4),
                tail: wire::bytes(u, 4096),
            },
            _ => Kernel::BzImage {
                setup_sects: wire::u8(u),
                version: wire::u16(u),
                loadflags: wire::u8(u),
                code32_start: wire::u32(u),
                initrd_addr_max: wire::u32(u),
                xloadflags: wire::u16(u),
                cmdline_size: wire::u32(u),
                init_size: wire::u32(u),
                payload: wire::bytes(u, 4096),
            },
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Kernel::Raw(b) => {
                e.u8(0).bytes(b);
            }
            Kernel::Elf {
                class,
                machine,
                entry,
                phdrs,
                tail,
            } => {
                e.u8(1)
                    .u8(*class)
                    .u16(*machine)
                    .u64(*entry)
                    .list(phdrs)
                    .bytes(tail);
            }
            Kernel::BzImage {
                setup_sects,
                version,
                loadflags,
                code32_start,
                initrd_addr_max,
                xloadflags,
                cmdline_size,
                init_size,
                payload,
            } => {
                e.u8(2)
                    .u8(*setup_sects)
                    .u16(*version)
                    .u8(*loadflags)
                    .u32(*code32_start)
                    .u32(*initrd_addr_max)
                    .u16(*xloadflags)
                    .u32(*cmdline_size)
                    .u32(*init_size)
                    .bytes(payload);
            }
        }
    }
}

impl Kernel {
    /// The file's bytes.
    pub fn bytes(&self) -> Vec<u8> {
        match self {
            Kernel::Raw(b) => b.clone(),
            Kernel::Elf {
                class,
                machine,
                entry,
                phdrs,
                tail,
            } => {
                let mut f = vec![0u8; 64];
                f[0..4].copy_from_slice(b"\x7fELF");
                f[4] = *class;
                f[5] = 1;
                f[6] = 1;
                f[16..18].copy_from_slice(&2u16.to_le_bytes());
                f[18..20].copy_from_slice(&machine.to_le_bytes());
                f[20..24].copy_from_slice(&1u32.to_le_bytes());
                f[24..32].copy_from_slice(&entry.to_le_bytes());
                f[32..40].copy_from_slice(&64u64.to_le_bytes());
                f[52..54].copy_from_slice(&64u16.to_le_bytes());
                f[54..56].copy_from_slice(&56u16.to_le_bytes());
                f[56..58].copy_from_slice(&(phdrs.len() as u16).to_le_bytes());
                for p in phdrs {
                    let mut h = [0u8; 56];
                    h[0..4].copy_from_slice(&p.kind.to_le_bytes());
                    h[8..16].copy_from_slice(&p.offset.to_le_bytes());
                    h[16..24].copy_from_slice(&p.paddr.to_le_bytes());
                    h[24..32].copy_from_slice(&p.paddr.to_le_bytes());
                    h[32..40].copy_from_slice(&p.filesz.to_le_bytes());
                    h[40..48].copy_from_slice(&p.memsz.to_le_bytes());
                    f.extend_from_slice(&h);
                }
                f.extend_from_slice(tail);
                f
            }
            Kernel::BzImage {
                setup_sects,
                version,
                loadflags,
                code32_start,
                initrd_addr_max,
                xloadflags,
                cmdline_size,
                init_size,
                payload,
            } => {
                let setup = (usize::from(*setup_sects % 8) + 1) * 512;
                let mut f = vec![0u8; 512 + setup];
                f[0x1f1] = *setup_sects % 8;
                f[0x1fe..0x200].copy_from_slice(&0xaa55u16.to_le_bytes());
                f[0x202..0x206].copy_from_slice(b"HdrS");
                f[0x206..0x208].copy_from_slice(&version.to_le_bytes());
                f[0x211] = *loadflags;
                f[0x214..0x218].copy_from_slice(&code32_start.to_le_bytes());
                f[0x22c..0x230].copy_from_slice(&initrd_addr_max.to_le_bytes());
                f[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
                f[0x238..0x23c].copy_from_slice(&cmdline_size.to_le_bytes());
                f[0x260..0x264].copy_from_slice(&init_size.to_le_bytes());
                f.extend_from_slice(payload);
                f
            }
        }
    }
}

/// A fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Guest memory: 2, 4, 16 or 64 MiB (`% 4`).
    pub mem: u8,
    /// The kernel.
    pub kernel: Kernel,
    /// The initrd (none when empty and `initrd_len` is 0), `initrd_len` bytes of pattern.
    pub initrd_len: u32,
    /// `boot_args` (none when empty).
    pub boot_args: Vec<u8>,
    /// virtio devices on the command line (`% 20`).
    pub devices: u8,
    /// A root drive: none, `/dev/vda`, or PARTUUID `partuuid`.
    pub root: u8,
    /// The PARTUUID.
    pub partuuid: Vec<u8>,
    /// vCPUs.
    pub vcpus: u8,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            mem: wire::u8(u),
            kernel: Kernel::decode(u),
            initrd_len: wire::u32(u),
            boot_args: wire::bytes(u, 3000),
            devices: wire::u8(u),
            root: wire::u8(u),
            partuuid: wire::bytes(u, 64),
            vcpus: wire::u8(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u8(self.mem);
        self.kernel.encode(e);
        e.u32(self.initrd_len)
            .bytes(&self.boot_args)
            .u8(self.devices)
            .u8(self.root)
            .bytes(&self.partuuid)
            .u8(self.vcpus);
    }
}

crate::arbitrary_via_wire!(Input);

/// The command line as kiln's builder makes it; `None` when kiln refuses the config.
fn cmdline(input: &Input) -> Option<Cmdline> {
    let args = (!input.boot_args.is_empty())
        .then(|| String::from_utf8_lossy(&input.boot_args).into_owned());
    let boot = BootSourceConfig {
        kernel_image_path: "vmlinux".into(),
        initrd_path: None,
        boot_args: args.clone(),
    };
    validate_boot_source(&boot).ok()?;
    let args = args.as_deref().unwrap_or(kiln::config::DEFAULT_BOOT_ARGS);
    let mut c = Cmdline::try_from(args, CMDLINE_MAX_SIZE).ok()?;
    for slot in 0..u64::from(input.devices % 20) {
        c.add_virtio_mmio_device(
            VIRTIO_MMIO_SIZE,
            GuestAddress(VIRTIO_MMIO_START + slot * VIRTIO_MMIO_SIZE),
            5 + slot as u32,
            None,
        )
        .ok()?;
    }
    let root = match input.root % 3 {
        0 => None,
        1 => Some("root=/dev/vda".to_string()),
        _ => Some(format!(
            "root=PARTUUID={}",
            String::from_utf8_lossy(&input.partuuid)
        )),
    };
    if let Some(root) = root {
        c.insert_str(root).ok()?;
        c.insert_str("rw").ok()?;
    }
    Some(c)
}

/// Runs one input.
pub fn run(input: &Input) {
    let mib = [2u64, 4, 16, 64][usize::from(input.mem % 4)];
    let mem = create_guest_memory(mib).expect("guest memory");
    let size = mib << 20;
    let image = input.kernel.bytes();
    let Ok(k) = load_kernel(&mem, &mut Cursor::new(&image)) else {
        return;
    };
    let entry = k.entry.0;
    match k.protocol {
        BootProtocol::Linux64 => {
            assert!((HIMEM_START..1 << 30).contains(&entry), "entry {entry:#x}")
        }
        BootProtocol::Pvh => assert!(
            (HIMEM_START..MMIO_GAP_START).contains(&entry),
            "PVH entry {entry:#x}"
        ),
    }
    let mut low = vec![0u8; HIMEM_START as usize];
    mem.read_slice(&mut low, GuestAddress(0))
        .expect("the first MiB");
    assert!(
        low.iter().all(|b| *b == 0),
        "the kernel was loaded into the first MiB"
    );

    let initrd = if input.initrd_len > 0 {
        let len = (input.initrd_len % (1 << 20)) as usize + 1;
        let data: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        match load_initrd(&mem, &mut Cursor::new(&data), &k) {
            Ok((addr, n)) => {
                assert_eq!(n, len as u64, "initrd size");
                assert_eq!(addr % PAGE_SIZE, 0, "initrd alignment");
                let end = addr.checked_add(n).expect("initrd end overflows");
                assert!(
                    end <= size.min(MMIO_GAP_START),
                    "initrd {addr:#x}+{n:#x} past RAM"
                );
                assert!(addr >= HIMEM_START, "initrd below 1 MiB");
                assert!(
                    addr >= k.kernel_end,
                    "initrd {addr:#x} overlaps the kernel (end {:#x})",
                    k.kernel_end
                );
                let mut back = vec![0u8; len];
                mem.read_slice(&mut back, GuestAddress(addr))
                    .expect("initrd readable");
                assert!(back == data, "initrd contents");
                Some((addr, n))
            }
            Err(_) => None,
        }
    } else {
        None
    };

    let Some(cmdline) = cmdline(input) else {
        return;
    };
    let vcpus = input.vcpus % 33;
    let Ok(text) = cmdline.as_cstring() else {
        // linux-loader cannot build the string (init arguments after "--" and no kernel
        // argument before them): kiln must refuse to boot, not write a partial line.
        assert!(
            configure_system(&mem, &k, &cmdline, initrd, vcpus.max(1), &[]).is_err(),
            "a command line linux-loader cannot build was accepted"
        );
        return;
    };
    if configure_system(&mem, &k, &cmdline, initrd, vcpus.max(1), &[]).is_err() {
        return;
    }
    let bytes = text.as_bytes_with_nul();
    assert!(
        bytes.len() <= CMDLINE_MAX_SIZE,
        "a {}-byte command line",
        bytes.len()
    );
    let mut back = vec![0u8; bytes.len()];
    mem.read_slice(&mut back, GuestAddress(CMDLINE_START))
        .expect("cmdline readable");
    assert_eq!(back, bytes, "the command line in guest memory");
    let rd32 = |a: u64| -> u32 { mem.read_obj(GuestAddress(a)).expect("readable") };
    match k.protocol {
        BootProtocol::Linux64 => {
            assert_eq!(
                u64::from(rd32(ZERO_PAGE_START + 0x228)),
                CMDLINE_START,
                "cmd_line_ptr"
            );
            let (addr, n) = initrd.unwrap_or((0, 0));
            assert_eq!(
                u64::from(rd32(ZERO_PAGE_START + 0x218)),
                addr,
                "ramdisk_image"
            );
            assert_eq!(u64::from(rd32(ZERO_PAGE_START + 0x21c)), n, "ramdisk_size");
        }
        BootProtocol::Pvh => {
            let cmdline_paddr: u64 = mem
                .read_obj(GuestAddress(PVH_INFO_START + 24))
                .expect("readable");
            assert_eq!(cmdline_paddr, CMDLINE_START, "hvm_start_info.cmdline_paddr");
        }
    }
}
