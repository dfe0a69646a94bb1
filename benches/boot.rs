//! Boot benchmark (issue 2): `cargo bench --bench boot`, as root, on a host with /dev/kvm.
//!
//! Three measurements, each against baselines run in the same invocation:
//!
//! 1. **Start-up**: wall time from just before the spawn to the guest's first byte on the
//!    child's stdout pipe and to its exit (wait4: the guest's reset ends every variant), the
//!    child's CPU time (user + sys) and ru_maxrss. kiln runs in config-file mode, 1 vCPU,
//!    128 MiB, `kiln.run=hello`. Baselines:
//!    - `firecracker`: Firecracker 1.12.1 (`benches/firecracker.sh` fetches and caches it;
//!      "baseline absent" without it) booting the same guest ELF and command line from a
//!      config file (`--no-api`, its default seccomp filters, its log to a file as kiln's
//!      goes to stderr); the guest finds no devices either way.
//!
//!    and, this binary re-executed with `KILN_BENCH_ROLE` set:
//!    - `floor`: the least any KVM VMM process does: KVM_CREATE_VM, 128 MiB of anonymous
//!      memory, one vCPU in real mode running a blob that writes the guest's three hello
//!      lines to port 0x3f8 and then `out 0x64, 0xfe`; KVM_RUN + exit decode, no irqchip.
//!    - `floor devices`: the same plus what booting Linux needs from KVM whatever the VMM:
//!      the in-kernel irqchip and PIT, KVM_GET_SUPPORTED_CPUID + KVM_SET_CPUID2.
//!    - `libvmm`: the same kiln test guest and command line, booted through kiln's library
//!      (memory, `Vm`, `load_kernel`, `configure_system`, `Vcpu::configure`) but driven by a
//!      minimal single-threaded loop: what kiln's process adds on top of the boot itself.
//!
//!    kiln also runs with `--no-seccomp`, to show its filters' share. Every serial byte is
//!    written (and flushed) to stdout as it comes, as kiln does.
//! 2. **Memory overhead**: the same variants with `kiln.run=idle` (the floors halt): once the
//!    guest idles, /proc/<pid>/smaps gives the guest RAM mapping's Rss (the guest memory
//!    actually touched); VmHWM (peak RSS) minus it is the VMM's overhead.
//! 3. **PIO exit round trip**: `kiln.run=pio-bench:N` (N `out` to the unclaimed port 0x80,
//!    timed by the guest's rdtsc) through kiln's vCPU loop (with and without seccomp),
//!    Firecracker's and `libvmm`'s raw loop, converted to µs with the vCPU's TSC frequency
//!    (KVM_GET_TSC_KHZ).
//! 4. **Start rate**: 50 VMs (`kiln.run=hello`, each to its reset), 4 at a time on this
//!    2-core host, for kiln and Firecracker in turn (the order alternating); VMs per second
//!    = 50 / wall time from the first spawn to the last exit, and the median per-VM spawn →
//!    exit and CPU.
//!
//! Runs are interleaved (the order rotates) so drift affects every variant alike; ratios
//! against Firecracker are of medians of the same run. Medians are reported with min/max. Environment: `KILN_BENCH_RUNS` (start-up runs per variant,
//! default 30), `KILN_BENCH_MEM_RUNS` (default 10), `KILN_BENCH_PIO_RUNS` (default 15),
//! `KILN_BENCH_PIO_N` (exits per PIO run, default 30000), `KILN_BENCH_RATE_RUNS` (start-rate
//! runs per VMM, default 3), `KILN_BENCH_RATE_VMS` (default 50), `KILN_BENCH_RATE_PARALLEL`
//! (default 4), `KILN_BENCH_BOOT_ONLY` (a comma list of `startup`, `memory`, `pio`, `rate`:
//! only those sections).

mod common;

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kvm_bindings::{
    KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY, kvm_pit_config, kvm_regs,
    kvm_userspace_memory_region,
};
use kvm_ioctls::{Cap, Kvm, VcpuExit, VcpuFd};
use linux_loader::cmdline::Cmdline;

use kiln::arch::x86_64::configure_system;
use kiln::arch::x86_64::cpuid::CpuTopology;
use kiln::arch::x86_64::layout::CMDLINE_MAX_SIZE;
use kiln::arch::x86_64::loader::load_kernel;
use kiln::devices::bus::Bus;
use kiln::exit::ExitSignal;
use kiln::vstate::memory::create_guest_memory;
use kiln::vstate::vcpu::Vcpu;
use kiln::vstate::vm::{Vm, open_kvm};

use common::{
    KILN, MemSample, Result, Scratch, cell, env_usize, field, guest_elf, host_tsc_khz, ms, ratio,
    read_memory, signal, stats, timeval, wait4,
};

/// Selects a baseline role when this binary re-executes itself.
const ROLE_ENV: &str = "KILN_BENCH_ROLE";

const MEM_MIB: u64 = 128;
/// Firecracker's kernel command line, plus the scenario.
const BASE_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off";
/// The hello scenario's output; the floor prints exactly the same bytes.
const HELLO_OUTPUT: &str =
    "kiln-guest: start variant=elf\nkiln-guest: hello\nkiln-guest: done ok=0 fail=0\n";
