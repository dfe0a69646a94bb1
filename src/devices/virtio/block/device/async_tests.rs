//! What only the `Async` engine has: a ring made on demand, requests in flight between
//! events, and what must happen to them on a reset, a backing-file swap or a drain.

use std::io::Write;
use std::os::fd::AsRawFd;

use vm_memory::{Bytes, GuestAddress};

use super::tests::{DATA, DISK_SECTORS, HDR, Rig, STATUS, limited_rig, memfd, rig, rig_sized};
use super::*;
use crate::config::IoEngine::Async;
use crate::devices::virtio::mock::{Driver, QueueLayout};
use testkit::fuse::GatedDisk;

/// A disk whose reads wait for the test (a FUSE file system this process serves: the ring
/// sends its requests to the kernel's workers, so none completes until it is released),
/// holding the rig's pattern (sector i is bytes i), swapped in as the rig's backing file.
fn gate(r: &mut Rig) -> Gate {
    testkit::require_root();
    let dir = testkit::TempDir::new("blk-gate");
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let contents: Vec<u8> = (0..DISK_SECTORS as usize * 512)
        .map(|i| (i / 512) as u8)
        .collect();
    let disk = GatedDisk::mount(&mnt, contents).unwrap();
    disk.hold();
    let file = DiskFile::open(&disk.file(), false).unwrap();
    assert!(file.may_block(), "a FUSE file must go to the io-wq workers");
    r.dev.update_disk(file);
    let _ = r.irq.read();
    Gate { disk, _dir: dir }
}

/// The gated disk, unmounted before its directory goes (field order).
struct Gate {
    disk: GatedDisk,
    _dir: testkit::TempDir,
}

/// Status byte of request `i` (one per request, so each answer is seen).
fn status_at(i: u64) -> GuestAddress {
    GuestAddress(STATUS + i)
}

/// Data buffer of request `i`.
fn data_at(i: u64) -> u64 {
    DATA + i * 0x1000
}

impl Rig {
    /// Publishes a 512-byte read of `sector` into buffer `i`, status at `status_at(i)`.
    fn post_read(&mut self, i: u64, sector: u64) -> u16 {
        let hdr = HDR + 16 * i;
        self.mem.write_obj(0u32, GuestAddress(hdr)).unwrap();
        self.mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
        self.mem.write_obj(sector, GuestAddress(hdr + 8)).unwrap();
        self.mem.write_obj(0xffu8, status_at(i)).unwrap();
        let head = self.q.add_chain(
            &self.mem,
            &[
                (hdr, 16, false),
                (data_at(i), 512, true),
                (status_at(i).0, 1, true),
            ],
        );
        self.q.publish(&self.mem, head);
        head
    }

    fn status_of(&self, i: u64) -> u8 {
        self.mem.read_obj(status_at(i)).unwrap()
    }

    fn data_of(&self, i: u64) -> Vec<u8> {
        let mut v = vec![0u8; 512];
        self.mem
            .read_slice(&mut v, GuestAddress(data_at(i)))
            .unwrap();
        v
    }

    /// Waits (at most 10 s) for the completion eventfd, then answers what completed.
    fn wait_completions(&mut self) {
        let fd = self.dev.completion_event().unwrap().as_raw_fd();
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "no completion signalled");
        self.dev.process_completions();
    }
}

#[test]
fn the_ring_is_made_on_the_first_transfer_only() {
    let mut r = rig(Async);
    assert!(!r.dev.has_io_ring(), "activation made a ring");
    // GET_ID, an unsupported type and a malformed request need no file I/O.
    r.header(8, 0);
    r.submit(&[(HDR, 16, false), (DATA, 20, true), (STATUS, 1, true)]);
    r.header(0x77, 0);
    r.submit(&[(HDR, 16, false), (STATUS, 1, true)]);
    assert_eq!(r.read(DISK_SECTORS, 512).0, status::IOERR);
    assert!(
        !r.dev.has_io_ring(),
        "a request without file I/O made a ring"
    );
    assert_eq!(r.read(0, 512), (status::OK, 513));
    assert!(r.dev.has_io_ring());
    // A Sync drive never has one.
    let mut s = rig(IoEngine::Sync);
    assert_eq!(s.read(0, 512).0, status::OK);
    assert!(!s.dev.has_io_ring() && s.dev.completion_event().is_none());
}

