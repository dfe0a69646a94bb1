//! API benchmark (issue 7): `cargo bench --bench api`, as root, on a host with /dev/kvm.
//!
//! Three measurements, each against a baseline run in the same invocation, interleaved:
//!
//! 1. **Start → accepting**: wall time from just before spawning `kiln --api-sock <tmp>`
//!    (no config: it waits for requests) until connect() on the socket succeeds (polled in a
//!    tight loop), and until the answer to a first `GET /` has been read; kiln's CPU time at
//!    both points (all its threads, /proc/<pid>/task/*/schedstat) and its RSS. Baselines:
//!    Firecracker 1.12.1 (`benches/firecracker.sh` fetches and caches it; "baseline absent"
//!    without it) started the same way, `firecracker --api-sock <tmp>`, interleaved with
//!    kiln; and spawn → first stdout byte of `kiln --version` (the same static binary doing
//!    nothing), i.e. the process-start floor of this host; its CPU from wait4.
//! 2. **GET / on one keep-alive connection**, request → full response → next request, N per
//!    run: requests/s and the CPU µs per request of kiln's threads (main, `kiln_api`) and of
//!    the client. Against kiln before boot and with a booted idle guest (`kiln.run=idle`,
//!    `builtin:test-guest`, config file). Baseline: the same client against a minimal HTTP
//!    responder on a Unix socket in this process (a thread that reads a request and writes a
//!    fixed 200 response: the bytes kiln answers before boot).
//! 3. **Memory**: kiln with the API thread (after serving requests) and an idle guest vs
//!    `kiln --no-api` with the same guest: VmHWM, VmRSS, the guest RAM actually touched
//!    (the Rss of the guest memory mapping in /proc/<pid>/smaps), overhead = RSS - guest
//!    touched, private anonymous memory outside guest RAM.
//!
//! Medians [min-max] over runs. Environment: `KILN_BENCH_API_START_RUNS` (default 30),
//! `KILN_BENCH_API_RUNS` (GET runs per variant, default 7), `KILN_BENCH_API_N` (requests per
//! GET run, default 20000), `KILN_BENCH_API_MEM_RUNS` (default 10).

mod common;

use std::error::Error;
use std::fs::{self, File};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

use common::{
    KILN, Kind, MemSample, Result, Scratch, cell, col, env_usize, ms, ratio, read_memory, stats,
    this_thread_cpu_ns, thread_cpu, timeval, wait4,
};

/// Set when this binary re-executes itself as the responder process.
const ROLE_ENV: &str = "KILN_BENCH_ROLE";

const MEM_MIB: u64 = 128;
const BOOT_ARGS: &str = "console=ttyS0 reboot=k panic=1 pci=off kiln.run=idle";
const IDLE_MARKER: &str = "info idle";
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: application/json\r\n\r\n";
/// Longest wait for anything (a socket, a line, a response).
const TIMEOUT: Duration = Duration::from_secs(20);
/// Requests sent before the memory of the API variant is read.
const MEM_REQUESTS: usize = 1000;

/// The goal for kiln / Firecracker, exec → API socket answering (issue 16).
const GOAL_START_RATIO: f64 = 0.5;

fn main() {
    if std::env::var(ROLE_ENV).ok().as_deref() == Some("responder") {
        if let Err(e) = responder_process() {
            eprintln!("api bench (responder): {e}");
            std::process::exit(1);
        }
        std::process::exit(0);
    }
    common::run("api", "boots VMs", bench);
}

// ---- scratch files and processes -----------------------------------------------------------

/// The idle guest's config file (the directory also holds sockets and the children's stderr).
impl Scratch {
    /// The idle test guest, from the binary's built-in image.
    fn idle_config(&self) -> Result<PathBuf> {
        let path = self.path("idle.json");
        let json = format!(
            r#"{{
  "boot-source": {{ "kernel_image_path": "builtin:test-guest", "boot_args": "{BOOT_ARGS}" }},
  "machine-config": {{ "vcpu_count": 1, "mem_size_mib": {MEM_MIB} }}
}}
"#
        );
        fs::write(&path, json)?;
        Ok(path)
    }
}

