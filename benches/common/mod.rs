//! Helpers shared by kiln's benchmarks (`mod common;` in each): the /dev/kvm check and
//! `main`, run counts from the environment, a scratch directory, per-thread CPU time from
//! /proc, stopping kiln and following the test guest's output line by line, the irqfd floor
//! VM, wait4, and the "median [min-max]" statistics every table prints.
// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::error::Error;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use vmm_sys_util::eventfd::EventFd;

/// Every benchmark's error type: anything, with a message.
pub type Result<T> = std::result::Result<T, Box<dyn Error>>;

/// The kiln binary built with the benchmark.
pub const KILN: &str = env!("CARGO_BIN_EXE_kiln");
/// The GSI of the floor VM's irqfd (kiln's first virtio device uses GSI 5).
pub const FLOOR_GSI: u32 = 5;

/// The test guest ELF (tests/guest), built by build.rs.
pub fn guest_elf() -> PathBuf {
    Path::new(env!("KILN_TEST_GUEST_DIR")).join("kiln-guest.elf")
}

// ---- main ----------------------------------------------------------------------------------

/// A benchmark's `main`: checks that /dev/kvm opens, then runs `bench`. Either failing ends
/// the process with status 1 and the error on stderr, prefixed with `<name> bench`. `does`
/// says why the benchmark needs root ("boots VMs").
pub fn run(name: &str, does: &str, bench: impl FnOnce() -> Result<()>) {
    if let Err(e) = check_kvm(name, does) {
        eprintln!("{name} bench: {e}");
        std::process::exit(1);
    }
    if let Err(e) = bench() {
        eprintln!("{name} bench: error: {e}");
        std::process::exit(1);
    }
}

/// Fails, saying how to run the benchmark `name`, unless /dev/kvm opens read-write.
fn check_kvm(name: &str, does: &str) -> Result<()> {
    fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .map(drop)
        .map_err(|e| {
            format!(
                "cannot open /dev/kvm: {e}. This benchmark {does}: run it as root on a host \
                 with KVM (`sudo cargo bench --bench {name}`)"
            )
            .into()
        })
}

/// The positive integer in the environment variable `name`, or `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(default)
}

// ---- scratch files -------------------------------------------------------------------------

/// The files a benchmark writes (kiln's config files, drive images, sockets, the children's
/// stderr), in `kiln-bench-<name>-<pid>` under the temp dir, removed on drop.
pub struct Scratch {
    dir: PathBuf,
}

impl Scratch {
    /// Creates the directory of benchmark `name`.
    pub fn new(name: &str) -> Result<Scratch> {
        let dir = std::env::temp_dir().join(format!("kiln-bench-{name}-{}", std::process::id()));
        fs::create_dir_all(&dir)?;
        Ok(Scratch { dir })
    }

    /// The file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.dir);
    }
}

// ---- per-thread CPU time -------------------------------------------------------------------

/// A kiln thread's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread (the event loop, where the devices run).
    Main,
    /// The API thread, `kiln_api`.
    Api,
    /// A vCPU thread, `kiln_vcpu<N>`.
    Vcpu,
    /// Anything else.
    Other,
}

/// One thread's schedstat: CPU nanoseconds and the number of times it was switched in.
#[derive(Clone, Copy, Debug)]
pub struct Sched {
    pub kind: Kind,
    pub ns: u64,
    pub slices: u64,
}

/// The schedstat of each thread of a process, by tid.
pub type ThreadCpu = BTreeMap<u32, Sched>;

