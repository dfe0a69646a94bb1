use super::*;
use crate::devices::IrqLine;
use crate::devices::virtio::mock::{Driver, QueueLayout};
use crate::devices::virtio::net::{MAX_FRAME_LEN, VNET_HDR_LEN};
use crate::rate_limiter::{RateLimiter, now_ns};
use crate::vstate::memory::create_guest_memory;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use vm_memory::{Bytes, GuestAddress};

const RXQ: u64 = 0x1_0000;
const TXQ: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x80_0000;

struct Rig {
    mem: GuestMemory,
    rx: Driver,
    tx: Driver,
    dev: Net,
    host: UnixDatagram,
    irq: EventFd,
}

fn rig(features: u64) -> Rig {
    let mem = create_guest_memory(32).unwrap();
    let (host, guest) = UnixDatagram::pair().unwrap();
    host.set_nonblocking(true).unwrap();
    guest.set_nonblocking(true).unwrap();
    let tap = Tap::from_fd(OwnedFd::from(guest), "test0");
    let config = NetConfig {
        iface_id: "eth0".into(),
        guest_mac: Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])),
    };
    let mut dev = Net::new(config, tap).unwrap();
    let rx = Driver::new(&mem, QueueLayout::at(RXQ, 256));
    let tx = Driver::new(&mem, QueueLayout::at(TXQ, 256));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(irq.try_clone().unwrap())));
    dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![rx.q.device_queue(), tx.q.device_queue()],
        acked_features: features & dev.avail_features(),
        interrupt,
    })
    .unwrap();
    Rig {
        mem,
        rx,
        tx,
        dev,
        host,
        irq,
    }
}

fn frame(len: usize, seed: u8) -> Vec<u8> {
    let mut f: Vec<u8> = (0..len)
        .map(|i| (i as u8).wrapping_mul(7).wrapping_add(seed))
        .collect();
    f[..VNET_HDR_LEN].fill(0);
    f
}

impl Rig {
    /// Posts `n` receive chains of `size` bytes each.
    fn post_rx(&mut self, n: usize, size: u32) {
        for _ in 0..n {
            let at = RX_BUFS + u64::from(self.rx.avail_idx()) * 0x1_0000;
            let head = self.rx.add_chain(&self.mem, &[(at, size, true)]);
            self.rx.publish(&self.mem, head);
        }
    }

    fn send_tx(&mut self, bufs: &[(u64, u32, bool)]) {
        let head = self.tx.add_chain(&self.mem, bufs);
        self.tx.publish(&self.mem, head);
    }

    fn host_recv(&self) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 70_000];
        match self.host.recv(&mut buf) {
            Ok(n) => {
                buf.truncate(n);
                Some(buf)
            }
            Err(_) => None,
        }
    }

    fn rx_used(&self, i: u16) -> (u32, u32) {
        self.rx.used_elem(&self.mem, i)
    }
}

#[test]
fn config_space_and_features() {
    let r = rig(u64::MAX);
    let mut mac = [0u8; 6];
    r.dev.read_config(0, &mut mac);
    assert_eq!(mac, [0xaa, 0xfc, 0, 0, 0, 1]);
    assert_ne!(r.dev.avail_features() & VIRTIO_NET_F_MAC, 0);
    assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_TSO4), 0, "TSO needs CSUM");
    assert_eq!(
        tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6),
        libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6
    );
}

#[test]
fn transmit_gathers_the_chain() {
    let mut r = rig(u64::MAX);
    let f = frame(1500, 3);
    r.mem.write_slice(&f[..700], GuestAddress(TX_BUFS)).unwrap();
    r.mem
        .write_slice(&f[700..], GuestAddress(TX_BUFS + 0x4000))
        .unwrap();
    r.send_tx(&[(TX_BUFS, 700, false), (TX_BUFS + 0x4000, 800, false)]);
    r.dev.process_tx();
    assert_eq!(r.host_recv().unwrap(), f);
    assert_eq!(r.tx.used_idx(&r.mem), 1);
    assert_eq!(r.tx.used_elem(&r.mem, 0), (0, 0));
    let m = r.dev.metrics();
    assert_eq!((m.tx_frames.get(), m.tx_bytes.get()), (1, 1500 - 12));
    assert_eq!(r.irq.read().unwrap(), 1);
}