/// A kiln process, killed and reaped when dropped.
struct Kiln {
    child: Child,
    /// Its stdout, while the guest prints (kept open so the serial console never blocks).
    stdout: Option<BufReader<ChildStdout>>,
    stderr: PathBuf,
    socket: Option<PathBuf>,
    /// Taken right before the spawn.
    spawned_at: Instant,
}

impl Kiln {
    /// Spawns kiln with `args`; stdout piped, stderr to `stderr`.
    fn spawn(args: &[&str], stderr: &Path, socket: Option<&Path>) -> Result<Kiln> {
        let mut cmd = Command::new(KILN);
        cmd.args(args);
        Kiln::spawn_command(cmd, stderr, socket)
    }

    /// Spawns `cmd` (kiln, or the responder process); stdout piped, stderr to `stderr`.
    fn spawn_command(mut cmd: Command, stderr: &Path, socket: Option<&Path>) -> Result<Kiln> {
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(File::create(stderr)?));
        let spawned_at = Instant::now();
        let mut child = cmd.spawn()?;
        let stdout = child.stdout.take().map(BufReader::new);
        Ok(Kiln {
            child,
            stdout,
            stderr: stderr.to_path_buf(),
            socket: socket.map(Path::to_path_buf),
            spawned_at,
        })
    }

    /// kiln serving the API on `socket`, booting the config file if given.
    fn with_api(socket: &Path, config: Option<&Path>, stderr: &Path) -> Result<Kiln> {
        let sock = socket.to_str().ok_or("non-UTF-8 path")?;
        let mut args = vec!["--api-sock", sock];
        if let Some(config) = config {
            args.extend(["--config-file", config.to_str().ok_or("non-UTF-8 path")?]);
        }
        Kiln::spawn(&args, stderr, Some(socket))
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Reads the guest's output until the idle marker.
    fn wait_idle(&mut self) -> Result<()> {
        let stdout = self.stdout.as_mut().ok_or("no stdout")?;
        let deadline = Instant::now() + TIMEOUT;
        let mut output = String::new();
        loop {
            let mut line = String::new();
            if stdout.read_line(&mut line)? == 0 || Instant::now() > deadline {
                return Err(self.failure(&format!("no `{IDLE_MARKER}` line in:\n{output}")));
            }
            output.push_str(&line);
            if line.trim_end() == IDLE_MARKER {
                return Ok(());
            }
        }
    }

    /// Connects to its API socket, waiting until it accepts.
    fn connect(&self) -> Result<UnixStream> {
        let socket = self.socket.as_ref().ok_or("no API socket")?;
        let deadline = Instant::now() + TIMEOUT;
        loop {
            match UnixStream::connect(socket) {
                Ok(s) => {
                    s.set_read_timeout(Some(TIMEOUT))?;
                    return Ok(s);
                }
                Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(1)),
                Err(e) => return Err(self.failure(&format!("connect: {e}"))),
            }
        }
    }

    /// An error naming the command and carrying its stderr.
    fn failure(&self, what: &str) -> Box<dyn Error> {
        let stderr = fs::read_to_string(&self.stderr).unwrap_or_default();
        format!("kiln (pid {}): {what}\n--- stderr\n{stderr}", self.pid()).into()
    }
}

impl Drop for Kiln {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if let Some(socket) = &self.socket {
            let _ = fs::remove_file(socket);
        }
    }
}

// ---- CPU and memory of a process -----------------------------------------------------------

/// CPU ns of each thread of `pid`, by role: `main` (tid = pid), `api` (`kiln_api`), `vcpu`
/// (`kiln_vcpu<N>`), `other`.
#[derive(Clone, Copy, Debug, Default)]
struct Cpu {
    main: u64,
    api: u64,
    vcpu: u64,
    other: u64,
}

impl Cpu {
    fn total(&self) -> u64 {
        self.main + self.api + self.vcpu + self.other
    }

    fn minus(&self, before: &Cpu) -> Cpu {
        Cpu {
            main: self.main.saturating_sub(before.main),
            api: self.api.saturating_sub(before.api),
            vcpu: self.vcpu.saturating_sub(before.vcpu),
            other: self.other.saturating_sub(before.other),
        }
    }
}

