use super::*;
use crate::config::IoEngine;
use crate::devices::IrqLine;
use crate::devices::virtio::mock::{Driver, F_INDIRECT, F_NEXT, QueueLayout, write_desc};
use crate::rate_limiter::now_ns;
use crate::vstate::memory::create_guest_memory;
use std::io::{Read, Seek, Write};
use vm_memory::GuestAddress;

pub(super) const HDR: u64 = 0x10_0000;
pub(super) const DATA: u64 = 0x20_0000;
pub(super) const STATUS: u64 = 0x30_0000;
pub(super) const DISK_SECTORS: u64 = 64;

pub(super) struct Rig {
    pub(super) mem: GuestMemory,
    pub(super) q: Driver,
    pub(super) dev: Block,
    pub(super) irq: EventFd,
    pub(super) file: std::fs::File,
}

pub(super) fn memfd(len: usize) -> std::fs::File {
    let fd =
        nix::sys::memfd::memfd_create(c"kiln-blk", nix::sys::memfd::MFdFlags::empty()).unwrap();
    let mut f = std::fs::File::from(fd);
    let pattern: Vec<u8> = (0..len).map(|i| (i / 512) as u8).collect();
    f.write_all(&pattern).unwrap();
    f
}

fn rig_with(engine: IoEngine, read_only: bool, cache_type: CacheType, features: u64) -> Rig {
    rig_sized(engine, read_only, cache_type, features, 16)
}

/// A drive of `DISK_SECTORS` (sector i holds bytes i) on a queue of `size` entries.
pub(super) fn rig_sized(
    engine: IoEngine,
    read_only: bool,
    cache_type: CacheType,
    features: u64,
    size: u16,
) -> Rig {
    let mem = create_guest_memory(16).unwrap();
    let file = memfd((DISK_SECTORS * 512) as usize);
    let disk = DiskFile::from_file(file.try_clone().unwrap(), read_only).unwrap();
    let config = BlockConfig {
        drive_id: "rootfs-drive-id-which-is-long".into(),
        read_only,
        cache_type,
        io_engine: engine,
    };
    let mut dev = Block::new(config, disk).unwrap();
    let q = Driver::new(&mem, QueueLayout::at(0x1000, size));
    let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    let interrupt = Arc::new(VirtioInterrupt::new(IrqLine::new(irq.try_clone().unwrap())));
    dev.activate(Activation {
        mem: mem.clone(),
        queues: vec![q.q.device_queue()],
        acked_features: features & dev.avail_features(),
        interrupt,
    })
    .unwrap();
    Rig {
        mem,
        q,
        dev,
        irq,
        file,
    }
}

pub(super) fn rig(e: IoEngine) -> Rig {
    rig_with(e, false, CacheType::Writeback, u64::MAX)
}

impl Rig {
    /// Runs the queue and, for the async engine, waits until every request it took is
    /// answered.
    pub(super) fn run(&mut self) {
        self.dev.process_queue();
        self.settle();
    }

    /// Answers every request in flight (the async engine; nothing for sync).
    pub(super) fn settle(&mut self) {
        self.dev.drain().unwrap();
    }

    pub(super) fn header(&self, kind: u32, sector: u64) {
        self.mem.write_obj(kind, GuestAddress(HDR)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(HDR + 8)).unwrap();
        self.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
    }

    /// Submits a chain and runs the device; returns (status byte, used length).
    pub(super) fn submit(&mut self, bufs: &[(u64, u32, bool)]) -> (u8, u32) {
        let before = self.q.used_idx(&self.mem);
        let head = self.q.add_chain(&self.mem, bufs);
        self.q.publish(&self.mem, head);
        self.run();
        let after = self.q.used_idx(&self.mem);
        assert_eq!(
            after,
            before.wrapping_add(1),
            "exactly one used entry per request"
        );
        let (id, len) = self.q.used_elem(&self.mem, before);
        assert_eq!(id, u32::from(head));
        (self.mem.read_obj(GuestAddress(STATUS)).unwrap(), len)
    }

    pub(super) fn read(&mut self, sector: u64, len: u32) -> (u8, u32) {
        self.header(0, sector);
        self.submit(&[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)])
    }

    fn file_bytes(&mut self) -> Vec<u8> {
        let mut v = Vec::new();
        self.file.rewind().unwrap();
        self.file.read_to_end(&mut v).unwrap();
        v
    }
}