#[test]
fn bad_transmit_frames_are_dropped_and_counted() {
    let mut r = rig(u64::MAX);
    // Shorter than the header, longer than the limit, a device-writable buffer, a chain
    // with only the header (valid: an empty frame is the host's business).
    r.send_tx(&[(TX_BUFS, 11, false)]);
    r.send_tx(&[(TX_BUFS, (MAX_FRAME_LEN + 1) as u32, false)]);
    r.send_tx(&[(TX_BUFS, 100, true)]);
    r.send_tx(&[(TX_BUFS, 0, false)]);
    r.dev.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 4);
    assert_eq!(r.dev.metrics().tx_dropped.get(), 4);
    assert!(r.host_recv().is_none());
    // GSO without the feature.
    let mut r = rig(!VIRTIO_NET_F_HOST_TSO4);
    let mut f = frame(100, 0);
    f[1] = 1; // TCPv4 GSO
    r.mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    r.send_tx(&[(TX_BUFS, 100, false)]);
    r.dev.process_tx();
    assert_eq!(r.dev.metrics().tx_dropped.get(), 1);
    // Exactly the limit passes.
    let mut r = rig(u64::MAX);
    r.send_tx(&[(TX_BUFS, MAX_FRAME_LEN as u32, false)]);
    r.dev.process_tx();
    // A datagram socket may refuse 64 KiB; either it was sent or counted as an error.
    let m = r.dev.metrics();
    assert_eq!(m.tx_frames.get() + m.tx_errors.get(), 1);
}

#[test]
fn transmit_eagain_keeps_the_frame() {
    let mut r = rig(u64::MAX);
    let f = frame(1000, 9);
    r.mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    // Send until the socket refuses.
    let mut sent = 0;
    for _ in 0..10_000 {
        r.send_tx(&[(TX_BUFS, 1000, false)]);
        r.dev.process_tx();
        if r.dev.tap_interest().contains(EventSet::OUT) {
            break;
        }
        sent += 1;
    }
    assert!(
        r.dev.tap_interest().contains(EventSet::OUT),
        "never blocked"
    );
    assert_eq!(
        r.tx.used_idx(&r.mem),
        sent,
        "the refused frame was not returned"
    );
    assert_eq!(r.dev.metrics().tx_retries.get(), 1);
    // Drain the host side; the device resumes and sends the held frame.
    let mut got = 0;
    while r.host_recv().is_some() {
        got += 1;
    }
    assert_eq!(got, sent);
    r.dev.tap_writable();
    assert_eq!(r.tx.used_idx(&r.mem), sent + 1);
    assert_eq!(r.host_recv().unwrap(), f);
    assert!(!r.dev.tap_interest().contains(EventSet::OUT));
}

#[test]
fn receive_zero_copy_with_mergeable_buffers() {
    let mut r = rig(u64::MAX);
    r.post_rx(20, 4096);
    let f = frame(1514, 1);
    r.host.send(&f).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.rx_used(0), (0, 1514));
    let mut got = vec![0u8; 1514];
    r.mem.read_slice(&mut got, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(&got[12..], &f[12..]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    let m = r.dev.metrics();
    assert_eq!(
        (m.rx_frames.get(), m.rx_zero_copy.get(), m.rx_bounced.get()),
        (1, 1, 0)
    );
    // The other 19 chains stay held: the next frame lands in chain 1.
    r.host.send(&frame(60, 2)).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx_used(1), (1, 60));
    assert_eq!(r.irq.read().unwrap(), 2);
}

#[test]
fn receive_spanning_buffers_through_the_bounce_buffer() {
    let mut r = rig(u64::MAX);
    r.post_rx(3, 1526);
    let f = frame(3000, 5);
    r.host.send(&f).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.rx_used(0), (0, 1526));
    assert_eq!(r.rx_used(1), (1, 3000 - 1526));
    let mut a = vec![0u8; 1526];
    let mut b = vec![0u8; 3000 - 1526];
    r.mem.read_slice(&mut a, GuestAddress(RX_BUFS)).unwrap();
    r.mem
        .read_slice(&mut b, GuestAddress(RX_BUFS + 0x1_0000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([a[10], a[11]]), 2, "num_buffers");
    assert_eq!(&a[12..], &f[12..1526]);
    assert_eq!(&b[..], &f[1526..]);
    assert_eq!(r.dev.metrics().rx_bounced.get(), 1);
}