#[test]
fn page_cache_hits_are_answered_in_the_run_that_took_them_with_one_interrupt() {
    let mut r = rig_sized(Async, false, CacheType::Writeback, u64::MAX, 128);
    // An image on the test's own filesystem (ext4 here: reads of cached pages complete
    // during the submission), in the page cache.
    let dir = testkit::TempDir::new("blk-cached");
    let contents: Vec<u8> = (0..DISK_SECTORS as usize * 512)
        .map(|i| (i / 512) as u8)
        .collect();
    let path = dir.file("cached.img", &contents);
    let file = DiskFile::open(&path, false).unwrap();
    assert!(
        !file.may_block(),
        "{} is not on a local filesystem",
        path.display()
    );
    r.dev.update_disk(file);
    let _ = r.irq.read();
    for i in 0..32 {
        r.post_read(i, i);
    }
    r.dev.process_queue();
    assert_eq!(r.q.used_idx(&r.mem), 32);
    assert_eq!(r.irq.read().unwrap(), 1);
    for i in 0..32 {
        assert_eq!(r.status_of(i), status::OK, "request {i}");
        assert!(r.data_of(i).iter().all(|b| u64::from(*b) == i), "data {i}");
    }
}

#[test]
fn a_queue_of_32_reads_is_in_flight_at_once_and_answered_through_the_eventfd() {
    let mut r = rig_sized(Async, false, CacheType::Writeback, u64::MAX, 128);
    let gate = gate(&mut r);
    let disk = &gate.disk;
    for i in 0..32 {
        r.post_read(i, i);
    }
    r.dev.process_queue();
    // All taken in one run, none answered: the event loop did not wait for any.
    assert_eq!(r.dev.in_flight(), 32);
    assert_eq!(r.q.used_idx(&r.mem), 0);
    assert_eq!(disk.wait_held(8, std::time::Duration::from_secs(10)), 8);
    disk.release();
    while r.q.used_idx(&r.mem) < 32 {
        r.wait_completions();
    }
    assert_eq!(r.dev.in_flight(), 0);
    let mut heads: Vec<u32> = (0..32).map(|k| r.q.used_elem(&r.mem, k).0).collect();
    heads.sort_unstable();
    assert_eq!(heads, (0..32).map(|h| 3 * h).collect::<Vec<_>>());
    for i in 0..32 {
        assert_eq!(r.status_of(i), status::OK, "request {i}");
        assert!(r.data_of(i).iter().all(|b| u64::from(*b) == i), "data {i}");
    }
    assert!(r.irq.read().unwrap() >= 1);
    assert_eq!(r.dev.metrics().read_count.get(), 32);
}

#[test]
fn a_reset_with_requests_in_flight_answers_none_of_them() {
    let mut r = rig_sized(Async, false, CacheType::Writeback, u64::MAX, 128);
    let gate = gate(&mut r);
    let disk = &gate.disk;
    for i in 0..8 {
        r.post_read(i, i);
    }
    r.dev.process_queue();
    assert_eq!(r.dev.in_flight(), 8);
    // The driver resets the device (a vCPU thread: no waiting) and sets it up again at
    // once, on the same rings, while the kernel still has the old requests.
    r.dev.reset();
    assert_eq!(r.dev.in_flight(), 8, "the requests are still the kernel's");
    r.q = Driver::new(&r.mem, QueueLayout::at(0x1000, 128));
    let interrupt = Arc::new(VirtioInterrupt::new(crate::devices::IrqLine::new(
        r.irq.try_clone().unwrap(),
    )));
    let features = r.dev.avail_features();
    r.dev
        .activate(Activation {
            mem: r.mem.clone(),
            queues: vec![r.q.q.device_queue()],
            acked_features: features,
            interrupt,
        })
        .unwrap();
    disk.release();
    while r.dev.in_flight() > 0 {
        r.wait_completions();
    }
    assert_eq!(r.q.used_idx(&r.mem), 0, "an orphan was returned");
    for i in 0..8 {
        assert_eq!(r.status_of(i), 0xff, "orphan {i} got a status");
    }
    // The new queue works.
    assert_eq!(r.read(5, 512), (status::OK, 513));
}