fn features_and_config_space(e: IoEngine) {
    let r = rig(e);
    let f = r.dev.avail_features();
    assert_ne!(f & features::VIRTIO_BLK_F_FLUSH, 0);
    assert_eq!(f & features::VIRTIO_BLK_F_RO, 0);
    let mut cap = [0u8; 8];
    r.dev.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), DISK_SECTORS);
    let mut seg = [0u8; 4];
    r.dev.read_config(12, &mut seg);
    assert_eq!(u32::from_le_bytes(seg), 254);
    let ro = rig_with(e, true, CacheType::Unsafe, u64::MAX);
    assert_ne!(ro.dev.avail_features() & features::VIRTIO_BLK_F_RO, 0);
    assert_eq!(ro.dev.avail_features() & features::VIRTIO_BLK_F_FLUSH, 0);
}

fn read_write_flush_get_id(e: IoEngine) {
    let mut r = rig(e);
    assert_eq!(r.read(3, 1024), (status::OK, 1025));
    let mut got = vec![0u8; 1024];
    r.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
    assert!(got[..512].iter().all(|b| *b == 3) && got[512..].iter().all(|b| *b == 4));
    assert_eq!(r.irq.read().unwrap(), 1);

    r.mem
        .write_slice(&[0xabu8; 512], GuestAddress(DATA))
        .unwrap();
    r.header(1, 10);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)]),
        (status::OK, 1)
    );
    assert!(
        r.file_bytes()[10 * 512..11 * 512]
            .iter()
            .all(|b| *b == 0xab)
    );

    r.header(4, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (status::OK, 1)
    );

    r.header(8, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]),
        (status::OK, 21)
    );
    let mut id = [0u8; 20];
    r.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
    assert_eq!(&id, b"rootfs-drive-id-whic");

    let m = r.dev.metrics();
    assert_eq!(
        (
            m.read_count.get(),
            m.write_count.get(),
            m.flush_count.get(),
            m.get_id_count.get()
        ),
        (1, 1, 1, 1)
    );
    assert_eq!((m.read_bytes.get(), m.write_bytes.get()), (1024, 512));
}

fn scattered_buffers_and_last_sector(e: IoEngine) {
    let mut r = rig(e);
    r.header(0, DISK_SECTORS - 1);
    let st = r.submit(&[
        (HDR, 16, false),
        (DATA, 100, true),
        (DATA + 0x1000, 412, true),
        (STATUS, 1, true),
    ]);
    assert_eq!(st, (status::OK, 513));
    let mut tail = [0u8; 412];
    r.mem
        .read_slice(&mut tail, GuestAddress(DATA + 0x1000))
        .unwrap();
    assert!(tail.iter().all(|b| *b == (DISK_SECTORS - 1) as u8));
}

fn hostile_requests_get_ioerr_or_unsupp(e: IoEngine) {
    let mut r = rig(e);
    let before = r.file_bytes();
    // Sector past the capacity, sector u64::MAX, length not a multiple of 512.
    assert_eq!(r.read(DISK_SECTORS, 512).0, status::IOERR);
    assert_eq!(r.read(DISK_SECTORS - 1, 1024).0, status::IOERR);
    assert_eq!(r.read(u64::MAX, 512).0, status::IOERR);
    assert_eq!(r.read(0, 100).0, status::IOERR);
    // Device-writable header.
    r.header(0, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, true), (DATA, 512, true), (STATUS, 1, true)])
            .0,
        status::IOERR
    );
    // Write whose data is device-writable: it is a read-stream buffer in the wrong place.
    r.header(1, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)])
            .0,
        status::IOERR
    );
    // Unknown type.
    r.header(0x77, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (STATUS, 1, true)]),
        (status::UNSUPP, 1)
    );
    // Missing status byte: returned with length 0, the status location untouched.
    r.header(0, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (DATA, 512, false)]), (0xff, 0));
    // Read-only status byte.
    r.header(0, 0);
    assert_eq!(r.submit(&[(HDR, 16, false), (STATUS, 1, false)]), (0xff, 0));
    assert_eq!(r.file_bytes(), before, "nothing was written");
    // The queue still works.
    assert_eq!(r.read(0, 512), (status::OK, 513));
    let m = r.dev.metrics();
    assert_eq!(m.invalid_requests.get(), 6);
    assert_eq!(m.unsupported.get(), 1);
    assert_eq!(m.dropped_chains.get(), 2);
}

