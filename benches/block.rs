//! Block benchmark (issue 3): `cargo bench --bench block`, as root, on a host with /dev/kvm.
//!
//! The test guest's `kiln.run=blk-bench:<n>:<size>` does `n` sequential reads of `size` bytes
//! at queue depth 1, each waited for by interrupt, from a drive backed by a 64 MiB image in
//! the page cache. Per run, the benchmark samples every kiln thread's CPU time
//! (/proc/<pid>/task/*/schedstat, nanoseconds) when the guest prints its `begin` line, its
//! `end` line and its `ok` line (the guest idles 100 ms after each), so start-up is
//! excluded:
//! - the measured window [begin, end] = 100 ms idle + the `n` reads + the end line;
//! - the idle window [end, ok] = 100 ms idle + the ok line: what the window holds besides
//!   the reads. `-idle` figures subtract it, run by run.
//!
//! Reported per size, as medians [min-max] over runs: requests/s and MB/s (guest TSC delta,
//! converted with KVM_GET_TSC_KHZ), CPU µs per request of kiln's main thread (the whole
//! device path: epoll_wait, eventfd read, preadv, irqfd write, the queue code), of its vCPU
//! thread (on this machine mostly the host kernel emulating guest instructions: not the
//! device path) and of all its threads.
//!
//! Baselines in the same invocation, interleaved with the kiln runs:
//! - `firecracker 1.12.1` (`benches/firecracker.sh` fetches and caches it; "baseline absent"
//!   without it): the same guest, command line and drive from a config file, its main
//!   thread (event loop and devices, as kiln's) measured the same way;
//! - `floor: syscalls`: what the device path cannot avoid, done by this process on one
//!   thread: a pread of `size` bytes from the same image + an eventfd read + an eventfd write
//!   per iteration (CLOCK_THREAD_CPUTIME_ID);
//! - `floor: device loop`: the same as a real device thread does it: a thread blocked in
//!   epoll_wait on an eventfd that a second thread writes (as KVM's ioeventfd does for the
//!   vCPU), then eventfd read, pread into a buffer, and a write to an eventfd registered as
//!   a KVM irqfd on an in-kernel IOAPIC pin (a real VM with one vCPU that does not run); the
//!   device thread's CPU per iteration, wake-ups included. Variants: the stand-in sleeping
//!   on a completion eventfd, or spinning while the device raises the pin through an irqfd
//!   or with KVM_IRQ_LINE; and the KVM_IRQ_LINE loop with the stand-in spinning 0.5 ms
//!   before each request, about the guest's own time between requests here: the device
//!   thread's CPU then idles between requests, as it does in a VM (on this nested host a
//!   wake-up after such an idle costs several times one after none);
//! - `kiln --no-seccomp`: the seccomp filters' share.
//!
//! Then the queue-depth part (issue 18, `block/depth.rs`): random reads at depths 1, 8 and
//! 32, page-cached and cold, kiln Sync vs kiln Async vs Firecracker Async.
//! `KILN_BENCH_BLK=depth` runs only that part, `KILN_BENCH_BLK=qd1` only the first.
//!
//! Environment: `KILN_BENCH_BLK_RUNS` (runs per variant and size, default 11),
//! `KILN_BENCH_BLK_N` (reads per run, default 500), `KILN_BENCH_BLK_FLOOR_ITERS` (iterations
//! per floor measurement, default 2000).

mod common;
#[path = "block/depth.rs"]
mod depth;

use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use common::{
    CpuDelta, FloorVm, KILN, Lines, Result, Scratch, Stats, ThreadCpu, cell, env_usize, field,
    guest_elf, host_tsc_khz, next_line, ratio, spawn_reader, stats, stop, this_thread_cpu_ns,
    this_thread_switches,
};

const MEM_MIB: u64 = 128;
const DISK_BYTES: u64 = 64 << 20;
const SIZES: [u64; 2] = [4096, 65536];
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// Longest wait for the guest's next line.
const LINE_TIMEOUT: Duration = Duration::from_secs(20);