const IDLE_MARKER: &str = "info idle\n";

/// Firecracker's binary (the same-run baseline), when it could be had.
static FIRECRACKER: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();

fn firecracker() -> Option<&'static Path> {
    FIRECRACKER.get_or_init(common::firecracker).as_deref()
}

const PORT_COM1: u16 = 0x3f8;
const PORT_COM1_LCR: u16 = 0x3fb;
const PORT_COM1_LSR: u16 = 0x3fd;
const PORT_I8042_CMD: u16 = 0x64;
const PORT_POST: u16 = 0x80;
const I8042_RESET: u8 = 0xfe;

fn main() {
    match std::env::var(ROLE_ENV).ok().as_deref() {
        None => {}
        Some(role) => {
            let arg = std::env::args().nth(1).unwrap_or_default();
            let result = match role {
                "floor" => floor(
                    arg == "idle",
                    std::env::args().nth(2).as_deref() == Some("devices"),
                ),
                "libvmm" => libvmm(&arg),
                other => Err(format!("unknown role {other:?}").into()),
            };
            if let Err(e) = result {
                eprintln!("boot bench ({role}): {e}");
                std::process::exit(1);
            }
            std::process::exit(0);
        }
    }
    common::run("boot", "boots VMs", bench);
}

// ---- the variants --------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    Floor,
    FloorDevices,
    LibVmm,
    Kiln,
    KilnNoSeccomp,
    Firecracker,
}

const ALL: [Variant; 6] = [
    Variant::Floor,
    Variant::FloorDevices,
    Variant::LibVmm,
    Variant::Kiln,
    Variant::KilnNoSeccomp,
    Variant::Firecracker,
];

/// The variants this run measures: all of them, Firecracker only when it could be had.
fn variants() -> Vec<Variant> {
    ALL.into_iter()
        .filter(|v| *v != Variant::Firecracker || firecracker().is_some())
        .collect()
}

/// What kiln is compared with: Firecracker, the floors, then kiln without its seccomp
/// filters (the filters' share of the cost).
const BASELINES: [Variant; 5] = [
    Variant::Firecracker,
    Variant::Floor,
    Variant::FloorDevices,
    Variant::LibVmm,
    Variant::KilnNoSeccomp,
];

impl Variant {
    fn name(self) -> &'static str {
        match self {
            Variant::Floor => "raw-KVM floor",
            Variant::FloorDevices => "floor + irqchip/PIT/CPUID",
            Variant::LibVmm => "library + minimal loop",
            Variant::Kiln => "kiln",
            Variant::KilnNoSeccomp => "kiln --no-seccomp",
            Variant::Firecracker => "firecracker 1.12.1",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// kiln's config files (the directory also holds the children's stderr).
impl Scratch {
    /// A kiln config file booting the test guest ELF with `scenario`.
    fn kiln_config(&self, scenario: &str) -> Result<PathBuf> {
        let path = self.path(&format!("{scenario}.json"));
        let elf = guest_elf();
        let json = format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{BASE_ARGS} kiln.run={scenario}"
  }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {MEM_MIB} }}
}}
"#,
            elf.display()
        );
        fs::write(&path, json)?;
        Ok(path)
    }

    /// The same for Firecracker: its config needs `drives`, and its log goes to a file.
    fn firecracker_config(&self, scenario: &str) -> Result<PathBuf> {
        let path = self.path(&format!("{scenario}-fc.json"));
        let logger = common::firecracker_logger(&self.path(&format!("{scenario}-fc.log")))?;
        let json = format!(
            r#"{{
  "boot-source": {{
    "kernel_image_path": "{}",
    "boot_args": "{BASE_ARGS} kiln.run={scenario}"
  }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {MEM_MIB} }},
  "drives": [],
  {logger}
}}
"#,
            guest_elf().display()
        );
        fs::write(&path, json)?;
        Ok(path)
    }
}

/// The command that runs `variant` with the scenario `scenario` ("hello", "idle" or
/// "pio-bench:N"); `config` is kiln's config file for it, `fc_config` Firecracker's.
fn command(variant: Variant, scenario: &str, config: &Path, fc_config: &Path) -> Result<Command> {
    let cmd = match variant {
        Variant::Floor | Variant::FloorDevices => {
            let mut c = Command::new(std::env::current_exe()?);
            c.env(ROLE_ENV, "floor").arg(scenario);
            if variant == Variant::FloorDevices {
                c.arg("devices");
            }
            c
        }
        Variant::LibVmm => {
            let mut c = Command::new(std::env::current_exe()?);
            c.env(ROLE_ENV, "libvmm")
                .arg(format!("{BASE_ARGS} kiln.run={scenario}"));
            c
        }
        Variant::Kiln | Variant::KilnNoSeccomp => {
            let mut c = Command::new(KILN);
            c.arg("--no-api").arg("--config-file").arg(config);
            if variant == Variant::KilnNoSeccomp {
                c.arg("--no-seccomp");
            }
            c
        }
        Variant::Firecracker => {
            let mut c = Command::new(firecracker().ok_or("baseline absent")?);
            c.arg("--no-api").arg("--config-file").arg(fc_config);
            c
        }
    };
    Ok(cmd)
}

