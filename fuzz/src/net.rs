//! virtio-net: the transmit and receive paths with the TAP replaced by one end of a
//! `UnixDatagram` pair (the harness holds the other end, the "host").
//!
//! Invariants:
//! - TX: the frames reaching the host are exactly the guest's bytes, in order, for the
//!   chains a correct device sends (readable only, 12 bytes to 64 KiB + headers, a header
//!   the negotiated features allow; an empty buffer may carry any address), and nothing
//!   else; chains are returned in the order they were made available; every head taken is
//!   counted once (sent, dropped or failed; a head outside the queue as dropped), and the
//!   device's place in the ring is followed exactly (a chain the TAP refused stays in the
//!   ring, counted as a retry, and goes first once the TAP is writable); used lengths are
//!   0; TX writes nothing but its used ring;
//! - for both: the harness follows the device's `next_used` itself (the driver may scribble
//!   on `used.idx`), and the used ring changes only in the entries added, the index (when
//!   one was added) and the notification fields;
//! - RX: checked against a model of kiln's receive policy ([`rx`]): every used entry (head
//!   and length), every byte written (only the bytes read into the chains the device holds
//!   and the used ring), each frame's bytes (`num_buffers` filled in), the counters, the
//!   chains the device holds between calls and its place in the ring (ahead of the chains
//!   used by the chains held), and why the device stopped (TAP empty: the TAP watched; too
//!   few buffers: nothing delivered, a kick asked for, the TAP no longer watched; end of
//!   file; a corrupt ring); and, independently of that model, against the virtio 1.2 rules
//!   for received packets (`rx::spec_check`: `num_buffers`, buffers used completely but the
//!   last, header flags and `gso_type` against the negotiated features);
//! - for both: the used-buffer interrupt is raised whenever EVENT_IDX requires it;
//! - no livelock: a call that does not return is a libFuzzer timeout (`-timeout=10`).

use std::collections::VecDeque;
use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use kiln::config::MacAddr;
use kiln::devices::IrqLine;
use kiln::devices::virtio::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use kiln::devices::virtio::net::{MAX_FRAME_LEN, Net, NetConfig, Tap, VNET_HDR_LEN, features};
use kiln::devices::virtio::queue::configured_queue;
use kiln::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use kiln::vstate::memory::GuestMemory;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::guest::{self, Ranges};
use crate::virtq::{self, Addr, Buf, ChainSpec, Driver, DriverExt, QueueLayout, RawDesc, Walked};
use crate::wire::{self, Enc, U, Wire};

mod rx;