fn broken_chains_are_returned_unanswered(e: IoEngine) {
    let mut r = rig(e);
    r.header(0, 0);
    // A loop: descriptor 0 -> 0.
    write_desc(&r.mem, r.q.q.desc, 0, (HDR, 16, F_NEXT, 0));
    r.q.publish(&r.mem, 0);
    r.run();
    assert_eq!(r.q.used_elem(&r.mem, 0), (0, 0));
    // Address past RAM.
    r.q = Driver::new(&r.mem, QueueLayout::at(0x1000, 16));
    let mut r = rig(e);
    r.header(0, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (64 << 20, 512, true), (STATUS, 1, true)]),
        (0xff, 0)
    );
    // Indirect descriptor when it was not negotiated.
    let mut r = rig_with(e, false, CacheType::Writeback, !VIRTIO_RING_F_INDIRECT_DESC);
    r.header(0, 0);
    write_desc(&r.mem, r.q.q.desc, 0, (0x8000, 48, F_INDIRECT, 0));
    r.q.publish(&r.mem, 0);
    r.run();
    assert_eq!(r.q.used_elem(&r.mem, 0), (0, 0));
    assert_eq!(r.dev.metrics().dropped_chains.get(), 1);
    assert_eq!(r.read(0, 512).0, status::OK);
}

fn indirect_chain_when_negotiated(e: IoEngine) {
    let mut r = rig(e);
    r.header(0, 5);
    let table = 0x8000u64;
    write_desc(&r.mem, table, 0, (HDR, 16, 1, 1));
    write_desc(&r.mem, table, 1, (DATA, 512, 1 | 2, 2));
    write_desc(&r.mem, table, 2, (STATUS, 1, 2, 0));
    write_desc(&r.mem, r.q.q.desc, 0, (table, 48, F_INDIRECT, 0));
    r.q.publish(&r.mem, 0);
    r.run();
    assert_eq!(r.q.used_elem(&r.mem, 0), (0, 513));
    assert_eq!(
        r.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(),
        status::OK
    );
}

fn read_only_drive_refuses_writes(e: IoEngine) {
    let mut r = rig_with(e, true, CacheType::Unsafe, u64::MAX);
    let before = r.file_bytes();
    r.header(1, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (DATA, 512, false), (STATUS, 1, true)])
            .0,
        status::IOERR
    );
    // FLUSH was not offered.
    r.header(4, 0);
    assert_eq!(
        r.submit(&[(HDR, 16, false), (STATUS, 1, true)]).0,
        status::UNSUPP
    );
    assert_eq!(r.file_bytes(), before);
    assert_eq!(r.read(0, 512).0, status::OK);
}

fn avail_index_jump_needs_reset(e: IoEngine) {
    let mut r = rig(e);
    r.q.set_avail_idx(&r.mem, 1000);
    r.run();
    assert!(r.dev.needs_reset());
    assert_eq!(r.dev.metrics().queue_errors.get(), 1);
    // A config interrupt told the driver.
    assert_eq!(r.irq.read().unwrap(), 1);
    // Nothing is processed until reset + reactivation.
    r.run();
    r.dev.reset();
    assert!(!r.dev.needs_reset());
}

fn same_head_twice_and_many_requests(e: IoEngine) {
    let mut r = rig(e);
    r.header(0, 1);
    let head = r.q.add_chain(
        &r.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    r.q.publish(&r.mem, head);
    r.q.publish(&r.mem, head);
    r.run();
    assert_eq!(r.q.used_idx(&r.mem), 2);
    for i in 0..100u64 {
        assert_eq!(r.read(i % DISK_SECTORS, 512).0, status::OK);
    }
    assert_eq!(r.q.used_idx(&r.mem), 102);
}

fn inactive_device_ignores_notifications(e: IoEngine) {
    let mut r = rig(e);
    r.dev.reset();
    r.header(0, 0);
    let head = r.q.add_chain(
        &r.mem,
        &[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)],
    );
    r.q.publish(&r.mem, head);
    r.run();
    assert_eq!(r.q.used_idx(&r.mem), 0);
}