/// Sums the CPU ns of `pid`'s threads (/proc/<pid>/task/*/schedstat) by role.
fn process_cpu(pid: u32) -> Result<Cpu> {
    let threads = thread_cpu(pid)?;
    if threads.is_empty() {
        return Err(format!("pid {pid}: no threads").into());
    }
    let mut cpu = Cpu::default();
    for t in threads.values() {
        match t.kind {
            Kind::Main => cpu.main += t.ns,
            Kind::Api => cpu.api += t.ns,
            Kind::Vcpu => cpu.vcpu += t.ns,
            Kind::IoWorker | Kind::Other => cpu.other += t.ns,
        }
    }
    Ok(cpu)
}

// ---- HTTP client and baseline responder ----------------------------------------------------

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// The length of the complete 200 response at the start of `buf`, if it is all there.
fn complete_response(buf: &[u8]) -> Result<Option<usize>> {
    let Some(end) = find(buf, b"\r\n\r\n") else {
        return Ok(None);
    };
    let head = std::str::from_utf8(&buf[..end])?;
    let mut lines = head.split("\r\n");
    let status = lines.next().unwrap_or("");
    if !status.starts_with("HTTP/1.1 200 ") {
        return Err(format!("unexpected response {head:?}").into());
    }
    let mut length = 0usize;
    for line in lines {
        if let Some((name, value)) = line.split_once(':') {
            if name.eq_ignore_ascii_case("content-length") {
                length = value.trim().parse()?;
            } else if name.eq_ignore_ascii_case("connection")
                && value.trim().eq_ignore_ascii_case("close")
            {
                return Err("the server closes the connection".into());
            }
        }
    }
    let total = end + 4 + length;
    Ok((buf.len() >= total).then_some(total))
}

/// A keep-alive client: one request, then its whole response, then the next.
struct Client {
    stream: UnixStream,
    buf: Vec<u8>,
    filled: usize,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        Client {
            stream,
            buf: vec![0; 16384],
            filled: 0,
        }
    }

    /// GET /; returns the response bytes.
    fn get(&mut self) -> Result<usize> {
        self.stream.write_all(REQUEST)?;
        loop {
            if let Some(len) = complete_response(&self.buf[..self.filled])? {
                self.buf.copy_within(len..self.filled, 0);
                self.filled -= len;
                return Ok(len);
            }
            if self.filled == self.buf.len() {
                return Err("response too large".into());
            }
            let n = self.stream.read(&mut self.buf[self.filled..])?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.filled += n;
        }
    }

    /// The body of one GET / (to build the baseline's response).
    fn get_raw(&mut self) -> Result<Vec<u8>> {
        self.stream.write_all(REQUEST)?;
        loop {
            if let Some(len) = complete_response(&self.buf[..self.filled])? {
                let bytes = self.buf[..len].to_vec();
                self.buf.copy_within(len..self.filled, 0);
                self.filled -= len;
                return Ok(bytes);
            }
            let n = self.stream.read(&mut self.buf[self.filled..])?;
            if n == 0 {
                return Err("connection closed".into());
            }
            self.filled += n;
        }
    }
}