/// The goal for kiln's device thread, CPU per read as a fraction of Firecracker's (issue 16).
const GOAL_RATIO: f64 = 0.6;
/// How long the spaced floor's stand-in for the vCPU spins between requests: about the test
/// guest's own time between two requests here (1/1900 s at queue depth 1, of which the
/// device's part is some 20 µs), during which the device thread's CPU idles.
const FLOOR_GAP: Duration = Duration::from_micros(500);

fn main() {
    common::run("block", "boots VMs", bench);
}

/// Firecracker's binary (the same-run baseline), when it could be had.
static FIRECRACKER: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

fn firecracker() -> Option<&'static Path> {
    FIRECRACKER.get_or_init(common::firecracker).as_deref()
}

/// Whether this run measures `v` (Firecracker only when it could be had).
fn measured(v: Variant) -> bool {
    v != Variant::Firecracker || firecracker().is_some()
}

// ---- scratch files -------------------------------------------------------------------------

/// Writes `bytes` (a whole number of MiB) of xorshift output seeded with `seed` to `path`,
/// synced to disk.
fn write_random_image(path: &Path, bytes: u64, seed: u64) -> Result<()> {
    let mut file = File::create(path)?;
    let mut x = seed;
    let mut chunk = vec![0u8; 1 << 20];
    for _ in 0..bytes >> 20 {
        for word in chunk.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            word.copy_from_slice(&x.to_le_bytes());
        }
        file.write_all(&chunk)?;
    }
    file.sync_all()?;
    Ok(())
}

/// The drive image and kiln's config files.
impl Scratch {
    fn disk(&self) -> PathBuf {
        self.path("disk.img")
    }

    /// A 64 MiB image of pseudo-random bytes, then read once so it is in the page cache.
    fn make_disk(&self) -> Result<()> {
        write_random_image(&self.disk(), DISK_BYTES, 0x9e37_79b9_7f4a_7c15)?;
        let mut sink = Vec::with_capacity(usize::try_from(DISK_BYTES)?);
        File::open(self.disk())?.read_to_end(&mut sink)?;
        Ok(())
    }

    /// A config file booting the test guest with `blk-bench:<n>:<size>,idle` and the image as
    /// a read-only root drive; Firecracker's (`fc`) adds its logger (a file, not stdout).
    fn config(&self, n: u64, size: u64, fc: bool) -> Result<PathBuf> {
        let name = format!("blk-{n}-{size}{}", if fc { "-fc" } else { "" });
        let path = self.path(&format!("{name}.json"));
        let logger = if fc {
            format!(
                ",\n  {}",
                common::firecracker_logger(&self.path(&format!("{name}.log")))?
            )
        } else {
            String::new()
        };
        let json = format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{BASE_ARGS} kiln.run=blk-bench:{n}:{size},idle"
  }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {MEM_MIB} }},
  "drives": [{{ "drive_id": "bench", "path_on_host": "{}", "is_root_device": true,
               "is_read_only": true, "cache_type": "Unsafe" }}]{logger}
}}
"#,
            guest_elf().display(),
            self.disk().display()
        );
        fs::write(&path, json)?;
        Ok(path)
    }
}

// ---- one kiln run --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Kiln,
    KilnNoSeccomp,
    Firecracker,
}

const VARIANTS: [Variant; 3] = [Variant::Kiln, Variant::KilnNoSeccomp, Variant::Firecracker];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Kiln => "kiln",
            Variant::KilnNoSeccomp => "kiln --no-seccomp",
            Variant::Firecracker => "firecracker 1.12.1",
        }
    }
}

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct RunSample {
    /// Reads done and bytes read (from the guest's bench line).
    n: u64,
    bytes: u64,
    /// Guest TSC ticks of the reads.
    tsc: u64,
    /// Host wall time between the begin and end lines (includes the guest's 100 ms idle).
    wall: Duration,
    /// CPU in [begin, end].
    window: CpuDelta,
    /// CPU in [end, ok]: idle and one line of output, no reads.
    idle: CpuDelta,
}

