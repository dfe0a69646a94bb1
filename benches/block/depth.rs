//! Queue depth (issue 18): `blk-rand:<n>:4096:<depth>` — 4 KiB reads at random 4 KiB-aligned
//! offsets of a 256 MiB image, `depth` of them in flight — at depths 1, 8 and 32, on the
//! image in the page cache and on a cold one (its pages dropped with
//! `POSIX_FADV_DONTNEED` before each run; no other file's cache is touched), and on a slow
//! disk — the image served by a FUSE file system this bench runs, every read answered
//! `KILN_BENCH_BLK_SLOW_MS` (default 2) ms after it arrives, reads in flight overlapping,
//! as a cold network-backed image behaves (this machine's own disk, caches dropped, answers
//! in a few hundred µs, so "cold" alone shows little) — for kiln `Sync`, kiln `Async` and
//! Firecracker 1.12.1 `Async`, interleaved in one invocation.
//!
//! Reported per (cache, depth, VMM), medians [min-max] over runs: requests/s (guest TSC) and
//! the device path's CPU per request — the VMM's main thread (its event loop) plus the
//! kernel's io_uring workers (`iou-wrk-*`), over the window from the guest's `begin` to its
//! `end` line — then the ratios Async / Sync (requests/s) and kiln Async / Firecracker Async.
//! Also the wall time from spawning kiln to the guest's `begin` line, Sync and Async: the
//! ring is made on the first request, so starting (and restoring) costs nothing more.
//!
//! Environment: `KILN_BENCH_BLK_DEPTH_RUNS` (runs per cell, default 3),
//! `KILN_BENCH_BLK_DEPTH_N` (reads per run, default 400).

use std::fs::{self, File};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::common::{
    CpuDelta, KILN, Result, Scratch, ThreadCpu, cell, env_usize, field, guest_elf, next_line,
    ratio, spawn_reader, stats, stop,
};

const IMAGE_BYTES: u64 = 256 << 20;
const DEPTHS: [u64; 3] = [1, 8, 32];
const READ: u64 = 4096;
const LINE_TIMEOUT: Duration = Duration::from_secs(60);
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    KilnSync,
    KilnAsync,
    FirecrackerAsync,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::KilnSync => "kiln Sync",
            Vmm::KilnAsync => "kiln Async",
            Vmm::FirecrackerAsync => "firecracker 1.12.1 Async",
        }
    }

    fn engine(self) -> &'static str {
        match self {
            Vmm::KilnSync => "Sync",
            Vmm::KilnAsync | Vmm::FirecrackerAsync => "Async",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cache {
    Cached,
    Cold,
    Slow,
}

impl Cache {
    fn name(self) -> &'static str {
        match self {
            Cache::Cached => "page-cached",
            Cache::Cold => "cold (pages dropped)",
            Cache::Slow => "slow disk (FUSE)",
        }
    }
}

/// One run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    iops: f64,
    /// Device path CPU (main thread + io_uring workers), µs per request.
    device_us: f64,
    /// Spawn to the guest's begin line.
    start: Duration,
}

fn make_image(path: &Path) -> Result<()> {
    super::write_random_image(path, IMAGE_BYTES, 0x2545_f491_4f6c_dd1d)
}

/// Puts the image in the page cache, or drops its pages from it.
fn set_cache(path: &Path, cache: Cache) -> Result<()> {
    match cache {
        Cache::Cached => {
            let mut f = File::open(path)?;
            std::io::copy(&mut f, &mut std::io::sink())?;
        }
        Cache::Slow => {}
        Cache::Cold => {
            let f = File::open(path)?;
            // SAFETY: fadvise on an fd this function owns; no memory is involved.
            let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            if r != 0 {
                return Err(
                    format!("posix_fadvise: {}", std::io::Error::from_raw_os_error(r)).into(),
                );
            }
        }
    }
    Ok(())
}

fn config(scratch: &Scratch, image: &Path, vmm: Vmm, n: u64, depth: u64) -> Result<PathBuf> {
    let path = scratch.path(&format!("depth-{}-{depth}.json", vmm.engine()));
    let json = format!(
        r#"{{
  "boot-source": {{ "kernel_image_path": "{}",
                    "boot_args": "{BASE_ARGS} kiln.run=blk-rand:{n}:{READ}:{depth},idle" }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 128 }},
  "drives": [{{ "drive_id": "bench", "path_on_host": "{}", "is_root_device": true,
               "is_read_only": true, "io_engine": "{}" }}]
}}"#,
        guest_elf().display(),
        image.display(),
        vmm.engine()
    );
    fs::write(&path, json)?;
    Ok(path)
}

