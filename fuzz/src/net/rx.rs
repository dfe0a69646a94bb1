//! The receive path, checked against a model of kiln's receive policy
//! (`src/devices/virtio/net/device/rx.rs`), which predicts every used entry, every byte
//! written, the counters, where in the ring the device stops and why.
//!
//! The policy the model follows:
//! - chains are taken in ring order, walked once and held (the oldest first) until frames
//!   fill them, across reads and across calls of `process_rx`: a held chain is never put
//!   back in the ring, so the device's place in the ring (`next_avail`) runs ahead of the
//!   chains it has used by the chains it holds. What the device writes into a held chain is
//!   the buffers walked when it was taken: a driver changing its descriptors afterwards is
//!   not seen. A reset forgets the held chains;
//! - a head outside the queue is skipped (counted in `rx_bad_chains`, no used entry). An
//!   unwalkable or device-readable chain, or a chain shorter than the virtio-net header
//!   taken while nothing is held, is returned with length 0, and so is every chain held
//!   then (each counted in `rx_bad_chains`); gathering goes on after it;
//! - a frame is read straight into the held chains when they hold `MAX_FRAME_LEN` bytes (a
//!   frame shorter than the header is dropped, the chains staying held for the next one);
//!   otherwise into the bounce buffer, then copied once the held chains hold it. Without
//!   MRG_RXBUF a frame must fit one chain and is dropped if the chain held is too small
//!   (the chain stays held);
//! - chains are taken only while the held ones hold less than the frame needs
//!   (`MAX_FRAME_LEN` before a read; without MRG_RXBUF only while none is held);
//! - a frame uses the first held chains that hold it (`num_buffers` of them with
//!   MRG_RXBUF, else 1); the others stay held for the next frames. The chain a frame
//!   starts in must hold the whole header: once a frame is delivered, held chains shorter
//!   than the header that would come first are returned with length 0 (each counted in
//!   `rx_bad_chains`);
//! - too few buffers for the frame in the bounce buffer: nothing is delivered and
//!   `process_rx` returns, with a kick asked for the next buffer the driver publishes
//!   (`avail_event` = `avail.idx` with EVENT_IDX, notifications on otherwise) and the TAP no
//!   longer watched; a kick without new buffers changes nothing;
//! - nothing new in the ring and nothing held: the same, without a frame waiting;
//! - the TAP empty: `process_rx` returns watching the TAP;
//! - an empty datagram is the TAP's end of file: the receive path stops for good;
//! - an available index more than a queue ahead of the device's place (behind it counts as
//!   far ahead) when a chain is to be taken: NEEDS_RESET, nothing taken.
//!
//! Independently of that policy, every round is also checked against the virtio 1.2
//! specification's rules for received packets ([`spec_check`], 5.1.6.3-5.1.6.4), on what kiln
//! really put in the used ring and guest memory: a wrong rule shared by kiln and the model is
//! caught there.
//!
//! A receive buffer (of a chain in the ring or held) over the rings or descriptor tables
//! lets the device's writes change what it reads next: the model stops following (until a
//! reset) and the round is only checked for not hanging and not panicking.

use std::collections::VecDeque;

use event_manager::EventSet;
use kiln::devices::virtio::VirtioDevice;
use kiln::devices::virtio::net::{MAX_FRAME_LEN, NetMetrics, VNET_HDR_LEN, features};
use kiln::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::{MAX_ROUNDS, Rig, gather};
use crate::guest::{self, Ranges};
use crate::virtq::{self, QueueLayout, Walked};

/// `VRING_USED_F_NO_NOTIFY`.
const NO_NOTIFY: u16 = 1;
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS: usize = 10;

/// What the receive model carries from one call to the next.
#[derive(Debug, Default)]
pub(super) struct State {
    /// The frame waiting in kiln's bounce buffer.
    bounce: Option<Vec<u8>>,
    /// The chains the device holds (taken, walked, not used yet), the oldest first.
    held: VecDeque<Chain>,
    /// The TAP reached end of file: the receive path is off for good.
    tap_dead: bool,
    /// A device write may have changed the rings: the model no longer follows the device.
    lost: bool,
}