fn kiln_run(
    variant: Variant,
    config: &(PathBuf, PathBuf),
    n: u64,
    size: u64,
    stderr: &Path,
) -> Result<RunSample> {
    let mut cmd = match variant {
        Variant::Firecracker => {
            let mut c = Command::new(firecracker().ok_or("baseline absent")?);
            c.arg("--no-api").arg("--config-file").arg(&config.1);
            c
        }
        Variant::Kiln | Variant::KilnNoSeccomp => {
            let mut c = Command::new(KILN);
            c.arg("--no-api").arg("--config-file").arg(&config.0);
            if variant == Variant::KilnNoSeccomp {
                c.arg("--no-seccomp");
            }
            c
        }
    };
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(File::create(stderr)?));
    let mut child = cmd.spawn()?;
    let result = spawn_reader(&mut child, "blk-bench").and_then(|rx| collect_run(&rx, n, size));
    let status = stop(&mut child)?;
    result.map_err(|e| {
        let err = fs::read_to_string(stderr).unwrap_or_default();
        format!("{cmd:?}: {e} ({status})\n--- stderr\n{err}").into()
    })
}

/// Follows the guest's output until `info idle`, and turns the three samples into a run.
fn collect_run(rx: &Lines, n: u64, size: u64) -> Result<RunSample> {
    let mut output = String::new();
    let mut begin: Option<(Instant, ThreadCpu)> = None;
    let mut end: Option<(Instant, ThreadCpu, (u64, u64, u64))> = None;
    let mut ok: Option<ThreadCpu> = None;
    loop {
        let line = next_line(rx, LINE_TIMEOUT, &mut output)?;
        match (line.cpu, line.text.as_str()) {
            (Some(cpu), t) if t.starts_with("info blk-bench begin") => begin = Some((line.at, cpu)),
            (Some(cpu), t) if t.starts_with("bench blk-bench end") => {
                let (Some(n), Some(bytes), Some(tsc)) =
                    (field(t, "n"), field(t, "bytes"), field(t, "tsc"))
                else {
                    return Err(format!("bad line {t:?}").into());
                };
                end = Some((line.at, cpu, (n, bytes, tsc)));
            }
            (Some(cpu), _) => ok = Some(cpu),
            (None, "info idle") => break,
            _ => {}
        }
    }
    let (Some((t0, c0)), Some((t1, c1, (done, bytes, tsc))), Some(c2)) = (begin, end, ok) else {
        return Err(format!("missing blk-bench lines in:\n{output}").into());
    };
    if done != n || bytes != n * size || !output.contains(&format!("ok blk-bench reads={n}")) {
        return Err(format!("unexpected blk-bench result:\n{output}").into());
    }
    Ok(RunSample {
        n,
        bytes,
        tsc,
        wall: t1 - t0,
        window: CpuDelta::between(&c0, &c1),
        idle: CpuDelta::between(&c1, &c2),
    })
}

// ---- the floors ----------------------------------------------------------------------------

/// CPU ns and context switches (times switched in) per iteration of a floor.
#[derive(Clone, Copy, Debug, Default)]
struct FloorSample {
    ns: f64,
    switches: f64,
}

/// Measures `iters` iterations of `body` on this thread.
fn per_iteration(iters: usize, mut body: impl FnMut() -> Result<()>) -> Result<FloorSample> {
    let (t0, s0) = (this_thread_cpu_ns(), this_thread_switches());
    for _ in 0..iters {
        body()?;
    }
    let (t1, s1) = (this_thread_cpu_ns(), this_thread_switches());
    Ok(FloorSample {
        ns: (t1 - t0) as f64 / iters as f64,
        switches: s1.saturating_sub(s0) as f64 / iters as f64,
    })
}

/// A pread of `size` bytes from the image + an eventfd read + an eventfd write per
/// iteration, on this thread.
fn floor_syscalls(disk: &File, size: u64, iters: usize) -> Result<FloorSample> {
    let evt = EventFd::new(libc::EFD_NONBLOCK)?;
    let mut buf = vec![1u8; usize::try_from(size)?];
    let mut offset = 0u64;
    evt.write(1)?;
    let sample = per_iteration(iters, || {
        evt.read()?;
        if disk.read_at(&mut buf, offset)? != buf.len() {
            return Err("short pread".into());
        }
        evt.write(1)?;
        offset = (offset + size) % DISK_BYTES;
        Ok(())
    })?;
    evt.read()?;
    Ok(sample)
}