/// The baseline server: accepts one connection, answers every request (header block
/// ending in an empty line) with `response`, until the client closes. Returns the requests
/// answered and this thread's CPU ns from the accept on.
fn responder(listener: &UnixListener, response: &[u8]) -> Result<(u64, u64)> {
    let (mut stream, _) = listener.accept()?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    let t0 = this_thread_cpu_ns();
    let mut buf = vec![0u8; 16384];
    let mut filled = 0usize;
    let mut count = 0u64;
    loop {
        let n = stream.read(&mut buf[filled..])?;
        if n == 0 {
            break;
        }
        filled += n;
        let mut start = 0;
        while let Some(end) = find(&buf[start..filled], b"\r\n\r\n") {
            stream.write_all(response)?;
            count += 1;
            start += end + 4;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if filled == buf.len() {
            return Err("request too large".into());
        }
    }
    Ok((count, this_thread_cpu_ns() - t0))
}

/// The responder as a process of its own (this binary re-executed with `KILN_BENCH_ROLE`
/// set): binds argv[1], answers with the bytes of the file argv[2], one connection after
/// another, until killed.
fn responder_process() -> Result<()> {
    let path = std::env::args().nth(1).ok_or("no socket path")?;
    let response = fs::read(std::env::args().nth(2).ok_or("no response file")?)?;
    let listener = UnixListener::bind(path)?;
    loop {
        responder(&listener, &response)?;
    }
}

// ---- 1. start -> accepting -----------------------------------------------------------------

#[derive(Clone, Copy, Debug)]
struct StartSample {
    /// Spawn → connect() succeeds.
    connect: Duration,
    /// Spawn → the first GET / answered.
    first_response: Duration,
    /// CPU ns of all kiln threads at those two points.
    cpu_connect: u64,
    cpu_response: u64,
    /// VmRSS after the first response, KiB.
    rss: u64,
}

#[derive(Clone, Copy, Debug)]
struct FloorSample {
    /// Spawn → first stdout byte.
    first_byte: Duration,
    /// CPU ns of the whole process (wait4).
    cpu: u64,
}

/// Starts `bin` (kiln or Firecracker) with `--api-sock` and no configuration.
fn start_kiln(scratch: &Scratch, run: usize, bin: &Path) -> Result<StartSample> {
    let socket = scratch.path(&format!("start-{run}.sock"));
    let stderr = scratch.path("stderr");
    let mut cmd = Command::new(bin);
    cmd.arg("--api-sock").arg(&socket);
    let kiln = Kiln::spawn_command(cmd, &stderr, Some(&socket))?;
    let t0 = kiln.spawned_at;
    let deadline = t0 + TIMEOUT;
    let stream = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {}
            Err(e) => return Err(kiln.failure(&format!("connect: {e}"))),
        }
    };
    let connect = t0.elapsed();
    let cpu_connect = process_cpu(kiln.pid())?.total();
    stream.set_read_timeout(Some(TIMEOUT))?;
    let mut client = Client::new(stream);
    client
        .get()
        .map_err(|e| kiln.failure(&format!("GET /: {e}")))?;
    let first_response = t0.elapsed();
    let cpu_response = process_cpu(kiln.pid())?.total();
    let rss = read_memory(kiln.pid(), MEM_MIB * 1024, false)?.rss;
    Ok(StartSample {
        connect,
        first_response,
        cpu_connect,
        cpu_response,
        rss,
    })
}

fn start_floor() -> Result<FloorSample> {
    let mut cmd = Command::new(KILN);
    cmd.arg("--version")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let mut child = cmd.spawn()?;
    let mut pipe = child.stdout.take().ok_or("no stdout pipe")?;
    let mut byte = [0u8; 1];
    let n = pipe.read(&mut byte)?;
    let first_byte = t0.elapsed();
    if n == 0 {
        return Err("kiln --version printed nothing".into());
    }
    let mut rest = Vec::new();
    pipe.read_to_end(&mut rest)?;
    let (status, usage) = wait4(child.id())?;
    if status != 0 {
        return Err(format!("kiln --version: wait status {status:#x}").into());
    }
    let cpu = timeval(usage.ru_utime) + timeval(usage.ru_stime);
    Ok(FloorSample {
        first_byte,
        cpu: u64::try_from(cpu.as_nanos())?,
    })
}

/// Start-up samples of kiln, Firecracker (empty when absent) and the floor, interleaved.
type StartSamples = (Vec<StartSample>, Vec<StartSample>, Vec<FloorSample>);

fn startup(scratch: &Scratch, runs: usize, fc: Option<&Path>) -> Result<StartSamples> {
    let kiln_bin = Path::new(KILN);
    // Warm-up: page cache, CPU frequency.
    for i in 0..2 {
        start_floor()?;
        start_kiln(scratch, i, kiln_bin)?;
        if let Some(fc) = fc {
            start_kiln(scratch, i, fc)?;
        }
    }
    let mut kiln = Vec::with_capacity(runs);
    let mut fcs = Vec::with_capacity(runs);
    let mut floor = Vec::with_capacity(runs);
    for i in 0..runs {
        // The order rotates, so drift and cache effects fall on every variant alike.
        for k in 0..3 {
            match (i + k) % 3 {
                0 => floor.push(start_floor()?),
                1 => kiln.push(start_kiln(scratch, i, kiln_bin)?),
                _ => {
                    if let Some(fc) = fc {
                        fcs.push(start_kiln(scratch, i, fc)?);
                    }
                }
            }
        }
    }
    Ok((kiln, fcs, floor))
}