// ---- running a child -----------------------------------------------------------------------

/// One measured run.
#[derive(Clone, Copy, Debug)]
struct Sample {
    first_byte: Duration,
    exit: Duration,
    user: Duration,
    sys: Duration,
    maxrss_kib: u64,
}

impl Sample {
    fn cpu(&self) -> Duration {
        self.user + self.sys
    }
}

fn describe_status(status: i32) -> String {
    if libc::WIFEXITED(status) {
        format!("exit status {}", libc::WEXITSTATUS(status))
    } else if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("wait status {status:#x}")
    }
}

/// Runs `cmd` to completion, timing the guest's first byte on stdout (the first of
/// `kiln-guest:`, after any line of Firecracker's own log) and the exit. Its stdout, less
/// Firecracker's log lines, must be `expected` and it must exit 0.
fn measure(mut cmd: Command, stderr_path: &Path, expected: &str) -> Result<Sample> {
    let stderr = File::create(stderr_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    let mut output = Vec::with_capacity(256);
    let mut buf = [0u8; 256];

    let start = Instant::now();
    let mut child = cmd.spawn()?;
    let mut pipe = child.stdout.take().ok_or("no stdout pipe")?;
    let mut first_byte = None;
    loop {
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            break;
        }
        let before = output.len();
        output.extend_from_slice(&buf[..n]);
        if first_byte.is_none() && guest_started(&output, before) {
            first_byte = Some(start.elapsed());
        }
    }
    let (status, usage) = wait4(child.id())?;
    let exit = start.elapsed();

    let text = common::strip_firecracker_log(&String::from_utf8_lossy(&output));
    if first_byte.is_none() || status != 0 || text != expected {
        let stderr = fs::read_to_string(stderr_path).unwrap_or_default();
        return Err(format!(
            "{cmd:?}: {}\n--- stdout\n{text}--- stderr\n{stderr}--- expected stdout\n{expected}",
            describe_status(status)
        )
        .into());
    }
    Ok(Sample {
        first_byte: first_byte.unwrap_or_default(),
        exit,
        user: timeval(usage.ru_utime),
        sys: timeval(usage.ru_stime),
        maxrss_kib: u64::try_from(usage.ru_maxrss).unwrap_or(0),
    })
}

/// Whether the bytes from `before` on hold the guest's first byte: a `k` at the start of a
/// line (the guest's lines all begin `kiln-guest:` or a scenario word; Firecracker's log
/// lines with a digit).
fn guest_started(output: &[u8], before: usize) -> bool {
    (before..output.len())
        .any(|i| output[i] != b'2' && (i == 0 || output[i - 1] == b'\n') && output[i] != b'\n')
}

// ---- 1. start-up ---------------------------------------------------------------------------

fn startup(scratch: &Scratch, runs: usize) -> Result<Vec<Vec<Sample>>> {
    let config = scratch.kiln_config("hello")?;
    let fc_config = scratch.firecracker_config("hello")?;
    let stderr = scratch.path("stderr");
    let variants = variants();
    let mut samples: Vec<Vec<Sample>> = vec![Vec::with_capacity(runs); ALL.len()];
    // Warm-ups: page cache, KVM module state, CPU frequency.
    for _ in 0..2 {
        for &v in &variants {
            measure(
                command(v, "hello", &config, &fc_config)?,
                &stderr,
                HELLO_OUTPUT,
            )?;
        }
    }
    for i in 0..runs {
        for k in 0..variants.len() {
            let v = variants[(i + k) % variants.len()];
            let s = measure(
                command(v, "hello", &config, &fc_config)?,
                &stderr,
                HELLO_OUTPUT,
            )?;
            samples[v.index()].push(s);
        }
    }
    Ok(samples)
}