fn backing_file_errors_are_ioerr(e: IoEngine) {
    // A file that shrank under the device: reads beyond its end fail.
    let mut r = rig(e);
    r.file.set_len(512).unwrap();
    assert_eq!(r.read(10, 512).0, status::IOERR);
    assert_eq!(r.dev.metrics().io_errors.get(), 1);
    assert_eq!(r.read(0, 512).0, status::OK);
}

fn head_outside_the_queue_is_counted_once(e: IoEngine) {
    let mut r = rig(e);
    // Avail entry naming descriptor 40 of a 16-entry table: nothing to walk, no used slot.
    let head_at = r.q.q.avail + 4;
    r.mem.write_obj(40u16, GuestAddress(head_at)).unwrap();
    r.q.set_avail_idx(&r.mem, 1);
    r.run();
    assert_eq!(r.dev.metrics().dropped_chains.get(), 1);
    // The ring moved on past it and still serves requests.
    assert_eq!(r.read(0, 512).0, status::OK);
    assert_eq!(r.dev.metrics().dropped_chains.get(), 1);
}

pub(super) fn limited_rig(e: IoEngine, json: &str) -> Rig {
    let mut r = rig(e);
    let config: crate::config::RateLimiterConfig = serde_json::from_str(json).unwrap();
    r.dev
        .set_rate_limiter(RateLimiter::new(Some(&config)).unwrap());
    r
}