fn one_run(bin: &Path, cfg: &Path, n: u64, tsc_khz: f64) -> Result<Sample> {
    let spawned = Instant::now();
    let mut child = Command::new(bin)
        .arg("--no-api")
        .arg("--config-file")
        .arg(cfg)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let result = spawn_reader(&mut child, "blk-rand").and_then(|rx| {
        let mut output = String::new();
        let mut begin: Option<(Instant, ThreadCpu)> = None;
        loop {
            let line = next_line(&rx, LINE_TIMEOUT, &mut output)?;
            match (line.cpu, line.text.as_str()) {
                (Some(cpu), t) if t.starts_with("info blk-rand begin") => {
                    begin = Some((line.at, cpu));
                }
                (Some(cpu), t) if t.starts_with("bench blk-rand end") => {
                    let (Some((at, c0)), Some(done), Some(tsc)) =
                        (begin.take(), field(t, "n"), field(t, "tsc"))
                    else {
                        return Err(format!("bad output:\n{output}").into());
                    };
                    if done != n {
                        return Err(format!("{done}/{n} reads:\n{output}").into());
                    }
                    let d = CpuDelta::between(&c0, &cpu);
                    let secs = tsc as f64 / (tsc_khz * 1e3);
                    return Ok(Sample {
                        iops: n as f64 / secs,
                        device_us: (d.main + d.io_workers) as f64 / n as f64 / 1e3,
                        start: at - spawned,
                    });
                }
                _ => {}
            }
        }
    });
    stop(&mut child)?;
    result
}

/// The queue-depth benchmark.
pub fn bench(scratch: &Scratch) -> Result<()> {
    let runs = env_usize("KILN_BENCH_BLK_DEPTH_RUNS", 3);
    let n = env_usize("KILN_BENCH_BLK_DEPTH_N", 400) as u64;
    let tsc_khz = crate::common::host_tsc_khz();
    let image = scratch.path("depth.img");
    make_image(&image)?;
    let slow_ms = env_usize("KILN_BENCH_BLK_SLOW_MS", 2) as u64;
    let mountpoint = scratch.path("slow");
    fs::create_dir_all(&mountpoint)?;
    let slow = testkit::fuse::GatedDisk::mount_with_latency(
        &mountpoint,
        fs::read(&image)?,
        Duration::from_millis(slow_ms),
    )?;
    let fc = crate::common::firecracker();
    let mut vmms = vec![Vmm::KilnSync, Vmm::KilnAsync];
    match &fc {
        Some(_) => vmms.push(Vmm::FirecrackerAsync),
        None => {
            println!("baseline absent: Firecracker could not be fetched (benches/firecracker.sh)")
        }
    }
    println!();
    println!(
        "== queue depth (issue 18): {n} random 4 KiB reads per run of a {} MiB image, \
         {runs} runs per cell, interleaved; cells: median [min-max]",
        IMAGE_BYTES >> 20
    );
    println!("slow disk: every read answered {slow_ms} ms after it arrives");
    let caches = [Cache::Cached, Cache::Cold, Cache::Slow];
    let mut samples: Vec<Vec<Sample>> = vec![Vec::new(); caches.len() * DEPTHS.len() * vmms.len()];
    let index = |c: usize, d: usize, v: usize| (c * DEPTHS.len() + d) * vmms.len() + v;
    for _ in 0..runs {
        for (ci, &cache) in caches.iter().enumerate() {
            for (di, &depth) in DEPTHS.iter().enumerate() {
                for (vi, &vmm) in vmms.iter().enumerate() {
                    let bin = match vmm {
                        Vmm::FirecrackerAsync => fc.clone().ok_or("no firecracker")?,
                        _ => PathBuf::from(KILN),
                    };
                    let path = match cache {
                        Cache::Slow => slow.file(),
                        _ => image.clone(),
                    };
                    let cfg = config(scratch, &path, vmm, n, depth)?;
                    set_cache(&path, cache)?;
                    let s = one_run(&bin, &cfg, n, tsc_khz).map_err(|e| {
                        format!("{} depth {depth} {}: {e}", vmm.name(), cache.name())
                    })?;
                    samples[index(ci, di, vi)].push(s);
                }
            }
        }
    }
    println!(
        "{:<22} {:>6} {:<26} {:>24} {:>26}",
        "image", "depth", "VMM", "requests/s", "device CPU µs/req"
    );
    let median = |v: &[Sample], f: fn(&Sample) -> f64| stats(&v.iter().map(f).collect::<Vec<_>>());
    for (ci, &cache) in caches.iter().enumerate() {
        for (di, &depth) in DEPTHS.iter().enumerate() {
            for (vi, &vmm) in vmms.iter().enumerate() {
                let v = &samples[index(ci, di, vi)];
                println!(
                    "{:<22} {:>6} {:<26} {:>24} {:>26}",
                    cache.name(),
                    depth,
                    vmm.name(),
                    cell(median(v, |s| s.iops), 0),
                    cell(median(v, |s| s.device_us), 2)
                );
            }
            let iops = |vi: usize| median(&samples[index(ci, di, vi)], |s| s.iops).median;
            let mut line = format!(
                "{:<22} {:>6}   kiln Async / kiln Sync requests/s {}",
                "",
                "",
                ratio(iops(1), iops(0))
            );
            if vmms.len() > 2 {
                line.push_str(&format!(
                    "; kiln Async / firecracker Async {}",
                    ratio(iops(1), iops(2))
                ));
            }
            println!("{line}");
        }
    }
    let starts = |vi: usize| {
        let all: Vec<f64> = samples
            .iter()
            .enumerate()
            .filter(|(i, _)| i % vmms.len() == vi)
            .flat_map(|(_, v)| v.iter().map(|s| s.start.as_secs_f64() * 1e3))
            .collect();
        stats(&all)
    };
    println!(
        "start-up, spawn to the guest's begin line (ms): kiln Sync {}, kiln Async {}",
        cell(starts(0), 1),
        cell(starts(1), 1)
    );
    Ok(())
}