#[test]
fn no_buffers_stops_reading_and_resumes_on_kick() {
    let mut r = rig(u64::MAX);
    r.host.send(&frame(100, 1)).unwrap();
    r.host.send(&frame(200, 2)).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert!(
        !r.dev.tap_interest().contains(EventSet::IN),
        "stopped reading the TAP"
    );
    // The guest adds buffers and kicks: both frames arrive, in order.
    r.post_rx(4, 1526);
    r.dev.rx_queue_kicked();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert_eq!(r.rx_used(0), (0, 100));
    assert_eq!(r.rx_used(1), (1, 200));
    assert!(r.dev.tap_interest().contains(EventSet::IN));
}

#[test]
fn full_queue_and_full_tap_then_drained() {
    let mut r = rig(u64::MAX);
    r.post_rx(2, 1526);
    let mut queued = 0u32;
    while r.host.send(&frame(500, queued as u8)).is_ok() {
        queued += 1;
    }
    assert!(queued > 2);
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    assert!(!r.dev.tap_interest().contains(EventSet::IN));
    // The guest drains everything, 2 buffers at a time.
    let mut delivered = 2u32;
    while delivered < queued {
        r.post_rx(2, 1526);
        r.dev.rx_queue_kicked();
        let now = u32::from(r.rx.used_idx(&r.mem));
        assert!(now > delivered, "receive stalled at {delivered}/{queued}");
        delivered = now;
    }
    assert_eq!(delivered, queued);
    assert_eq!(r.dev.metrics().rx_frames.get(), u64::from(queued));
}

#[test]
fn without_mergeable_buffers_a_too_large_frame_is_dropped() {
    let mut r = rig(!VIRTIO_NET_F_MRG_RXBUF);
    r.post_rx(2, 1526);
    r.host.send(&frame(4000, 1)).unwrap();
    r.host.send(&frame(1000, 2)).unwrap();
    r.dev.process_rx();
    assert_eq!(r.dev.metrics().rx_dropped.get(), 1);
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert_eq!(r.rx_used(0), (0, 1000));
    let mut hdr = [0u8; 12];
    r.mem.read_slice(&mut hdr, GuestAddress(RX_BUFS)).unwrap();
    assert_eq!(
        u16::from_le_bytes([hdr[10], hdr[11]]),
        1,
        "num_buffers is 1"
    );
}

#[test]
fn bad_receive_chains_are_returned() {
    let mut r = rig(u64::MAX);
    // A device-readable chain and one too short for the header.
    let h = r.rx.add_chain(&r.mem, &[(RX_BUFS, 1526, false)]);
    r.rx.publish(&r.mem, h);
    let h = r.rx.add_chain(&r.mem, &[(RX_BUFS, 8, true)]);
    r.rx.publish(&r.mem, h);
    r.post_rx(1, 1526);
    r.host.send(&frame(100, 1)).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    assert_eq!(r.rx_used(0), (0, 0));
    assert_eq!(r.rx_used(1), (1, 0));
    assert_eq!(r.rx_used(2).1, 100);
    assert_eq!(r.dev.metrics().rx_bad_chains.get(), 2);
}

#[test]
fn peer_gone_is_a_tap_failure() {
    let mut r = rig(u64::MAX);
    r.post_rx(2, 1526);
    let host = std::mem::replace(&mut r.host, UnixDatagram::unbound().unwrap());
    drop(host);
    r.dev.process_rx();
    // Transmit keeps moving, errors counted.
    r.send_tx(&[(TX_BUFS, 100, false)]);
    r.dev.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 1);
    assert_eq!(r.dev.metrics().tx_errors.get(), 1);
    // The event loop reports the hang-up: the TAP is no longer watched.
    r.dev.tap_failed();
    assert_eq!(r.dev.tap_interest(), EventSet::empty());
    assert_eq!(r.dev.metrics().tap_failures.get(), 1);
    r.send_tx(&[(TX_BUFS, 100, false)]);
    r.dev.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 2);
}