impl State {
    /// After a device reset: the bounce buffer is emptied, the held chains are forgotten
    /// and the rings start over (the TAP stays as it is).
    pub(super) fn reset(&mut self) {
        self.bounce = None;
        self.held.clear();
        self.lost = false;
    }
}

/// A usable receive chain: device-writable buffers, as walked when the device takes it.
#[derive(Clone, Debug)]
struct Chain {
    head: u16,
    bufs: Vec<Walked>,
    cap: u64,
}

/// A receive chain, as the device sees it when it takes it.
#[derive(Debug)]
enum Slot {
    /// The head names no descriptor of the queue.
    Outside,
    /// Unwalkable or device-readable.
    Bad(u16),
    /// Device-writable buffers.
    Usable(Chain),
}

impl Slot {
    fn read(mem: &GuestMemory, q: &QueueLayout, head: u16, indirect: bool) -> Slot {
        if head >= q.size {
            return Slot::Outside;
        }
        match virtq::walk(mem, q, head, indirect) {
            Some(bufs) if bufs.iter().all(|b| b.writable) => {
                let cap = virtq::writable_len(&bufs);
                Slot::Usable(Chain { head, bufs, cap })
            }
            _ => Slot::Bad(head),
        }
    }
}

/// Records the writes of `len` bytes into the stream of `bufs`.
fn record(writes: &mut Vec<(u64, u64)>, bufs: &[Walked], len: u64) {
    let mut left = len;
    let ranges = bufs
        .iter()
        .map_while(|b| {
            (left > 0).then(|| {
                let n = left.min(u64::from(b.len));
                left -= n;
                (b.addr, b.addr + n)
            })
        })
        .filter(|(s, e)| s < e);
    writes.extend(ranges);
}

/// Why a call to `process_rx` returned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The TAP has no frame: watch it.
    TapEmpty,
    /// Not enough buffers (or none): wait for the driver's kick.
    NeedBuffers,
    /// The TAP reached end of file.
    TapDead,
    /// The available ring is corrupt: NEEDS_RESET.
    Corrupt,
}

/// A frame the model delivers.
#[derive(Debug)]
struct Frame {
    /// The bytes the guest must find, `num_buffers` filled in.
    bytes: Vec<u8>,
    /// The buffers of the chains holding it and the bytes of each.
    parts: Vec<(Vec<Walked>, u32)>,
    /// Its writes: `writes[first..last]`.
    writes: (usize, usize),
}

/// One call of `process_rx` as the model plays it.
struct Round<'a> {
    /// The chains from the device's place in the ring up to `avail.idx`.
    window: &'a [Slot],
    /// Slot of `window[0]`.
    start: u16,
    avail: u16,
    /// The device's `next_avail`.
    next: u16,
    /// `avail.idx` is more than a queue ahead of the device.
    jump: bool,
    mrg: bool,
    /// The chains the device holds, the oldest first.
    held: VecDeque<Chain>,
    /// The used entries, in order: (head, length).
    used: Vec<(u16, u32)>,
    frames: Vec<Frame>,
    /// Byte ranges written into guest buffers, in order.
    writes: Vec<(u64, u64)>,
    dropped: u64,
    bad: u64,
    bounced: u64,
    zero_copy: u64,
    bytes: u64,
}

