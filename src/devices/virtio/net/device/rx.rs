//! Receive: frames from the TAP into the guest's receive buffers.
//!
//! Chains are taken from the ring and walked once, then held (oldest first) until frames
//! fill them. When the held buffers can take any frame (64 KiB + headers), the frame is
//! read with readv straight into them. Otherwise it is read into a bounce buffer and copied,
//! and kept there (the TAP left unread) until the guest posts enough buffers: no frame is
//! lost to a full queue, and no wake-up is lost either, because the decision to wait is
//! taken after re-enabling notifications and looking at the ring once more.

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::super::features::VIRTIO_NET_F_MRG_RXBUF;
use super::super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::{Active, Net};
use crate::devices::virtio::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::devices::virtio::queue::{
    Buffer, pop_head, return_chain, total_len, walk_chain, write_stream,
};

/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: u64 = 10;

/// A receive chain taken from the ring.
pub(super) struct RxChain {
    head: u16,
    bufs: Vec<Buffer>,
    capacity: usize,
}

/// What became of a frame.
enum Outcome {
    /// Delivered to the guest.
    Delivered,
    /// Not enough buffers; nothing consumed.
    NoRoom,
    /// Dropped and counted.
    Dropped,
    /// Read into the bounce buffer, waiting for delivery.
    Pending,
    /// The ring is corrupt.
    Corrupt,
}