fn print_startup(samples: &[Vec<Sample>], runs: usize) {
    println!();
    println!(
        "== 1. start-up: spawn -> first serial byte / exit; config file, 1 vCPU, {MEM_MIB} MiB, \
         kiln.run=hello; {runs} runs per variant"
    );
    println!("   cells: median [min-max]");
    println!(
        "{:<26} {:>22} {:>22} {:>22} {:>9} {:>9} {:>16}",
        "variant",
        "first byte ms",
        "exit ms",
        "CPU ms (user+sys)",
        "user ms",
        "sys ms",
        "maxrss KiB"
    );
    let mut medians = vec![(f64::NAN, f64::NAN, f64::NAN); ALL.len()];
    for v in variants() {
        let s = &samples[v.index()];
        let first = stats(&s.iter().map(|x| ms(x.first_byte)).collect::<Vec<_>>());
        let exit = stats(&s.iter().map(|x| ms(x.exit)).collect::<Vec<_>>());
        let cpu = stats(&s.iter().map(|x| ms(x.cpu())).collect::<Vec<_>>());
        let user = stats(&s.iter().map(|x| ms(x.user)).collect::<Vec<_>>());
        let sys = stats(&s.iter().map(|x| ms(x.sys)).collect::<Vec<_>>());
        let rss = stats(&s.iter().map(|x| x.maxrss_kib as f64).collect::<Vec<_>>());
        println!(
            "{:<26} {:>22} {:>22} {:>22} {:>9.2} {:>9.2} {:>16}",
            v.name(),
            cell(first, 2),
            cell(exit, 2),
            cell(cpu, 2),
            user.median,
            sys.median,
            cell(rss, 0)
        );
        medians[v.index()] = (first.median, exit.median, cpu.median);
    }
    println!(
        "   (CPU is exact; its user/sys split is tick-sampled by the kernel, only indicative)"
    );
    let kiln = medians[Variant::Kiln.index()];
    for base in BASELINES {
        if samples[base.index()].is_empty() {
            println!("kiln / {:<26} baseline absent", base.name());
            continue;
        }
        let b = medians[base.index()];
        // Round i ran every variant once, back to back: the ratio within a round cancels drift.
        let paired = stats(
            &samples[Variant::Kiln.index()]
                .iter()
                .zip(&samples[base.index()])
                .map(|(k, o)| ms(k.cpu()) / ms(o.cpu()).max(1e-3))
                .collect::<Vec<_>>(),
        );
        println!(
            "kiln / {:<26} first byte {}  exit {}  CPU {} (per-round {})   kiln - it: first \
             byte {:+.2} ms, exit {:+.2} ms, CPU {:+.2} ms",
            base.name(),
            ratio(kiln.0, b.0),
            ratio(kiln.1, b.1),
            ratio(kiln.2, b.2),
            cell(paired, 2),
            kiln.0 - b.0,
            kiln.1 - b.1,
            kiln.2 - b.2,
        );
    }
    println!(
        "   (goals, kiln / Firecracker: CPU exec -> reset <= 0.6, wall exec -> reset <= 0.5; \
         what each VMM spends beyond the library loop, which boots the same guest, is its own \
         cost)"
    );
    let fc = medians[Variant::Firecracker.index()];
    let lib = medians[Variant::LibVmm.index()];
    if !samples[Variant::Firecracker.index()].is_empty() {
        println!(
            "beyond the library loop: kiln exit {:+.2} ms, CPU {:+.2} ms; firecracker exit \
             {:+.2} ms, CPU {:+.2} ms",
            kiln.1 - lib.1,
            kiln.2 - lib.2,
            fc.1 - lib.1,
            fc.2 - lib.2
        );
    }
}

// ---- 2. memory overhead --------------------------------------------------------------------

/// Starts `cmd`, waits for the idle marker, reads its memory, stops it with SIGTERM.
fn measure_idle(mut cmd: Command, stderr_path: &Path) -> Result<MemSample> {
    let stderr = File::create(stderr_path)?;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(stderr));
    let mut child = cmd.spawn()?;
    let mut pipe = child.stdout.take().ok_or("no stdout pipe")?;
    let mut output = Vec::new();
    let mut buf = [0u8; 256];
    let seen = loop {
        let n = pipe.read(&mut buf)?;
        if n == 0 {
            break false;
        }
        output.extend_from_slice(&buf[..n]);
        if String::from_utf8_lossy(&output).contains(IDLE_MARKER) {
            break true;
        }
    };
    let mem: Result<MemSample> = if seen {
        read_memory(child.id(), MEM_MIB * 1024, true).map_err(Into::into)
    } else {
        Err("the child ended before idling".into())
    };
    signal(&child, libc::SIGTERM);
    let _ = pipe.read_to_end(&mut output);
    let (status, _) = wait4(child.id())?;
    mem.map_err(|e| {
        let stderr = fs::read_to_string(stderr_path).unwrap_or_default();
        format!(
            "{cmd:?}: {e} ({})\n--- stdout\n{}--- stderr\n{stderr}",
            describe_status(status),
            String::from_utf8_lossy(&output)
        )
        .into()
    })
}

fn memory(scratch: &Scratch, runs: usize) -> Result<Vec<Vec<MemSample>>> {
    let config = scratch.kiln_config("idle")?;
    let fc_config = scratch.firecracker_config("idle")?;
    let stderr = scratch.path("stderr");
    let variants = variants();
    let mut samples: Vec<Vec<MemSample>> = vec![Vec::with_capacity(runs); ALL.len()];
    for i in 0..runs {
        for k in 0..variants.len() {
            let v = variants[(i + k) % variants.len()];
            let cmd = command(v, "idle", &config, &fc_config)?;
            samples[v.index()].push(measure_idle(cmd, &stderr)?);
        }
    }
    Ok(samples)
}

