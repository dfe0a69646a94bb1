//! virtio-blk: requests, well formed or hostile, written into guest memory and processed by
//! [`Block::process_queue`] over a memfd image.
//!
//! Invariants checked after every round of processing:
//! - guest memory changed only inside the device-writable buffers of the chains taken and,
//!   in the used ring, the entries added, the index (if any was added) and the
//!   notification fields;
//! - a read-only image is never written; a writable one changes only with a counted write;
//! - the device's used index (followed by the harness: the driver may scribble on
//!   `used.idx`) moved by exactly the number of heads taken (minus heads outside the
//!   queue, which have no used slot), each used element names the head taken in that order
//!   (no request answered twice or skipped), and its length is at most the chain's
//!   device-writable bytes (0 for an invalid chain);
//! - a device-writable buffer over the rings or descriptor tables lets the device change
//!   what it reads next: from then on (until a reset) only the image checks apply;
//! - every head taken is counted in exactly one outcome counter;
//! - an available index more than a queue ahead puts the device in NEEDS_RESET, takes
//!   nothing, and raises a configuration interrupt;
//! - the used-buffer interrupt is raised when EVENT_IDX (or its absence) says it must be;
//! - every request is checked against an independent model of a block device written from
//!   the virtio 1.2 specification ([`crate::blk_model`]): the image as a byte array, writes
//!   landing exactly at `sector * 512` with exactly the chain's bytes (and nothing else in the
//!   image changing), reads delivering exactly the image's bytes into guest memory, the
//!   status OK / IOERR / UNSUPP where the specification says, and used lengths.
//!
//! [`run_async`] runs the same inputs through the `Async` engine (io_uring): each round
//! drains what is in flight before the checks, and since io_uring completes requests in
//! the order they finish, the used ring must hold exactly the heads taken (as a multiset,
//! each checked against its own model prediction) rather than in that order, with at most
//! two used-buffer interrupts a round (requests answered at submission, then at the drain).

use std::sync::Arc;

use kiln::config::CacheType;
use kiln::devices::IrqLine;
use kiln::devices::virtio::block::{Block, BlockConfig, DiskFile};
use kiln::devices::virtio::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use kiln::devices::virtio::queue::configured_queue;
use kiln::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use kiln::vstate::memory::GuestMemory;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::blk_model::{self, Device as ModelDevice};
use crate::guest::{self, Ranges};
use crate::virtq::{self, Addr, Buf, ChainSpec, Driver, DriverExt, QueueLayout, RawDesc};
use crate::wire::{self, Enc, U, Wire};

/// Most operations per input.
const MAX_OPS: usize = 64;
/// Most processing rounds per input (each snapshots guest memory).
const MAX_ROUNDS: usize = 16;

/// Where the request builder puts the header and data of a structured request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Req {
    /// `type` (0 in, 1 out, 4 flush, 8 get id, anything else).
    pub kind: u32,
    /// `sector`.
    pub sector: u64,
    /// Where the 16-byte header is split in two buffers (0 or >= 16: not split).
    pub header_split: u8,
    /// Data segments: a length code (high bit set: that many bytes, else that many
    /// sectors) and the direction (a correct request uses writable for in/get id).
    pub data: Vec<(u16, bool)>,
    /// Status buffer length (0: none) and whether it is device-writable.
    pub status: (u8, bool),
    /// Through an indirect table (in slot `Some(n)`).
    pub indirect: Option<u8>,
}