impl Round<'_> {
    /// Bytes the held chains can take.
    fn held_cap(&self) -> u64 {
        self.held.iter().map(|c| c.cap).sum()
    }

    /// Takes chains from the ring into the held ones until those hold `target` bytes (one
    /// chain only without MRG_RXBUF); `None` when the ring is corrupt.
    fn gather(&mut self, target: u64) -> Option<()> {
        let window = self.window;
        while self.held_cap() < target && (self.mrg || self.held.is_empty()) {
            if self.jump {
                return None;
            }
            if self.next == self.avail {
                break;
            }
            let i = usize::from(self.next.wrapping_sub(self.start));
            self.next = self.next.wrapping_add(1);
            match &window[i] {
                Slot::Usable(c) if !self.held.is_empty() || c.cap >= VNET_HDR_LEN as u64 => {
                    self.held.push_back(c.clone());
                }
                slot => {
                    // Unusable: it and every chain held go back unused.
                    for c in self.held.drain(..) {
                        self.used.push((c.head, 0));
                        self.bad += 1;
                    }
                    self.bad += 1;
                    match slot {
                        Slot::Usable(Chain { head, .. }) | Slot::Bad(head) => {
                            self.used.push((*head, 0));
                        }
                        Slot::Outside => {}
                    }
                }
            }
        }
        Some(())
    }

    /// Delivers `frame` into the first held chains that hold it; the others stay held.
    fn complete(&mut self, mut frame: Vec<u8>) {
        let first = self.writes.len();
        let mut left = frame.len() as u64;
        let mut parts = Vec::new();
        while left > 0 {
            let c = self
                .held
                .pop_front()
                .expect("model: a frame delivered into chains too small");
            let n = left.min(c.cap);
            record(&mut self.writes, &c.bufs, n);
            self.used.push((c.head, n as u32));
            parts.push((c.bufs, n as u32));
            left -= n;
        }
        let num_buffers = if self.mrg { parts.len() as u16 } else { 1 };
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&num_buffers.to_le_bytes());
        self.bytes += (frame.len() - VNET_HDR_LEN) as u64;
        self.frames.push(Frame {
            bytes: frame,
            parts,
            writes: (first, self.writes.len()),
        });
        // The next frame starts in the first chain held: one too short for the header
        // goes back unused.
        while self
            .held
            .front()
            .is_some_and(|c| c.cap < VNET_HDR_LEN as u64)
        {
            if let Some(c) = self.held.pop_front() {
                self.used.push((c.head, 0));
                self.bad += 1;
            }
        }
    }

    /// Plays `process_rx` until it returns.
    fn play(&mut self, state: &mut State, tap: &mut VecDeque<Vec<u8>>) -> End {
        loop {
            if let Some(frame) = state.bounce.take() {
                let len = frame.len();
                if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
                    self.dropped += 1;
                    continue;
                }
                if self.gather(len as u64).is_none() {
                    state.bounce = Some(frame);
                    return End::Corrupt;
                }
                if self.held_cap() < len as u64 {
                    if !self.mrg && !self.held.is_empty() {
                        // A frame must fit one chain: this one never will (it stays held).
                        self.dropped += 1;
                        continue;
                    }
                    state.bounce = Some(frame);
                    return End::NeedBuffers;
                }
                self.complete(frame);
                continue;
            }
            if self.next == self.avail && self.held.is_empty() {
                return End::NeedBuffers;
            }
            if self.gather(MAX_FRAME_LEN as u64).is_none() {
                return End::Corrupt;
            }
            if self.held.is_empty() {
                // Every chain offered was unusable (returned): look at the ring again.
                continue;
            }
            if self.held_cap() < MAX_FRAME_LEN as u64 {
                // Read aside: the buffers might be too small.
                match tap.pop_front() {
                    None => return End::TapEmpty,
                    Some(f) if f.is_empty() => {
                        state.tap_dead = true;
                        return End::TapDead;
                    }
                    Some(f) => {
                        self.bounced += 1;
                        state.bounce = Some(f);
                    }
                }
                continue;
            }
            // Straight into the held chains' buffers.
            match tap.pop_front() {
                None => return End::TapEmpty,
                Some(f) if f.is_empty() => {
                    state.tap_dead = true;
                    return End::TapDead;
                }
                Some(f) if f.len() < VNET_HDR_LEN => {
                    // Read into the buffers, then dropped: the chains stay held.
                    let mut left = f.len() as u64;
                    for c in &self.held {
                        let n = left.min(c.cap);
                        record(&mut self.writes, &c.bufs, n);
                        left -= n;
                    }
                    self.dropped += 1;
                }
                Some(f) => {
                    self.zero_copy += 1;
                    self.complete(f);
                }
            }
        }
    }

    /// Whether frame `k`'s bytes are still in guest memory after the round: its buffers
    /// overlap neither each other nor anything written after them.
    fn intact(&self, k: usize) -> bool {
        let (first, last) = self.frames[k].writes;
        let own = &self.writes[first..last];
        let overlap = |a: &(u64, u64), b: &(u64, u64)| a.0 < b.1 && b.0 < a.1;
        own.iter()
            .enumerate()
            .all(|(x, a)| own[x + 1..].iter().all(|b| !overlap(a, b)))
            && self.writes[last..]
                .iter()
                .all(|b| own.iter().all(|a| !overlap(a, b)))
    }
}