#[test]
fn a_backing_file_swapped_with_requests_in_flight_serves_them_from_the_old_one() {
    let mut r = rig_sized(Async, false, CacheType::Writeback, u64::MAX, 128);
    let gate = gate(&mut r);
    let disk = &gate.disk;
    for i in 0..4 {
        r.post_read(i, i + 1);
    }
    r.dev.process_queue();
    assert_eq!(r.dev.in_flight(), 4);
    let mut new = memfd(0);
    new.write_all(&vec![0xeeu8; 128 * 512]).unwrap();
    r.dev.update_disk(DiskFile::from_file(new, false).unwrap());
    assert!(!r.dev.has_io_ring(), "the new file needs a ring of its own");
    disk.release();
    while r.q.used_idx(&r.mem) < 4 {
        r.wait_completions();
    }
    for i in 0..4 {
        assert_eq!(r.status_of(i), status::OK);
        assert!(
            r.data_of(i).iter().all(|b| u64::from(*b) == i + 1),
            "old data {i}"
        );
    }
    // The next read is from the new file, on a new ring.
    r.post_read(9, 100);
    r.run();
    assert_eq!(r.status_of(9), status::OK);
    assert!(r.data_of(9).iter().all(|b| *b == 0xee));
    assert!(r.dev.has_io_ring());
}

#[test]
fn drain_answers_everything_so_a_save_sees_no_request_half_done() {
    let mut r = rig_sized(Async, false, CacheType::Writeback, u64::MAX, 128);
    let gate = gate(&mut r);
    let disk = &gate.disk;
    for i in 0..16 {
        r.post_read(i, i);
    }
    r.dev.process_queue();
    assert_eq!(r.dev.in_flight(), 16);
    std::thread::scope(|s| {
        s.spawn(|| {
            disk.wait_held(8, std::time::Duration::from_secs(10));
            disk.release();
        });
        r.dev.drain().unwrap();
    });
    assert_eq!(r.dev.in_flight(), 0);
    assert_eq!(r.q.used_idx(&r.mem), 16);
    assert_eq!(r.dev.queue_positions(), vec![(16, 16)]);
    assert!((0..16).all(|i| r.status_of(i) == status::OK));
}

#[test]
fn a_throttled_request_never_reaches_the_ring() {
    let mut r = limited_rig(Async, r#"{"ops": {"size": 2, "refill_time": 100000}}"#);
    for i in 0..4 {
        r.post_read(i, i);
    }
    r.dev.process_queue();
    assert!(r.dev.rate_limiter().is_throttled());
    r.settle();
    assert_eq!(r.q.used_idx(&r.mem), 2);
    assert_eq!(
        r.dev.metrics().read_count.get(),
        2,
        "only what the bucket allows is read"
    );
    assert_eq!(r.dev.metrics().rate_limiter_admitted_bytes.get(), 1024);
}

#[test]
fn a_failed_async_transfer_gives_its_bytes_back() {
    let mut r = limited_rig(
        Async,
        r#"{"bandwidth": {"size": 1000000, "refill_time": 100000}}"#,
    );
    // Inside the capacity seen at open, past the end of the (shrunken) file: the kernel
    // fails it, after the limiter charged it at submission.
    r.file.set_len(512).unwrap();
    assert_eq!(r.read(10, 4096).0, status::IOERR);
    let m = r.dev.metrics();
    assert_eq!(m.rate_limiter_admitted_ops.get(), 1);
    assert_eq!(m.rate_limiter_admitted_bytes.get(), 0);
    let (b, _) = r.dev.rate_limiter().buckets();
    assert_eq!(
        b.map(crate::rate_limiter::TokenBucket::level),
        Some(1_000_000)
    );
}
