//! The virtio-mmio transport: sequences of register reads and writes (any offset, any
//! width), driver initialisation, queue set-up, activation and reset, in front of a real
//! virtio-blk or virtio-net device.
//!
//! Invariants, after every access:
//! - the status register only ever holds a state the driver-initialisation order reaches
//!   (0, A, A|D, A|D|FEATURES_OK, A|D|FEATURES_OK|DRIVER_OK, each possibly with
//!   DEVICE_NEEDS_RESET and/or FAILED), and every status write does what the virtio 1.2
//!   specification says ([`spec_status`], a table written in this harness from 2.1, 3.1.1
//!   and 4.2.2, independent of kiln's own transition table);
//! - a queue reads ready only if the configuration the driver wrote is valid (size a power
//!   of two within the maximum, aligned rings inside RAM), and a valid one is accepted;
//! - DRIVER_OK is set only with the device activated; a reset clears status, interrupts
//!   and every queue;
//! - constant registers read constant; reads of another width than 4 read zeros;
//!   configuration reads past the device's space read zeros; InterruptStatus holds only
//!   the two defined bits.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use kiln::config::CacheType;
use kiln::devices::IrqLine;
use kiln::devices::bus::BusDevice;
use kiln::devices::virtio::block::{Block, BlockConfig, DiskFile};
use kiln::devices::virtio::features::VIRTIO_F_VERSION_1;
use kiln::devices::virtio::mmio::MmioTransport;
use kiln::devices::virtio::net::{Net, NetConfig, Tap};
use kiln::devices::virtio::status::{
    ACKNOWLEDGE, DEVICE_NEEDS_RESET, DRIVER, DRIVER_OK, FAILED, FEATURES_OK,
};
use kiln::devices::virtio::{VirtioDevice, VirtioInterrupt};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::guest::{self, MEM_SIZE};
use crate::virtq::Addr;
use crate::wire::{self, Enc, U, Wire};

const MAX_OPS: usize = 128;

const STATUS: u64 = 0x70;
const QUEUE_SEL: u64 = 0x30;
const QUEUE_NUM_MAX: u64 = 0x34;
const QUEUE_NUM: u64 = 0x38;
const QUEUE_READY: u64 = 0x44;
const INTERRUPT_STATUS: u64 = 0x60;
const DRIVER_FEATURES: u64 = 0x20;
const DRIVER_FEATURES_SEL: u64 = 0x24;
const CONFIG: u64 = 0x100;

/// One access.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A write of `width` (1, 2, 4 or 8: `width % 4` selects) bytes of `value`.
    Write { offset: u16, width: u8, value: u64 },
    /// A read.
    Read { offset: u16, width: u8 },
    /// The driver's initialisation up to FEATURES_OK, acking `features`.
    Init { features: u64 },
    /// Programs queue `sel` (size, rings) and writes QueueReady = `ready`.
    Queue {
        sel: u8,
        size: u16,
        desc: u64,
        avail: u64,
        used: u64,
        ready: u32,
    },
    /// Writes `status`.
    Status(u8),
    /// Writes bytes into guest memory.
    Poke(Addr, Vec<u8>),
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 6 {
            0 => Op::Write {
                offset: wire::u16(u),
                width: wire::u8(u),
                value: wire::u64(u),
            },
            1 => Op::Read {
                offset: wire::u16(u),
                width: wire::u8(u),
            },
            2 => Op::Init {
                features: wire::u64(u),
            },
            3 => Op::Queue {
                sel: wire::u8(u),
                size: wire::u16(u),
                desc: wire::u64(u),
                avail: wire::u64(u),
                used: wire::u64(u),
                ready: wire::u32(u),
            },
            4 => Op::Status(wire::u8(u)),
            _ => Op::Poke(Addr::decode(u), wire::bytes(u, 64)),
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::Write {
                offset,
                width,
                value,
            } => {
                e.u8(0).u16(*offset).u8(*width).u64(*value);
            }
            Op::Read { offset, width } => {
                e.u8(1).u16(*offset).u8(*width);
            }
            Op::Init { features } => {
                e.u8(2).u64(*features);
            }
            Op::Queue {
                sel,
                size,
                desc,
                avail,
                used,
                ready,
            } => {
                e.u8(3)
                    .u8(*sel)
                    .u16(*size)
                    .u64(*desc)
                    .u64(*avail)
                    .u64(*used)
                    .u32(*ready);
            }
            Op::Status(s) => {
                e.u8(4).u8(*s);
            }
            Op::Poke(a, b) => {
                e.u8(5);
                a.encode(e);
                e.bytes(b);
            }
        }
    }
}