fn print_memory(samples: &[Vec<MemSample>], runs: usize) {
    println!();
    println!(
        "== 2. memory: idling guest (kiln.run=idle; the floors halt), {MEM_MIB} MiB, {runs} runs \
         per variant; KiB, cells: median [min-max]"
    );
    println!(
        "{:<26} {:>20} {:>10} {:>20} {:>14} | {:>16} {:>8} {:>6}",
        "variant",
        "overhead: peak-guest",
        "rss-guest",
        "peak RSS (VmHWM)",
        "guest touched",
        "private anon",
        "file",
        "other"
    );
    let mut medians = vec![(f64::NAN, f64::NAN); ALL.len()];
    for v in variants() {
        let s = &samples[v.index()];
        let col = |f: &dyn Fn(&MemSample) -> u64| {
            stats(&s.iter().map(|m| f(m) as f64).collect::<Vec<_>>())
        };
        let peak = col(&|m| m.overhead_peak());
        let anon = col(&|m| m.anon);
        println!(
            "{:<26} {:>20} {:>10.0} {:>20} {:>14} | {:>16} {:>8.0} {:>6.0}",
            v.name(),
            cell(peak, 0),
            col(&|m| m.overhead_now()).median,
            cell(col(&|m| m.hwm), 0),
            cell(col(&|m| m.guest), 0),
            cell(anon, 0),
            col(&|m| m.file).median,
            col(&|m| m.other).median,
        );
        medians[v.index()] = (peak.median, anon.median);
    }
    let kiln = medians[Variant::Kiln.index()];
    for base in BASELINES {
        if samples[base.index()].is_empty() {
            println!("kiln / {:<26} baseline absent", base.name());
            continue;
        }
        let b = medians[base.index()];
        println!(
            "kiln / {:<26} overhead {} ({:+.0} KiB), private anon {} ({:+.0} KiB)",
            base.name(),
            ratio(kiln.0, b.0),
            kiln.0 - b.0,
            ratio(kiln.1, b.1),
            kiln.1 - b.1,
        );
    }
    println!(
        "   (breakdown of the RSS outside guest RAM, at idle: private anon = heap, stacks, \
         arenas, written data; file = executable pages, shared through the page cache by \
         every process running the same binary; other = kvm-vcpu run page, vdso. The floors \
         and the library loop are this benchmark's binary. Goal: kiln / Firecracker overhead \
         <= 0.6.)"
    );
}

// ---- 3. PIO exit round trip ----------------------------------------------------------------

/// `bench pio n=N tsc=T` → T.
fn parse_pio(output: &str, n: u64) -> Result<u64> {
    let line = output
        .lines()
        .find(|l| l.starts_with("bench pio "))
        .ok_or_else(|| format!("no `bench pio` line in:\n{output}"))?;
    match (field(line, "n"), field(line, "tsc")) {
        (Some(c), Some(t)) if c == n => Ok(t),
        _ => Err(format!("bad bench line {line:?} (wanted n={n})").into()),
    }
}

fn pio_run(variant: Variant, n: u64, scratch: &Scratch) -> Result<u64> {
    let stderr_path = &scratch.path("stderr");
    let cmdline = format!("{BASE_ARGS} kiln.run=pio-bench:{n}");
    let mut cmd = match variant {
        Variant::Firecracker => {
            let config = scratch.firecracker_config(&format!("pio-bench:{n}"))?;
            command(variant, "", &config, &config)?
        }
        Variant::Kiln | Variant::KilnNoSeccomp => {
            let mut c = Command::new(KILN);
            c.args(["--no-api", "--mem-mib", "128", "--vcpus", "1", "--cmdline"])
                .arg(&cmdline);
            if variant == Variant::KilnNoSeccomp {
                c.arg("--no-seccomp");
            }
            c
        }
        Variant::LibVmm => {
            let mut c = Command::new(std::env::current_exe()?);
            c.env(ROLE_ENV, "libvmm").arg(&cmdline);
            c
        }
        Variant::Floor | Variant::FloorDevices => {
            return Err("the floors run no PIO benchmark".into());
        }
    };
    cmd.stdin(Stdio::null())
        .stderr(Stdio::from(File::create(stderr_path)?));
    let out = cmd.output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("kiln-guest: done ok=0 fail=0") {
        let stderr = fs::read_to_string(stderr_path).unwrap_or_default();
        return Err(format!(
            "{cmd:?}: {}\n--- stdout\n{text}--- stderr\n{stderr}",
            out.status
        )
        .into());
    }
    parse_pio(&common::strip_firecracker_log(&text), n)
}

/// The guest TSC frequency (KVM_GET_TSC_KHZ of a fresh vCPU), in kHz.
fn vcpu_tsc_khz() -> Result<u32> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    let vcpu = vm.create_vcpu(0)?;
    Ok(vcpu.get_tsc_khz()?)
}

struct PioResult {
    n: u64,
    tsc_khz: f64,
    host_tsc_khz: f64,
    /// Guest TSC ticks per run, per variant of `PIO_VARIANTS`.
    ticks: Vec<Vec<u64>>,
}

/// The raw loop first: ratios are against it.
const PIO_VARIANTS: [Variant; 4] = [
    Variant::LibVmm,
    Variant::Kiln,
    Variant::KilnNoSeccomp,
    Variant::Firecracker,
];

fn pio(scratch: &Scratch, runs: usize, n: u64) -> Result<PioResult> {
    let variants: Vec<usize> = (0..PIO_VARIANTS.len())
        .filter(|&j| PIO_VARIANTS[j] != Variant::Firecracker || firecracker().is_some())
        .collect();
    let host = host_tsc_khz();
    let khz = match vcpu_tsc_khz() {
        Ok(k) if k > 0 => f64::from(k),
        _ => host,
    };
    // Warm-up.
    for &j in &variants {
        pio_run(PIO_VARIANTS[j], n.min(1000), scratch)?;
    }
    let mut ticks = vec![Vec::with_capacity(runs); PIO_VARIANTS.len()];
    for i in 0..runs {
        for k in 0..variants.len() {
            let j = variants[(i + k) % variants.len()];
            ticks[j].push(pio_run(PIO_VARIANTS[j], n, scratch)?);
        }
    }
    Ok(PioResult {
        n,
        tsc_khz: khz,
        host_tsc_khz: host,
        ticks,
    })
}