fn timer_fires(dev: &Block, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: dev.rate_limiter().timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

impl Rig {
    /// Publishes `n` reads of `len` bytes without running the device.
    fn queue_reads(&mut self, n: usize, len: u32) {
        self.header(0, 0);
        for _ in 0..n {
            let head = self.q.add_chain(
                &self.mem,
                &[(HDR, 16, false), (DATA, len, true), (STATUS, 1, true)],
            );
            self.q.publish(&self.mem, head);
        }
    }
}

fn throttled_requests_stay_on_the_ring_until_the_limit_allows(e: IoEngine) {
    let mut r = limited_rig(e, r#"{"ops": {"size": 2, "refill_time": 100000}}"#);
    r.queue_reads(4, 512);
    r.run();
    assert_eq!(r.q.used_idx(&r.mem), 2, "two ops in the bucket");
    let m = r.dev.metrics();
    assert_eq!(m.rate_limiter_throttled_events.get(), 1);
    assert_eq!(m.rate_limiter_admitted_ops.get(), 2);
    assert_eq!(m.rate_limiter_admitted_bytes.get(), 1024);
    assert!(r.dev.rate_limiter().is_throttled());
    // Kicks while throttled do nothing (and walk nothing).
    r.run();
    assert_eq!(r.q.used_idx(&r.mem), 2);
    assert!(!timer_fires(&r.dev, 20), "the next op is 50 s away");
    // PATCH: ops disabled; the held-back requests go at once.
    let update = LimiterUpdate {
        bandwidth: crate::rate_limiter::BucketUpdate::Keep,
        ops: crate::rate_limiter::BucketUpdate::Disable,
    };
    r.dev.update_rate_limiter(&update).unwrap();
    assert!(timer_fires(&r.dev, 1000));
    r.dev.rate_limiter_timer();
    r.settle();
    assert_eq!(r.q.used_idx(&r.mem), 4);
    assert_eq!(m.rate_limiter_event_count.get(), 1);
    assert_eq!(m.read_count.get(), 4);
}

fn a_request_larger_than_the_bucket_goes_then_the_timer_is_exact(e: IoEngine) {
    // 1 KiB per 100 ms; a 4 KiB read goes (the bucket is full), the next waits ~300 ms of
    // debt plus the next read's 512 bytes.
    let mut r = limited_rig(e, r#"{"bandwidth": {"size": 1024, "refill_time": 100}}"#);
    r.queue_reads(1, 4096);
    r.queue_reads(1, 512);
    let t0 = now_ns();
    r.run();
    assert_eq!(r.q.used_idx(&r.mem), 1);
    let t1 = now_ns();
    assert!(timer_fires(&r.dev, 2000));
    // Armed for exactly 350 ms after the first read was processed (between t0 and t1); a
    // loaded machine may deliver it late, never early.
    let fired = now_ns();
    assert!(fired >= t0 + 350_000_000, "{}", fired - t0);
    assert!(fired < t1 + 1_000_000_000, "{}", fired - t1);
    r.dev.rate_limiter_timer();
    r.settle();
    assert_eq!(r.q.used_idx(&r.mem), 2);
    assert_eq!(r.dev.metrics().rate_limiter_admitted_bytes.get(), 4608);
}

fn failed_transfers_are_not_charged_bytes(e: IoEngine) {
    let mut r = limited_rig(
        e,
        r#"{"bandwidth": {"size": 1000000, "refill_time": 100000}}"#,
    );
    // Past the end of the disk: IOERR, one op, no bytes.
    r.header(0, DISK_SECTORS);
    let (status, _) = r.submit(&[(HDR, 16, false), (DATA, 512, true), (STATUS, 1, true)]);
    assert_eq!(status, status::IOERR);
    assert_eq!(r.dev.metrics().rate_limiter_admitted_ops.get(), 1);
    assert_eq!(r.dev.metrics().rate_limiter_admitted_bytes.get(), 0);
    let (b, _) = r.dev.rate_limiter().buckets();
    assert_eq!(
        b.map(crate::rate_limiter::TokenBucket::level),
        Some(1_000_000)
    );
}

fn chains_longer_than_iov_max_are_served_whole(e: IoEngine) {
    // 2048 one-byte buffers in an indirect table: more than one preadv/READV takes.
    let mut r = rig(e);
    r.header(0, 3);
    let mut bufs = vec![(HDR, 16, false)];
    bufs.extend((0..2048u64).map(|i| (DATA + 2 * i, 1, true)));
    bufs.push((STATUS, 1, true));
    let head = r.q.add_indirect(&r.mem, 0x8000, &bufs);
    r.q.publish(&r.mem, head);
    r.run();
    assert_eq!(r.q.used_elem(&r.mem, 0), (u32::from(head), 2049));
    let st: u8 = r.mem.read_obj(GuestAddress(STATUS)).unwrap();
    assert_eq!(st, status::OK);
    for i in 0..2048u64 {
        let b: u8 = r.mem.read_obj(GuestAddress(DATA + 2 * i)).unwrap();
        assert_eq!(u64::from(b), 3 + i / 512, "byte {i}");
    }
}

fn a_read_across_a_shrunken_end_is_ioerr(e: IoEngine) {
    // The image shrinks to 10.5 sectors under the device: a read of sectors 10-11 gets
    // 256 bytes, then the end of the file.
    let mut r = rig(e);
    r.file.set_len(10 * 512 + 256).unwrap();
    assert_eq!(r.read(10, 1024).0, status::IOERR);
    assert_eq!(r.dev.metrics().io_errors.get(), 1);
    assert_eq!(r.read(9, 512), (status::OK, 513));
}

/// Each test above, against each engine.
macro_rules! engines {
    ($($name:ident),* $(,)?) => {
        mod sync_engine {
            use super::*;
            $(#[test] fn $name() { super::$name(IoEngine::Sync) })*
        }
        mod async_engine {
            use super::*;
            $(#[test] fn $name() { super::$name(IoEngine::Async) })*
        }
    };
}

engines!(
    chains_longer_than_iov_max_are_served_whole,
    a_read_across_a_shrunken_end_is_ioerr,
    features_and_config_space,
    read_write_flush_get_id,
    scattered_buffers_and_last_sector,
    hostile_requests_get_ioerr_or_unsupp,
    broken_chains_are_returned_unanswered,
    indirect_chain_when_negotiated,
    read_only_drive_refuses_writes,
    avail_index_jump_needs_reset,
    same_head_twice_and_many_requests,
    inactive_device_ignores_notifications,
    backing_file_errors_are_ioerr,
    head_outside_the_queue_is_counted_once,
    throttled_requests_stay_on_the_ring_until_the_limit_allows,
    a_request_larger_than_the_bucket_goes_then_the_timer_is_exact,
    failed_transfers_are_not_charged_bytes
);