#[test]
fn reset_stops_everything() {
    let mut r = rig(u64::MAX);
    r.dev.reset();
    r.post_rx(2, 1526);
    r.host.send(&frame(100, 1)).unwrap();
    r.dev.process_rx();
    r.send_tx(&[(TX_BUFS, 100, false)]);
    r.dev.process_tx();
    assert_eq!(r.rx.used_idx(&r.mem), 0);
    assert_eq!(r.tx.used_idx(&r.mem), 0);
    assert_eq!(r.dev.tap_interest(), EventSet::empty());
    let _ = r.host.as_raw_fd();
}

/// Runs `f` on its own thread and fails the test if it has not returned within 10 s (a
/// livelocked device loop would otherwise hang the test run).
fn within_10s<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (done, wait) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(f());
    });
    wait.recv_timeout(std::time::Duration::from_secs(10))
        .expect("process_rx did not return: livelock")
}

#[test]
fn too_few_mergeable_buffers_wait_for_more_instead_of_spinning() {
    for features in [u64::MAX, !VIRTIO_RING_F_EVENT_IDX] {
        let mut r = rig(features);
        // One 256-byte buffer cannot hold a 3000-byte frame, but there is a buffer.
        r.post_rx(1, 256);
        r.host.send(&frame(3000, 9)).unwrap();
        let mut r = within_10s(move || {
            r.dev.process_rx();
            r
        });
        assert_eq!(r.rx.used_idx(&r.mem), 0, "nothing delivered yet");
        assert!(
            !r.dev.tap_interest().contains(EventSet::IN),
            "stopped reading the TAP"
        );
        if features & VIRTIO_RING_F_EVENT_IDX != 0 {
            // avail_event asks for a kick once the driver publishes past index 1.
            let at = r.rx.q.used + 4 + 8 * u64::from(r.rx.q.size);
            assert_eq!(r.mem.read_obj::<u16>(GuestAddress(at)).unwrap(), 1);
        }
        // A kick without new buffers changes nothing (and does not spin either).
        let mut r = within_10s(move || {
            r.dev.rx_queue_kicked();
            r
        });
        assert_eq!(r.rx.used_idx(&r.mem), 0);
        // Enough buffers: the frame arrives whole, spread over them.
        r.post_rx(12, 256);
        r.dev.rx_queue_kicked();
        let used = r.rx.used_idx(&r.mem);
        assert_eq!(used, 12, "3000 bytes in 256-byte buffers");
        let total: u32 = (0..used).map(|i| r.rx_used(i).1).sum();
        assert_eq!(total, 3000);
        assert_eq!(r.dev.metrics().rx_frames.get(), 1);
    }
}

#[test]
fn usable_chains_before_a_bad_one_are_returned_unused() {
    let mut r = rig(u64::MAX);
    // 256 bytes (usable but too small alone), a device-readable chain, then room enough.
    r.post_rx(1, 256);
    let h = r.rx.add_chain(&r.mem, &[(RX_BUFS + 0x1_0000, 1526, false)]);
    r.rx.publish(&r.mem, h);
    let h = r.rx.add_chain(&r.mem, &[(RX_BUFS + 0x2_0000, 4096, true)]);
    r.rx.publish(&r.mem, h);
    r.host.send(&frame(1000, 3)).unwrap();
    let r = within_10s(move || {
        r.dev.process_rx();
        r
    });
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    assert_eq!(r.rx_used(0), (0, 0), "usable chain given back unused");
    assert_eq!(r.rx_used(1), (1, 0), "bad chain refused");
    assert_eq!(r.rx_used(2), (2, 1000));
    assert_eq!(r.dev.metrics().rx_bad_chains.get(), 2);
    assert_eq!(r.dev.metrics().rx_frames.get(), 1);
}

#[test]
fn empty_buffer_outside_ram_does_not_spoil_a_frame() {
    let mut r = rig(u64::MAX);
    let f = frame(100, 4);
    r.mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    // A zero-length buffer may carry any address: it is never touched.
    r.send_tx(&[(TX_BUFS, 100, false), (u64::MAX - 4096, 0, false)]);
    r.dev.process_tx();
    assert_eq!(r.host_recv(), Some(f));
    assert_eq!(r.dev.metrics().tx_frames.get(), 1);
    assert_eq!(r.dev.metrics().tx_dropped.get(), 0);
}