fn print_pio(r: &PioResult, runs: usize) {
    println!();
    println!(
        "== 3. PIO exit round trip: kiln.run=pio-bench:{} (out to unclaimed port 0x80), {runs} runs \
         per variant; guest TSC {:.0} kHz (KVM_GET_TSC_KHZ; host TSC measured {:.0} kHz)",
        r.n, r.tsc_khz, r.host_tsc_khz
    );
    println!(
        "{:<24} {:>26} {:>26}",
        "variant", "µs per exit", "TSC cycles per exit"
    );
    let names = [
        "raw loop (library VM)",
        "kiln vCPU loop",
        "kiln --no-seccomp",
        "firecracker 1.12.1",
    ];
    let mut medians = [f64::NAN; PIO_VARIANTS.len()];
    for (j, name) in names.iter().enumerate() {
        if r.ticks[j].is_empty() {
            println!("{name:<24} baseline absent");
            continue;
        }
        let cycles: Vec<f64> = r.ticks[j].iter().map(|t| *t as f64 / r.n as f64).collect();
        let us: Vec<f64> = cycles.iter().map(|c| c / r.tsc_khz * 1e3).collect();
        let us = stats(&us);
        println!(
            "{name:<24} {:>26} {:>26}",
            cell(us, 3),
            cell(stats(&cycles), 0)
        );
        medians[j] = us.median;
    }
    // Runs are interleaved in rounds: the ratio within each round cancels slow drift.
    let paired = |j: usize| {
        stats(
            &r.ticks[j]
                .iter()
                .zip(&r.ticks[0])
                .map(|(a, b)| *a as f64 / (*b).max(1) as f64)
                .collect::<Vec<_>>(),
        )
    };
    println!(
        "kiln / raw loop: {}  (target <= 1.10x; kiln - raw: {:+.3} µs per exit; per-round \
         ratio {})",
        ratio(medians[1], medians[0]),
        medians[1] - medians[0],
        cell(paired(1), 3)
    );
    println!(
        "kiln --no-seccomp / raw loop: {}  (per-round ratio {}; kiln - it: {:+.3} µs per exit)",
        ratio(medians[2], medians[0]),
        cell(paired(2), 3),
        medians[1] - medians[2]
    );
    if r.ticks[3].is_empty() {
        println!("kiln / firecracker 1.12.1: baseline absent");
    } else {
        println!(
            "kiln / firecracker 1.12.1: {}  (firecracker / raw loop: {}, per-round {})",
            ratio(medians[1], medians[3]),
            ratio(medians[3], medians[0]),
            cell(paired(3), 3)
        );
    }
}

// ---- 4. start rate --------------------------------------------------------------------------

/// A start-rate run: the wall time from the first spawn to the last exit, and each VM's sample.
type RateRun = (Duration, Vec<Sample>);
/// Every start-rate run of each VMM.
type RateRuns = Vec<(Variant, Vec<RateRun>)>;

/// One start-rate run: `total` VMs of `variant`, `parallel` at a time. Returns the wall time
/// from the first spawn to the last exit and every VM's sample.
fn rate_run(scratch: &Scratch, variant: Variant, total: usize, parallel: usize) -> Result<RateRun> {
    let config = scratch.kiln_config("hello")?;
    let fc_config = scratch.firecracker_config("hello")?;
    let next = std::sync::atomic::AtomicUsize::new(0);
    let start = Instant::now();
    let results: Vec<std::result::Result<Vec<Sample>, String>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..parallel)
            .map(|w| {
                let (next, config, fc_config) = (&next, &config, &fc_config);
                s.spawn(move || -> std::result::Result<Vec<Sample>, String> {
                    let stderr = scratch.path(&format!("stderr-rate-{w}"));
                    let mut out = Vec::new();
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                        let cmd = command(variant, "hello", config, fc_config)
                            .map_err(|e| e.to_string())?;
                        out.push(measure(cmd, &stderr, HELLO_OUTPUT).map_err(|e| e.to_string())?);
                    }
                    Ok(out)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().unwrap_or_else(|_| Err("a worker panicked".into())))
            .collect()
    });
    let wall = start.elapsed();
    let mut samples = Vec::with_capacity(total);
    for r in results {
        samples.extend(r?);
    }
    Ok((wall, samples))
}

/// Start-rate runs of kiln and (when it can be had) Firecracker, alternating.
fn start_rate(scratch: &Scratch, runs: usize, total: usize, parallel: usize) -> Result<RateRuns> {
    let vmms: Vec<Variant> = [Variant::Kiln, Variant::Firecracker]
        .into_iter()
        .filter(|v| variants().contains(v))
        .collect();
    let mut out: RateRuns = vmms.iter().map(|v| (*v, Vec::new())).collect();
    for i in 0..runs {
        for k in 0..vmms.len() {
            let j = (i + k) % vmms.len();
            out[j].1.push(rate_run(scratch, vmms[j], total, parallel)?);
        }
    }
    Ok(out)
}