fn print_startup(kiln: &[StartSample], fc: &[StartSample], floor: &[FloorSample]) {
    println!();
    println!(
        "== 1. start -> accepting: `kiln --api-sock <tmp>` (no config), connect() polled in a \
         tight loop; {} runs per variant; cells: median [min-max]",
        kiln.len()
    );
    println!(
        "{:<44} {:>24} {:>24} {:>16}",
        "variant", "wall ms", "CPU ms (all threads)", "RSS KiB"
    );
    let connect = col(kiln, |s| ms(s.connect));
    let response = col(kiln, |s| ms(s.first_response));
    let cpu_connect = col(kiln, |s| s.cpu_connect as f64 / 1e6);
    let cpu_response = col(kiln, |s| s.cpu_response as f64 / 1e6);
    let floor_wall = col(floor, |s| ms(s.first_byte));
    let floor_cpu = col(floor, |s| s.cpu as f64 / 1e6);
    println!(
        "{:<44} {:>24} {:>24}",
        "kiln: spawn -> connect() succeeds",
        cell(connect, 2),
        cell(cpu_connect, 2)
    );
    println!(
        "{:<44} {:>24} {:>24} {:>16}",
        "kiln: spawn -> first GET / answered",
        cell(response, 2),
        cell(cpu_response, 2),
        cell(col(kiln, |s| s.rss as f64), 0)
    );
    if fc.is_empty() {
        println!("{:<44} baseline absent", "firecracker 1.12.1");
    } else {
        println!(
            "{:<44} {:>24} {:>24}",
            "firecracker: spawn -> connect() succeeds",
            cell(col(fc, |s| ms(s.connect)), 2),
            cell(col(fc, |s| s.cpu_connect as f64 / 1e6), 2)
        );
        println!(
            "{:<44} {:>24} {:>24} {:>16}",
            "firecracker: spawn -> first GET / answered",
            cell(col(fc, |s| ms(s.first_response)), 2),
            cell(col(fc, |s| s.cpu_response as f64 / 1e6), 2),
            cell(col(fc, |s| s.rss as f64), 0)
        );
    }
    println!(
        "{:<44} {:>24} {:>24}",
        "floor: `kiln --version` -> first byte",
        cell(floor_wall, 2),
        cell(floor_cpu, 2)
    );
    println!("   (floor CPU: the whole process, to exit, from wait4)");
    // Runs i of both variants were back to back: the per-run ratio cancels drift.
    let paired = stats(
        &kiln
            .iter()
            .zip(floor)
            .map(|(k, f)| ms(k.connect) / ms(f.first_byte).max(1e-3))
            .collect::<Vec<_>>(),
    );
    println!(
        "kiln accepting / process-start floor: wall {} (per-round {}; kiln - floor {:+.2} ms), \
         CPU {} ({:+.2} ms)",
        ratio(connect.median, floor_wall.median),
        cell(paired, 2),
        connect.median - floor_wall.median,
        ratio(cpu_connect.median, floor_cpu.median),
        cpu_connect.median - floor_cpu.median
    );
    println!(
        "kiln first answer / process-start floor: wall {} ({:+.2} ms)",
        ratio(response.median, floor_wall.median),
        response.median - floor_wall.median
    );
    if fc.is_empty() {
        println!("kiln / firecracker 1.12.1: baseline absent");
        return;
    }
    let fc_response = col(fc, |s| ms(s.first_response));
    let paired = stats(
        &kiln
            .iter()
            .zip(fc)
            .map(|(k, f)| ms(k.first_response) / ms(f.first_response).max(1e-3))
            .collect::<Vec<_>>(),
    );
    let r = response.median / fc_response.median;
    println!(
        "kiln / firecracker 1.12.1, same run: spawn -> connect {} (CPU {}); spawn -> first answer \
         {} (per-round {}; goal <= {GOAL_START_RATIO}: {}), CPU {}; RSS {}",
        ratio(connect.median, col(fc, |s| ms(s.connect)).median),
        ratio(
            cpu_connect.median,
            col(fc, |s| s.cpu_connect as f64 / 1e6).median
        ),
        ratio(response.median, fc_response.median),
        cell(paired, 2),
        if r <= GOAL_START_RATIO {
            "met"
        } else {
            "not met"
        },
        ratio(
            cpu_response.median,
            col(fc, |s| s.cpu_response as f64 / 1e6).median
        ),
        ratio(
            col(kiln, |s| s.rss as f64).median,
            col(fc, |s| s.rss as f64).median
        ),
    );
}