#[test]
fn held_chains_take_the_next_frames_in_order() {
    let mut r = rig(u64::MAX);
    // 34 chains of 2 KiB: room for any frame (zero copy) twice, then not any more.
    r.post_rx(34, 2048);
    for (i, len) in [100usize, 200, 300].into_iter().enumerate() {
        r.host.send(&frame(len, i as u8)).unwrap();
        r.dev.process_rx();
        assert_eq!(r.rx.used_idx(&r.mem), i as u16 + 1, "frame {i} delivered");
        assert_eq!(r.rx_used(i as u16), (i as u32, len as u32), "in ring order");
        let mut hdr = [0u8; 12];
        r.mem
            .read_slice(&mut hdr, GuestAddress(RX_BUFS + 0x1_0000 * i as u64))
            .unwrap();
        assert_eq!(u16::from_le_bytes([hdr[10], hdr[11]]), 1, "num_buffers");
        assert!(r.dev.tap_interest().contains(EventSet::IN), "still reading");
    }
    let m = r.dev.metrics();
    assert_eq!((m.rx_zero_copy.get(), m.rx_bounced.get()), (2, 1));
    assert_eq!(m.rx_frames.get(), 3);
    // A frame spanning several held chains.
    r.host.send(&frame(5000, 7)).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 6, "5000 bytes in three 2 KiB chains");
    assert_eq!(r.rx_used(3), (3, 2048));
    assert_eq!(r.rx_used(5), (5, 5000 - 2 * 2048));
}

#[test]
fn a_held_chain_too_short_for_the_header_does_not_start_a_frame() {
    let mut r = rig(u64::MAX);
    // All three are taken for the first frame (zero copy needs more); it uses the first.
    // The 4-byte chain would then start the second frame, its header split across chains
    // and `num_buffers` written nowhere: it goes back unused instead.
    for (i, size) in [100u32, 4, 100].into_iter().enumerate() {
        let h =
            r.rx.add_chain(&r.mem, &[(RX_BUFS + 0x1_0000 * i as u64, size, true)]);
        r.rx.publish(&r.mem, h);
    }
    let f = frame(50, 2);
    r.host.send(&frame(50, 1)).unwrap();
    r.host.send(&f).unwrap();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    assert_eq!(r.rx_used(0), (0, 50));
    assert_eq!(r.rx_used(1), (1, 0), "short chain given back unused");
    assert_eq!(
        r.rx_used(2),
        (2, 50),
        "the second frame whole in the third chain"
    );
    let mut got = vec![0u8; 50];
    r.mem
        .read_slice(&mut got, GuestAddress(RX_BUFS + 0x2_0000))
        .unwrap();
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 1, "num_buffers");
    assert_eq!(&got[12..], &f[12..]);
    let m = r.dev.metrics();
    assert_eq!((m.rx_frames.get(), m.rx_bad_chains.get()), (2, 1));
}

fn limiter(json: &str) -> RateLimiter {
    let config: crate::config::RateLimiterConfig = serde_json::from_str(json).unwrap();
    RateLimiter::new(Some(&config)).unwrap()
}