/// Reads /proc/<pid>/task/*/schedstat (ns on the CPU, ns waiting, times switched in). The
/// main thread is the one whose tid is the pid; the API thread is named `kiln_api`, vCPU
/// threads `kiln_vcpu<N>`.
pub fn thread_cpu(pid: u32) -> Result<ThreadCpu> {
    let mut out = ThreadCpu::new();
    for entry in fs::read_dir(format!("/proc/{pid}/task"))? {
        let entry = entry?;
        let Some(tid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        // A thread may end between the listing and the reads.
        let (Ok(comm), Ok(stat)) = (
            fs::read_to_string(entry.path().join("comm")),
            fs::read_to_string(entry.path().join("schedstat")),
        ) else {
            continue;
        };
        let fields: Vec<u64> = stat
            .split_whitespace()
            .filter_map(|v| v.parse().ok())
            .collect();
        let [ns, _, slices] = fields[..] else {
            return Err(format!("bad schedstat {stat:?}").into());
        };
        let comm = comm.trim();
        let kind = if tid == pid {
            Kind::Main
        } else if comm == "kiln_api" {
            Kind::Api
        } else if comm.starts_with("kiln_vcpu") {
            Kind::Vcpu
        } else {
            Kind::Other
        };
        out.insert(tid, Sched { kind, ns, slices });
    }
    Ok(out)
}

/// CPU nanoseconds spent between two samples, by kind of thread (the API thread counts as
/// other).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    pub main: u64,
    pub vcpu: u64,
    pub other: u64,
    /// Times the main thread was switched in.
    pub main_slices: u64,
}

impl CpuDelta {
    /// What each kind of thread spent from `before` to `after`.
    pub fn between(before: &ThreadCpu, after: &ThreadCpu) -> CpuDelta {
        let mut d = CpuDelta::default();
        for (tid, now) in after {
            let then = before.get(tid);
            let spent = now.ns.saturating_sub(then.map_or(0, |b| b.ns));
            match now.kind {
                Kind::Main => {
                    d.main += spent;
                    d.main_slices += now.slices.saturating_sub(then.map_or(0, |b| b.slices));
                }
                Kind::Vcpu => d.vcpu += spent,
                Kind::Api | Kind::Other => d.other += spent,
            }
        }
        d
    }

    /// All threads.
    pub fn total(&self) -> u64 {
        self.main + self.vcpu + self.other
    }
}

/// The CPU time of this thread (CLOCK_THREAD_CPUTIME_ID), in nanoseconds.
pub fn this_thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