/// How the device thread of [`floor_device_loop`] interrupts, and how the stand-in for the
/// vCPU waits for the completion.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interrupt {
    /// A write to a real KVM irqfd (IOAPIC pin; KVM injects from a kworker); the driver
    /// spins on a counter.
    Irqfd,
    /// KVM_IRQ_LINE up then down (injected in the ioctl itself, as irqfd's worker does);
    /// the driver spins on a counter.
    IrqLine,
    /// A write to an eventfd the driver sleeps on in read(2), as a vCPU halted until the
    /// interrupt sleeps: both sides sleep and are woken once per request, as in kiln.
    Sleeping,
}

/// A device thread as small as one can be: blocked in epoll_wait on a "queue" eventfd that
/// the calling thread writes (as KVM's ioeventfd does on the vCPU's notify), then eventfd
/// read, pread, interrupt. The device thread's CPU per iteration (its own clock, wake-ups
/// included).
fn floor_device_loop(
    disk: &File,
    vm: &FloorVm,
    interrupt: Interrupt,
    gap: Duration,
    size: u64,
    iters: usize,
) -> Result<FloorSample> {
    let queue = EventFd::new(libc::EFD_NONBLOCK)?;
    // Blocking: the sleeping driver waits in read(2).
    let completion = EventFd::new(0)?;
    let done = AtomicU64::new(0);
    let len = usize::try_from(size)?;
    std::thread::scope(|s| -> Result<FloorSample> {
        let device = s.spawn(|| -> std::result::Result<FloorSample, String> {
            let run = || -> Result<FloorSample> {
                let epoll = Epoll::new()?;
                epoll.ctl(
                    ControlOperation::Add,
                    queue.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, 0),
                )?;
                let mut events = [EpollEvent::default(); 4];
                let mut buf = vec![1u8; len];
                let mut offset = 0u64;
                let mut i = 0u64;
                per_iteration(iters, || {
                    while epoll.wait(-1, &mut events)? == 0 {}
                    queue.read()?;
                    if disk.read_at(&mut buf, offset)? != len {
                        return Err("short pread".into());
                    }
                    match interrupt {
                        Interrupt::Irqfd => vm.irqfd.write(1)?,
                        Interrupt::IrqLine => vm.pulse()?,
                        Interrupt::Sleeping => completion.write(1)?,
                    }
                    i += 1;
                    done.store(i, Ordering::Release);
                    offset = (offset + size) % DISK_BYTES;
                    Ok(())
                })
            };
            let result = run().map_err(|e| e.to_string());
            // Never leave the driver waiting.
            done.store(u64::MAX, Ordering::Release);
            let _ = completion.write(1);
            result
        });
        for i in 1..=iters as u64 {
            // The guest's own work between requests, on the vCPU's CPU.
            let notify_at = Instant::now() + gap;
            while Instant::now() < notify_at {
                std::hint::spin_loop();
            }
            queue.write(1)?;
            if interrupt == Interrupt::Sleeping {
                completion.read()?;
            } else {
                while done.load(Ordering::Acquire) < i {
                    std::hint::spin_loop();
                }
            }
            if done.load(Ordering::Acquire) == u64::MAX {
                break;
            }
        }
        match device.join() {
            Ok(r) => r.map_err(Into::into),
            Err(_) => Err("the device thread panicked".into()),
        }
    })
}

// ---- the benchmark -------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Floor {
    Syscalls,
    Device(Interrupt),
    /// The KVM_IRQ_LINE device loop with [`FLOOR_GAP`] between requests, as the guest
    /// spaces them: the device thread sleeps that long before each wake-up.
    Spaced,
}