// ---- 2. GET / requests per second ----------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Target {
    Baseline,
    BaselineProcess,
    PreBoot,
    Booted,
}

const TARGETS: [Target; 4] = [
    Target::Baseline,
    Target::BaselineProcess,
    Target::PreBoot,
    Target::Booted,
];

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Baseline => "baseline: in-process responder",
            Target::BaselineProcess => "baseline: responder process",
            Target::PreBoot => "kiln, before boot",
            Target::Booted => "kiln, idle guest booted",
        }
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct GetSample {
    n: u64,
    wall: Duration,
    /// The client thread's CPU ns.
    client: u64,
    /// The server's CPU ns: kiln's threads, or the responder thread.
    server: Cpu,
}

impl GetSample {
    fn per_req_us(&self, ns: u64) -> f64 {
        ns as f64 / self.n as f64 / 1e3
    }
}

/// `n` GET / on one connection, request by request.
fn get_loop(stream: UnixStream, n: u64) -> Result<(Duration, u64)> {
    let mut client = Client::new(stream);
    let c0 = this_thread_cpu_ns();
    let t0 = Instant::now();
    for _ in 0..n {
        client.get()?;
    }
    Ok((t0.elapsed(), this_thread_cpu_ns() - c0))
}

fn get_kiln(kiln: &Kiln, n: u64) -> Result<GetSample> {
    let stream = kiln.connect()?;
    let before = process_cpu(kiln.pid())?;
    let (wall, client) = get_loop(stream, n).map_err(|e| kiln.failure(&format!("GET /: {e}")))?;
    let after = process_cpu(kiln.pid())?;
    Ok(GetSample {
        n,
        wall,
        client,
        server: after.minus(&before),
    })
}

fn get_baseline(
    listener: &UnixListener,
    path: &Path,
    response: &[u8],
    n: u64,
) -> Result<GetSample> {
    std::thread::scope(|s| -> Result<GetSample> {
        let server = s.spawn(|| responder(listener, response).map_err(|e| e.to_string()));
        let stream = UnixStream::connect(path)?;
        stream.set_read_timeout(Some(TIMEOUT))?;
        let (wall, client) = get_loop(stream, n)?;
        let (count, cpu) = match server.join() {
            Ok(r) => r?,
            Err(_) => return Err("the responder panicked".into()),
        };
        if count != n {
            return Err(format!("the responder answered {count} of {n} requests").into());
        }
        Ok(GetSample {
            n,
            wall,
            client,
            server: Cpu {
                api: cpu,
                ..Cpu::default()
            },
        })
    })
}

fn get_bench(scratch: &Scratch, runs: usize, n: u64) -> Result<Vec<Vec<GetSample>>> {
    let stderr = scratch.path("stderr-get");
    let pre = Kiln::with_api(&scratch.path("pre.sock"), None, &scratch.path("stderr-pre"))?;
    let config = scratch.idle_config()?;
    let mut booted = Kiln::with_api(&scratch.path("booted.sock"), Some(&config), &stderr)?;
    booted.wait_idle()?;
    // The baseline answers exactly what kiln answers before boot.
    let response = Client::new(pre.connect()?).get_raw()?;
    let base_path = scratch.path("baseline.sock");
    let listener = UnixListener::bind(&base_path)?;
    let response_file = scratch.path("response");
    fs::write(&response_file, &response)?;
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.env(ROLE_ENV, "responder")
        .arg(scratch.path("responder.sock"))
        .arg(&response_file);
    let process = Kiln::spawn_command(
        cmd,
        &scratch.path("stderr-responder"),
        Some(&scratch.path("responder.sock")),
    )?;

    let one = |t: Target, n: u64| -> Result<GetSample> {
        match t {
            Target::Baseline => get_baseline(&listener, &base_path, &response, n),
            Target::BaselineProcess => get_kiln(&process, n),
            Target::PreBoot => get_kiln(&pre, n),
            Target::Booted => get_kiln(&booted, n),
        }
    };
    for t in TARGETS {
        one(t, n.min(2000))?;
    }
    let mut samples = vec![Vec::with_capacity(runs); TARGETS.len()];
    for i in 0..runs {
        for k in 0..TARGETS.len() {
            let j = (i + k) % TARGETS.len();
            samples[j].push(one(TARGETS[j], n)?);
        }
    }
    Ok(samples)
}