// ---- child processes -----------------------------------------------------------------------

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: kill(2) on our own child, not yet reaped, so the pid is still ours.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Stops `child` (SIGTERM, then SIGKILL after 5 s) and reaps it.
pub fn stop(child: &mut Child) -> Result<ExitStatus> {
    signal(child, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if Instant::now() > deadline {
            child.kill()?;
            return Ok(child.wait()?);
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `pid` and returns its wait status and resource usage.
pub fn wait4(pid: u32) -> Result<(i32, libc::rusage)> {
    let pid = libc::pid_t::try_from(pid)?;
    let mut status = 0;
    // SAFETY: rusage is plain integers; all zeroes is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    loop {
        // SAFETY: `status` and `usage` are valid, writable and live for the call.
        let ret = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
        if ret == pid {
            return Ok((status, usage));
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(format!("wait4({pid}): {err}").into());
        }
    }
}

/// A rusage time as a Duration.
pub fn timeval(tv: libc::timeval) -> Duration {
    let secs = u64::try_from(tv.tv_sec).unwrap_or(0);
    let micros = u32::try_from(tv.tv_usec).unwrap_or(0);
    Duration::from_secs(secs) + Duration::from_micros(u64::from(micros))
}

// ---- memory of a process -------------------------------------------------------------------

/// Resident memory of a VMM process, in KiB.
#[derive(Clone, Copy, Debug, Default)]
pub struct MemSample {
    /// VmHWM: peak RSS.
    pub hwm: u64,
    /// VmRSS now.
    pub rss: u64,
    /// Rss of the guest RAM mapping: guest memory actually touched (0 without a VM).
    pub guest: u64,
    /// Anonymous (private, per-process) memory outside the guest RAM: heap, stacks,
    /// thread arenas, written data pages of the executable.
    pub anon: u64,
    /// File pages (the executable's text and read-only data): shared with the page cache,
    /// so every VM process on the host shares them.
    pub file: u64,
    /// Everything else: the kvm-vcpu run page, vdso.
    pub other: u64,
    /// Size of another mapping the kernel merged with the guest RAM's.
    pub merged: u64,
}

impl MemSample {
    /// VmHWM and VmRSS of `status` (the text of /proc/<pid>/status), the rest zero.
    pub fn from_status(status: &str) -> MemSample {
        let mut m = MemSample::default();
        for line in status.lines() {
            if let Some(v) = kib_field(line, "VmHWM:") {
                m.hwm = v;
            } else if let Some(v) = kib_field(line, "VmRSS:") {
                m.rss = v;
            }
        }
        m
    }

    /// Counts `map`, a mapping outside the guest RAM: its anonymous pages as private anon,
    /// the rest of its Rss as file pages (a mapped file) or other.
    pub fn add_outside_guest(&mut self, map: &Mapping) {
        self.anon += map.anon;
        let rest = map.rss.saturating_sub(map.anon);
        if map.name.starts_with('/') {
            self.file += rest;
        } else {
            self.other += rest;
        }
    }

    /// Peak RSS outside the guest RAM.
    pub fn overhead_peak(&self) -> u64 {
        self.hwm.saturating_sub(self.guest)
    }

    /// RSS outside the guest RAM now.
    pub fn overhead_now(&self) -> u64 {
        self.rss.saturating_sub(self.guest)
    }
}

/// One mapping of /proc/<pid>/smaps; sizes in KiB.
#[derive(Debug, Default)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub perms: String,
    /// The mapped file or `[name]`; empty for anonymous memory.
    pub name: String,
    pub size: u64,
    pub rss: u64,
    pub anon: u64,
}

/// The mappings of `smaps` (the text of /proc/<pid>/smaps), in address order.
pub fn parse_smaps(smaps: &str) -> Vec<Mapping> {
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut fields = line.split_whitespace();
        let first = fields.next().unwrap_or("");
        let range = first.split_once('-').and_then(|(a, b)| {
            Some((
                u64::from_str_radix(a, 16).ok()?,
                u64::from_str_radix(b, 16).ok()?,
            ))
        });
        if let Some((start, end)) = range {
            let perms = fields.next().unwrap_or("").to_string();
            let name = fields.nth(3).unwrap_or("").to_string();
            maps.push(Mapping {
                start,
                end,
                perms,
                name,
                ..Mapping::default()
            });
        } else if let Some(cur) = maps.last_mut() {
            if let Some(v) = kib_field(line, "Size:") {
                cur.size = v;
            } else if let Some(v) = kib_field(line, "Rss:") {
                cur.rss = v;
            } else if let Some(v) = kib_field(line, "Anonymous:") {
                cur.anon = v;
            }
        }
    }
    maps
}

/// The value of a `Name:   1234 kB` line of /proc/<pid>/status or smaps, in KiB.
fn kib_field(line: &str, name: &str) -> Option<u64> {
    line.strip_prefix(name)?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()
}

// ---- the guest's output --------------------------------------------------------------------

/// What the reader thread sends: a guest line, the time it came and, for the marker lines,
/// the CPU sample taken right then.
pub struct Line {
    pub text: String,
    pub at: Instant,
    pub cpu: Option<ThreadCpu>,
}

/// The reader thread's lines, or why it stopped.
pub type Lines = mpsc::Receiver<std::result::Result<Line, String>>;

/// Reads the child's stdout line by line on a thread; samples the CPU of its threads as soon
/// as a marker line of the bench scenario `scenario` arrives (`info <scenario> begin`,
/// `bench <scenario> end`, `ok <scenario>`: the guest idles 100 ms after each).
pub fn spawn_reader(child: &mut Child, scenario: &str) -> Result<Lines> {
    let pid = child.id();
    let stdout = child.stdout.take().ok_or("no stdout pipe")?;
    let markers = [
        format!("info {scenario} begin"),
        format!("bench {scenario} end"),
        format!("ok {scenario}"),
    ];
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let at = Instant::now();
            let msg = line.map_err(|e| e.to_string()).and_then(|text| {
                let cpu = if markers.iter().any(|m| text.starts_with(m.as_str())) {
                    Some(thread_cpu(pid).map_err(|e| e.to_string())?)
                } else {
                    None
                };
                Ok(Line { text, at, cpu })
            });
            if tx.send(msg).is_err() {
                return;
            }
        }
    });
    Ok(rx)
}