/// The virtio 1.2 rules for a received packet (5.1.6.4 "Processing of Incoming Packets",
/// device requirements), written from the specification and checked on kiln's used entries
/// `got` and the bytes in guest memory:
/// - without VIRTIO_NET_F_MRG_RXBUF, `num_buffers` is 1 (a packet is one buffer);
/// - with it, `num_buffers` is the number of buffers the packet (header included) is spread
///   over; they are used together, one after the other; every one but the last is used
///   completely, up to the full length of the buffer;
/// - a used length (2.7.8) is at most the chain's writable bytes; a packet holds at least its
///   header (5.1.6: `struct virtio_net_hdr` comes first);
/// - without VIRTIO_NET_F_GUEST_CSUM, `flags` is 0 (the host frames here carry none of
///   VIRTIO_NET_HDR_F_DATA_VALID / NEEDS_CSUM); without GUEST_TSO4/TSO6/UFO, `gso_type` is
///   VIRTIO_NET_HDR_GSO_NONE.
///
/// Chains returned unused (length 0) may sit between packets; inside one, a length 0 is only
/// a zero-length buffer (used completely). `chains`
/// names the buffers of every head the device could have used; only rounds whose writes do
/// not overlap (so every packet's bytes are still there) are checked.
fn spec_check(
    mem: &GuestMemory,
    got: &[Option<(u32, u32)>],
    chains: &[&Chain],
    features: u64,
    writes: &[(u64, u64)],
) {
    const MRG_RXBUF: u64 = 1 << 15;
    const GUEST_CSUM: u64 = 1 << 1;
    const GUEST_TSO4: u64 = 1 << 7;
    const GUEST_TSO6: u64 = 1 << 8;
    const GUEST_UFO: u64 = 1 << 10;
    const HDR_LEN: u64 = 12;
    let overlap = writes
        .iter()
        .enumerate()
        .any(|(x, a)| writes[x + 1..].iter().any(|b| a.0 < b.1 && b.0 < a.1));
    if overlap || got.iter().any(Option::is_none) {
        return;
    }
    let entries: Vec<(u32, u32)> = got.iter().flatten().copied().collect();
    // Each used entry consumes the oldest chain with its head (a head may come back).
    let mut taken = vec![false; chains.len()];
    // (An unusable chain returned with length 0 has no entry in `chains`.)
    let heads: Vec<Option<&Chain>> = entries
        .iter()
        .map(|&(head, len)| {
            let at = (0..chains.len()).find(|&j| !taken[j] && u32::from(chains[j].head) == head);
            assert!(
                at.is_some() || len == 0,
                "used entry ({head}, {len}) names no chain the device could use"
            );
            at.map(|at| {
                taken[at] = true;
                chains[at]
            })
        })
        .collect();
    let mrg = features & MRG_RXBUF != 0;
    let mut i = 0;
    while i < entries.len() {
        let (head, len) = entries[i];
        let Some(first) = heads[i].filter(|_| len > 0) else {
            i += 1;
            continue;
        };
        assert!(
            u64::from(len) <= first.cap,
            "used length {len} > {} writable bytes (head {head})",
            first.cap
        );
        let hdr = gather(mem, &first.bufs, HDR_LEN as usize);
        assert!(
            u64::from(len) >= HDR_LEN.min(first.cap) && hdr.len() == HDR_LEN as usize,
            "a packet of {len} bytes in head {head} does not hold the virtio-net header"
        );
        let num_buffers = u16::from_le_bytes([hdr[10], hdr[11]]);
        if !mrg {
            assert_eq!(
                num_buffers, 1,
                "num_buffers without MRG_RXBUF (5.1.6.4.2: the device MUST set it to 1)"
            );
        }
        assert!(num_buffers >= 1, "num_buffers 0 (head {head})");
        let n = usize::from(num_buffers);
        assert!(
            i + n <= entries.len(),
            "num_buffers {n} but only {} used entries follow (head {head})",
            entries.len() - i
        );
        for (k, (&(h, l), c)) in entries[i..i + n].iter().zip(&heads[i..i + n]).enumerate() {
            // (A zero-length buffer used completely has length 0.)
            let c = c.unwrap_or_else(|| {
                panic!("an unusable chain inside a packet of {n} buffers (head {h}, length {l})")
            });
            if k + 1 < n {
                assert_eq!(
                    u64::from(l),
                    c.cap,
                    "buffer {k} of {n} of a packet not used completely (head {h}; 5.1.6.4.2)"
                );
            }
        }
        if features & GUEST_CSUM == 0 {
            assert_eq!(hdr[0], 0, "header flags without GUEST_CSUM (head {head})");
        }
        if features & (GUEST_TSO4 | GUEST_TSO6 | GUEST_UFO) == 0 {
            assert_eq!(hdr[1], 0, "gso_type without GUEST_TSO4/6/UFO (head {head})");
        }
        i += n;
    }
}