impl Wire for Req {
    fn decode(u: &mut U<'_>) -> Self {
        Req {
            kind: wire::u32(u),
            sector: wire::u64(u),
            header_split: wire::u8(u),
            data: {
                let n = usize::from(wire::u8(u)) % 9;
                (0..n).map(|_| (wire::u16(u), wire::bool(u))).collect()
            },
            status: (wire::u8(u), wire::bool(u)),
            indirect: wire::bool(u).then(|| wire::u8(u)),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u32(self.kind).u64(self.sector).u8(self.header_split);
        e.u8(self.data.len() as u8);
        for (len, w) in &self.data {
            e.u16(*len).bool(*w);
        }
        e.u8(self.status.0).bool(self.status.1);
        match self.indirect {
            None => e.bool(false),
            Some(s) => e.bool(true).u8(s),
        };
    }
}

impl Req {
    /// A well-formed request: `kind` at `sector`, `segments` data buffers of `sectors`
    /// sectors each.
    pub fn valid(kind: u32, sector: u64, segments: usize, sectors: u16) -> Req {
        let writable = kind != 1;
        Req {
            kind,
            sector,
            header_split: 0,
            data: vec![(sectors, writable); segments],
            status: (1, true),
            indirect: None,
        }
    }
}

/// One step of the driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Builds a request (header written) and publishes it.
    Request(Req),
    /// Writes a chain of arbitrary buffers and publishes it.
    Chain(ChainSpec),
    /// Writes one descriptor anywhere in a table.
    Raw(RawDesc),
    /// Publishes a head.
    Publish(u16),
    /// Sets `avail.idx`.
    SetAvailIdx(u16),
    /// Sets `used_event`.
    SetUsedEvent(u16),
    /// Writes bytes into guest memory.
    Poke(Addr, Vec<u8>),
    /// Runs the device.
    Process,
    /// Resets the device and activates it again (the driver starts over).
    Reset,
    /// The image shrinks to this many sectors under the device.
    Truncate(u8),
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 10 {
            0 => Op::Request(Req::decode(u)),
            1 => Op::Chain(ChainSpec::decode(u)),
            2 => Op::Raw(RawDesc::decode(u)),
            3 => Op::Publish(wire::u16(u)),
            4 => Op::SetAvailIdx(wire::u16(u)),
            5 => Op::SetUsedEvent(wire::u16(u)),
            6 => Op::Poke(Addr::decode(u), wire::bytes(u, 64)),
            7 => Op::Process,
            8 => Op::Reset,
            _ => Op::Truncate(wire::u8(u)),
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::Request(r) => {
                e.u8(0);
                r.encode(e);
            }
            Op::Chain(c) => {
                e.u8(1);
                c.encode(e);
            }
            Op::Raw(d) => {
                e.u8(2);
                d.encode(e);
            }
            Op::Publish(h) => {
                e.u8(3).u16(*h);
            }
            Op::SetAvailIdx(i) => {
                e.u8(4).u16(*i);
            }
            Op::SetUsedEvent(i) => {
                e.u8(5).u16(*i);
            }
            Op::Poke(a, b) => {
                e.u8(6);
                a.encode(e);
                e.bytes(b);
            }
            Op::Process => {
                e.u8(7);
            }
            Op::Reset => {
                e.u8(8);
            }
            Op::Truncate(n) => {
                e.u8(9).u8(*n);
            }
        }
    }
}

/// A fuzz input: the drive, the negotiated features and the driver's steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Read-only drive.
    pub read_only: bool,
    /// `cache_type` Writeback (FLUSH offered).
    pub writeback: bool,
    /// Features the driver acks (masked with the offered ones).
    pub features: u64,
    /// Queue size: 1 << (this % 9).
    pub size_log: u8,
    /// Image size in sectors (modulo 129).
    pub sectors: u8,
    /// Drive id length (modulo 33).
    pub id_len: u8,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            read_only: wire::bool(u),
            writeback: wire::bool(u),
            features: wire::u64(u),
            size_log: wire::u8(u),
            sectors: wire::u8(u),
            id_len: wire::u8(u),
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.bool(self.read_only)
            .bool(self.writeback)
            .u64(self.features)
            .u8(self.size_log)
            .u8(self.sectors)
            .u8(self.id_len)
            .many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

const QUEUE: QueueLayout = QueueLayout {
    desc: 0x1000,
    avail: 0x2000,
    used: 0x3000,
    size: 0,
};

struct Rig {
    /// The `Async` engine: drain after processing, order-free used-ring checks.
    asynchronous: bool,
    mem: GuestMemory,
    dev: Block,
    drv: Driver,
    irq: EventFd,
    file: std::fs::File,
    features: u64,
    read_only: bool,
    /// Heads the device has taken so far (its `next_avail`).
    taken: u16,
    /// The device's next used-ring slot (its `next_used`; `used.idx` in memory is the
    /// driver's to scribble on too).
    used: u16,
    /// A device write may have changed the rings: only the image checks stay exact (until
    /// a reset).
    lost: bool,
    broken: bool,
    rounds: usize,
    /// Bump allocator in the arena for structured requests.
    cursor: u64,
    /// The device as the specification model sees it.
    model: ModelDevice,
}