/// The next line from the reader, appended to `output`. An error when none comes within
/// `timeout`, when kiln ends, or when the guest reports a failure (a `fail ` line).
pub fn next_line(rx: &Lines, timeout: Duration, output: &mut String) -> Result<Line> {
    let line = match rx.recv_timeout(timeout) {
        Ok(line) => line?,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            return Err(format!("no output for {timeout:?}:\n{output}").into());
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => {
            return Err(format!("kiln ended early:\n{output}").into());
        }
    };
    output.push_str(&line.text);
    output.push('\n');
    if line.text.starts_with("fail ") {
        return Err(format!("the guest failed:\n{output}").into());
    }
    Ok(line)
}

/// The value of the `name=<u64>` field of a guest line.
pub fn field(line: &str, name: &str) -> Option<u64> {
    line.split_whitespace()
        .find_map(|f| f.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

// ---- the floor VM --------------------------------------------------------------------------

/// A VM with the in-kernel irqchip and one vCPU (never run), and an eventfd registered as its
/// irqfd on an IOAPIC pin: what kiln's devices write to interrupt the guest.
pub struct FloorVm {
    pub vm: kvm_ioctls::VmFd,
    // Kept alive: the interrupts go to its local APIC.
    _vcpu: kvm_ioctls::VcpuFd,
    pub irqfd: EventFd,
    /// The vCPU's TSC frequency (KVM_GET_TSC_KHZ), 0 if KVM did not say.
    pub tsc_khz: u32,
}

impl FloorVm {
    /// Creates the VM, its vCPU and the irqfd on [`FLOOR_GSI`].
    pub fn new() -> Result<FloorVm> {
        let kvm = Kvm::new()?;
        let vm = kvm.create_vm()?;
        vm.create_irq_chip()?;
        let vcpu = vm.create_vcpu(0)?;
        let tsc_khz = vcpu.get_tsc_khz().unwrap_or(0);
        let irqfd = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&irqfd, FLOOR_GSI)?;
        Ok(FloorVm {
            vm,
            _vcpu: vcpu,
            irqfd,
            tsc_khz,
        })
    }
}

/// The host TSC frequency measured against CLOCK_MONOTONIC over 100 ms, in kHz.
pub fn host_tsc_khz() -> f64 {
    let t0 = Instant::now();
    // SAFETY: rdtsc reads a counter; it has no memory effects.
    let c0 = unsafe { core::arch::x86_64::_rdtsc() };
    std::thread::sleep(Duration::from_millis(100));
    // SAFETY: as above.
    let c1 = unsafe { core::arch::x86_64::_rdtsc() };
    (c1.wrapping_sub(c0)) as f64 / t0.elapsed().as_secs_f64() / 1e3
}

// ---- statistics ----------------------------------------------------------------------------

/// The median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The statistics of `values` (NaN when there are none).
pub fn stats(values: &[f64]) -> Stats {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Stats {
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// The statistics of `f` over `samples`.
pub fn col<T>(samples: &[T], f: impl Fn(&T) -> f64) -> Stats {
    stats(&samples.iter().map(f).collect::<Vec<_>>())
}

/// "median [min-max]" with `prec` decimals.
pub fn cell(s: Stats, prec: usize) -> String {
    format!(
        "{:.prec$} [{:.prec$}-{:.prec$}]",
        s.median,
        s.min,
        s.max,
        prec = prec
    )
}

/// "a/b" as "1.23x", or "n/a" unless `b` is positive.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".to_string()
    }
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
