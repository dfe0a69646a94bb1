//! kiln-specific helpers of the benchmarks (`mod common;` in each): `main` with the
//! /dev/kvm check, run counts from the environment, a scratch directory, kiln's threads by
//! role with their CPU time, stopping kiln and following the test guest's output line by
//! line, the irqfd floor VM and wait4. The generic parts (temporary directories, the KVM
//! check, line readers, /proc sampling, statistics) are testkit's, re-exported here.
// Each benchmark uses only part of this module.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::error::Error;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use kvm_ioctls::Kvm;
use testkit::{LineReader, TempDir};
use vmm_sys_util::eventfd::EventFd;

// Each user takes part of it.
#[allow(unused_imports)]
pub use testkit::procfs::{
    Mapping, MemSample, parse_smaps, read_memory, this_thread_cpu_ns, this_thread_switches,
};
// Each user takes part of it.
#[allow(unused_imports)]
pub use testkit::stats::{Stats, cell, col, ms, ratio, stats};

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
    testkit::check_kvm().map_err(|e| {
        format!(
            "{e}. This benchmark {does}: run it as root on a host with KVM \
             (`sudo cargo bench --bench {name}`)"
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
/// stderr), in a temporary directory removed on drop.
pub struct Scratch(TempDir);

impl Scratch {
    /// Creates the directory of benchmark `name`.
    pub fn new(name: &str) -> Result<Scratch> {
        Ok(Scratch(TempDir::try_new(&format!("bench-{name}"))?))
    }

    /// The file `name` in the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

// ---- per-thread CPU time -------------------------------------------------------------------

/// A kiln thread's role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// The main thread (the event loop, where the devices run).
    Main,
    /// The API thread, `kiln_api` (Firecracker: `fc_api`).
    Api,
    /// A vCPU thread, `kiln_vcpu<N>` (Firecracker: `fc_vcpu <N>`).
    Vcpu,
    /// One of the kernel's io_uring workers (`iou-wrk-<tid>`): an async drive's I/O.
    IoWorker,
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

/// The schedstat of every thread of VMM process `pid` (kiln or Firecracker), by role: the
/// main thread (both run their event loop and devices there) is the one whose tid is the
/// pid; the API thread is named `kiln_api` or `fc_api`, vCPU threads `kiln_vcpu<N>` or
/// `fc_vcpu <N>`.
pub fn thread_cpu(pid: u32) -> Result<ThreadCpu> {
    let mut out = ThreadCpu::new();
    for t in testkit::procfs::threads(pid)? {
        let kind = if t.tid == pid {
            Kind::Main
        } else if t.comm == "kiln_api" || t.comm == "fc_api" {
            Kind::Api
        } else if t.comm.starts_with("kiln_vcpu") || t.comm.starts_with("fc_vcpu") {
            Kind::Vcpu
        } else if t.comm.starts_with("iou-wrk") {
            Kind::IoWorker
        } else {
            Kind::Other
        };
        out.insert(
            t.tid,
            Sched {
                kind,
                ns: t.ns,
                slices: t.slices,
            },
        );
    }
    Ok(out)
}

/// CPU nanoseconds spent between two samples, by kind of thread (the API thread counts as
/// other).
#[derive(Clone, Copy, Debug, Default)]
pub struct CpuDelta {
    pub main: u64,
    pub vcpu: u64,
    /// The kernel's io_uring workers (part of an async drive's device path).
    pub io_workers: u64,
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
                Kind::IoWorker => d.io_workers += spent,
                Kind::Api | Kind::Other => d.other += spent,
            }
        }
        d
    }

    /// All threads.
    pub fn total(&self) -> u64 {
        self.main + self.vcpu + self.io_workers + self.other
    }
}

// ---- child processes -----------------------------------------------------------------------

/// Sends `sig` to `child` (not yet reaped, so the pid is still its).
pub fn signal(child: &Child, sig: libc::c_int) {
    let _ = testkit::signal(child.id(), sig);
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

// ---- the guest's output --------------------------------------------------------------------

/// A guest line, the time it came and, for the marker lines, the CPU sample taken right then.
pub struct Line {
    pub text: String,
    pub at: Instant,
    pub cpu: Option<ThreadCpu>,
}

/// The guest's lines, each with the CPU sample (or why it failed) of a marker line.
pub type Lines = LineReader<Option<std::result::Result<ThreadCpu, String>>>;

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
    Ok(LineReader::spawn_with(stdout, move |text| {
        markers
            .iter()
            .any(|m| text.starts_with(m.as_str()))
            .then(|| thread_cpu(pid).map_err(|e| e.to_string()))
    }))
}

/// The next line from the reader, appended to `output`. An error when none comes within
/// `timeout`, when kiln ends, or when the guest reports a failure (a `fail ` line).
pub fn next_line(rx: &Lines, timeout: Duration, output: &mut String) -> Result<Line> {
    let line = match rx.recv_timeout(timeout) {
        Ok(line) => Line {
            cpu: line.extra.transpose()?,
            text: line.text,
            at: line.at,
        },
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

/// The GSI a floor raises with KVM_IRQ_LINE ([`FloorVm::pulse`]), as kiln raises its
/// devices' lines.
pub const FLOOR_IRQ_LINE_GSI: u32 = 6;

impl FloorVm {
    /// Raises [`FLOOR_IRQ_LINE_GSI`] with KVM_IRQ_LINE, up then down: kiln's interrupt.
    pub fn pulse(&self) -> Result<()> {
        self.vm.set_irq_line(FLOOR_IRQ_LINE_GSI, true)?;
        self.vm.set_irq_line(FLOOR_IRQ_LINE_GSI, false)?;
        Ok(())
    }

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

/// Firecracker 1.12.1's binary, the same-run baseline: what `benches/firecracker.sh` prints
/// (it fetches and caches it, or takes `KILN_FIRECRACKER`); `None` when it cannot be had,
/// and the benchmark then says "baseline absent".
pub fn firecracker() -> Option<PathBuf> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/firecracker.sh");
    let out = std::process::Command::new(script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .ok()?;
    let path = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && path.is_file()).then_some(path)
}

/// Firecracker's logger section for a config file: its log lines go to `path` (created
/// empty here) instead of stdout, where the guest's console is, as kiln's go to stderr.
pub fn firecracker_logger(path: &Path) -> Result<String> {
    std::fs::write(path, "")?;
    Ok(format!(
        r#""logger": {{ "log_path": "{}", "level": "Info" }}"#,
        path.display()
    ))
}

/// `text` without Firecracker's own log lines (`<timestamp> [<instance>:<thread>] ...`): the
/// one it writes to stdout before its logger is configured.
pub fn strip_firecracker_log(text: &str) -> String {
    text.split_inclusive('\n')
        .filter(|l| !(l.starts_with("20") && l.contains(" [anonymous-instance:")))
        .collect()
}