impl Rig {
    fn activate(&mut self) {
        let q = self.drv.q;
        let mut queue =
            configured_queue(256, q.size, q.desc, q.avail, q.used).expect("a valid queue layout");
        queue.set_event_idx(self.features & VIRTIO_RING_F_EVENT_IDX != 0);
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(
            self.irq.try_clone().expect("dup an eventfd"),
        )));
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues: vec![queue],
                acked_features: self.features,
                interrupt,
            })
            .expect("one queue activates");
        self.taken = 0;
        self.used = 0;
        self.lost = false;
        self.broken = false;
    }

    fn alloc(&mut self, len: u64) -> u64 {
        if self.cursor + len > virtq::ARENA_LEN {
            self.cursor = 0;
        }
        let at = virtq::ARENA + self.cursor;
        self.cursor = (self.cursor + len + 15) & !15;
        at
    }

    fn request(&mut self, r: &Req) {
        let mut bufs = Vec::new();
        let hdr = self.alloc(16);
        let mut h = [0u8; 16];
        h[0..4].copy_from_slice(&r.kind.to_le_bytes());
        h[8..16].copy_from_slice(&r.sector.to_le_bytes());
        let _ = self.mem.write_slice(&h, GuestAddress(hdr));
        let split = u32::from(r.header_split);
        let header_off = (hdr - virtq::ARENA) as u32;
        if split == 0 || split >= 16 {
            bufs.push(Buf {
                addr: Addr::Arena(header_off),
                len: 16,
                writable: false,
            });
        } else {
            bufs.push(Buf {
                addr: Addr::Arena(header_off),
                len: split,
                writable: false,
            });
            bufs.push(Buf {
                addr: Addr::Arena(header_off + split),
                len: 16 - split,
                writable: false,
            });
        }
        for &(code, writable) in &r.data {
            let len = if code & 0x8000 != 0 {
                u32::from(code & 0x7fff)
            } else {
                u32::from(code % 129) * 512
            };
            let at = self.alloc(u64::from(len));
            bufs.push(Buf {
                addr: Addr::Arena((at - virtq::ARENA) as u32),
                len,
                writable,
            });
        }
        let (slen, swritable) = r.status;
        let slen = u32::from(slen % 4);
        if slen > 0 {
            let at = self.alloc(u64::from(slen));
            let _ = self
                .mem
                .write_slice(&[0xaa; 4][..slen as usize], GuestAddress(at));
            bufs.push(Buf {
                addr: Addr::Arena((at - virtq::ARENA) as u32),
                len: slen,
                writable: swritable,
            });
        }
        let spec = match r.indirect {
            Some(slot) => ChainSpec::Indirect { slot, bufs },
            None => ChainSpec::Direct(bufs),
        };
        let head = self.drv.add(&self.mem, &spec);
        self.drv.publish(&self.mem, head);
    }

    fn process(&mut self) {
        if self.rounds == MAX_ROUNDS {
            return;
        }
        self.rounds += 1;
        let mem = &self.mem;
        let q = self.drv.q;
        let indirect_ok = self.features & VIRTIO_RING_F_INDIRECT_DESC != 0;
        let event_idx = self.features & VIRTIO_RING_F_EVENT_IDX != 0;
        let avail = self.drv.avail_idx_in_memory(mem);
        let pending = avail.wrapping_sub(self.taken);
        let jump = pending > q.size;

        // What the device may write, and what it should answer.
        let mut bufs = Ranges::default();
        let mut expected: Vec<(u16, Option<u64>)> = Vec::new();
        let mut chains = Vec::new();
        if !self.broken && !jump {
            for i in 0..pending {
                let head = self.drv.avail_head(mem, self.taken.wrapping_add(i));
                let chain = virtq::walk(mem, &q, head, indirect_ok);
                if let Some(c) = &chain {
                    for b in c.iter().filter(|b| b.writable) {
                        bufs.add(b.addr, u64::from(b.len));
                    }
                }
                expected.push((head, chain.as_deref().map(virtq::writable_len)));
                chains.push((head, chain));
            }
        }
        // A device-writable buffer over a descriptor table or ring makes the walk above
        // stale once the device writes there: from then on only the image checks are exact.
        if virtq::control_area_touched(&bufs) {
            self.lost = true;
        }
        let exact = !self.lost;
        let returned: Vec<(u16, Option<u64>)> = expected
            .iter()
            .filter(|(h, _)| *h < q.size)
            .copied()
            .collect();
        let mut allowed = bufs;
        q.used_writes(self.used, returned.len() as u16, &mut allowed);

        let m = self.dev.metrics();
        let outcomes = |m: &kiln::devices::virtio::block::BlockMetrics| {
            m.read_count.get()
                + m.write_count.get()
                + m.flush_count.get()
                + m.get_id_count.get()
                + m.invalid_requests.get()
                + m.io_errors.get()
                + m.unsupported.get()
                + m.dropped_chains.get()
        };
        let before_outcomes = outcomes(&m);
        let before_writes = m.write_count.get();
        let before_interrupts = m.interrupts.get();
        let before_queue_errors = m.queue_errors.get();
        let used_before = self.used;
        let used_event = self.drv.used_event(mem);
        let disk_before = guest::file_bytes(&self.file);
        // The specification model's prediction for every chain, from guest memory and the
        // image as they are now.
        let mut image: Vec<Option<u8>> = disk_before.iter().copied().map(Some).collect();
        let (predictions, image_known) = if exact {
            blk_model::predict(mem, &self.model, &chains, &mut image)
        } else {
            (Vec::new(), false)
        };
        let _ = self.irq.read();
        guest::snapshot(mem);

        self.dev.process_queue();
        if self.asynchronous {
            self.dev
                .drain()
                .expect("the ring drains (the image is a memfd)");
        }

        if exact {
            guest::assert_writes_within(mem, &allowed, "virtio-blk");
        }
        let disk_after = guest::file_bytes(&self.file);
        if self.read_only {
            assert!(disk_after == disk_before, "a read-only image was written");
        }
        if m.write_count.get() == before_writes {
            assert!(
                disk_after == disk_before,
                "the image changed without a counted write"
            );
        }
        let irqs = self.irq.read().unwrap_or(0);
        let interrupts = m.interrupts.get() - before_interrupts;
        let queue_errors = m.queue_errors.get() - before_queue_errors;
        assert_eq!(
            irqs,
            interrupts + queue_errors,
            "interrupts raised vs counted"
        );
        assert!(
            interrupts <= 1 + u64::from(self.asynchronous),
            "more used-buffer interrupts than answer runs in a round"
        );

        if !exact {
            self.broken |= self.dev.needs_reset();
            return;
        }
        // Nothing answered here: the write check above allowed no used entry.
        if self.broken {
            return;
        }
        if jump {
            assert_eq!(queue_errors, 1, "a corrupt available ring was not counted");
            assert!(
                self.dev.needs_reset(),
                "a corrupt available ring left the device running"
            );
            self.broken = true;
            return;
        }
        assert!(
            !self.dev.needs_reset(),
            "NEEDS_RESET without a corrupt ring"
        );
        // The image: exactly the writes the model predicts, nothing else.
        if image_known {
            blk_model::assert_image(&disk_after, &image);
        }
        let used = returned.len() as u16;
        let entries = self.drv.used_entries(mem, used_before, used);
        if self.asynchronous {
            // Completion order: every head taken answered exactly once, each against its
            // own prediction and bound.
            let mut pending: Vec<Option<(u16, Option<u64>)>> =
                returned.iter().copied().map(Some).collect();
            for (i, entry) in entries.into_iter().enumerate() {
                let Some((id, len)) = entry else {
                    continue;
                };
                let slot = pending
                    .iter_mut()
                    .find(|p| p.is_some_and(|(h, _)| u32::from(h) == id))
                    .unwrap_or_else(|| {
                        panic!("used element {i} names head {id}, not taken or answered twice")
                    });
                let (head, bound) = slot.take().expect("found above");
                match bound {
                    Some(max) => assert!(
                        u64::from(len) <= max,
                        "used length {len} > {max} writable bytes (head {head})"
                    ),
                    None => assert_eq!(len, 0, "an invalid chain (head {head}) was answered"),
                }
                if let Some(p) = predictions.iter().find(|p| p.head == head) {
                    blk_model::check(mem, p, len);
                }
            }
        } else {
            let answered = predictions.iter().filter(|p| p.head < q.size);
            for (p, entry) in answered.zip(self.drv.used_entries(mem, used_before, used)) {
                if let Some((_, len)) = entry {
                    blk_model::check(mem, p, len);
                }
            }
            for (i, ((head, bound), entry)) in returned.iter().zip(entries).enumerate() {
                let Some((id, len)) = entry else {
                    continue;
                };
                assert_eq!(
                    id,
                    u32::from(*head),
                    "used element {i} names the wrong head"
                );
                match bound {
                    Some(max) => assert!(
                        u64::from(len) <= *max,
                        "used length {len} > {max} writable bytes (head {head})"
                    ),
                    None => assert_eq!(len, 0, "an invalid chain (head {head}) was answered"),
                }
            }
        }
        // Each head taken, inside the queue or not, is counted in exactly one outcome
        // (a head outside the queue once, as a dropped chain: findings/blk-double-dropped.bin).
        assert_eq!(
            outcomes(&m) - before_outcomes,
            expected.len() as u64,
            "outcome counters moved by {} for {} heads taken",
            outcomes(&m) - before_outcomes,
            expected.len()
        );
        let used_after = used_before.wrapping_add(used);
        if used > 0 && (!event_idx || virtq::need_event(used_event, used_after, used_before)) {
            // Async: the event index falls in one of the round's answer runs (at submission,
            // at the drain), which must have interrupted.
            assert!(
                interrupts == 1 || (self.asynchronous && interrupts == 2),
                "a required used-buffer interrupt was not raised ({interrupts})"
            );
        }
        self.taken = avail;
        self.used = used_after;
    }
}

