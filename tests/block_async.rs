//! The async block engine end to end, on a disk that answers when the test says so: the
//! drive's backing file lives on a FUSE file system this test serves (`testkit::fuse`), which
//! holds every read until it is released. The guest (`blk-slow:8`) posts 8 reads and a FLUSH
//! at once, then answers ARP and ping on its network device; the host pings it while the
//! reads are held.
//!
//! - `Async`: all 8 reads reach the disk at once, the guest's echo reply comes back while
//!   they are all still held (an ordering, not a timing: the reads cannot complete before
//!   the test releases them), and the FLUSH reaches the disk only after every read was
//!   answered (`IOSQE_IO_DRAIN`). Every thread of kiln — the kernel's io-wq workers too —
//!   runs under a seccomp filter.
//! - `Sync`: one read at a time reaches the disk and the event loop waits for it, so the
//!   echo reply comes only after the release; the test prints the stall it saw.
//!
//! The mount, the namespace and kiln are gone when a test ends, pass or fail.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::Ipv4Addr;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use common::{NetNs, TempDir, guest, kiln, require_kvm, wait_until};
use testkit::LineReader;
use testkit::fuse::{Event, GatedDisk};

const GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
const GUEST_MAC: &str = "02:6b:69:6c:6e:02";
const READS: usize = 8;
const LINE_TIMEOUT: Duration = Duration::from_secs(30);

/// kiln, its console, and what must go when the test ends.
struct Run {
    child: Option<Child>,
    lines: LineReader,
    seen: Vec<String>,
    // Dropped after kiln is gone (field order), so nothing it holds is pulled away first.
    disk: GatedDisk,
    ns: NetNs,
    _dir: TempDir,
}