/// A fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// virtio-net behind the transport (else virtio-blk).
    pub net: bool,
    /// The accesses.
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            net: wire::bool(u),
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.bool(self.net).many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

/// What the driver wrote about a queue (the registers are write-only).
#[derive(Clone, Copy, Debug)]
struct Shadow {
    max: u16,
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    ready: bool,
}

impl Shadow {
    fn new(max: u16) -> Shadow {
        Shadow {
            max,
            size: max,
            desc: 0,
            avail: 0,
            used: 0,
            ready: false,
        }
    }

    fn valid(&self) -> bool {
        let n = u64::from(self.size);
        let inside = |a: u64, len: u64| a.checked_add(len).is_some_and(|e| e <= MEM_SIZE);
        self.size != 0
            && self.size.is_power_of_two()
            && self.size <= self.max
            && self.desc.is_multiple_of(16)
            && self.avail.is_multiple_of(2)
            && self.used.is_multiple_of(4)
            && inside(self.desc, 16 * n)
            && inside(self.avail, 6 + 2 * n)
            && inside(self.used, 6 + 8 * n)
    }
}

/// What a write to the Status register must do, from the virtio 1.2 specification (written
/// here, not taken from kiln's `status_action`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum SpecStatus {
    /// 4.2.2: writing 0 resets the device; Status reads 0.
    Reset,
    /// The written value is the new status.
    Becomes(u32),
    /// The device does not take the write (Status unchanged).
    Ignored,
    /// 3.1.1 step 8: DRIVER_OK makes the device live (or, if it cannot work with what the
    /// driver set up, it sets DEVICE_NEEDS_RESET, 2.1).
    Activation,
}

/// The driver initialisation sequence of 3.1.1, one step per row: from the status on the
/// left the driver sets the bit that makes the status on the right (steps 2, 3, 5 and 8;
/// steps 4, 6 and 7 write no status).
const INIT_STEPS: [(u32, u32); 4] = [
    (0, ACKNOWLEDGE),
    (ACKNOWLEDGE, ACKNOWLEDGE | DRIVER),
    (ACKNOWLEDGE | DRIVER, ACKNOWLEDGE | DRIVER | FEATURES_OK),
    (
        ACKNOWLEDGE | DRIVER | FEATURES_OK,
        ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK,
    ),
];

/// The transition for writing `new` over `current`:
/// - 4.2.2: 0 resets;
/// - 2.1 / 3.1.1: the driver may set FAILED at any time (it gave up on the device);
/// - 2.1.1: after FAILED, and with DEVICE_NEEDS_RESET set, the driver must reset: nothing
///   else is taken;
/// - 3.1.1: otherwise only the next step of the initialisation sequence is taken, one bit at
///   a time; anything else clears a bit (2.1.1: the driver must not), skips a step or sets a
///   bit the driver does not own (DEVICE_NEEDS_RESET) and is ignored;
/// - 3.1.1 step 5-6 with 2.2.2 and 6.1: FEATURES_OK stays set only if the device accepts the
///   features, and a modern (version 2) virtio-mmio device needs VIRTIO_F_VERSION_1.
fn spec_status(current: u32, new: u32, acked_version_1: bool) -> SpecStatus {
    if new == 0 {
        return SpecStatus::Reset;
    }
    if new == current | FAILED {
        return SpecStatus::Becomes(new);
    }
    if current & (FAILED | DEVICE_NEEDS_RESET) != 0 {
        return SpecStatus::Ignored;
    }
    match INIT_STEPS.iter().position(|&step| step == (current, new)) {
        Some(2) if !acked_version_1 => SpecStatus::Ignored,
        Some(3) => SpecStatus::Activation,
        Some(_) => SpecStatus::Becomes(new),
        None => SpecStatus::Ignored,
    }
}

/// Whether `s` is a state the initialisation order can reach.
fn reachable(s: u32) -> bool {
    const A: u32 = ACKNOWLEDGE;
    const AD: u32 = A | DRIVER;
    const ADF: u32 = AD | FEATURES_OK;
    const ADFO: u32 = ADF | DRIVER_OK;
    matches!(s & !(FAILED | DEVICE_NEEDS_RESET), 0 | A | AD | ADF | ADFO)
}

struct Rig {
    t: MmioTransport,
    dev: Arc<Mutex<dyn VirtioDevice>>,
    block: Option<Arc<Mutex<Block>>>,
    queues: Vec<Shadow>,
    sel: u32,
    features_sel: u32,
    config_len: usize,
    acked_version_1: bool,
    _host: Option<UnixDatagram>,
    _irq: EventFd,
}