fn print_rate(r: &[(Variant, Vec<RateRun>)], total: usize, parallel: usize) {
    println!();
    println!(
        "== 4. start rate: {total} VMs (kiln.run=hello, each to its reset), {parallel} at a time; \
         {} runs per VMM; cells: median [min-max]",
        r.first().map_or(0, |x| x.1.len())
    );
    println!(
        "{:<26} {:>22} {:>22} {:>22} {:>22}",
        "variant", "VMs/s", "wall ms (all VMs)", "per VM: exit ms", "per VM: CPU ms"
    );
    let mut rates = Vec::new();
    for (v, runs) in r {
        let rate = stats(
            &runs
                .iter()
                .map(|(w, _)| total as f64 / w.as_secs_f64())
                .collect::<Vec<_>>(),
        );
        let all: Vec<&Sample> = runs.iter().flat_map(|(_, s)| s).collect();
        println!(
            "{:<26} {:>22} {:>22} {:>22} {:>22}",
            v.name(),
            cell(rate, 1),
            cell(
                stats(&runs.iter().map(|(w, _)| ms(*w)).collect::<Vec<_>>()),
                0
            ),
            cell(
                stats(&all.iter().map(|x| ms(x.exit)).collect::<Vec<_>>()),
                2
            ),
            cell(
                stats(&all.iter().map(|x| ms(x.cpu())).collect::<Vec<_>>()),
                2
            ),
        );
        rates.push(rate.median);
    }
    if rates.len() < 2 {
        println!("kiln / firecracker 1.12.1: baseline absent");
    } else {
        println!(
            "kiln / firecracker 1.12.1, VMs started per second: {} (goal >= 1.5)",
            ratio(rates[0], rates[1])
        );
    }
}

// ---- the benchmark -------------------------------------------------------------------------

fn bench() -> Result<()> {
    let runs = env_usize("KILN_BENCH_RUNS", 30);
    let mem_runs = env_usize("KILN_BENCH_MEM_RUNS", 10);
    let pio_runs = env_usize("KILN_BENCH_PIO_RUNS", 15);
    let pio_n = env_usize("KILN_BENCH_PIO_N", 30_000) as u64;
    let scratch = Scratch::new("boot")?;
    let started = Instant::now();
    println!("kiln boot benchmark (issue 2)");
    println!("   kiln:  {KILN}");
    println!("   guest: {}", guest_elf().display());
    println!(
        "   baselines: raw-KVM floor = real-mode blob printing the same {} bytes, no irqchip;",
        HELLO_OUTPUT.len()
    );
    println!(
        "              floor + irqchip/PIT/CPUID = the same plus the KVM objects any VMM booting \
         Linux creates;"
    );
    println!(
        "              library + minimal loop = the same guest and command line as kiln through \
         kiln's library, one thread, KVM_RUN + exit decode"
    );

    match firecracker() {
        Some(fc) => println!("              firecracker 1.12.1 = {}", fc.display()),
        None => println!("              firecracker: baseline absent (benches/firecracker.sh)"),
    }
    // `KILN_BENCH_BOOT_ONLY=startup,memory,pio,rate` runs only the sections named.
    let only = std::env::var("KILN_BENCH_BOOT_ONLY").unwrap_or_default();
    let section = |name: &str| only.is_empty() || only.split(',').any(|s| s == name);
    if section("startup") {
        let s = startup(&scratch, runs)?;
        print_startup(&s, runs);
    }
    if section("memory") {
        let m = memory(&scratch, mem_runs)?;
        print_memory(&m, mem_runs);
    }
    if section("pio") {
        let p = pio(&scratch, pio_runs, pio_n)?;
        print_pio(&p, pio_runs);
    }
    if section("rate") {
        let rate_runs = env_usize("KILN_BENCH_RATE_RUNS", 3);
        let rate_vms = env_usize("KILN_BENCH_RATE_VMS", 50);
        let parallel = env_usize("KILN_BENCH_RATE_PARALLEL", 4);
        let r = start_rate(&scratch, rate_runs, rate_vms, parallel)?;
        print_rate(&r, rate_vms, parallel);
    }
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}

// ---- baseline roles (this binary re-executed) -----------------------------------------------

/// Guest-physical address of the floor's code.
const FLOOR_ENTRY: usize = 0x1000;
/// Any address above guest RAM works for the TSS KVM needs on Intel (real mode without
/// unrestricted guest); kiln uses the same.
const FLOOR_TSS: usize = 0xfffb_d000;

/// Real-mode code: `mov dx, 0x3f8`, then `mov al, b; out dx, al` per byte of the text, then
/// for hello `mov al, 0xfe; out 0x64, al; hlt`, for idle `hlt; jmp $-1`.
fn floor_code(idle: bool) -> Vec<u8> {
    let text = if idle { IDLE_MARKER } else { HELLO_OUTPUT };
    let mut code = vec![0xba, 0xf8, 0x03];
    for b in text.bytes() {
        code.extend_from_slice(&[0xb0, b, 0xee]);
    }
    if idle {
        code.extend_from_slice(&[0xf4, 0xeb, 0xfd]);
    } else {
        code.extend_from_slice(&[0xb0, I8042_RESET, 0xe6, 0x64, 0xf4]);
    }
    code
}

