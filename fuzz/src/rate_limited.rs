//! The throttled paths of both devices: a drive and an interface with tiny rate limiters
//! (1-2 ms refills, a few requests per bucket), well-formed requests and frames published
//! in any order with processing, timer expirations and live `PATCH`es in between.
//!
//! Invariants: a used entry is always a chain that was published and not used yet (a
//! throttled chain goes back on the ring and comes out once); nothing is lost: once the
//! limits are removed and the timers have fired, every published request is answered,
//! every guest frame reached the host and every host frame reached the guest; a throttled
//! device with a limit makes no progress without its timer.

use std::collections::VecDeque;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use kiln::config::{CacheType, MacAddr, RateLimiterConfig, TokenBucketConfig};
use kiln::devices::IrqLine;
use kiln::devices::virtio::block::{Block, BlockConfig, DiskFile};
use kiln::devices::virtio::mock::{Driver, QueueLayout};
use kiln::devices::virtio::net::{Net, NetConfig, Tap};
use kiln::devices::virtio::{Activation, VirtioDevice, VirtioInterrupt};
use kiln::rate_limiter::{LimiterUpdate, RateLimiter};
use kiln::vstate::memory::GuestMemory;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use crate::guest;
use crate::wire::{self, Enc, U, Wire};

const MAX_OPS: usize = 64;
/// Outstanding chains at most (descriptors are reused round the 16-entry table).
const MAX_OUTSTANDING: usize = 4;
const QSIZE: u16 = 16;
const DATA: u64 = 0x2_0000;
const RX_BUFS: u64 = 0x3_0000;
const RX_BUF_LEN: u32 = 2048;
const HDR: u64 = 0x1_0000;

/// A small limiter: `ops` and `bytes` per bucket (0: none), refilled every `refill` ms.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limit {
    pub ops: u8,
    pub bytes: u16,
    pub refill: u8,
}

impl Wire for Limit {
    fn decode(u: &mut U<'_>) -> Self {
        Limit {
            ops: wire::u8(u) % 4,
            bytes: wire::u16(u),
            refill: 1 + wire::u8(u) % 2,
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u8(self.ops).u16(self.bytes).u8(self.refill - 1);
    }
}

impl Limit {
    fn config(&self) -> RateLimiterConfig {
        let b = |size: u64| TokenBucketConfig {
            size,
            one_time_burst: None,
            refill_time: u64::from(self.refill),
        };
        RateLimiterConfig {
            bandwidth: Some(b(u64::from(self.bytes))),
            ops: Some(b(u64::from(self.ops))),
        }
    }
}

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A block request: kind (read, write, flush, get-id), sector, sectors.
    Blk(u8, u8, u8),
    /// The drive's queue is processed.
    BlkProcess,
    /// Waits up to 2 ms for the drive's timer and handles it if it fired.
    BlkTimer,
    /// A PATCH of the drive's limiter.
    BlkPatch(Limit),
    /// A guest frame of this many bytes after the header.
    Tx(u16),
    /// The transmit queue is processed.
    TxProcess,
    /// A host frame of this many bytes (header included) toward the guest.
    HostSend(u16),
    /// Receive is processed.
    RxProcess,
    /// Waits up to 2 ms for the interface's timers and handles those that fired.
    NetTimers,
    /// A PATCH of both of the interface's limiters.
    NetPatch(Limit, Limit),
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 10 {
            0 => Op::Blk(wire::u8(u), wire::u8(u), wire::u8(u)),
            1 => Op::BlkProcess,
            2 => Op::BlkTimer,
            3 => Op::BlkPatch(Limit::decode(u)),
            4 => Op::Tx(wire::u16(u)),
            5 => Op::TxProcess,
            6 => Op::HostSend(wire::u16(u)),
            7 => Op::RxProcess,
            8 => Op::NetTimers,
            _ => Op::NetPatch(Limit::decode(u), Limit::decode(u)),
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::Blk(k, s, n) => e.u8(0).u8(*k).u8(*s).u8(*n),
            Op::BlkProcess => e.u8(1),
            Op::BlkTimer => e.u8(2),
            Op::BlkPatch(l) => e.u8(3).raw(&l.to_bytes()),
            Op::Tx(n) => e.u8(4).u16(*n),
            Op::TxProcess => e.u8(5),
            Op::HostSend(n) => e.u8(6).u16(*n),
            Op::RxProcess => e.u8(7),
            Op::NetTimers => e.u8(8),
            Op::NetPatch(a, b) => e.u8(9).raw(&a.to_bytes()).raw(&b.to_bytes()),
        };
    }
}