const FLOORS: [Floor; 5] = [
    Floor::Syscalls,
    Floor::Device(Interrupt::Sleeping),
    Floor::Device(Interrupt::Irqfd),
    Floor::Device(Interrupt::IrqLine),
    Floor::Spaced,
];

impl Floor {
    fn name(self) -> &'static str {
        match self {
            Floor::Syscalls => "floor: syscalls",
            Floor::Device(Interrupt::Sleeping) => "floor: device loop, sleeping",
            Floor::Device(Interrupt::Irqfd) => "floor: device loop, irqfd",
            Floor::Device(Interrupt::IrqLine) => "floor: device loop, KVM_IRQ_LINE",
            Floor::Spaced => "floor: the same, 0.5 ms apart",
        }
    }

    fn measure(self, disk: &File, vm: &FloorVm, size: u64, iters: usize) -> Result<FloorSample> {
        match self {
            Floor::Syscalls => floor_syscalls(disk, size, iters),
            Floor::Device(interrupt) => {
                floor_device_loop(disk, vm, interrupt, Duration::ZERO, size, iters)
            }
            Floor::Spaced => {
                floor_device_loop(disk, vm, Interrupt::IrqLine, FLOOR_GAP, size, iters)
            }
        }
    }
}

/// Everything measured for one size.
#[derive(Default)]
struct SizeResults {
    /// Per variant of `VARIANTS`.
    runs: [Vec<RunSample>; 3],
    /// Per floor of `FLOORS`.
    floors: [Vec<FloorSample>; 5],
}

fn bench() -> Result<()> {
    let part = std::env::var("KILN_BENCH_BLK").unwrap_or_default();
    if part != "depth" {
        bench_qd1()?;
    }
    if part != "qd1" {
        depth::bench(&Scratch::new("block-depth")?)?;
    }
    Ok(())
}