impl Run {
    fn start(engine: &str, tap: &str) -> Run {
        require_kvm();
        let dir = TempDir::new("blk-slow");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt).unwrap();
        let disk = GatedDisk::mount(&mnt, vec![0x5au8; 1 << 20]).unwrap();
        disk.hold();
        let ns = NetNs::new("blk-slow").unwrap();
        ns.add_tap(tap, "10.0.0.1/24").unwrap();
        // The guest's address is known: no ARP that a stalled event loop could let expire.
        ns.ip(&[
            "neigh",
            "add",
            "10.0.0.2",
            "lladdr",
            GUEST_MAC,
            "dev",
            tap,
            "nud",
            "permanent",
        ])
        .unwrap();
        let json = format!(
            r#"{{"boot-source": {{"kernel_image_path": "{}",
                 "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=blk-slow:{READS}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": 128}},
                "drives": [{{"drive_id": "slow", "path_on_host": "{}", "is_root_device": true,
                             "is_read_only": false, "cache_type": "Writeback",
                             "io_engine": "{engine}"}}],
                "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "{tap}",
                                         "guest_mac": "{GUEST_MAC}"}}]}}"#,
            guest("kiln-guest.elf").display(),
            disk.file().display()
        );
        let cfg = dir.file("vm.json", json.as_bytes());
        let mut child = ns
            .command(kiln())
            .args(["--no-api", "--config-file"])
            .arg(&cfg)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let lines = LineReader::spawn(child.stdout.take().unwrap());
        Run {
            child: Some(child),
            lines,
            seen: Vec::new(),
            disk,
            ns,
            _dir: dir,
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// Waits for the next line starting with `prefix`.
    fn wait_line(&mut self, prefix: &str) -> String {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            match self.lines.recv_until(deadline) {
                Ok(line) => {
                    self.seen.push(line.text.clone());
                    if line.text.starts_with(prefix) {
                        return line.text;
                    }
                }
                Err(_) => panic!(
                    "no `{prefix}` line within {LINE_TIMEOUT:?}; guest output:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Waits for kiln's exit code.
    fn exit(&mut self) -> i32 {
        let mut child = self.child.take().unwrap();
        let status = wait_until(&mut child, Instant::now() + LINE_TIMEOUT);
        let Some(status) = status else {
            let _ = child.kill();
            let _ = child.wait();
            panic!("kiln did not exit; guest output:\n{}", self.seen.join("\n"));
        };
        testkit::exit_code(status)
    }

    /// The end both engines must reach once the disk lets go: every read and the FLUSH
    /// done, the guest's report, exit 0, and the FLUSH reaching the disk after every read.
    fn finish(&mut self) {
        assert_eq!(
            self.wait_line("info blk-slow flush-done"),
            format!("info blk-slow flush-done reads-done={READS} status=ok")
        );
        assert_eq!(
            self.wait_line("ok blk-slow"),
            format!("ok blk-slow reads={READS} flush=ok echoes=1")
        );
        assert_eq!(self.exit(), 0, "{}", self.seen.join("\n"));
        assert_flush_after_reads(&self.disk.events());
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        // Let kiln finish whatever it waits for, then make sure it is gone.
        self.disk.release();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where each read and the FLUSH reached the disk: the FLUSH only after every read was
/// answered.
fn assert_flush_after_reads(events: &[Event]) {
    let fsync = events
        .iter()
        .position(|e| *e == Event::Fsync)
        .unwrap_or_else(|| panic!("the FLUSH never reached the disk: {events:?}"));
    let answered = events
        .iter()
        .filter(|e| matches!(e, Event::ReadAnswered { .. }))
        .count();
    let before = events[..fsync]
        .iter()
        .filter(|e| matches!(e, Event::ReadAnswered { .. }))
        .count();
    assert_eq!(answered, READS, "{events:?}");
    assert_eq!(
        before, READS,
        "the FLUSH reached the disk before every earlier read was answered: {events:?}"
    );
}

#[test]
fn async_network_answers_while_every_read_is_held_and_the_flush_waits_for_them() {
    let mut run = Run::start("Async", "kilnbsa0");
    run.wait_line(&format!("info blk-slow posted reads={READS} flush=1"));
    // All the guest's reads are at the disk at once (the io-wq bound is 8).
    let held = run.disk.wait_held(READS, LINE_TIMEOUT);
    assert_eq!(held, READS, "reads at the disk at once");
    // The guest answers ARP and ping while every read is still held.
    let rtt = run
        .ns
        .ping(GUEST_IP, 1, 56, Duration::from_secs(20))
        .unwrap();
    assert_eq!(run.disk.held(), READS, "a read completed without the disk");
    let rtt = rtt.unwrap_or_else(|| {
        panic!(
            "no echo reply while {READS} block reads were outstanding; guest output:\n{}",
            run.seen.join("\n")
        )
    });
    let line = run.wait_line("info blk-slow echo answered=1");
    assert_eq!(line, "info blk-slow echo answered=1 blk-done=0");
    assert!(
        !run.disk.events().contains(&Event::Fsync),
        "the FLUSH started before the reads before it completed"
    );
    // The kernel's io-wq workers (blocked in the held reads) are threads of kiln: under the
    // filter they inherited, like every other.
    let modes = common::seccomp_modes(run.pid());
    assert!(
        modes.iter().any(|(n, _)| n.starts_with("iou-wrk")),
        "no io-wq worker: {modes:?}"
    );
    for (name, mode) in &modes {
        assert_eq!(mode, "2", "thread {name} is not filtered: {modes:?}");
    }
    println!(
        "Async: {READS} reads held at the disk; the echo reply came in {:.1} ms",
        rtt.as_secs_f64() * 1e3
    );
    run.disk.release();
    run.finish();
}

#[test]
fn sync_engine_stalls_the_network_while_a_read_is_held() {
    let mut run = Run::start("Sync", "kilnbss0");
    run.wait_line(&format!("info blk-slow posted reads={READS} flush=1"));
    assert_eq!(run.disk.wait_held(1, LINE_TIMEOUT), 1);
    // One read at a time: no second one reaches the disk while the first is held.
    assert_eq!(run.disk.wait_held(2, Duration::from_secs(2)), 1);
    let hold = Duration::from_secs(3);
    let sent = Instant::now();
    let (rtt, released) = std::thread::scope(|s| {
        let pinger = s.spawn(|| run.ns.ping(GUEST_IP, 1, 56, Duration::from_secs(30)));
        std::thread::sleep(hold);
        let released = Instant::now();
        assert_eq!(run.disk.held(), 1);
        run.disk.release();
        (pinger.join().unwrap().unwrap(), released)
    });
    let rtt = rtt.expect("no echo reply even after the release");
    let answered = sent + rtt;
    assert!(
        answered >= released,
        "the echo reply came while the event loop waited for the disk"
    );
    println!(
        "Sync: the echo reply came {:.0} ms after the ping, {:.1} ms after the read held for \
         {:.0} ms was released: the network stalled with the disk",
        rtt.as_secs_f64() * 1e3,
        (answered - released).as_secs_f64() * 1e3,
        hold.as_secs_f64() * 1e3
    );
    run.finish();
}