const MAX_OPS: usize = 64;
const MAX_ROUNDS: usize = 24;
/// `virtio_net_hdr.flags`: checksum left to the device.
const NEEDS_CSUM: u8 = 1;

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// Posts `count` receive chains of one writable buffer of `size` bytes each.
    RxBuffers { count: u8, size: u16 },
    /// Posts an arbitrary receive chain.
    RxChain(ChainSpec),
    /// Writes a frame (virtio-net header first) and posts it in `segments` buffers.
    TxFrame {
        frame: Vec<u8>,
        segments: u8,
        indirect: Option<u8>,
    },
    /// Posts an arbitrary transmit chain.
    TxChain(ChainSpec),
    /// A raw descriptor in a table of queue `rx` (true) or TX.
    Raw { rx: bool, desc: RawDesc },
    /// Publishes a head.
    Publish { rx: bool, head: u16 },
    /// Sets `avail.idx`.
    SetAvailIdx { rx: bool, idx: u16 },
    /// Sets `used_event`.
    SetUsedEvent { rx: bool, v: u16 },
    /// The host sends a frame of `len` bytes (pattern `seed`, header zeroed).
    HostSend { len: u32, seed: u8 },
    /// Runs the transmit path; `drain` reads what reached the host afterwards.
    ProcessTx { drain: bool },
    /// Runs the receive path.
    ProcessRx,
    /// The event loop says the TAP is writable.
    TapWritable,
    /// Writes bytes into guest memory.
    Poke(Addr, Vec<u8>),
    /// Resets the device and activates it again.
    Reset,
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 14 {
            0 => Op::RxBuffers {
                count: wire::u8(u),
                size: wire::u16(u),
            },
            1 => Op::RxChain(ChainSpec::decode(u)),
            2 => Op::TxFrame {
                frame: wire::bytes(u, 4096),
                segments: wire::u8(u),
                indirect: wire::bool(u).then(|| wire::u8(u)),
            },
            3 => Op::TxChain(ChainSpec::decode(u)),
            4 => Op::Raw {
                rx: wire::bool(u),
                desc: RawDesc::decode(u),
            },
            5 => Op::Publish {
                rx: wire::bool(u),
                head: wire::u16(u),
            },
            6 => Op::SetAvailIdx {
                rx: wire::bool(u),
                idx: wire::u16(u),
            },
            7 => Op::SetUsedEvent {
                rx: wire::bool(u),
                v: wire::u16(u),
            },
            8 => Op::HostSend {
                len: wire::u32(u),
                seed: wire::u8(u),
            },
            9 => Op::ProcessTx {
                drain: wire::bool(u),
            },
            10 => Op::ProcessRx,
            11 => Op::TapWritable,
            12 => Op::Poke(Addr::decode(u), wire::bytes(u, 64)),
            _ => Op::Reset,
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::RxBuffers { count, size } => {
                e.u8(0).u8(*count).u16(*size);
            }
            Op::RxChain(c) => {
                e.u8(1);
                c.encode(e);
            }
            Op::TxFrame {
                frame,
                segments,
                indirect,
            } => {
                e.u8(2).bytes(frame).u8(*segments);
                match indirect {
                    None => e.bool(false),
                    Some(s) => e.bool(true).u8(*s),
                };
            }
            Op::TxChain(c) => {
                e.u8(3);
                c.encode(e);
            }
            Op::Raw { rx, desc } => {
                e.u8(4).bool(*rx);
                desc.encode(e);
            }
            Op::Publish { rx, head } => {
                e.u8(5).bool(*rx).u16(*head);
            }
            Op::SetAvailIdx { rx, idx } => {
                e.u8(6).bool(*rx).u16(*idx);
            }
            Op::SetUsedEvent { rx, v } => {
                e.u8(7).bool(*rx).u16(*v);
            }
            Op::HostSend { len, seed } => {
                e.u8(8).u32(*len).u8(*seed);
            }
            Op::ProcessTx { drain } => {
                e.u8(9).bool(*drain);
            }
            Op::ProcessRx => {
                e.u8(10);
            }
            Op::TapWritable => {
                e.u8(11);
            }
            Op::Poke(a, b) => {
                e.u8(12);
                a.encode(e);
                e.bytes(b);
            }
            Op::Reset => {
                e.u8(13);
            }
        }
    }
}

/// A fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Features the driver acks (masked with the offered ones).
    pub features: u64,
    /// Queue sizes: 1 << (this % 9), RX then TX.
    pub size_log: (u8, u8),
    /// The steps.
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            features: wire::u64(u),
            size_log: (wire::u8(u), wire::u8(u)),
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u64(self.features)
            .u8(self.size_log.0)
            .u8(self.size_log.1)
            .many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

/// The host's frame `seed` of `len` bytes (virtio-net header zeroed).
pub fn host_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect();
    let h = len.min(VNET_HDR_LEN);
    f[..h].fill(0);
    f
}

fn header_allowed(features: u64, hdr: &[u8]) -> bool {
    let (flags, gso) = (hdr[0], hdr[1]);
    if flags & NEEDS_CSUM != 0 && features & features::VIRTIO_NET_F_CSUM == 0 {
        return false;
    }
    match gso {
        0 => true,
        1 => features & features::VIRTIO_NET_F_HOST_TSO4 != 0,
        4 => features & features::VIRTIO_NET_F_HOST_TSO6 != 0,
        _ => false,
    }
}

fn gather(mem: &GuestMemory, bufs: &[Walked], max: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for b in bufs {
        if out.len() >= max {
            break;
        }
        let n = (b.len as usize).min(max - out.len());
        let mut v = vec![0u8; n];
        let _ = mem.read_slice(&mut v, GuestAddress(b.addr));
        out.extend_from_slice(&v);
    }
    out
}

/// One queue as the harness tracks it.
struct Side {
    drv: Driver,
    /// The device's next available-ring slot (its `next_avail`), followed exactly (RX: past
    /// the chains it holds, which never go back to the ring).
    taken: u16,
    /// The device's next used-ring slot (its `next_used`; `used.idx` in memory is the
    /// driver's to scribble on too).
    used: u16,
}

impl Side {
    /// The in-range heads from `taken` up to `avail.idx`, with their slot.
    fn pending(&self, mem: &GuestMemory) -> Vec<(u16, u16)> {
        let avail = self.drv.avail_idx_in_memory(mem);
        let n = avail.wrapping_sub(self.taken).min(self.drv.q.size);
        (0..n)
            .map(|i| {
                let slot = self.taken.wrapping_add(i);
                (slot, self.drv.avail_head(mem, slot))
            })
            .filter(|(_, h)| *h < self.drv.q.size)
            .collect()
    }
}

