//! virtio-net: the transmit and receive paths with the TAP replaced by one end of a
//! `UnixDatagram` pair (the harness holds the other end, the "host").
//!
//! Invariants:
//! - TX: the frames reaching the host are exactly the guest's bytes, in order, for the
//!   chains a correct device sends (readable only, 12 bytes to 64 KiB + headers, a header
//!   the negotiated features allow), and nothing else; every chain taken is counted once
//!   (sent, dropped or failed); used lengths are 0; TX writes nothing but its used ring;
//! - RX: guest memory changes only inside the posted receive buffers (and the used ring);
//!   used lengths are at most the chain's capacity (0 for an
//!   unusable chain); chains are returned in the order they were made available; each frame
//!   delivered is the host's frame, byte for byte, with `num_buffers` filled in, and frames
//!   are delivered in order, none twice (a frame is only ever skipped as a counted drop);
//! - for both: the used-buffer interrupt is raised whenever EVENT_IDX requires it.

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
use crate::virtq::{self, Addr, Buf, ChainSpec, Driver, QueueLayout, RawDesc, Walked};
use crate::wire::{self, Enc, U, Wire};

/// Whether to steer clear of finding 2 of the fuzzing report: with MRG_RXBUF, a frame
/// waiting in the bounce buffer that is larger than all the receive buffers posted makes
/// `Net::process_rx` loop forever (NoRoom → `enable_notification` sees buffers → retry).
/// While true, the harness does not run the receive path in that state. Set to false once
/// fixed.
const AVOID_RX_LIVELOCK: bool = true;
/// Finding 3: a zero-length buffer outside RAM passes the chain walk but makes
/// `queue::host_buffers` fail, so TX drops the frame. Set to false once fixed.
const TOLERATE_ZERO_LEN_OUTSIDE: bool = true;
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
    TxFrame { frame: Vec<u8>, segments: u8, indirect: Option<u8> },
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
            0 => Op::RxBuffers { count: wire::u8(u), size: wire::u16(u) },
            1 => Op::RxChain(ChainSpec::decode(u)),
            2 => Op::TxFrame {
                frame: wire::bytes(u, 4096),
                segments: wire::u8(u),
                indirect: wire::bool(u).then(|| wire::u8(u)),
            },
            3 => Op::TxChain(ChainSpec::decode(u)),
            4 => Op::Raw { rx: wire::bool(u), desc: RawDesc::decode(u) },
            5 => Op::Publish { rx: wire::bool(u), head: wire::u16(u) },
            6 => Op::SetAvailIdx { rx: wire::bool(u), idx: wire::u16(u) },
            7 => Op::SetUsedEvent { rx: wire::bool(u), v: wire::u16(u) },
            8 => Op::HostSend { len: wire::u32(u), seed: wire::u8(u) },
            9 => Op::ProcessTx { drain: wire::bool(u) },
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
            Op::TxFrame { frame, segments, indirect } => {
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
        e.u64(self.features).u8(self.size_log.0).u8(self.size_log.1).many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

/// The host's frame `seed` of `len` bytes (virtio-net header zeroed).
pub fn host_frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed)).collect();
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
    /// Available-ring slot after the last chain the device returned.
    taken: u16,
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
    /// Frames the host sent, not yet delivered or dropped.
    host_sent: VecDeque<Vec<u8>>,
    /// Frames a correct device sends for the TX chains returned, not yet seen by the host.
    tx_expected: VecDeque<Vec<u8>>,
    /// Frame content can no longer be matched (overlapping buffers, a reset).
    rx_desync: bool,
    /// A blocked TAP hid which chains were taken: TX counts are no longer exact.
    tx_inexact: bool,
    /// Host frames skipped by the matcher so far (each must be a counted drop).
    rx_skipped: u64,
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

    fn tx_frame(&mut self, frame: &[u8], segments: u8, indirect: Option<u8>) {
        let off = self.alloc(frame.len() as u64);
        let _ = self.mem.write_slice(frame, GuestAddress(virtq::ARENA + u64::from(off)));
        let n = usize::from(segments % 8) + 1;
        let step = frame.len().div_ceil(n).max(1);
        let mut bufs = Vec::new();
        let mut at = 0usize;
        while at < frame.len() || bufs.is_empty() {
            let len = step.min(frame.len() - at);
            bufs.push(Buf { addr: Addr::Arena(off + at as u32), len: len as u32, writable: false });
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

    /// Checks the used entries a path added; returns them as (slot, head, len).
    fn returned(&mut self, rx: bool, used_before: u16, pending: &[(u16, u16)]) -> Vec<(u16, u16, u32)> {
        let mem = self.mem.clone();
        let side = self.side(rx);
        let used = side.drv.used_idx(&mem).wrapping_sub(used_before);
        assert!(
            usize::from(used) <= pending.len(),
            "{} used entries for {} chains made available",
            used,
            pending.len()
        );
        let mut out = Vec::new();
        for i in 0..used {
            let (id, len) = side.drv.used_elem(&mem, used_before.wrapping_add(i));
            let (slot, head) = pending[usize::from(i)];
            assert_eq!(id, u32::from(head), "used entry {i} is not the next chain made available");
            out.push((slot, head, len));
        }
        if let Some((slot, _, _)) = out.last() {
            side.taken = slot.wrapping_add(1);
        }
        out
    }

    fn check_interrupt(&self, rx: bool, used_before: u16, used_after: u16, used_event: u16, raised: u64) {
        let event_idx = self.features & VIRTIO_RING_F_EVENT_IDX != 0;
        if used_after != used_before && (!event_idx || virtq::need_event(used_event, used_after, used_before)) {
            assert!(raised >= 1, "a required used-buffer interrupt (rx: {rx}) was not raised");
        }
    }

    fn process_tx(&mut self, drain: bool, writable: bool) {
        if !self.round() {
            return;
        }
        let mem = self.mem.clone();
        let q = self.tx.drv.q;
        let pending = self.tx.pending(&mem);
        let all = self.tx.drv.avail_idx_in_memory(&mem).wrapping_sub(self.tx.taken);
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
                    // Finding 3: kiln drops a chain holding a zero-length buffer outside
                    // RAM (`host_buffers` fails on it) although the walk accepts it.
                    let zero_outside = bufs
                        .iter()
                        .any(|b| b.len == 0 && b.addr >= crate::guest::MEM_SIZE);
                    if TOLERATE_ZERO_LEN_OUTSIDE && zero_outside {
                        return None;
                    }
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
        let used_before = self.tx.drv.used_idx(&mem);
        let used_event = self.tx.drv.used_event(&mem);
        let m = self.dev.metrics();
        let counted = |m: &kiln::devices::virtio::net::NetMetrics| {
            m.tx_frames.get() + m.tx_dropped.get() + m.tx_errors.get()
        };
        let (counted_before, irq_before) = (counted(&m), m.interrupts.get());
        let _ = self.irq.read();
        guest::snapshot(&mem);

        if writable {
            self.dev.tap_writable();
        } else {
            self.dev.process_tx();
        }

        let mut allowed = Ranges::default();
        allowed.add(q.used, q.used_len());
        guest::assert_writes_within(&mem, &allowed, "virtio-net TX");
        if self.dev.needs_reset() {
            self.broken = true;
            return;
        }
        let returned = self.returned(false, used_before, &pending);
        for (i, (_, head, len)) in returned.iter().enumerate() {
            assert_eq!(*len, 0, "TX used length of head {head}");
            if let Some(f) = frames[i].take() {
                self.tx_expected.push_back(f);
            }
        }
        let blocked = self.dev.tap_interest().contains(event_manager::EventSet::OUT);
        if blocked {
            // The refused chain stays in the ring; heads outside the queue taken before it
            // left no trace the harness can see: stop counting exactly.
            self.tx_inexact = true;
        } else {
            assert_eq!(returned.len(), pending.len(), "TX chains left in the ring");
            if !self.tx_inexact {
                assert_eq!(
                    counted(&m) - counted_before,
                    u64::from(all),
                    "TX chains taken vs counted (sent, dropped, failed)"
                );
            }
            self.tx.taken = self.tx.drv.avail_idx_in_memory(&mem);
        }
        let irq = m.interrupts.get() - irq_before;
        let used_after = self.tx.drv.used_idx(&mem);
        self.check_interrupt(false, used_before, used_after, used_event, irq);
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
        assert!(skipped <= m.tx_errors.get(), "frames lost without a counted TX error");
    }

    fn process_rx(&mut self) {
        if self.broken || self.rounds == MAX_ROUNDS {
            return;
        }
        let mem = self.mem.clone();
        let q = self.rx.drv.q;
        let mrg = self.features & features::VIRTIO_NET_F_MRG_RXBUF != 0;
        let pending = self.rx.pending(&mem);
        let walked: Vec<Option<Vec<Walked>>> = pending
            .iter()
            .map(|(_, h)| virtq::walk(&mem, &q, *h, self.indirect_ok()))
            .collect();
        let every: Vec<Option<Vec<Walked>>> = {
            let avail = self.rx.drv.avail_idx_in_memory(&mem);
            (0..avail.wrapping_sub(self.rx.taken).min(q.size))
                .map(|i| {
                    let head = self.rx.drv.avail_head(&mem, self.rx.taken.wrapping_add(i));
                    virtq::walk(&mem, &q, head, self.indirect_ok())
                })
                .collect()
        };
        if AVOID_RX_LIVELOCK && mrg && self.would_livelock(&every) {
            // Known livelock: never run the receive path again for this input.
            self.broken = true;
            return;
        }
        self.rounds += 1;
        let mut bufs = Ranges::default();
        for b in walked.iter().flatten().flatten().filter(|b| b.writable) {
            bufs.add(b.addr, u64::from(b.len));
        }
        let exact = !virtq::control_area_touched(&bufs);
        let disjoint = exact && disjoint(&walked);
        let used_before = self.rx.drv.used_idx(&mem);
        let used_event = self.rx.drv.used_event(&mem);
        let m = self.dev.metrics();
        let (frames_before, irq_before) = (m.rx_frames.get(), m.interrupts.get());
        guest::snapshot(&mem);

        self.dev.process_rx();

        if self.dev.needs_reset() {
            self.broken = true;
            return;
        }
        let returned = self.returned(true, used_before, &pending);
        // Posted receive buffers belong to the device until returned: a frame it reads and
        // then drops (shorter than the header) may land in buffers it keeps.
        let mut allowed = bufs.clone();
        allowed.add(q.used, q.used_len());
        for (i, (_, head, len)) in returned.iter().enumerate() {
            let capacity = match &walked[i] {
                Some(b) if b.iter().all(|b| b.writable) => virtq::writable_len(b),
                _ => 0,
            };
            if exact {
                assert!(
                    u64::from(*len) <= capacity,
                    "RX used length {len} > capacity {capacity} (head {head})"
                );
                if let Some(b) = &walked[i] {
                    let mut left = u64::from(*len);
                    for w in b {
                        let n = left.min(u64::from(w.len));
                        allowed.add(w.addr, n);
                        left -= n;
                    }
                }
            }
        }
        if exact {
            guest::assert_writes_within(&mem, &allowed, "virtio-net RX");
        }
        let delivered = m.rx_frames.get() - frames_before;
        if !disjoint {
            self.rx_desync = true;
        }
        if !self.rx_desync {
            // Rebuild the frames from the used entries and match them with the host's.
            let mut frames = 0u64;
            let mut i = 0usize;
            let mut skipped = 0u64;
            while i < returned.len() {
                let (_, head, len) = returned[i];
                if len == 0 {
                    i += 1;
                    continue;
                }
                let first = walked[i].as_ref().expect("a used chain was walkable");
                let head_bytes = gather(&mem, first, VNET_HDR_LEN);
                assert!(
                    head_bytes.len() == VNET_HDR_LEN,
                    "a frame was delivered into a first chain of {} bytes",
                    head_bytes.len()
                );
                let nb = if mrg {
                    u16::from_le_bytes([head_bytes[10], head_bytes[11]])
                } else {
                    1
                };
                assert!(
                    nb >= 1 && i + usize::from(nb) <= returned.len(),
                    "num_buffers {nb} of the frame in head {head} does not match the {} chains returned",
                    returned.len() - i
                );
                let mut frame = Vec::new();
                for k in i..i + usize::from(nb) {
                    let (_, h, l) = returned[k];
                    let chain = walked[k].as_ref().expect("a used chain was walkable");
                    // A zero-capacity chain may be counted in num_buffers (it holds 0 bytes).
                    assert!(
                        l > 0 || virtq::writable_len(chain) == 0,
                        "an empty used entry (head {h}) inside a frame"
                    );
                    frame.extend_from_slice(&gather(&mem, chain, l as usize));
                }
                loop {
                    let Some(mut want) = self.host_sent.pop_front() else {
                        panic!("the guest received a {}-byte frame the host never sent", frame.len());
                    };
                    if want.len() >= VNET_HDR_LEN {
                        want[10..12].copy_from_slice(&nb.to_le_bytes());
                    }
                    if want == frame {
                        break;
                    }
                    skipped += 1;
                }
                frames += 1;
                i += usize::from(nb);
            }
            assert_eq!(frames, delivered, "frames delivered vs rx_frames");
            self.rx_skipped += skipped;
            assert!(
                self.rx_skipped <= m.rx_dropped.get(),
                "host frames lost without a counted drop"
            );
        }
        let irq = m.interrupts.get() - irq_before;
        let used_after = self.rx.drv.used_idx(&mem);
        self.check_interrupt(true, used_before, used_after, used_event, irq);
    }
}

impl Rig {
    /// Whether delivering the host's frames into these chains reaches the livelock of
    /// finding 2: some frame needs more than the usable chains ahead of it hold (up to the
    /// first unusable chain after a usable one), yet some chain is available.
    fn would_livelock(&self, walked: &[Option<Vec<Walked>>]) -> bool {
        let caps: Vec<Option<u64>> = walked
            .iter()
            .map(|c| match c {
                Some(b) if b.iter().all(|b| b.writable) => Some(virtq::writable_len(b)),
                _ => None,
            })
            .collect();
        if caps.is_empty() {
            return false;
        }
        if self.rx_desync {
            return true;
        }
        let mut i = 0usize;
        for frame in &self.host_sent {
            let len = frame.len() as u64;
            if len < VNET_HDR_LEN as u64 {
                continue;
            }
            // Unusable chains in front are returned; the first must hold the header.
            while i < caps.len() && caps[i].is_none_or(|c| c < VNET_HDR_LEN as u64) {
                i += 1;
            }
            if i == caps.len() {
                return false;
            }
            let usable: u64 = caps[i..].iter().map_while(|c| *c).sum();
            if usable >= MAX_FRAME_LEN as u64 {
                // Zero copy: the frame takes the chains it fills.
            } else if usable < len {
                return true;
            }
            let mut acc = 0u64;
            while acc < len && i < caps.len() {
                acc += caps[i].unwrap_or(0);
                i += 1;
            }
        }
        false
    }
}

/// Whether the writable buffers of all the chains are pairwise disjoint.
fn disjoint(walked: &[Option<Vec<Walked>>]) -> bool {
    let mut v: Vec<(u64, u64)> = walked
        .iter()
        .flatten()
        .flatten()
        .filter(|b| b.writable && b.len > 0)
        .map(|b| (b.addr, b.addr + u64::from(b.len)))
        .collect();
    v.sort_unstable();
    v.windows(2).all(|w| w[0].1 <= w[1].0)
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
    let rx = Side { drv: Driver::new(&mem, layout(0x1000, input.size_log.0)), taken: 0 };
    let tx = Side { drv: Driver::new(&mem, layout(0x4000, input.size_log.1)), taken: 0 };
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
        tx_expected: VecDeque::new(),
        rx_desync: false,
        tx_inexact: false,
        rx_skipped: 0,
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
            Op::TxFrame { frame, segments, indirect } => rig.tx_frame(frame, *segments, *indirect),
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
                // A frame held in the bounce buffer is discarded by a reset.
                rig.rx_desync = true;
            }
        }
    }
    rig.process_tx(true, false);
    rig.process_rx();
}