/// The receive counters the model predicts.
#[derive(Debug, PartialEq, Eq)]
struct Counters {
    frames: u64,
    bytes: u64,
    dropped: u64,
    bad_chains: u64,
    bounced: u64,
    zero_copy: u64,
    tap_failures: u64,
}

impl Counters {
    fn read(m: &NetMetrics) -> Counters {
        Counters {
            frames: m.rx_frames.get(),
            bytes: m.rx_bytes.get(),
            dropped: m.rx_dropped.get(),
            bad_chains: m.rx_bad_chains.get(),
            bounced: m.rx_bounced.get(),
            zero_copy: m.rx_zero_copy.get(),
            tap_failures: m.tap_failures.get(),
        }
    }

    fn since(&self, before: &Counters) -> Counters {
        Counters {
            frames: self.frames - before.frames,
            bytes: self.bytes - before.bytes,
            dropped: self.dropped - before.dropped,
            bad_chains: self.bad_chains - before.bad_chains,
            bounced: self.bounced - before.bounced,
            zero_copy: self.zero_copy - before.zero_copy,
            tap_failures: self.tap_failures - before.tap_failures,
        }
    }
}

impl Rig {
    /// Runs the receive path and checks it against the model.
    pub(super) fn process_rx(&mut self) {
        if self.broken || self.rounds == MAX_ROUNDS {
            return;
        }
        self.rounds += 1;
        let mem = self.mem.clone();
        let q = self.rx.drv.q;
        if self.rx_state.lost {
            self.dev.process_rx();
            self.broken = self.dev.needs_reset();
            return;
        }
        let avail = self.rx.drv.avail_idx_in_memory(&mem);
        let start = self.rx.taken;
        let held = self.rx_state.held.len();
        let jump = avail.wrapping_sub(start) > q.size;
        let window: Vec<Slot> = if jump {
            Vec::new()
        } else {
            (0..avail.wrapping_sub(start))
                .map(|i| {
                    let head = self.rx.drv.avail_head(&mem, start.wrapping_add(i));
                    Slot::read(&mem, &q, head, self.indirect_ok())
                })
                .collect()
        };
        // The buffers the device may write: those of the chains it holds and of the chains
        // in the ring.
        let mut bufs = Ranges::default();
        let in_ring = window.iter().filter_map(|slot| match slot {
            Slot::Usable(c) => Some(c),
            _ => None,
        });
        // Every chain the device could use this round (for the specification's checks).
        let usable: Vec<Chain> = self
            .rx_state
            .held
            .iter()
            .chain(in_ring.clone())
            .cloned()
            .collect();
        for c in self.rx_state.held.iter().chain(in_ring) {
            for w in &c.bufs {
                bufs.add(w.addr, u64::from(w.len));
            }
        }
        if virtq::control_area_touched(&bufs) {
            // The device may write over what it reads next.
            self.rx_state.lost = true;
            self.dev.process_rx();
            self.broken = self.dev.needs_reset();
            return;
        }

        let mut round = Round {
            window: &window,
            start,
            avail,
            next: start,
            jump,
            mrg: self.features & features::VIRTIO_NET_F_MRG_RXBUF != 0,
            held: std::mem::take(&mut self.rx_state.held),
            used: Vec::new(),
            frames: Vec::new(),
            writes: Vec::new(),
            dropped: 0,
            bad: 0,
            bounced: 0,
            zero_copy: 0,
            bytes: 0,
        };
        // A dead TAP: process_rx does nothing at all.
        let end =
            (!self.rx_state.tap_dead).then(|| round.play(&mut self.rx_state, &mut self.host_sent));
        self.rx_state.held = std::mem::take(&mut round.held);

        let used_before = self.rx.used;
        let used_event = self.rx.drv.used_event(&mem);
        let m = self.dev.metrics();
        let before = Counters::read(&m);
        let irq_before = m.interrupts.get();
        guest::snapshot(&mem);

        self.dev.process_rx();

        let mut allowed = Ranges::default();
        for &(s, e) in &round.writes {
            allowed.add(s, e - s);
        }
        let k = round.used.len() as u16;
        q.used_writes(used_before, k, &mut allowed);
        guest::assert_writes_within(&mem, &allowed, "virtio-net RX");
        assert_eq!(
            self.dev.needs_reset(),
            end == Some(End::Corrupt),
            "NEEDS_RESET (avail.idx {avail}, next_avail {start}, {held} chains held, queue size {}; model: {end:?})",
            q.size
        );
        let got = self.rx.drv.used_entries(&mem, used_before, k);
        // Entries a longer-than-the-ring batch overwrote are compared as unseen.
        let want: Vec<Option<(u32, u32)>> = round
            .used
            .iter()
            .zip(&got)
            .map(|(&(h, l), g)| g.map(|_| (u32::from(h), l)))
            .collect();
        spec_check(
            &mem,
            &got,
            &usable.iter().collect::<Vec<_>>(),
            self.features,
            &round.writes,
        );
        assert_eq!(
            got, want,
            "RX used entries (head, length) vs the model (ended: {end:?})"
        );
        let counted = Counters::read(&m).since(&before);
        let expected = Counters {
            frames: round.frames.len() as u64,
            bytes: round.bytes,
            dropped: round.dropped,
            bad_chains: round.bad,
            bounced: round.bounced,
            zero_copy: round.zero_copy,
            tap_failures: u64::from(end == Some(End::TapDead)),
        };
        assert_eq!(
            counted, expected,
            "RX counters vs the model (ended: {end:?})"
        );
        if end == Some(End::Corrupt) {
            self.broken = true;
            return;
        }
        for k in 0..round.frames.len() {
            if !round.intact(k) {
                continue;
            }
            let frame = &round.frames[k];
            let mut bytes = Vec::new();
            for (bufs, n) in &frame.parts {
                bytes.extend_from_slice(&gather(&mem, bufs, *n as usize));
            }
            assert!(
                bytes == frame.bytes,
                "frame {k} of the round ({} bytes in {} chains) is not the host's",
                frame.bytes.len(),
                frame.parts.len()
            );
        }
        let interest = self.dev.tap_interest();
        match end {
            None | Some(End::TapDead) => assert!(
                interest.is_empty(),
                "a TAP at end of file is still watched ({interest:?})"
            ),
            Some(End::TapEmpty) => assert!(
                interest.contains(EventSet::IN),
                "the TAP is empty but not watched: a frame arriving would never be read"
            ),
            Some(End::NeedBuffers) => {
                assert!(
                    !interest.contains(EventSet::IN),
                    "waiting for receive buffers while watching the TAP (a busy loop)"
                );
                // The driver's next buffer must bring a kick.
                if self.event_idx() {
                    let at = GuestAddress(q.used + 4 + 8 * u64::from(q.size));
                    let avail_event: u16 = mem.read_obj(at).unwrap_or(0);
                    assert_eq!(
                        avail_event, avail,
                        "waiting for receive buffers without asking for the kick past avail.idx"
                    );
                } else {
                    let flags: u16 = mem.read_obj(GuestAddress(q.used)).unwrap_or(0);
                    assert_eq!(
                        flags & NO_NOTIFY,
                        0,
                        "waiting for receive buffers with kicks off"
                    );
                }
            }
            Some(End::Corrupt) => unreachable!(),
        }
        self.rx.taken = round.next;
        self.rx.used = used_before.wrapping_add(k);
        let irq = m.interrupts.get() - irq_before;
        self.check_interrupt(true, used_before, self.rx.used, used_event, irq);
    }
}
