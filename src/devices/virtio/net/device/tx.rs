//! Transmit: the guest's frames, gathered from its buffers and written to the TAP with
//! writev. A frame the TAP refuses with EAGAIN stays in the ring (the guest is not told it
//! was sent) until the TAP is writable again.

use virtio_queue::QueueT;

use super::super::features::{VIRTIO_NET_F_CSUM, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6};
use super::super::{MAX_FRAME_LEN, VNET_HDR_LEN};
use super::{Active, Net};
use crate::devices::virtio::features::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use crate::devices::virtio::queue::{pop_head, read_stream, total_len, walk_chain};

/// `virtio_net_hdr.flags`: the checksum is left for the device.
const VIRTIO_NET_HDR_F_NEEDS_CSUM: u8 = 1;
/// `virtio_net_hdr.gso_type` values.
const GSO_NONE: u8 = 0;
const GSO_TCPV4: u8 = 1;
const GSO_TCPV6: u8 = 4;

/// What became of one transmit chain.
enum Sent {
    /// Written, or dropped and counted: return the chain.
    Done,
    /// The TAP is full: leave the chain in the ring.
    Retry,
    /// The rate limiter holds it back: leave the chain in the ring until its timer fires.
    Throttled,
}

/// Whether the guest may send a frame with this header, given the negotiated features.
fn header_allowed(features: u64, flags: u8, gso_type: u8) -> bool {
    if flags & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0 && features & VIRTIO_NET_F_CSUM == 0 {
        return false;
    }
    match gso_type {
        GSO_NONE => true,
        GSO_TCPV4 => features & VIRTIO_NET_F_HOST_TSO4 != 0,
        GSO_TCPV6 => features & VIRTIO_NET_F_HOST_TSO6 != 0,
        // UFO, USO and ECN are not offered.
        _ => false,
    }
}

impl Net {
    /// Sends every frame the guest queued. This is the whole transmit path; tests and
    /// fuzzers call it directly.
    pub fn process_tx(&mut self) {
        if self.broken || self.tx_blocked || self.tx_limiter.is_throttled() {
            return;
        }
        let Some(mut active) = self.active.take() else {
            return;
        };
        self.batch_now = None;
        let event_idx = active.has(VIRTIO_RING_F_EVENT_IDX);
        let used_before = active.tx_queue.next_used();
        'outer: loop {
            if event_idx {
                let _ = active.tx_queue.disable_notification(&active.mem);
            }
            loop {
                match pop_head(&mut active.tx_queue, &active.mem) {
                    Ok(Some(head)) => match self.send_chain(&active, head) {
                        Sent::Done => {
                            let _ = active.tx_queue.add_used(&active.mem, head, 0);
                        }
                        Sent::Retry => {
                            let back = active.tx_queue.next_avail().wrapping_sub(1);
                            active.tx_queue.set_next_avail(back);
                            self.tx_blocked = true;
                            self.metrics.tx_retries.inc();
                            break 'outer;
                        }
                        Sent::Throttled => {
                            let back = active.tx_queue.next_avail().wrapping_sub(1);
                            active.tx_queue.set_next_avail(back);
                            break 'outer;
                        }
                    },
                    Ok(None) => break,
                    Err(e) => {
                        self.queue_corrupted(&e.to_string(), &active.interrupt);
                        break 'outer;
                    }
                }
            }
            if !event_idx {
                break;
            }
            match active.tx_queue.enable_notification(&active.mem) {
                Ok(true) => {}
                _ => break,
            }
        }
        self.tx_limiter.idle();
        if active.tx_queue.next_used() != used_before
            && active
                .tx_queue
                .needs_notification(&active.mem)
                .unwrap_or(true)
        {
            self.metrics.interrupts.inc();
            active.interrupt.signal_used_queue();
        }
        self.active = Some(active);
    }

    fn send_chain(&mut self, active: &Active, head: u16) -> Sent {
        let mut bufs = std::mem::take(&mut self.chain);
        bufs.clear();
        let result = self.send_buffers(active, head, &mut bufs);
        self.chain = bufs;
        result
    }

    fn send_buffers(
        &mut self,
        active: &Active,
        head: u16,
        bufs: &mut Vec<crate::devices::virtio::queue::Buffer>,
    ) -> Sent {
        let indirect = active.has(VIRTIO_RING_F_INDIRECT_DESC);
        if walk_chain(&active.mem, &active.tx_queue, head, indirect, bufs).is_err()
            || bufs.iter().any(|b| b.writable)
        {
            self.metrics.tx_dropped.inc();
            return Sent::Done;
        }
        let len = total_len(bufs) as usize;
        if !(VNET_HDR_LEN..=MAX_FRAME_LEN).contains(&len) {
            self.metrics.tx_dropped.inc();
            return Sent::Done;
        }
        let mut hdr = [0u8; 2];
        if read_stream(&active.mem, bufs, 0, &mut hdr) != 2
            || !header_allowed(active.features, hdr[0], hdr[1])
        {
            self.metrics.tx_dropped.inc();
            return Sent::Done;
        }
        if self.host.fill(&active.mem, bufs.iter()).is_none() {
            self.metrics.tx_dropped.inc();
            return Sent::Done;
        }
        let bytes = (len - VNET_HDR_LEN) as u64;
        let limiting = self.tx_limiter.is_limiting();
        if limiting {
            let now = self.limiter_now();
            if let Err(at) = self.tx_limiter.check(bytes, now) {
                match self.tx_limiter.throttle(at) {
                    Ok(()) => {
                        self.metrics.tx_rate_limiter_throttled.inc();
                        return Sent::Throttled;
                    }
                    // Without a timer the frame would wait forever: let it go.
                    Err(e) => log::warn!(
                        "interface {}: cannot arm the TX rate limiter's timer: {e}",
                        self.config.iface_id
                    ),
                }
            }
        }
        // SAFETY: the host buffers `fill` resolved above are device-readable guest memory
        // inside `active.mem`, which outlives the call.
        match unsafe { self.tap.write_frame(self.host.filled()) } {
            Ok(_) => {
                self.metrics.tx_frames.inc();
                self.metrics.tx_bytes.add(bytes);
                if limiting {
                    // Charged only once sent: a frame the TAP refused costs nothing.
                    self.tx_limiter.commit(bytes);
                    self.metrics.tx_rate_limiter_admitted_frames.inc();
                    self.metrics.tx_rate_limiter_admitted_bytes.add(bytes);
                }
                Sent::Done
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock && self.tap_alive => Sent::Retry,
            Err(e) => {
                self.metrics.tx_errors.inc();
                log::debug!("interface {}: TAP write failed: {e}", self.config.iface_id);
                Sent::Done
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_must_match_the_features() {
        assert!(header_allowed(0, 0, GSO_NONE));
        assert!(!header_allowed(0, 1, GSO_NONE));
        assert!(header_allowed(VIRTIO_NET_F_CSUM, 1, GSO_NONE));
        assert!(!header_allowed(VIRTIO_NET_F_CSUM, 1, GSO_TCPV4));
        assert!(header_allowed(VIRTIO_NET_F_HOST_TSO4, 0, GSO_TCPV4));
        assert!(header_allowed(VIRTIO_NET_F_HOST_TSO6, 0, GSO_TCPV6));
        assert!(!header_allowed(u64::MAX, 0, 3));
        assert!(!header_allowed(u64::MAX, 0, 0x81));
    }
}