/// The limits at start and the steps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    pub blk: Limit,
    pub rx: Limit,
    pub tx: Limit,
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            blk: Limit::decode(u),
            rx: Limit::decode(u),
            tx: Limit::decode(u),
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        self.blk.encode(e);
        self.rx.encode(e);
        self.tx.encode(e);
        e.many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

fn fired(fd: RawFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

/// Consumes new used entries of `q`, checking each is an outstanding head.
fn reap(mem: &GuestMemory, q: &Driver, seen: &mut u16, outstanding: &mut VecDeque<u16>) {
    let idx = q.used_idx(mem);
    while *seen != idx {
        let (id, _) = q.used_elem(mem, *seen);
        let pos = outstanding
            .iter()
            .position(|h| u32::from(*h) == id)
            .unwrap_or_else(|| panic!("used id {id} was not outstanding: {outstanding:?}"));
        outstanding.remove(pos);
        *seen = seen.wrapping_add(1);
    }
}

fn off() -> LimiterUpdate {
    let zero = RateLimiterConfig {
        bandwidth: Some(TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 0,
        }),
        ops: Some(TokenBucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 0,
        }),
    };
    LimiterUpdate::from_config(Some(&zero))
}

/// Runs the input; panics when an invariant breaks.
pub fn run(input: &Input) {
    let mem = guest::memory();
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let interrupt = || {
        Arc::new(VirtioInterrupt::new(IrqLine::new(
            irq.try_clone().expect("dup"),
        )))
    };

    // The drive.
    let file = guest::memfd(&vec![0u8; 64 * 512]);
    let disk = DiskFile::from_file(file, false).expect("a memfd is a disk");
    let config = BlockConfig {
        drive_id: "d".into(),
        read_only: false,
        cache_type: CacheType::Writeback,
        io_engine: kiln::config::IoEngine::Sync,
    };
    let mut blk = Block::new(config, disk).expect("a block device");
    blk.set_rate_limiter(RateLimiter::new(Some(&input.blk.config())).expect("a limiter"));
    let mut bq = Driver::new(&mem, QueueLayout::at(0x1000, QSIZE));
    blk.activate(Activation {
        mem: mem.clone(),
        queues: vec![bq.q.device_queue()],
        acked_features: blk.avail_features(),
        interrupt: interrupt(),
    })
    .expect("the drive activates");
    let (mut b_out, mut b_seen) = (VecDeque::new(), 0u16);

    // The interface.
    let (host, guest_end) = UnixDatagram::pair().expect("a socket pair");
    host.set_nonblocking(true).expect("non-blocking");
    guest_end.set_nonblocking(true).expect("non-blocking");
    let tap = Tap::from_fd(OwnedFd::from(guest_end), "fuzz0");
    let config = NetConfig {
        iface_id: "eth0".into(),
        guest_mac: Some(MacAddr([0xaa, 0xfc, 0, 0, 0, 1])),
    };
    let mut net = Net::new(config, tap).expect("a net device");
    net.set_rate_limiters(
        RateLimiter::new(Some(&input.rx.config())).expect("a limiter"),
        RateLimiter::new(Some(&input.tx.config())).expect("a limiter"),
    );
    let mut rxq = Driver::new(&mem, QueueLayout::at(0x4000, QSIZE));
    let mut txq = Driver::new(&mem, QueueLayout::at(0x7000, QSIZE));
    net.activate(Activation {
        mem: mem.clone(),
        queues: vec![rxq.q.device_queue(), txq.q.device_queue()],
        acked_features: net.avail_features(),
        interrupt: interrupt(),
    })
    .expect("the interface activates");
    for i in 0..u64::from(QSIZE) {
        let head = rxq.add_chain(
            &mem,
            &[(RX_BUFS + i * u64::from(RX_BUF_LEN), RX_BUF_LEN, true)],
        );
        rxq.publish(&mem, head);
    }
    let (mut rx_seen, mut rx_delivered, mut host_sent) = (0u16, 0usize, 0usize);
    let (mut t_out, mut t_seen, mut t_sent) = (VecDeque::new(), 0u16, 0usize);
    let mut buf = vec![0u8; 70_000];

    for op in &input.ops {
        match *op {
            Op::Blk(kind, sector, n) if b_out.len() < MAX_OUTSTANDING => {
                let kind = [0u32, 1, 4, 8][usize::from(kind % 4)];
                let len = 512 * (1 + u32::from(n % 8));
                let hdr = HDR + 16 * b_out.len() as u64;
                let _ = mem.write_obj(kind, GuestAddress(hdr));
                let _ = mem.write_obj(u64::from(sector % 64), GuestAddress(hdr + 8));
                let status = hdr + 0x800;
                let data = (DATA, len, kind != 1);
                let head = if kind == 4 {
                    bq.add_chain(&mem, &[(hdr, 16, false), (status, 1, true)])
                } else {
                    bq.add_chain(&mem, &[(hdr, 16, false), data, (status, 1, true)])
                };
                bq.publish(&mem, head);
                b_out.push_back(head);
            }
            Op::Blk(..) => {}
            Op::BlkProcess => {
                let throttled = blk.rate_limiter().is_throttled();
                let before = bq.used_idx(&mem);
                blk.process_queue();
                if throttled {
                    assert_eq!(bq.used_idx(&mem), before, "a throttled drive went on");
                }
            }
            Op::BlkTimer => {
                if fired(blk.rate_limiter().timer_fd(), 2) {
                    blk.rate_limiter_timer();
                }
            }
            Op::BlkPatch(l) => {
                let u = LimiterUpdate::from_config(Some(&l.config()));
                blk.update_rate_limiter(&u).expect("a PATCH");
            }
            Op::Tx(n) if t_out.len() < MAX_OUTSTANDING => {
                let len = 12 + u32::from(n % 1500);
                let at = DATA + 0x8000 + 0x800 * t_out.len() as u64;
                let _ = mem.write_slice(&[0u8; 12], GuestAddress(at));
                let head = txq.add_chain(&mem, &[(at, len, false)]);
                txq.publish(&mem, head);
                t_out.push_back(head);
            }
            Op::Tx(_) => {}
            Op::TxProcess => {
                let throttled = net.rate_limiters().1.is_throttled();
                let before = txq.used_idx(&mem);
                net.process_tx();
                if throttled {
                    assert_eq!(txq.used_idx(&mem), before, "a throttled TX went on");
                }
            }
            Op::HostSend(n) if host_sent < usize::from(QSIZE) / 2 => {
                let len = 12 + 14 + usize::from(n % 1400);
                if host.send(&buf[..len]).is_ok() {
                    host_sent += 1;
                }
            }
            Op::HostSend(_) => {}
            Op::RxProcess => net.process_rx(),
            Op::NetTimers => {
                let (rx, tx) = net.rate_limiters();
                let (rx, tx) = (rx.timer_fd(), tx.timer_fd());
                if fired(rx, 1) {
                    net.rx_rate_limiter_timer();
                }
                if fired(tx, 1) {
                    net.tx_rate_limiter_timer();
                }
            }
            Op::NetPatch(r, t) => {
                let r = LimiterUpdate::from_config(Some(&r.config()));
                let t = LimiterUpdate::from_config(Some(&t.config()));
                net.update_rate_limiters(&r, &t).expect("a PATCH");
            }
        }
        reap(&mem, &bq, &mut b_seen, &mut b_out);
        let before = t_out.len();
        reap(&mem, &txq, &mut t_seen, &mut t_out);
        t_sent += before - t_out.len();
        let idx = rxq.used_idx(&mem);
        rx_delivered += usize::from(idx.wrapping_sub(rx_seen));
        rx_seen = idx;
    }

    // Limits off: everything goes, at once.
    blk.update_rate_limiter(&off()).expect("a PATCH");
    net.update_rate_limiters(&off(), &off()).expect("a PATCH");
    for _ in 0..2 {
        net.tap_writable();
        if fired(blk.rate_limiter().timer_fd(), 0) {
            blk.rate_limiter_timer();
        }
        let (rx, tx) = net.rate_limiters();
        let (rx, tx) = (rx.timer_fd(), tx.timer_fd());
        if fired(rx, 0) {
            net.rx_rate_limiter_timer();
        }
        if fired(tx, 0) {
            net.tx_rate_limiter_timer();
        }
        blk.process_queue();
        net.process_tx();
        net.process_rx();
    }
    reap(&mem, &bq, &mut b_seen, &mut b_out);
    assert!(b_out.is_empty(), "requests never answered: {b_out:?}");
    let before = t_out.len();
    reap(&mem, &txq, &mut t_seen, &mut t_out);
    t_sent += before - t_out.len();
    assert!(t_out.is_empty(), "frames never sent: {t_out:?}");
    let mut got = 0;
    while host.recv(&mut buf).is_ok() {
        got += 1;
    }
    assert_eq!(got, t_sent, "guest frames lost or duplicated");
    rx_delivered += usize::from(rxq.used_idx(&mem).wrapping_sub(rx_seen));
    assert_eq!(rx_delivered, host_sent, "host frames lost or duplicated");
}