fn fires(fd: std::os::fd::RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

#[test]
fn tx_limit_keeps_frames_on_the_ring_and_charges_only_sent_frames() {
    let mut r = rig(u64::MAX);
    r.dev.set_rate_limiters(
        RateLimiter::new(None).unwrap(),
        limiter(r#"{"ops": {"size": 2, "refill_time": 100000}}"#),
    );
    let f = frame(100, 1);
    r.mem.write_slice(&f, GuestAddress(TX_BUFS)).unwrap();
    for _ in 0..3 {
        r.send_tx(&[(TX_BUFS, 100, false)]);
    }
    r.dev.process_tx();
    assert_eq!(r.tx.used_idx(&r.mem), 2);
    assert!(r.host_recv().is_some() && r.host_recv().is_some() && r.host_recv().is_none());
    let m = r.dev.metrics();
    assert_eq!(m.tx_rate_limiter_throttled.get(), 1);
    assert_eq!(m.tx_rate_limiter_admitted_frames.get(), 2);
    assert_eq!(m.tx_rate_limiter_admitted_bytes.get(), 2 * 88);
    // Doubling the bucket re-evaluates at once (a new bucket starts full).
    let c: crate::config::RateLimiterConfig =
        serde_json::from_str(r#"{"ops": {"size": 4, "refill_time": 100000}}"#).unwrap();
    let keep = LimiterUpdate::from_config(None);
    r.dev
        .update_rate_limiters(&keep, &LimiterUpdate::from_config(Some(&c)))
        .unwrap();
    assert!(fires(r.dev.rate_limiters().1.timer_fd(), 1000));
    r.dev.tx_rate_limiter_timer();
    assert_eq!(r.tx.used_idx(&r.mem), 3);
    assert_eq!(m.tx_rate_limiter_event_count.get(), 1);
}

#[test]
fn rx_limit_holds_one_frame_and_leaves_the_tap_unread() {
    let mut r = rig(u64::MAX);
    r.dev.set_rate_limiters(
        limiter(r#"{"bandwidth": {"size": 1000, "refill_time": 100}}"#),
        RateLimiter::new(None).unwrap(),
    );
    r.post_rx(8, 4096);
    for i in 0..4 {
        r.host.send(&frame(612, i)).unwrap();
    }
    // 600 bytes a frame: the first goes, the second waits (200 bytes = 20 ms short).
    let t0 = now_ns();
    r.dev.process_rx();
    assert_eq!(r.rx.used_idx(&r.mem), 1);
    assert!(r.dev.rate_limiters().0.is_throttled());
    assert!(r.dev.tap_interest().is_empty(), "the TAP is left unread");
    let m = r.dev.metrics();
    assert_eq!(m.rx_rate_limiter_throttled.get(), 1);
    assert_eq!(m.rx_zero_copy.get(), 0);
    assert!(fires(r.dev.rate_limiters().0.timer_fd(), 2000));
    let waited = now_ns() - t0;
    assert!((20_000_000..1_000_000_000).contains(&waited), "{waited}");
    r.dev.rx_rate_limiter_timer();
    assert_eq!(r.rx.used_idx(&r.mem), 2);
    // Disabling the limit lets the rest through at once.
    let off: crate::config::RateLimiterConfig =
        serde_json::from_str(r#"{"bandwidth": {"size": 0, "refill_time": 100}}"#).unwrap();
    r.dev
        .update_rate_limiters(
            &LimiterUpdate::from_config(Some(&off)),
            &LimiterUpdate::from_config(None),
        )
        .unwrap();
    assert!(fires(r.dev.rate_limiters().0.timer_fd(), 1000));
    r.dev.rx_rate_limiter_timer();
    assert_eq!(r.rx.used_idx(&r.mem), 4);
    assert_eq!(m.rx_rate_limiter_admitted_frames.get(), 2);
    assert_eq!(m.rx_rate_limiter_admitted_bytes.get(), 1200);
    assert_eq!(m.rx_frames.get(), 4);
}

#[test]
fn rx_limit_with_room_for_the_largest_frame_stays_zero_copy() {
    let mut r = rig(u64::MAX);
    r.dev.set_rate_limiters(
        limiter(r#"{"bandwidth": {"size": 1000000, "refill_time": 1000}, "ops": {"size": 3, "refill_time": 100000}}"#),
        RateLimiter::new(None).unwrap(),
    );
    r.post_rx(40, 4096);
    for i in 0..4 {
        r.host.send(&frame(1012, i)).unwrap();
    }
    r.dev.process_rx();
    // Three ops: three frames, read straight into guest buffers; the fourth waits.
    assert_eq!(r.rx.used_idx(&r.mem), 3);
    let m = r.dev.metrics();
    assert_eq!(m.rx_zero_copy.get(), 3);
    assert_eq!(m.rx_rate_limiter_admitted_frames.get(), 3);
    assert_eq!(m.rx_rate_limiter_admitted_bytes.get(), 3000);
    // Charged (the bucket refills at 1000 bytes per ms meanwhile).
    let (b, _) = r.dev.rate_limiters().0.buckets();
    let level = b.map(crate::rate_limiter::TokenBucket::level).unwrap();
    assert!((997_000..1_000_000).contains(&level), "{level}");
}