struct Rig {
    mem: GuestMemory,
    dev: Net,
    host: UnixDatagram,
    irq: EventFd,
    features: u64,
    rx: Side,
    tx: Side,
    rounds: usize,
    cursor: u64,
    /// Frames the host sent that the device has not read yet (the TAP's queue).
    host_sent: VecDeque<Vec<u8>>,
    /// What the receive model carries from one round to the next.
    rx_state: rx::State,
    /// Frames a correct device sends for the TX chains returned, not yet seen by the host.
    tx_expected: VecDeque<Vec<u8>>,
    /// TX frame contents can no longer be predicted.
    tx_desync: bool,
    broken: bool,
}

impl Rig {
    fn activate(&mut self) {
        let mut queues = Vec::new();
        for side in [&self.rx, &self.tx] {
            let q = side.drv.q;
            let mut queue = configured_queue(256, q.size, q.desc, q.avail, q.used)
                .expect("a valid queue layout");
            queue.set_event_idx(self.features & VIRTIO_RING_F_EVENT_IDX != 0);
            queues.push(queue);
        }
        let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(
            self.irq.try_clone().expect("dup an eventfd"),
        )));
        self.dev
            .activate(Activation {
                mem: self.mem.clone(),
                queues,
                acked_features: self.features,
                interrupt,
            })
            .expect("two queues activate");
        self.rx.taken = 0;
        self.tx.taken = 0;
        self.rx.used = 0;
        self.tx.used = 0;
        self.broken = false;
    }

    fn alloc(&mut self, len: u64) -> u32 {
        if self.cursor + len > virtq::ARENA_LEN {
            self.cursor = 0;
        }
        let at = self.cursor;
        self.cursor = (self.cursor + len + 15) & !15;
        at as u32
    }

    fn side(&mut self, rx: bool) -> &mut Side {
        if rx { &mut self.rx } else { &mut self.tx }
    }

    fn indirect_ok(&self) -> bool {
        self.features & VIRTIO_RING_F_INDIRECT_DESC != 0
    }

    fn event_idx(&self) -> bool {
        self.features & VIRTIO_RING_F_EVENT_IDX != 0
    }

    fn tx_frame(&mut self, frame: &[u8], segments: u8, indirect: Option<u8>) {
        let off = self.alloc(frame.len() as u64);
        let _ = self
            .mem
            .write_slice(frame, GuestAddress(virtq::ARENA + u64::from(off)));
        let n = usize::from(segments % 8) + 1;
        let step = frame.len().div_ceil(n).max(1);
        let mut bufs = Vec::new();
        let mut at = 0usize;
        while at < frame.len() || bufs.is_empty() {
            let len = step.min(frame.len() - at);
            bufs.push(Buf {
                addr: Addr::Arena(off + at as u32),
                len: len as u32,
                writable: false,
            });
            at += len;
            if len == 0 {
                break;
            }
        }
        let spec = match indirect {
            Some(slot) => ChainSpec::Indirect { slot, bufs },
            None => ChainSpec::Direct(bufs),
        };
        let head = self.tx.drv.add(&self.mem, &spec);
        self.tx.drv.publish(&self.mem, head);
    }

    fn round(&mut self) -> bool {
        if self.rounds == MAX_ROUNDS || self.broken {
            return false;
        }
        self.rounds += 1;
        true
    }

    fn check_interrupt(
        &self,
        rx: bool,
        used_before: u16,
        used_after: u16,
        used_event: u16,
        raised: u64,
    ) {
        if used_after != used_before
            && (!self.event_idx() || virtq::need_event(used_event, used_after, used_before))
        {
            assert!(
                raised >= 1,
                "a required used-buffer interrupt (rx: {rx}) was not raised"
            );
        }
    }

    fn process_tx(&mut self, drain: bool, writable: bool) {
        if !self.round() {
            return;
        }
        let mem = self.mem.clone();
        let q = self.tx.drv.q;
        let pending = self.tx.pending(&mem);
        let avail = self.tx.drv.avail_idx_in_memory(&mem);
        let taken = self.tx.taken;
        let jump = avail.wrapping_sub(taken) > q.size;
        // A refused frame waits for the TAP: process_tx does nothing until it is writable.
        let blocked_before = self
            .dev
            .tap_interest()
            .contains(event_manager::EventSet::OUT);
        let runs = writable || !blocked_before;
        let walked: Vec<Option<Vec<Walked>>> = pending
            .iter()
            .map(|(_, h)| virtq::walk(&mem, &q, *h, self.indirect_ok()))
            .collect();
        // The frames a correct device sends, gathered before it runs (it writes its used
        // ring afterwards, which a hostile chain may cover).
        let mut frames: Vec<Option<Vec<u8>>> = walked
            .iter()
            .map(|w| {
                w.as_ref().and_then(|bufs| {
                    let total: u64 = bufs.iter().map(|b| u64::from(b.len)).sum();
                    let ok = bufs.iter().all(|b| !b.writable)
                        && (VNET_HDR_LEN as u64..=MAX_FRAME_LEN as u64).contains(&total);
                    let bytes = ok.then(|| gather(&mem, bufs, MAX_FRAME_LEN))?;
                    header_allowed(self.features, &bytes).then_some(bytes)
                })
            })
            .collect();
        // A chain that covers the TX used ring sees the device's own writes: the frames
        // after it cannot be predicted any more.
        let mut ring = Ranges::default();
        for b in walked.iter().flatten().flatten() {
            ring.add(b.addr, u64::from(b.len));
        }
        if ring.touches(q.used, q.used + q.used_len()) {
            self.tx_desync = true;
        }
        let used_event = self.tx.drv.used_event(&mem);
        let m = self.dev.metrics();
        let counted = |m: &kiln::devices::virtio::net::NetMetrics| {
            m.tx_frames.get() + m.tx_dropped.get() + m.tx_errors.get()
        };
        let (counted_before, retries_before, irq_before) =
            (counted(&m), m.tx_retries.get(), m.interrupts.get());
        let _ = self.irq.read();
        guest::snapshot(&mem);

        if writable {
            self.dev.tap_writable();
        } else {
            self.dev.process_tx();
        }

        // The heads taken, from the counters: each is sent, dropped or failed once (a
        // head outside the queue is dropped); a refused one stays in the ring.
        let c = counted(&m) - counted_before;
        let blocked = self
            .dev
            .tap_interest()
            .contains(event_manager::EventSet::OUT);
        assert!(
            c <= u64::from(avail.wrapping_sub(taken).min(q.size)),
            "{c} TX heads counted, {} made available",
            avail.wrapping_sub(taken)
        );
        let next = taken.wrapping_add(c as u16);
        // The chains returned: the in-range heads among those taken, in order.
        let k = pending
            .iter()
            .take_while(|(slot, _)| u64::from(slot.wrapping_sub(taken)) < c)
            .count();
        let mut allowed = Ranges::default();
        q.used_writes(self.tx.used, k as u16, &mut allowed);
        guest::assert_writes_within(&mem, &allowed, "virtio-net TX");
        assert_eq!(
            self.dev.needs_reset(),
            runs && jump,
            "NEEDS_RESET (avail.idx {avail}, next_avail {taken}, queue size {})",
            q.size
        );
        if self.dev.needs_reset() {
            assert_eq!(c, 0, "TX heads taken from a corrupt ring");
            self.broken = true;
            return;
        }
        if !runs {
            assert_eq!(c, 0, "TX sent while the TAP was full");
        } else if blocked {
            assert_eq!(
                pending.get(k).map(|(slot, _)| *slot),
                Some(next),
                "TX blocked, but slot {next} holds no chain left in the ring"
            );
        } else {
            assert_eq!(next, avail, "TX chains left in the ring");
        }
        assert_eq!(
            m.tx_retries.get() - retries_before,
            u64::from(runs && blocked),
            "a refused frame is counted as one retry"
        );
        let used_before = self.tx.used;
        let entries = self.tx.drv.used_entries(&mem, used_before, k as u16);
        for (i, entry) in entries.into_iter().enumerate() {
            let head = pending[i].1;
            if let Some((id, len)) = entry {
                assert_eq!(
                    id,
                    u32::from(head),
                    "used entry {i} is not the next chain made available"
                );
                assert_eq!(len, 0, "TX used length of head {head}");
            }
            if let Some(f) = frames[i].take() {
                self.tx_expected.push_back(f);
            }
        }
        self.tx.taken = next;
        self.tx.used = used_before.wrapping_add(k as u16);
        let irq = m.interrupts.get() - irq_before;
        self.check_interrupt(false, used_before, self.tx.used, used_event, irq);
        if drain {
            self.drain();
        }
    }

    fn drain(&mut self) {
        let m = self.dev.metrics();
        let mut buf = vec![0u8; MAX_FRAME_LEN + 1];
        let mut skipped = 0u64;
        if self.tx_desync {
            while self.host.recv(&mut buf).is_ok() {}
            return;
        }
        while let Ok(n) = self.host.recv(&mut buf) {
            let got = &buf[..n];
            loop {
                let Some(want) = self.tx_expected.pop_front() else {
                    panic!("the host received a {n}-byte frame the guest never sent");
                };
                if want == got {
                    break;
                }
                skipped += 1;
            }
        }
        assert!(
            skipped <= m.tx_errors.get(),
            "frames lost without a counted TX error"
        );
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let mem = guest::memory();
    let (host, guest_end) = UnixDatagram::pair().expect("a socket pair");
    host.set_nonblocking(true).expect("non-blocking");
    guest_end.set_nonblocking(true).expect("non-blocking");
    let tap = Tap::from_fd(OwnedFd::from(guest_end), "fuzz0");
    let config = NetConfig {
        iface_id: "eth0".into(),
        guest_mac: Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])),
    };
    let dev = Net::new(config, tap).expect("a net device");
    let features = input.features & dev.avail_features();
    let layout = |base: u64, log: u8| QueueLayout {
        desc: base,
        avail: base + 0x1000,
        used: base + 0x2000,
        size: 1 << (log % 9),
    };
    let rx = Side {
        drv: Driver::new(&mem, layout(0x1000, input.size_log.0)),
        taken: 0,
        used: 0,
    };
    let tx = Side {
        drv: Driver::new(&mem, layout(0x4000, input.size_log.1)),
        taken: 0,
        used: 0,
    };
    let mut rig = Rig {
        irq: EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd"),
        mem,
        dev,
        host,
        features,
        rx,
        tx,
        rounds: 0,
        cursor: 0,
        host_sent: VecDeque::new(),
        rx_state: rx::State::default(),
        tx_expected: VecDeque::new(),
        tx_desync: false,
        broken: false,
    };
    rig.activate();
    for op in &input.ops {
        match op {
            Op::RxBuffers { count, size } => {
                for _ in 0..count % 17 {
                    let off = rig.alloc(u64::from(*size));
                    let spec = ChainSpec::Direct(vec![Buf {
                        addr: Addr::Arena(off),
                        len: u32::from(*size),
                        writable: true,
                    }]);
                    let head = rig.rx.drv.add(&rig.mem, &spec);
                    rig.rx.drv.publish(&rig.mem, head);
                }
            }
            Op::RxChain(c) | Op::TxChain(c) => {
                let rx = matches!(op, Op::RxChain(_));
                let mem = rig.mem.clone();
                let side = rig.side(rx);
                let head = side.drv.add(&mem, c);
                side.drv.publish(&mem, head);
            }
            Op::TxFrame {
                frame,
                segments,
                indirect,
            } => rig.tx_frame(frame, *segments, *indirect),
            Op::Raw { rx, desc } => {
                let mem = rig.mem.clone();
                rig.side(*rx).drv.raw(&mem, desc);
            }
            Op::Publish { rx, head } => {
                let mem = rig.mem.clone();
                rig.side(*rx).drv.publish(&mem, *head);
            }
            Op::SetAvailIdx { rx, idx } => {
                let mem = rig.mem.clone();
                rig.side(*rx).drv.set_avail_idx(&mem, *idx);
            }
            Op::SetUsedEvent { rx, v } => {
                let mem = rig.mem.clone();
                rig.side(*rx).drv.set_used_event(&mem, *v);
            }
            Op::HostSend { len, seed } => {
                // A TAP never delivers more than MAX_FRAME_LEN bytes in one read.
                let len = *len as usize % (MAX_FRAME_LEN + 1);
                let f = host_frame(len, *seed);
                if rig.host.send(&f).is_ok() {
                    rig.host_sent.push_back(f);
                }
            }
            Op::ProcessTx { drain } => rig.process_tx(*drain, false),
            Op::ProcessRx => rig.process_rx(),
            Op::TapWritable => rig.process_tx(false, true),
            Op::Poke(a, b) => {
                let _ = rig.mem.write_slice(b, GuestAddress(a.resolve()));
            }
            Op::Reset => {
                rig.dev.reset();
                rig.rx.drv.reset(&rig.mem);
                rig.tx.drv.reset(&rig.mem);
                rig.activate();
                // A reset discards the frame in the bounce buffer and the receive chains
                // held; the rings start over.
                rig.rx_state.reset();
            }
        }
    }
    rig.process_tx(true, false);
    rig.process_rx();
}