/// Runs one input through the `Sync` engine.
pub fn run(input: &Input) {
    run_with(input, kiln::config::IoEngine::Sync);
}

/// Runs one input through the `Async` engine (io_uring).
pub fn run_async(input: &Input) {
    run_with(input, kiln::config::IoEngine::Async);
}

fn run_with(input: &Input, engine: kiln::config::IoEngine) {
    let mem = guest::memory();
    let sectors = u64::from(input.sectors % 129);
    let image: Vec<u8> = (0..sectors * 512)
        .map(|i| (i / 512) as u8 ^ (i as u8))
        .collect();
    let file = guest::memfd(&image);
    let disk = DiskFile::from_file(file.try_clone().expect("dup a memfd"), input.read_only)
        .expect("a memfd is a disk");
    let id: String = "drive-id-0123456789abcdefghijklmn"
        .chars()
        .take(usize::from(input.id_len % 33))
        .collect();
    let config = BlockConfig {
        drive_id: id,
        read_only: input.read_only,
        cache_type: if input.writeback {
            CacheType::Writeback
        } else {
            CacheType::Unsafe
        },
        io_engine: engine,
    };
    let id_bytes = config.drive_id.as_bytes().to_vec();
    let dev = Block::new(config, disk).expect("a block device");
    let offered = dev.avail_features();
    // What the configuration must offer (5.2.3): RO for a read-only drive, FLUSH with a
    // write-back cache, never either otherwise.
    assert_eq!(
        offered & blk_model::F_RO != 0,
        input.read_only,
        "VIRTIO_BLK_F_RO offered"
    );
    assert_eq!(
        offered & blk_model::F_FLUSH != 0,
        input.writeback,
        "VIRTIO_BLK_F_FLUSH offered"
    );
    let features = input.features & offered;
    let model = ModelDevice {
        capacity: sectors,
        read_only: input.read_only,
        flush: features & blk_model::F_FLUSH != 0,
        id: id_bytes,
    };
    let size = 1u16 << (input.size_log % 9);
    let drv = Driver::new(&mem, QueueLayout { size, ..QUEUE });
    let mut rig = Rig {
        asynchronous: engine == kiln::config::IoEngine::Async,
        irq: EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
        mem,
        dev,
        drv,
        file,
        features,
        read_only: input.read_only,
        taken: 0,
        used: 0,
        lost: false,
        broken: false,
        rounds: 0,
        cursor: 0,
        model,
    };
    rig.activate();
    for op in &input.ops {
        match op {
            Op::Request(r) => rig.request(r),
            Op::Chain(c) => {
                let head = rig.drv.add(&rig.mem, c);
                rig.drv.publish(&rig.mem, head);
            }
            Op::Raw(d) => rig.drv.raw(&rig.mem, d),
            Op::Publish(h) => rig.drv.publish(&rig.mem, *h),
            Op::SetAvailIdx(i) => rig.drv.set_avail_idx(&rig.mem, *i),
            Op::SetUsedEvent(i) => rig.drv.set_used_event(&rig.mem, *i),
            Op::Poke(a, b) => {
                let _ = rig.mem.write_slice(b, GuestAddress(a.resolve()));
            }
            Op::Process => rig.process(),
            Op::Reset => {
                rig.dev.reset();
                rig.drv.reset(&rig.mem);
                rig.activate();
            }
            Op::Truncate(n) => {
                let _ = rig.file.set_len(u64::from(*n) * 512);
            }
        }
    }
    rig.process();
}