/// The minimal raw-KVM VMM process; with `devices`, also the in-kernel irqchip and PIT and
/// KVM's supported CPUID set on the vCPU. (With the irqchip, the idle `hlt` blocks in KVM_RUN.)
fn floor(idle: bool, devices: bool) -> Result<()> {
    let kvm = Kvm::new()?;
    let vm = kvm.create_vm()?;
    vm.set_tss_address(FLOOR_TSS)?;
    let size = usize::try_from(MEM_MIB << 20)?;
    // SAFETY: a new anonymous private mapping; no existing memory is affected.
    let host = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            size,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_NORESERVE,
            -1,
            0,
        )
    };
    if host == libc::MAP_FAILED {
        return Err(format!("mmap: {}", io::Error::last_os_error()).into());
    }
    let region = kvm_userspace_memory_region {
        slot: 0,
        flags: 0,
        guest_phys_addr: 0,
        memory_size: size as u64,
        userspace_addr: host as u64,
    };
    // SAFETY: the mapping is `size` bytes long and never unmapped (the process exits).
    unsafe { vm.set_user_memory_region(region) }?;
    // SAFETY: `host` is a live, writable mapping of `size` bytes that nothing else references
    // from Rust.
    let ram = unsafe { std::slice::from_raw_parts_mut(host.cast::<u8>(), size) };
    let code = floor_code(idle);
    ram[FLOOR_ENTRY..FLOOR_ENTRY + code.len()].copy_from_slice(&code);

    if devices {
        vm.create_irq_chip()?;
        vm.create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })?;
    }
    let mut vcpu = vm.create_vcpu(0)?;
    if devices {
        vcpu.set_cpuid2(&kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?)?;
    }
    let mut sregs = vcpu.get_sregs()?;
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    vcpu.set_sregs(&sregs)?;
    vcpu.set_regs(&kvm_regs {
        rip: FLOOR_ENTRY as u64,
        rflags: 2,
        ..Default::default()
    })?;

    let mut out = io::stdout().lock();
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(PORT_COM1, data)) => {
                out.write_all(data)?;
                out.flush()?;
            }
            Ok(VcpuExit::IoOut(PORT_I8042_CMD, [I8042_RESET])) => return Ok(()),
            Ok(VcpuExit::Hlt) if idle => loop {
                // Until SIGTERM.
                std::thread::park();
            },
            Ok(other) => return Err(format!("unexpected exit {other:?}").into()),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {}
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
    }
}

/// The kiln test guest booted through kiln's library, run by a minimal loop on this thread.
fn libvmm(cmdline: &str) -> Result<()> {
    let kvm = open_kvm(1)?;
    let memory = create_guest_memory(MEM_MIB)?;
    let vm = Vm::new(&kvm, memory, false)?;
    let kernel = load_kernel(vm.memory(), &mut File::open(guest_elf())?)?;
    let cmdline = Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE)?;
    configure_system(vm.memory(), &kernel, &cmdline, None, 1, &[])?;
    let cpuid = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)?;
    let exit = Arc::new(ExitSignal::new()?);
    let mut vcpu = Vcpu::new(vm.fd(), 0, Arc::new(Bus::new()), Arc::new(Bus::new()), exit)?;
    vcpu.configure(
        vm.memory(),
        &kernel,
        &cpuid,
        CpuTopology::new(1, false),
        kvm.check_extension(Cap::TscDeadlineTimer),
    )?;
    minimal_loop(vcpu.fd(), &mut io::stdout().lock())
}

/// KVM_RUN and exit decode, and only what the test guest needs: COM1 data bytes (DLAB clear)
/// go to `out` as they come, the line status says "transmitter empty", the i8042 status is
/// 0 and its reset command (0xfe to 0x64) ends the run; port 0x80 and every other access are
/// decoded and ignored (reads as all ones).
fn minimal_loop(fd: &mut VcpuFd, out: &mut impl Write) -> Result<()> {
    let mut dlab = false;
    loop {
        match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => match (port, data) {
                (PORT_POST, _) => {}
                (PORT_COM1, [byte]) if !dlab => {
                    out.write_all(&[*byte])?;
                    out.flush()?;
                }
                (PORT_COM1_LCR, [lcr]) => dlab = lcr & 0x80 != 0,
                (PORT_I8042_CMD, [I8042_RESET]) => return Ok(()),
                _ => {}
            },
            Ok(VcpuExit::IoIn(port, data)) => data.fill(match port {
                PORT_COM1_LSR => 0x60,
                PORT_I8042_CMD => 0,
                _ => 0xff,
            }),
            Ok(VcpuExit::MmioRead(_, data)) => data.fill(0xff),
            Ok(VcpuExit::MmioWrite(..) | VcpuExit::Intr) => {}
            Ok(VcpuExit::SystemEvent(..)) => return Ok(()),
            Ok(other) => return Err(format!("unexpected exit {other:?}").into()),
            Err(e) if matches!(e.errno(), libc::EINTR | libc::EAGAIN) => {}
            Err(e) => return Err(format!("KVM_RUN: {e}").into()),
        }
    }
}