fn print_get(samples: &[Vec<GetSample>], n: u64) {
    println!();
    println!(
        "== 2. GET / on one keep-alive connection, request -> full response -> next; {n} requests \
         per run, {} runs per variant; cells: median [min-max]",
        samples.first().map_or(0, Vec::len)
    );
    println!(
        "{:<32} {:>26} {:>22} {:>20} {:>20} {:>20} {:>14}",
        "variant",
        "requests/s",
        "server CPU µs/req",
        "main µs/req",
        "API thread µs/req",
        "vCPU+other µs/req",
        "client µs/req"
    );
    let mut rates = Vec::new();
    let mut cpus = Vec::new();
    for (j, t) in TARGETS.iter().enumerate() {
        let s = &samples[j];
        let rate = col(s, |x| x.n as f64 / x.wall.as_secs_f64());
        let cpu = col(s, |x| x.per_req_us(x.server.total()));
        println!(
            "{:<32} {:>26} {:>22} {:>20} {:>20} {:>20} {:>14.2}",
            t.name(),
            cell(rate, 0),
            cell(cpu, 2),
            cell(col(s, |x| x.per_req_us(x.server.main)), 2),
            cell(col(s, |x| x.per_req_us(x.server.api)), 2),
            cell(col(s, |x| x.per_req_us(x.server.vcpu + x.server.other)), 2),
            col(s, |x| x.per_req_us(x.client)).median,
        );
        rates.push(rate.median);
        cpus.push(cpu.median);
    }
    println!(
        "   (in-process responder: its thread's CPU is in the API-thread column; the responder \
         process is this bench re-executed, one thread: main column)"
    );
    for t in [Target::PreBoot, Target::Booted] {
        for base in [Target::Baseline, Target::BaselineProcess] {
            let (j, b) = (t as usize, base as usize);
            // Run i of every variant came from the same round.
            let paired = stats(
                &samples[j]
                    .iter()
                    .zip(&samples[b])
                    .map(|(k, o)| {
                        (k.n as f64 / k.wall.as_secs_f64()) / (o.n as f64 / o.wall.as_secs_f64())
                    })
                    .collect::<Vec<_>>(),
            );
            println!(
                "{} / {}: requests/s {} (per-round {}), server CPU per request {} ({:+.2} µs)",
                t.name(),
                base.name(),
                ratio(rates[j], rates[b]),
                cell(paired, 2),
                ratio(cpus[j], cpus[b]),
                cpus[j] - cpus[b]
            );
        }
    }
}

// ---- 3. memory -----------------------------------------------------------------------------

const MEM_VARIANTS: [&str; 2] = ["kiln + API thread, idle guest", "kiln --no-api, idle guest"];

fn mem_run(scratch: &Scratch, config: &Path, api: bool) -> Result<MemSample> {
    let stderr = scratch.path("stderr-mem");
    let cfg = config.to_str().ok_or("non-UTF-8 path")?;
    let mut kiln = if api {
        Kiln::with_api(&scratch.path("mem.sock"), Some(config), &stderr)?
    } else {
        Kiln::spawn(&["--no-api", "--config-file", cfg], &stderr, None)?
    };
    kiln.wait_idle()?;
    if api {
        let mut client = Client::new(kiln.connect()?);
        for _ in 0..MEM_REQUESTS {
            client.get()?;
        }
    }
    read_memory(kiln.pid(), MEM_MIB * 1024, true).map_err(|e| kiln.failure(&e.to_string()))
}