impl Rig {
    fn read(&mut self, offset: u64, width: usize) -> u64 {
        let mut d = [0u8; 8];
        self.t.read(offset, &mut d[..width]);
        u64::from_le_bytes(d)
    }

    fn read32(&mut self, offset: u64) -> u32 {
        self.read(offset, 4) as u32
    }

    fn bad_accesses(&self) -> u64 {
        self.t.metrics().bad_accesses.get()
    }

    fn write(&mut self, offset: u64, width: usize, value: u64) {
        let before_bad = self.bad_accesses();
        let before_status = self.t.status();
        self.t.write(offset, &value.to_le_bytes()[..width]);
        let accepted = self.bad_accesses() == before_bad;
        if width != 4 || offset >= CONFIG {
            return self.check();
        }
        let v = value as u32;
        let sel = usize::try_from(self.sel)
            .ok()
            .filter(|s| *s < self.queues.len());
        match offset {
            STATUS => {
                let after = self.t.status();
                let want = match spec_status(before_status, v, self.acked_version_1) {
                    SpecStatus::Reset => Some(0),
                    SpecStatus::Becomes(s) => Some(s),
                    SpecStatus::Ignored => Some(before_status),
                    SpecStatus::Activation => None,
                };
                match want {
                    Some(w) => {
                        // The device may add NEEDS_RESET on its own (a corrupt ring).
                        assert!(
                            after == w || after == w | DEVICE_NEEDS_RESET,
                            "status {before_status:#x} + write {v:#x}: got {after:#x}, the table says {w:#x}"
                        );
                    }
                    None => assert!(
                        after == before_status | DRIVER_OK
                            || after == before_status | DEVICE_NEEDS_RESET,
                        "activation from {before_status:#x} gave {after:#x}"
                    ),
                }
                if after == 0 {
                    // Reset: everything back to its initial state.
                    for q in &mut self.queues {
                        *q = Shadow::new(q.max);
                    }
                    self.sel = 0;
                    self.features_sel = 0;
                    self.acked_version_1 = false;
                    assert_eq!(
                        self.read32(INTERRUPT_STATUS),
                        0,
                        "interrupts survive a reset"
                    );
                    for i in 0..self.queues.len() {
                        self.t.write(QUEUE_SEL, &(i as u32).to_le_bytes());
                        assert_eq!(self.read32(QUEUE_READY), 0, "queue {i} ready after a reset");
                        assert_eq!(
                            self.read32(QUEUE_NUM_MAX),
                            u32::from(self.queues[i].max),
                            "queue {i} maximum"
                        );
                    }
                    self.t.write(QUEUE_SEL, &0u32.to_le_bytes());
                }
            }
            QUEUE_SEL => self.sel = v,
            DRIVER_FEATURES_SEL => self.features_sel = v,
            QUEUE_NUM if accepted => {
                if let Some(s) = sel {
                    self.queues[s].size = v.min(u32::from(u16::MAX)) as u16;
                }
            }
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if accepted => {
                if let Some(s) = sel {
                    let q = &mut self.queues[s];
                    let field = match offset & !0xf {
                        0x80 => &mut q.desc,
                        0x90 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    if offset & 4 == 0 {
                        *field = (*field & !0xffff_ffff) | u64::from(v);
                    } else {
                        *field = (*field & 0xffff_ffff) | (u64::from(v) << 32);
                    }
                }
            }
            QUEUE_READY if accepted => {
                if let Some(s) = sel {
                    let ready = self.read32(QUEUE_READY) == 1;
                    let q = &mut self.queues[s];
                    q.ready = ready;
                    if ready {
                        assert!(
                            q.valid(),
                            "queue {s} became ready with an invalid configuration {q:x?}"
                        );
                    }
                    if v == 1 && q.valid() {
                        assert!(ready, "queue {s} refused a valid configuration {q:x?}");
                    }
                    if v != 1 {
                        assert!(!ready, "queue {s} ready after writing {v}");
                    }
                }
            }
            DRIVER_FEATURES if accepted && self.features_sel == 1 => {
                self.acked_version_1 = v & ((VIRTIO_F_VERSION_1 >> 32) as u32) != 0;
            }
            // Refused writes change nothing the harness tracks.
            _ => {}
        }
        self.check();
    }

    fn check(&mut self) {
        let status = self.t.status();
        assert!(reachable(status), "unreachable device status {status:#x}");
        assert_eq!(self.read32(0), 0x7472_6976, "magic");
        assert_eq!(self.read32(4), 2, "version");
        let isr = self.read32(INTERRUPT_STATUS);
        assert_eq!(isr & !3, 0, "InterruptStatus {isr:#x}");
        if status & DRIVER_OK != 0
            && let Some(b) = &self.block
        {
            assert!(
                b.lock().expect("lock").is_activated(),
                "DRIVER_OK without activation"
            );
        }
        let _ = &self.dev;
    }
}

fn width(w: u8) -> usize {
    [1, 2, 4, 8][usize::from(w % 4)]
}

/// Runs one input.
pub fn run(input: &Input) {
    let mem = guest::memory();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(
        irq.try_clone().expect("dup an eventfd"),
    )));
    let (dev, block, host, config_len): (Arc<Mutex<dyn VirtioDevice>>, _, _, usize) = if input.net {
        let (host, guest_end) = UnixDatagram::pair().expect("a socket pair");
        guest_end.set_nonblocking(true).expect("non-blocking");
        let tap = Tap::from_fd(OwnedFd::from(guest_end), "fuzz0");
        let config = NetConfig {
            iface_id: "eth0".into(),
            guest_mac: None,
        };
        let net = Net::new(config, tap).expect("a net device");
        (Arc::new(Mutex::new(net)), None, Some(host), 6)
    } else {
        let disk = DiskFile::from_file(guest::memfd(&[0u8; 4096]), false).expect("a memfd disk");
        let config = BlockConfig {
            drive_id: "fuzz".into(),
            read_only: false,
            cache_type: CacheType::Writeback,
            io_engine: kiln::config::IoEngine::Sync,
        };
        let b = Arc::new(Mutex::new(
            Block::new(config, disk).expect("a block device"),
        ));
        (b.clone(), Some(b), None, 24)
    };
    let maxes: Vec<u16> = dev.lock().expect("lock").queue_max_sizes().to_vec();
    let t = MmioTransport::new(dev.clone(), mem.clone(), interrupt);
    let mut rig = Rig {
        t,
        dev,
        block,
        queues: maxes.iter().map(|m| Shadow::new(*m)).collect(),
        sel: 0,
        features_sel: 0,
        config_len,
        acked_version_1: false,
        _host: host,
        _irq: irq,
    };
    rig.check();
    for op in &input.ops {
        match op {
            Op::Write {
                offset,
                width: w,
                value,
            } => {
                rig.write(u64::from(*offset), width(*w), *value);
            }
            Op::Read { offset, width: w } => {
                let offset = u64::from(*offset);
                let w = width(*w);
                let v = rig.read(offset, w);
                if offset >= CONFIG {
                    let start = offset - CONFIG;
                    for i in 0..w as u64 {
                        if start + i >= rig.config_len as u64 {
                            assert_eq!(
                                (v >> (8 * i)) & 0xff,
                                0,
                                "config byte {} past the space",
                                start + i
                            );
                        }
                    }
                } else if w != 4 {
                    assert_eq!(v, 0, "a {w}-byte register read returned data");
                }
                rig.check();
            }
            Op::Init { features } => {
                rig.write(STATUS, 4, 0);
                rig.write(STATUS, 4, u64::from(ACKNOWLEDGE));
                rig.write(STATUS, 4, u64::from(ACKNOWLEDGE | DRIVER));
                rig.write(DRIVER_FEATURES_SEL, 4, 0);
                rig.write(DRIVER_FEATURES, 4, *features & 0xffff_ffff);
                rig.write(DRIVER_FEATURES_SEL, 4, 1);
                rig.write(DRIVER_FEATURES, 4, *features >> 32);
                rig.write(STATUS, 4, u64::from(ACKNOWLEDGE | DRIVER | FEATURES_OK));
            }
            Op::Queue {
                sel,
                size,
                desc,
                avail,
                used,
                ready,
            } => {
                rig.write(QUEUE_SEL, 4, u64::from(*sel));
                rig.write(QUEUE_NUM, 4, u64::from(*size));
                for (reg, v) in [(0x80u64, *desc), (0x90, *avail), (0xa0, *used)] {
                    rig.write(reg, 4, v & 0xffff_ffff);
                    rig.write(reg + 4, 4, v >> 32);
                }
                rig.write(QUEUE_READY, 4, u64::from(*ready));
            }
            Op::Status(s) => rig.write(STATUS, 4, u64::from(*s)),
            Op::Poke(a, b) => {
                let _ = mem.write_slice(b, GuestAddress(a.resolve()));
            }
        }
    }
}