fn bench_qd1() -> Result<()> {
    let runs = env_usize("KILN_BENCH_BLK_RUNS", 11);
    let n = env_usize("KILN_BENCH_BLK_N", 500) as u64;
    let floor_iters = env_usize("KILN_BENCH_BLK_FLOOR_ITERS", 2000);
    let started = Instant::now();
    let scratch = Scratch::new("block")?;
    scratch.make_disk()?;
    let disk = File::open(scratch.disk())?;
    let stderr = scratch.path("stderr");
    let vm = FloorVm::new()?;
    let tsc_khz = match vm.tsc_khz {
        0 => host_tsc_khz(),
        k => f64::from(k),
    };
    let configs = SIZES
        .iter()
        .map(|&size| {
            Ok((
                scratch.config(n, size, false)?,
                scratch.config(n, size, true)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;

    println!("kiln block benchmark (issue 3)");
    println!("   kiln:  {KILN}");
    println!(
        "   guest: {} kiln.run=blk-bench:{n}:<size>",
        guest_elf().display()
    );
    println!(
        "   drive: {} ({} MiB, page cache), read-only, 1 vCPU, {MEM_MIB} MiB; guest TSC \
         {tsc_khz:.0} kHz",
        scratch.disk().display(),
        DISK_BYTES >> 20
    );

    // Warm-up: page cache, KVM, CPU frequency.
    let warm_n = n.min(50);
    for &size in &SIZES {
        let config = (
            scratch.config(warm_n, size, false)?,
            scratch.config(warm_n, size, true)?,
        );
        for v in VARIANTS.into_iter().filter(|v| measured(*v)) {
            kiln_run(v, &config, warm_n, size, &stderr)?;
        }
        for f in FLOORS {
            f.measure(&disk, &vm, size, floor_iters)?;
        }
    }

    let mut results: Vec<SizeResults> = SIZES.iter().map(|_| SizeResults::default()).collect();
    // Each round runs every (size, variant) and every (size, floor) once, in a rotating order.
    let per_size = VARIANTS.len() + FLOORS.len();
    let steps = SIZES.len() * per_size;
    for round in 0..runs {
        for k in 0..steps {
            let step = (round + k) % steps;
            let (si, what) = (step / per_size, step % per_size);
            let size = SIZES[si];
            let r = &mut results[si];
            if what < VARIANTS.len() {
                let v = VARIANTS[what];
                if !measured(v) {
                    continue;
                }
                r.runs[what].push(kiln_run(v, &configs[si], n, size, &stderr)?);
            } else {
                let f = what - VARIANTS.len();
                r.floors[f].push(FLOORS[f].measure(&disk, &vm, size, floor_iters)?);
            }
        }
    }

    for (si, &size) in SIZES.iter().enumerate() {
        print_size(size, n, runs, floor_iters, tsc_khz, &results[si]);
    }
    println!();
    println!(
        "Notes: main = kiln's main thread, the whole device path (epoll_wait, eventfd read, \
         preadv into guest memory, irqfd write, queue code); vCPU = kiln_vcpu0, mostly the host \
         kernel emulating the guest here, not the device path. On this machine a wake-up on the \
         other (idle) CPU costs the woken thread far more CPU than one on the same CPU, so \
         per-request CPU depends on where the scheduler places the woken thread: compare within \
         a round (per-round ratios)."
    );
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

/// CPU µs per request of a delta.
fn per_req(ns: u64, n: u64) -> f64 {
    ns as f64 / n.max(1) as f64 / 1e3
}

fn print_size(size: u64, n: u64, runs: usize, floor_iters: usize, tsc_khz: f64, r: &SizeResults) {
    println!();
    println!(
        "== {} KiB reads: n={n} per run, queue depth 1, {runs} runs per variant; cells: median \
         [min-max]",
        size / 1024
    );
    println!(
        "{:<30} {:>20} {:>20} {:>22} {:>22} {:>22}",
        "variant", "requests/s", "MB/s", "main µs/req", "vCPU µs/req", "all threads µs/req"
    );
    let mut main_medians = [f64::NAN; 3];
    for (vi, v) in VARIANTS.iter().enumerate() {
        let s = &r.runs[vi];
        if s.is_empty() {
            println!("{:<30} baseline absent", v.name());
            continue;
        }
        let col = |f: &dyn Fn(&RunSample) -> f64| stats(&s.iter().map(f).collect::<Vec<_>>());
        let secs = |x: &RunSample| x.tsc as f64 / (tsc_khz * 1e3);
        let main = col(&|x| per_req(x.window.main, x.n));
        let minus_idle = |w: u64, i: u64, n: u64| (w as f64 - i as f64) / n as f64 / 1e3;
        main_medians[vi] = main.median;
        println!(
            "{:<30} {:>20} {:>20} {:>22} {:>22} {:>22}",
            v.name(),
            cell(col(&|x| x.n as f64 / secs(x)), 0),
            cell(col(&|x| x.bytes as f64 / secs(x) / 1e6), 1),
            cell(main, 2),
            cell(col(&|x| per_req(x.window.vcpu, x.n)), 1),
            cell(col(&|x| per_req(x.window.total(), x.n)), 1),
        );
        println!(
            "{:<30} {:>20} {:>20} {:>22} {:>22} {:>22}",
            "   minus the idle window",
            "",
            "",
            cell(col(&|x| minus_idle(x.window.main, x.idle.main, x.n)), 2),
            cell(col(&|x| minus_idle(x.window.vcpu, x.idle.vcpu, x.n)), 1),
            cell(
                col(&|x| minus_idle(x.window.total(), x.idle.total(), x.n)),
                1
            ),
        );
        println!(
            "   main thread switched in {} times per request; idle window (100 ms + one line): \
             main {:.0} µs, vCPU {:.0} µs, other threads {:.0} µs; other threads in the window \
             {:.0} µs; host wall begin->end {} ms",
            cell(col(&|x| x.window.main_slices as f64 / x.n as f64), 2),
            col(&|x| x.idle.main as f64 / 1e3).median,
            col(&|x| x.idle.vcpu as f64 / 1e3).median,
            col(&|x| x.idle.other as f64 / 1e3).median,
            col(&|x| x.window.other as f64 / 1e3).median,
            cell(col(&|x| x.wall.as_secs_f64() * 1e3), 0),
        );
    }
    let floors: Vec<Stats> = r
        .floors
        .iter()
        .map(|v| stats(&v.iter().map(|f| f.ns / 1e3).collect::<Vec<_>>()))
        .collect();
    for (fi, f) in FLOORS.iter().enumerate() {
        let switches = stats(&r.floors[fi].iter().map(|f| f.switches).collect::<Vec<_>>());
        println!(
            "{:<30} {:>20} {:>20} {:>22}   switched in {:.2} times per iteration",
            f.name(),
            "",
            "",
            cell(floors[fi], 2),
            switches.median
        );
    }
    println!(
        "   (floors: {floor_iters} iterations per measurement; CPU of the one thread doing the \
         device's work. syscalls = pread {size} B + eventfd read + eventfd write, one thread. \
         device loop = the same woken from epoll_wait by a second thread standing in for the \
         vCPU's ioeventfd; sleeping: that thread sleeps in read(2) on the eventfd the device \
         writes; irqfd: it spins, the device writes a real KVM irqfd (IOAPIC pin, as kiln); \
         KVM_IRQ_LINE: it spins, the device raises and lowers the pin with two ioctls; 0.5 ms \
         apart: the same, the stand-in spinning 0.5 ms before each request, about the guest's \
         own time between requests here, so the device thread's CPU idles in between as in \
         a VM)"
    );

    let kiln = main_medians[0];
    for (fi, f) in FLOORS.iter().enumerate() {
        // Per-round ratios: run i of every variant and floor i come from the same round.
        let paired = stats(
            &r.runs[0]
                .iter()
                .zip(&r.floors[fi])
                .map(|(x, f)| per_req(x.window.main, x.n) / (f.ns / 1e3))
                .collect::<Vec<_>>(),
        );
        println!(
            "kiln main thread / {:<29} {}  (per-round {}; kiln - floor {:+.2} µs/req)",
            f.name(),
            ratio(kiln, floors[fi].median),
            cell(paired, 2),
            kiln - floors[fi].median
        );
    }
    let paired = stats(
        &r.runs[0]
            .iter()
            .zip(&r.runs[1])
            .map(|(a, b)| per_req(a.window.main, a.n) / per_req(b.window.main, b.n).max(1e-3))
            .collect::<Vec<_>>(),
    );
    println!(
        "kiln / kiln --no-seccomp (main thread)              {}  (per-round {}; seccomp costs \
         {:+.2} µs/req)",
        ratio(kiln, main_medians[1]),
        cell(paired, 2),
        kiln - main_medians[1]
    );
    let fc = &r.runs[2];
    if fc.is_empty() {
        println!("kiln / firecracker 1.12.1: baseline absent");
        return;
    }
    // Per-round: kiln's run i and Firecracker's run i come from the same round.
    let paired = |f: &dyn Fn(&RunSample) -> f64| {
        stats(
            &r.runs[0]
                .iter()
                .zip(fc)
                .map(|(a, b)| f(a) / f(b).max(1e-3))
                .collect::<Vec<_>>(),
        )
    };
    let main = |x: &RunSample| per_req(x.window.main, x.n);
    let all = |x: &RunSample| per_req(x.window.total(), x.n);
    let fc_all = stats(&fc.iter().map(all).collect::<Vec<_>>()).median;
    let kiln_all = stats(&r.runs[0].iter().map(all).collect::<Vec<_>>()).median;
    let ratio_main = kiln / main_medians[2];
    println!(
        "kiln / firecracker 1.12.1, device thread (main) CPU per read: {} (per-round {}; goal <= \
         {GOAL_RATIO}: {}); all threads: {} (per-round {})",
        ratio(kiln, main_medians[2]),
        cell(paired(&main), 2),
        if ratio_main <= GOAL_RATIO {
            "met"
        } else {
            "not met"
        },
        ratio(kiln_all, fc_all),
        cell(paired(&all), 2),
    );
    println!(
        "firecracker device thread / floor: device loop, irqfd {}",
        ratio(main_medians[2], floors[2].median)
    );
}