fn memory(scratch: &Scratch, runs: usize) -> Result<[Vec<MemSample>; 2]> {
    let config = scratch.idle_config()?;
    let mut samples = [Vec::with_capacity(runs), Vec::with_capacity(runs)];
    for i in 0..runs {
        for k in 0..2 {
            let j = (i + k) % 2;
            samples[j].push(mem_run(scratch, &config, j == 0)?);
        }
    }
    Ok(samples)
}

fn print_memory(samples: &[Vec<MemSample>; 2]) {
    println!();
    println!(
        "== 3. memory: idle guest ({MEM_MIB} MiB, kiln.run=idle), the API variant after \
         {MEM_REQUESTS} GET /; {} runs per variant; KiB, cells: median [min-max]",
        samples[0].len()
    );
    println!(
        "{:<32} {:>20} {:>18} {:>20} {:>18} {:>14} | {:>18} {:>8} {:>6}",
        "variant",
        "overhead: peak-guest",
        "overhead: rss-guest",
        "peak RSS (VmHWM)",
        "VmRSS",
        "guest touched",
        "private anon",
        "file",
        "other"
    );
    let mut medians = Vec::new();
    for (name, s) in MEM_VARIANTS.iter().zip(samples) {
        let peak = col(s, |m| m.overhead_peak() as f64);
        let now = col(s, |m| m.overhead_now() as f64);
        let anon = col(s, |m| m.anon as f64);
        println!(
            "{:<32} {:>20} {:>18} {:>20} {:>18} {:>14} | {:>18} {:>8.0} {:>6.0}",
            name,
            cell(peak, 0),
            cell(now, 0),
            cell(col(s, |m| m.hwm as f64), 0),
            cell(col(s, |m| m.rss as f64), 0),
            cell(col(s, |m| m.guest as f64), 0),
            cell(anon, 0),
            col(s, |m| m.file as f64).median,
            col(s, |m| m.other as f64).median,
        );
        medians.push((peak.median, now.median, anon.median));
    }
    for (name, s) in MEM_VARIANTS.iter().zip(samples) {
        let merged = col(s, |m| m.merged as f64);
        if merged.max > 0.0 {
            println!(
                "   ({name}: the guest RAM mapping was merged with {} KiB of adjacent anonymous \
                 memory in some runs; the guest part is counted from pagemap, the rest as private anon)",
                cell(merged, 0)
            );
        }
    }
    let (a, b) = (medians[0], medians[1]);
    println!(
        "API / --no-api: overhead (peak) {} ({:+.0} KiB), overhead (now) {} ({:+.0} KiB), \
         private anon {} ({:+.0} KiB)",
        ratio(a.0, b.0),
        a.0 - b.0,
        ratio(a.1, b.1),
        a.1 - b.1,
        ratio(a.2, b.2),
        a.2 - b.2
    );
}

// ---- the benchmark -------------------------------------------------------------------------

fn bench() -> Result<()> {
    let start_runs = env_usize("KILN_BENCH_API_START_RUNS", 30);
    let get_runs = env_usize("KILN_BENCH_API_RUNS", 7);
    let n = env_usize("KILN_BENCH_API_N", 20_000) as u64;
    let mem_runs = env_usize("KILN_BENCH_API_MEM_RUNS", 10);
    let started = Instant::now();
    let scratch = Scratch::new("api")?;
    println!("kiln API benchmark (issue 7)");
    println!("   kiln: {KILN}");
    println!(
        "   request: {:?}",
        String::from_utf8_lossy(REQUEST).trim_end()
    );

    let fc = common::firecracker();
    match &fc {
        Some(fc) => println!("   baseline: {} (Firecracker 1.12.1)", fc.display()),
        None => {
            println!("   baseline absent: Firecracker could not be had (benches/firecracker.sh)")
        }
    }
    let (kiln, fcs, floor) = startup(&scratch, start_runs, fc.as_deref())?;
    print_startup(&kiln, &fcs, &floor);
    let get = get_bench(&scratch, get_runs, n)?;
    print_get(&get, n);
    let mem = memory(&scratch, mem_runs)?;
    print_memory(&mem);
    println!();
    println!("total {:.1} s", started.elapsed().as_secs_f64());
    Ok(())
}