impl Net {
    /// Moves frames from the TAP into the guest until the TAP is empty or the guest has no
    /// room. This is the whole receive path; tests and fuzzers call it directly.
    pub fn process_rx(&mut self) {
        if self.broken || !self.tap_alive || self.rx_limiter.is_throttled() {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.batch_now = None;
        let used_before = active.rx_queue.next_used();
        loop {
            if let Some(len) = self.pending_rx {
                let limited = self.rx_limiter.is_limiting();
                let bytes = len.saturating_sub(VNET_HDR_LEN) as u64;
                if limited && self.rx_held_back(bytes) {
                    break;
                }
                match self.deliver_bounced(&mut active, len) {
                    Outcome::Delivered => {
                        self.pending_rx = None;
                        if limited {
                            self.rx_limiter.commit(bytes);
                            self.metrics.rx_rate_limiter_admitted_frames.inc();
                            self.metrics.rx_rate_limiter_admitted_bytes.add(bytes);
                        }
                    }
                    Outcome::Dropped => self.pending_rx = None,
                    Outcome::Pending => {}
                    Outcome::NoRoom => {
                        // The ring has buffers, but not enough for this frame: go on only
                        // once the driver adds more (a livelock otherwise).
                        if self.wait_for_more_buffers(&mut active) {
                            continue;
                        }
                        break;
                    }
                    Outcome::Corrupt => break,
                }
                continue;
            }
            match active
                .rx_queue
                .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
            {
                Ok(idx) if idx.0 == active.rx_queue.next_avail() && active.rx_held.is_empty() => {
                    if self.wait_for_buffers(&mut active) {
                        continue;
                    }
                    break;
                }
                Ok(_) => {}
                Err(_) => {
                    self.queue_corrupted("receive ring unreadable", &active.interrupt);
                    break;
                }
            }
            self.rx_wants_frames = true;
            match self.read_frame(&mut active) {
                // Delivered, dropped, waiting in the bounce buffer, or every chain offered
                // was unusable (returned): look at the TAP and the ring again.
                Some(
                    Outcome::Delivered | Outcome::Dropped | Outcome::Pending | Outcome::NoRoom,
                ) => {}
                Some(Outcome::Corrupt) | None => break,
            }
        }
        self.rx_limiter.idle();
        let used_any = active.rx_queue.next_used() != used_before;
        if used_any
            && active
                .rx_queue
                .needs_notification(&active.mem)
                .unwrap_or(true)
        {
            self.metrics.interrupts.inc();
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    /// Whether the RX rate limiter holds back the frame waiting in the bounce buffer (then
    /// the TAP is left unread and the timer is armed for when the frame can go).
    fn rx_held_back(&mut self, bytes: u64) -> bool {
        let now = self.limiter_now();
        let Err(at) = self.rx_limiter.check(bytes, now) else {
            return false;
        };
        match self.rx_limiter.throttle(at) {
            Ok(()) => {
                self.metrics.rx_rate_limiter_throttled.inc();
                self.rx_wants_frames = false;
                true
            }
            // Without a timer the frame would wait forever: let it go.
            Err(e) => {
                log::warn!(
                    "interface {}: cannot arm the RX rate limiter's timer: {e}",
                    self.config.iface_id
                );
                false
            }
        }
    }

    /// No receive buffers: stop reading the TAP and ask the guest for a kick. Returns true if
    /// buffers arrived in the meantime (then carry on).
    fn wait_for_buffers(&mut self, active: &mut Active) -> bool {
        match active.rx_queue.enable_notification(&active.mem) {
            Ok(true) => true,
            Ok(false) => {
                self.rx_wants_frames = false;
                false
            }
            Err(_) => {
                self.queue_corrupted("receive ring unreadable", &active.interrupt);
                false
            }
        }
    }

    /// The ring holds buffers, but fewer than the frame needs: stop reading the TAP until the
    /// driver publishes past what was seen (with EVENT_IDX, `avail_event` asks for exactly
    /// that kick). Returns true if it already has.
    fn wait_for_more_buffers(&mut self, active: &mut Active) -> bool {
        let seen = self.rx_seen_avail;
        if active.has(VIRTIO_RING_F_EVENT_IDX) {
            let at = active.rx_queue.used_ring() + 4 + 8 * u64::from(active.rx_queue.size());
            if active
                .mem
                .write_obj(seen.to_le(), GuestAddress(at))
                .is_err()
            {
                self.queue_corrupted("used ring unwritable", &active.interrupt);
                return false;
            }
        } else if active.rx_queue.enable_notification(&active.mem).is_err() {
            // Only clears VRING_USED_F_NO_NOTIFY; its answer compares against `next_avail`
            // (past the chains held), which is not the question here.
            self.queue_corrupted("used ring unwritable", &active.interrupt);
            return false;
        }
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        match active
            .rx_queue
            .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
        {
            Ok(idx) if idx.0 != seen => true,
            Ok(_) => {
                self.rx_wants_frames = false;
                false
            }
            Err(_) => {
                self.queue_corrupted("receive ring unreadable", &active.interrupt);
                false
            }
        }
    }

    /// Takes chains from the ring into the held ones until those hold `target` bytes (one
    /// chain only without MRG_RXBUF). An unusable chain is returned to the guest with length
    /// 0, and so are the held chains (unused): the ring always moves on, and the held
    /// chains stay the contiguous run the next frame goes into.
    fn gather(&mut self, active: &mut Active, target: usize) -> Result<(), ()> {
        if let Ok(idx) = active
            .rx_queue
            .avail_idx(&active.mem, std::sync::atomic::Ordering::Acquire)
        {
            self.rx_seen_avail = idx.0;
        }
        let mrg = active.has(VIRTIO_NET_F_MRG_RXBUF);
        let indirect = active.has(VIRTIO_RING_F_INDIRECT_DESC);
        while active.rx_held_capacity < target && (mrg || active.rx_held.is_empty()) {
            let head = match pop_head(&mut active.rx_queue, &active.mem) {
                Ok(Some(head)) => head,
                Ok(None) => break,
                Err(e) => {
                    self.queue_corrupted(&e.to_string(), &active.interrupt);
                    return Err(());
                }
            };
            let mut bufs = self.rx_spare.pop().unwrap_or_default();
            bufs.clear();
            let ok = walk_chain(&active.mem, &active.rx_queue, head, indirect, &mut bufs).is_ok()
                && bufs.iter().all(|b| b.writable)
                && (!active.rx_held.is_empty() || total_len(&bufs) >= VNET_HDR_LEN as u64);
            if !ok {
                self.rx_spare.push(bufs);
                while let Some(chain) = active.rx_held.pop_front() {
                    self.metrics.rx_bad_chains.inc();
                    return_chain(&mut active.rx_queue, &active.mem, chain.head, 0);
                    self.rx_spare.push(chain.bufs);
                }
                active.rx_held_capacity = 0;
                self.metrics.rx_bad_chains.inc();
                return_chain(&mut active.rx_queue, &active.mem, head, 0);
                continue;
            }
            let capacity = usize::try_from(total_len(&bufs)).unwrap_or(usize::MAX);
            active.rx_held_capacity = active.rx_held_capacity.saturating_add(capacity);
            active.rx_held.push_back(RxChain {
                head,
                bufs,
                capacity,
            });
        }
        Ok(())
    }

    /// Gives the first held chains covering the `len` bytes just written into them to the
    /// guest; the rest stay held, but for chains too short for a header that would come
    /// first (given back unused).
    fn complete(&mut self, active: &mut Active, len: usize) {
        let mrg = active.has(VIRTIO_NET_F_MRG_RXBUF);
        let mut used = 0usize;
        let mut covered = 0usize;
        for chain in &active.rx_held {
            if covered >= len {
                break;
            }
            covered = covered.saturating_add(chain.capacity);
            used += 1;
        }
        let Some(first) = active.rx_held.front() else {
            return;
        };
        // The header before the used entries: a driver polling the used ring must find it.
        let num_buffers: u16 = if mrg {
            u16::try_from(used).unwrap_or(u16::MAX)
        } else {
            1
        };
        write_stream(
            &active.mem,
            &first.bufs,
            NUM_BUFFERS_OFFSET,
            &num_buffers.to_le_bytes(),
        );
        let mut left = len;
        for _ in 0..used {
            let Some(chain) = active.rx_held.pop_front() else {
                break;
            };
            let n = left.min(chain.capacity);
            return_chain(&mut active.rx_queue, &active.mem, chain.head, n as u32);
            left -= n;
            active.rx_held_capacity -= chain.capacity;
            self.rx_spare.push(chain.bufs);
        }
        // The next frame starts in the first chain held, and its header (`num_buffers`
        // included) must fit there: a chain shorter than that, taken to follow the first
        // chain of a frame that turned out not to need it, goes back unused.
        while active
            .rx_held
            .front()
            .is_some_and(|c| c.capacity < VNET_HDR_LEN)
        {
            if let Some(chain) = active.rx_held.pop_front() {
                self.metrics.rx_bad_chains.inc();
                return_chain(&mut active.rx_queue, &active.mem, chain.head, 0);
                active.rx_held_capacity -= chain.capacity;
                self.rx_spare.push(chain.bufs);
            }
        }
        self.metrics.rx_frames.inc();
        self.metrics.rx_bytes.add((len - VNET_HDR_LEN) as u64);
    }

    /// Reads the next frame from the TAP, straight into guest buffers when they can hold
    /// any frame, else into the bounce buffer. `None` when the TAP has nothing (or failed).
    fn read_frame(&mut self, active: &mut Active) -> Option<Outcome> {
        if self.gather(active, MAX_FRAME_LEN).is_err() {
            return Some(Outcome::Corrupt);
        }
        if active.rx_held.is_empty() {
            return Some(Outcome::NoRoom);
        }
        // With an RX limit, a frame's length must be known before it is admitted: it is read
        // aside first, unless the limiter would admit the largest frame now (then whatever
        // comes is admitted, and charged once its length is known).
        let limited = self.rx_limiter.is_limiting();
        let now = if limited { self.limiter_now() } else { 0 };
        let largest = (MAX_FRAME_LEN - VNET_HDR_LEN) as u64;
        if active.rx_held_capacity >= MAX_FRAME_LEN
            && (!limited || self.rx_limiter.would_allow(largest, now))
        {
            let held = active.rx_held.iter().flat_map(|c| c.bufs.iter());
            let Some(host) = self.host.fill(&active.mem, held) else {
                return Some(Outcome::Corrupt);
            };
            // SAFETY: the host buffers are device-writable guest memory inside `active.mem`,
            // which outlives the call.
            let read = unsafe { self.tap.read_frame(host) };
            return match read {
                Ok(0) => {
                    // End of file: the other side is gone.
                    self.tap_failed();
                    None
                }
                Ok(n) if n >= VNET_HDR_LEN => {
                    self.metrics.rx_zero_copy.inc();
                    self.complete(active, n);
                    if limited {
                        let bytes = (n - VNET_HDR_LEN) as u64;
                        // Allowed: the largest frame was.
                        let _ = self.rx_limiter.check(bytes, now);
                        self.rx_limiter.commit(bytes);
                        self.metrics.rx_rate_limiter_admitted_frames.inc();
                        self.metrics.rx_rate_limiter_admitted_bytes.add(bytes);
                    }
                    Some(Outcome::Delivered)
                }
                Ok(_) => {
                    // Too short to carry the header: the held buffers are simply reused.
                    self.metrics.rx_dropped.inc();
                    Some(Outcome::Dropped)
                }
                Err(e) => {
                    self.read_failed(&e);
                    None
                }
            };
        }
        // The buffers might be too small for the next frame: read it aside.
        if self.bounce.len() < MAX_FRAME_LEN {
            self.bounce.resize(MAX_FRAME_LEN, 0);
        }
        let host = [crate::devices::virtio::queue::HostBuffer {
            ptr: self.bounce.as_mut_ptr(),
            len: self.bounce.len(),
        }];
        // SAFETY: the bounce buffer is owned by the device and outlives the call.
        match unsafe { self.tap.read_frame(&host) } {
            Ok(0) => {
                self.tap_failed();
                None
            }
            Ok(n) => {
                self.metrics.rx_bounced.inc();
                // Delivered at the top of the receive loop.
                self.pending_rx = Some(n);
                Some(Outcome::Pending)
            }
            Err(e) => {
                self.read_failed(&e);
                None
            }
        }
    }

    fn read_failed(&mut self, e: &std::io::Error) {
        if e.kind() == std::io::ErrorKind::WouldBlock {
            // The TAP is empty; it will tell the event loop when a frame arrives.
            self.rx_wants_frames = true;
            return;
        }
        if e.kind() == std::io::ErrorKind::Interrupted {
            return;
        }
        self.metrics.rx_errors.inc();
        log::debug!("interface {}: TAP read failed: {e}", self.config.iface_id);
        if matches!(
            e.raw_os_error(),
            Some(libc::EBADFD | libc::EIO | libc::ENXIO)
        ) {
            self.tap_failed();
        }
    }

    /// Copies the frame in the bounce buffer into the guest's buffers.
    fn deliver_bounced(&mut self, active: &mut Active, len: usize) -> Outcome {
        if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
            self.metrics.rx_dropped.inc();
            return Outcome::Dropped;
        }
        if self.gather(active, len).is_err() {
            return Outcome::Corrupt;
        }
        if active.rx_held_capacity < len {
            if !active.has(VIRTIO_NET_F_MRG_RXBUF) && !active.rx_held.is_empty() {
                // Without MRG_RXBUF a frame must fit one chain: this one never will (the
                // chain stays held for the next frame).
                self.metrics.rx_dropped.inc();
                return Outcome::Dropped;
            }
            return Outcome::NoRoom;
        }
        let mut offset = 0usize;
        for chain in &active.rx_held {
            if offset == len {
                break;
            }
            let n = chain.capacity.min(len - offset);
            write_stream(
                &active.mem,
                &chain.bufs,
                0,
                &self.bounce[offset..offset + n],
            );
            offset += n;
        }
        self.complete(active, len);
        Outcome::Delivered
    }
}
