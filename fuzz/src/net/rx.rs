//! The receive path, checked against a model of kiln's receive policy
//! (`src/devices/virtio/net/device/rx.rs`), which predicts every used entry, every byte
//! written, the counters, where in the ring the device stops and why.
//!
//! The policy the model follows:
//! - chains are taken in ring order. A head outside the queue is skipped (counted in
//!   `rx_bad_chains`, no used entry). An unwalkable or device-readable chain, or a first
//!   chain shorter than the virtio-net header, is returned with length 0, and so are the
//!   usable chains taken before it while gathering for the same frame (each counted in
//!   `rx_bad_chains`); gathering goes on after it;
//! - a frame is read straight into the chains taken when they hold `MAX_FRAME_LEN` bytes
//!   (a frame shorter than the header is dropped, its chains put back); otherwise into the
//!   bounce buffer, then copied once chains holding it are taken. Without MRG_RXBUF a frame
//!   must fit one chain and is dropped if the chain taken is too small;
//! - a frame uses the first chains that hold it (`num_buffers` of them with MRG_RXBUF, else
//!   1); the chains taken but not needed go back to the ring;
//! - too few buffers for the frame in the bounce buffer: nothing is delivered and
//!   `process_rx` returns, with a kick asked for the next buffer the driver publishes
//!   (`avail_event` = `avail.idx` with EVENT_IDX, notifications on otherwise) and the TAP no
//!   longer watched; a kick without new buffers changes nothing;
//! - an empty ring: the same, without a frame waiting;
//! - the TAP empty: `process_rx` returns watching the TAP;
//! - an empty datagram is the TAP's end of file: the receive path stops for good;
//! - an available index more than a queue ahead of the device: NEEDS_RESET, nothing taken.
//!
//! A receive buffer over the rings or descriptor tables lets the device's writes change
//! what it reads next: the model stops following (until a reset) and the round is only
//! checked for not hanging and not panicking.

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
    /// The TAP reached end of file: the receive path is off for good.
    tap_dead: bool,
    /// A device write may have changed the rings: the model no longer follows the device.
    lost: bool,
}

impl State {
    /// After a device reset: the bounce buffer is emptied and the rings start over (the TAP
    /// stays as it is).
    pub(super) fn reset(&mut self) {
        self.bounce = None;
        self.lost = false;
    }
}

/// A receive chain, as the device sees it when it takes it.
#[derive(Debug)]
enum Slot {
    /// The head names no descriptor of the queue.
    Outside,
    /// Unwalkable or device-readable.
    Bad(u16),
    /// Device-writable buffers.
    Usable {
        head: u16,
        bufs: Vec<Walked>,
        cap: u64,
    },
}

impl Slot {
    fn read(mem: &GuestMemory, q: &QueueLayout, head: u16, indirect: bool) -> Slot {
        if head >= q.size {
            return Slot::Outside;
        }
        match virtq::walk(mem, q, head, indirect) {
            Some(bufs) if bufs.iter().all(|b| b.writable) => {
                let cap = virtq::writable_len(&bufs);
                Slot::Usable { head, bufs, cap }
            }
            _ => Slot::Bad(head),
        }
    }
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
    /// The chains holding it (index in the window) and the bytes of each.
    parts: Vec<(usize, u32)>,
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
    fn bufs(&self, i: usize) -> &[Walked] {
        match &self.window[i] {
            Slot::Usable { bufs, .. } => bufs,
            _ => unreachable!("only usable chains are kept"),
        }
    }

    fn cap(&self, i: usize) -> u64 {
        match &self.window[i] {
            Slot::Usable { cap, .. } => *cap,
            _ => unreachable!("only usable chains are kept"),
        }
    }

    fn head(&self, i: usize) -> u16 {
        match &self.window[i] {
            Slot::Usable { head, .. } | Slot::Bad(head) => *head,
            Slot::Outside => unreachable!("a head outside the queue has no used entry"),
        }
    }

    /// Takes chains until they hold `target` bytes (one usable chain without MRG_RXBUF);
    /// `None` when the ring is corrupt.
    fn gather(&mut self, target: u64) -> Option<Vec<usize>> {
        let mut chains: Vec<usize> = Vec::new();
        let mut capacity = 0u64;
        while capacity < target && (self.mrg || chains.is_empty()) {
            if self.jump {
                return None;
            }
            if self.next == self.avail {
                break;
            }
            let i = usize::from(self.next.wrapping_sub(self.start));
            self.next = self.next.wrapping_add(1);
            match &self.window[i] {
                Slot::Usable { cap, .. } if !chains.is_empty() || *cap >= VNET_HDR_LEN as u64 => {
                    chains.push(i);
                    capacity += *cap;
                }
                slot => {
                    // Unusable: it and the chains taken before it go back unused.
                    for j in chains.drain(..) {
                        self.used.push((self.head(j), 0));
                        self.bad += 1;
                    }
                    capacity = 0;
                    self.bad += 1;
                    if !matches!(slot, Slot::Outside) {
                        self.used.push((self.head(i), 0));
                    }
                }
            }
        }
        Some(chains)
    }

    fn put_back(&mut self, n: usize) {
        self.next = self.next.wrapping_sub(n as u16);
    }

    /// Records the writes of `len` bytes into the stream of `chain`'s buffers.
    fn write(&mut self, chain: usize, len: u64) {
        let mut left = len;
        let ranges: Vec<(u64, u64)> = self
            .bufs(chain)
            .iter()
            .map_while(|b| {
                (left > 0).then(|| {
                    let n = left.min(u64::from(b.len));
                    left -= n;
                    (b.addr, b.addr + n)
                })
            })
            .filter(|(s, e)| s < e)
            .collect();
        self.writes.extend(ranges);
    }

    /// Delivers `frame` into the first of `chains` that hold it; the rest go back.
    fn complete(&mut self, chains: Vec<usize>, mut frame: Vec<u8>) {
        let first = self.writes.len();
        let mut left = frame.len() as u64;
        let mut parts = Vec::new();
        for &i in &chains {
            if left == 0 {
                break;
            }
            let n = left.min(self.cap(i));
            self.write(i, n);
            self.used.push((self.head(i), n as u32));
            parts.push((i, n as u32));
            left -= n;
        }
        assert_eq!(left, 0, "model: a frame delivered into chains too small");
        self.put_back(chains.len() - parts.len());
        let num_buffers = if self.mrg { parts.len() as u16 } else { 1 };
        frame[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&num_buffers.to_le_bytes());
        self.bytes += (frame.len() - VNET_HDR_LEN) as u64;
        self.frames.push(Frame {
            bytes: frame,
            parts,
            writes: (first, self.writes.len()),
        });
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
                let Some(chains) = self.gather(len as u64) else {
                    return End::Corrupt;
                };
                let capacity: u64 = chains.iter().map(|&i| self.cap(i)).sum();
                if capacity < len as u64 {
                    self.put_back(chains.len());
                    if !self.mrg && chains.len() == 1 {
                        // A frame must fit one chain: this one never will.
                        self.dropped += 1;
                        continue;
                    }
                    state.bounce = Some(frame);
                    return End::NeedBuffers;
                }
                self.complete(chains, frame);
                continue;
            }
            if self.next == self.avail {
                return End::NeedBuffers;
            }
            let Some(chains) = self.gather(MAX_FRAME_LEN as u64) else {
                return End::Corrupt;
            };
            if chains.is_empty() {
                continue;
            }
            let capacity: u64 = chains.iter().map(|&i| self.cap(i)).sum();
            if capacity < MAX_FRAME_LEN as u64 {
                // Read aside: the buffers might be too small.
                self.put_back(chains.len());
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
            // Straight into the guest's buffers.
            match tap.pop_front() {
                None => {
                    self.put_back(chains.len());
                    return End::TapEmpty;
                }
                Some(f) if f.is_empty() => {
                    self.put_back(chains.len());
                    state.tap_dead = true;
                    return End::TapDead;
                }
                Some(f) if f.len() < VNET_HDR_LEN => {
                    // Read into the buffers, then dropped: the chains go back.
                    let mut left = f.len() as u64;
                    for &i in &chains {
                        let n = left.min(self.cap(i));
                        self.write(i, n);
                        left -= n;
                    }
                    self.put_back(chains.len());
                    self.dropped += 1;
                }
                Some(f) => {
                    self.zero_copy += 1;
                    self.complete(chains, f);
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
        let mut bufs = Ranges::default();
        for slot in &window {
            if let Slot::Usable { bufs: b, .. } = slot {
                for w in b {
                    bufs.add(w.addr, u64::from(w.len));
                }
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
            "NEEDS_RESET (avail.idx {avail}, next_avail {start}, queue size {}; model: {end:?})",
            q.size
        );
        let got = self.rx.drv.used_entries(&mem, used_before, k);
        let want: Vec<(u32, u32)> = round.used.iter().map(|&(h, l)| (u32::from(h), l)).collect();
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
            for &(i, n) in &frame.parts {
                bytes.extend_from_slice(&gather(&mem, round.bufs(i), n as usize));
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
