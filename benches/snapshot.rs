//! Snapshot benchmark: `cargo bench --bench snapshot`, as root, on a host with /dev/kvm.
//!
//! kiln and Firecracker 1.12.1 (`benches/firecracker.sh` fetches it; "baseline absent" when
//! it cannot be had) run the same test guest (`kiln.run=workload:...:blk`: a memory pattern
//! and a block sector per step, progress lines on the serial console), configured through
//! the same API requests, interleaved run by run. For each guest memory size:
//! - **create**: `PUT /snapshot/create` (Full) on the paused guest, request → response;
//!   then the guest runs two more steps and a **Diff** is created into a new file (both VMMs
//!   track dirty pages: `track_dirty_pages` in machine-config), request → response;
//! - **load**: in a fresh process, `PUT /snapshot/load` of the Full (File backend,
//!   `resume_vm`) request → response; request → the guest's next progress line (which comes
//!   after the rest of the guest's TSC-timed wait); and request → the guest's answer to a
//!   byte written on its console right after the response (`echo=`: running again, measured
//!   without any guest timer);
//! - **load (Uffd)**: a load through testkit's page-fault handler serving the Full memory
//!   file (Firecracker's handshake on both sides): request → response, request → console
//!   echo, and the pages the handler had served by the echo;
//! - the memory files' allocated sizes;
//! - kiln only: its first restore records the guest's working set (`working_set`, 1 s after
//!   it runs); a second restore faults it in before the guest runs: load → response and
//!   load → console echo (the guest reads its `ws=` working set before answering), beside
//!   Firecracker's and kiln's plain load → console echo;
//! - "cold": the same with the memory file evicted from the page cache before the load
//!   (`POSIX_FADV_DONTNEED`), so every page the guest needs comes from the disk.
//!
//! Medians (min–max) over `KILN_BENCH_SNAP_RUNS` runs (default 5) for each size in
//! `KILN_BENCH_SNAP_MIB` (default `128,1024,4096`), and the ratio kiln / Firecracker. Then
//! `KILN_BENCH_SNAP_CLONES` (default 20) clones of one 128 MiB snapshot restored 4 at a time
//! (no drive): wall time until all answered their console, and each clone's load → echo.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Result, Scratch, cell, env_usize, guest_elf, ratio, stats};
use testkit::LineReader;
use testkit::http::request;
use testkit::uffd::{Mode, PageServer};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Kiln,
    Firecracker,
}

/// The guest's working set (MiB, one word per page read before each console answer).
const WS_MIB: usize = 2;

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    create_ms: f64,
    diff_ms: f64,
    load_ms: f64,
    running_ms: f64,
    echo_ms: f64,
    mem_alloc_mib: f64,
    diff_alloc_mib: f64,
    /// kiln only: a load that faults in the working set the previous load recorded.
    ws_load_ms: f64,
    ws_echo_ms: f64,
    /// With the memory file evicted from the page cache first.
    cold_echo_ms: f64,
    /// kiln only: cold, with the working set.
    cold_ws_echo_ms: f64,
    /// Through a page-fault handler (the Uffd backend).
    uffd_load_ms: f64,
    uffd_echo_ms: f64,
    uffd_pages: f64,
}

struct Proc {
    child: Child,
    stdin: Option<std::process::ChildStdin>,
    lines: LineReader,
    sock: PathBuf,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.sock);
    }
}

fn spawn(bin: &Path, sock: &Path) -> Result<Proc> {
    let _ = std::fs::remove_file(sock);
    let mut child = Command::new(bin)
        .arg("--api-sock")
        .arg(sock)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let stdin = child.stdin.take();
    let out = child.stdout.take().ok_or("no stdout")?;
    let lines = LineReader::spawn(out);
    let start = Instant::now();
    while UnixStream::connect(sock).is_err() {
        if start.elapsed() > Duration::from_secs(10) {
            return Err(format!("{} never served its socket", bin.display()).into());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(Proc {
        child,
        stdin,
        lines,
        sock: sock.to_path_buf(),
    })
}

fn api(p: &Proc, method: &str, path: &str, body: &str) -> Result<()> {
    let (status, text) = request(&p.sock, method, path, Some(body));
    if status != 204 {
        return Err(format!("{method} {path}: {status} {text}").into());
    }
    Ok(())
}

/// Waits for a line starting with `prefix`.
fn wait_line(p: &Proc, prefix: &str, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        match p.lines.recv_until(deadline) {
            Ok(l) if l.text.starts_with(prefix) => return Ok(l.text),
            Ok(_) => {}
            Err(_) => return Err(format!("no `{prefix}` line in {timeout:?}").into()),
        }
    }
}

/// Boots the workload guest (with `disk` as its scratch drive) through the API.
fn boot(bin: &Path, dir: &Scratch, tag: &str, mem_mib: usize, disk: Option<&Path>) -> Result<Proc> {
    let src = spawn(bin, &dir.path(&format!("{tag}-src.sock")))?;
    let blk = if disk.is_some() { ":blk" } else { "" };
    api(
        &src,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=workload:1000000{blk}:ws={WS_MIB}"}}"#,
            guest_elf().display()
        ),
    )?;
    api(
        &src,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "track_dirty_pages": true}}"#),
    )?;
    if let Some(disk) = disk {
        api(
            &src,
            "PUT",
            "/drives/scratch",
            &format!(
                r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
                disk.display()
            ),
        )?;
    }
    api(
        &src,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )?;
    Ok(src)
}

/// 20 clones restored from one snapshot, `parallel` at a time (no drive, so that clones
/// share nothing writable): the wall time until every clone has answered its console, and
/// each clone's load -> console echo.
/// `PUT /snapshot/create` of `kind` (Full or Diff) into `state` and `mem` on the paused
/// `src`; returns request -> response in ms.
fn create(src: &Proc, kind: &str, state: &Path, mem: &Path) -> Result<f64> {
    let t = Instant::now();
    api(
        src,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "{kind}", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    )?;
    Ok(common::ms(t.elapsed()))
}

/// A fresh VMM told `PUT /snapshot/load` of `state` with the `backend` memory backend at
/// `path` (`extra` appended to the body), resuming: the process, when the request went, and
/// request -> response in ms.
fn load(
    bin: &Path,
    dir: &Scratch,
    tag: &str,
    state: &Path,
    backend: &str,
    path: &Path,
    extra: &str,
) -> Result<(Proc, Instant, f64)> {
    let dst = spawn(bin, &dir.path(&format!("{tag}-dst.sock")))?;
    let t = Instant::now();
    api(
        &dst,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "{backend}", "backend_path": "{}"}}, "resume_vm": true{extra}}}"#,
            state.display(),
            path.display()
        ),
    )?;
    Ok((dst, t, common::ms(t.elapsed())))
}

fn clones(
    vmm: Vmm,
    bin: &Path,
    dir: &Scratch,
    n: usize,
    parallel: usize,
) -> Result<(f64, Vec<f64>)> {
    let tag = format!("{vmm:?}-clones");
    let state = dir.path(&format!("{tag}.state"));
    let mem = dir.path(&format!("{tag}.mem"));
    let src = boot(bin, dir, &tag, 128, None)?;
    wait_line(&src, "info workload step=2 ", Duration::from_secs(60))?;
    api(&src, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    create(&src, "Full", &state, &mem)?;
    drop(src);
    let next = std::sync::atomic::AtomicUsize::new(0);
    let echoes = std::sync::Mutex::new(Vec::new());
    let t = Instant::now();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = (0..parallel)
            .map(|_| {
                scope.spawn(|| -> std::result::Result<(), String> {
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        if i >= n {
                            return Ok(());
                        }
                        let clone = format!("{tag}-{i}");
                        let (_, _, echo) =
                            restore_until(vmm, bin, dir, &clone, &state, &mem, "", false, false)
                                .map_err(|e| e.to_string())?;
                        echoes.lock().map_err(|e| e.to_string())?.push(echo);
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().map_err(|_| "a clone worker panicked")??;
        }
        Ok(())
    })?;
    let total = common::ms(t.elapsed());
    for f in [&state, &mem] {
        let _ = std::fs::remove_file(f);
    }
    let echoes = echoes.into_inner().map_err(|e| e.to_string())?;
    Ok((total, echoes))
}

fn cycle(vmm: Vmm, bin: &Path, dir: &Scratch, mem_mib: usize, run: usize) -> Result<Sample> {
    let tag = format!("{vmm:?}-{mem_mib}-{run}");
    let disk = dir.path(&format!("{tag}.img"));
    std::fs::write(&disk, vec![0u8; 4 << 20])?;
    let state = dir.path(&format!("{tag}.state"));
    let mem = dir.path(&format!("{tag}.mem"));
    let src = boot(bin, dir, &tag, mem_mib, Some(&disk))?;
    wait_line(&src, "info workload step=2 ", Duration::from_secs(60))?;
    api(&src, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let create_ms = create(&src, "Full", &state, &mem)?;
    api(&src, "PATCH", "/vm", r#"{"state": "Resumed"}"#)?;
    wait_line(&src, "info workload step=4 ", Duration::from_secs(60))?;
    api(&src, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let diff_state = dir.path(&format!("{tag}.diff-state"));
    let diff = dir.path(&format!("{tag}.diff"));
    let diff_ms = create(&src, "Diff", &diff_state, &diff)?;
    drop(src);
    let alloc = |p: &Path| -> Result<f64> {
        Ok(std::fs::metadata(p)?.blocks() as f64 * 512.0 / f64::from(1 << 20))
    };
    let mem_alloc_mib = alloc(&mem)?;
    let diff_alloc_mib = alloc(&diff)?;

    // kiln records the working set of its first restore (1 s after it runs), for the next.
    let ws = dir.path(&format!("{tag}.ws"));
    let ws_param = match vmm {
        Vmm::Kiln => format!(r#", "working_set": {{"path": "{}"}}"#, ws.display()),
        Vmm::Firecracker => String::new(),
    };
    let (load_ms, running_ms, echo_ms) =
        restore(vmm, bin, dir, &tag, &state, &mem, &ws_param, false)?;
    let (mut ws_load_ms, mut ws_echo_ms, mut cold_ws_echo_ms) = (0.0, 0.0, 0.0);
    let wtag = format!("{tag}-ws");
    if vmm == Vmm::Kiln {
        let (l, _, e) = restore(vmm, bin, dir, &wtag, &state, &mem, &ws_param, false)?;
        (ws_load_ms, ws_echo_ms) = (l, e);
        cold_ws_echo_ms = restore(vmm, bin, dir, &wtag, &state, &mem, &ws_param, true)?.2;
    }
    let cold_echo_ms = restore(
        vmm,
        bin,
        dir,
        &format!("{tag}-cold"),
        &state,
        &mem,
        "",
        true,
    )?
    .2;
    let (uffd_load_ms, uffd_echo_ms, uffd_pages) =
        restore_uffd(vmm, bin, dir, &format!("{tag}-uffd"), &state, &mem)?;
    for f in [&disk, &state, &mem, &diff, &diff_state, &ws] {
        let _ = std::fs::remove_file(f);
    }
    Ok(Sample {
        create_ms,
        diff_ms,
        load_ms,
        running_ms,
        echo_ms,
        mem_alloc_mib,
        diff_alloc_mib,
        ws_load_ms,
        ws_echo_ms,
        cold_echo_ms,
        cold_ws_echo_ms,
        uffd_load_ms,
        uffd_echo_ms,
        uffd_pages,
    })
}

/// Loads the snapshot in a fresh process (`extra` appended to the load's body), writes a
/// byte on the guest's console right after the answer, and times the answer, the guest's
/// next progress line and its answer to the byte. With a working set being recorded
/// (`extra` names one that does not exist yet), waits for the file before leaving. `cold`:
/// the memory file is evicted from the page cache first (its pages come from the disk).
#[allow(clippy::too_many_arguments)]
fn restore(
    vmm: Vmm,
    bin: &Path,
    dir: &Scratch,
    tag: &str,
    state: &Path,
    mem: &Path,
    extra: &str,
    cold: bool,
) -> Result<(f64, f64, f64)> {
    restore_until(vmm, bin, dir, tag, state, mem, extra, cold, true)
}

/// [`restore`], waiting for the next progress line only if `progress`.
#[allow(clippy::too_many_arguments)]
fn restore_until(
    vmm: Vmm,
    bin: &Path,
    dir: &Scratch,
    tag: &str,
    state: &Path,
    mem: &Path,
    extra: &str,
    cold: bool,
    progress: bool,
) -> Result<(f64, f64, f64)> {
    if cold {
        use std::os::fd::AsRawFd;
        let f = std::fs::File::open(mem)?;
        f.sync_all()?;
        // SAFETY: advice on a file descriptor we own; no memory is passed.
        let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
        if rc != 0 {
            return Err(format!("cannot evict the memory file: error {rc}").into());
        }
    }
    let ws = dir.path(&format!("{}.ws", tag.trim_end_matches("-ws")));
    let recording = !extra.is_empty() && !ws.exists();
    let (dst, t, load_ms) = load(bin, dir, tag, state, "File", mem, extra)?;
    let (running_ms, echo_ms) = answers(vmm, tag, &dst, t, progress)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while recording && !ws.exists() {
        if Instant::now() > deadline {
            return Err("the working set was never recorded".into());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(dst);
    Ok((load_ms, running_ms, echo_ms))
}

/// Writes a byte on a restored guest's console right away and times (from `t`, the load's
/// request) its next progress line (if `progress`) and its answer to the byte.
fn answers(vmm: Vmm, tag: &str, dst: &Proc, t: Instant, progress: bool) -> Result<(f64, f64)> {
    {
        use std::io::Write;
        let stdin = dst.stdin.as_ref().ok_or("no stdin")?;
        (&*stdin).write_all(b"k")?;
    }
    let (mut running_ms, mut echo_ms) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while (progress && running_ms.is_none()) || echo_ms.is_none() {
        let line = dst
            .lines
            .recv_until(deadline)
            .map_err(|_| "the restored guest went quiet")?;
        let at = common::ms(t.elapsed());
        if std::env::var_os("KILN_BENCH_SNAP_TRACE").is_some() {
            println!("  {vmm:?} {tag} +{at:.1} ms: {}", line.text);
        }
        if line.text.starts_with("info workload step=") {
            running_ms.get_or_insert(at);
        } else if line.text.starts_with("info workload echo=") {
            echo_ms.get_or_insert(at);
        }
    }
    Ok((running_ms.unwrap_or_default(), echo_ms.unwrap_or_default()))
}

/// Loads the snapshot with the Uffd backend, testkit's page-fault handler serving `mem`:
/// the load's answer, the guest's answer to a console byte, and the pages served by then.
fn restore_uffd(
    vmm: Vmm,
    bin: &Path,
    dir: &Scratch,
    tag: &str,
    state: &Path,
    mem: &Path,
) -> Result<(f64, f64, f64)> {
    let sock = dir.path(&format!("{tag}.sock"));
    let server = PageServer::start(&sock, mem, Mode::Serve)?;
    let (dst, t, load_ms) = load(bin, dir, tag, state, "Uffd", &sock, "")?;
    let (_, echo_ms) = answers(vmm, tag, &dst, t, false)?;
    let pages = server.served() as f64;
    drop(dst);
    server.finish()?;
    Ok((load_ms, echo_ms, pages))
}

fn main() {
    common::run("snapshot", "boots VMs", || {
        let runs = env_usize("KILN_BENCH_SNAP_RUNS", 5);
        let sizes: Vec<usize> = std::env::var("KILN_BENCH_SNAP_MIB")
            .unwrap_or_else(|_| "128,1024,4096".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        let fc = common::firecracker();
        if fc.is_none() {
            println!("baseline absent: Firecracker could not be fetched (benches/firecracker.sh)");
        }
        let kiln = PathBuf::from(common::KILN);
        let dir = Scratch::new("snapshot")?;
        println!("snapshot bench: {runs} runs per size, kiln and Firecracker interleaved");
        for mib in sizes {
            let mut k = Vec::new();
            let mut f = Vec::new();
            for run in 0..runs {
                k.push(cycle(Vmm::Kiln, &kiln, &dir, mib, run)?);
                if let Some(bin) = &fc {
                    f.push(cycle(Vmm::Firecracker, bin, &dir, mib, run)?);
                }
            }
            println!("\n{mib} MiB guest (medians, min-max)");
            println!(
                "{:<28} {:>22} {:>22} {:>8}",
                "", "kiln", "firecracker", "ratio"
            );
            type Get = fn(&Sample) -> f64;
            let rows: [(&str, Get); 11] = [
                ("create Full (ms)", |s| s.create_ms),
                ("create Diff, 2 steps (ms)", |s| s.diff_ms),
                ("load -> response (ms)", |s| s.load_ms),
                ("load -> next progress (ms)", |s| s.running_ms),
                ("load -> console echo (ms)", |s| s.echo_ms),
                ("cold load -> echo (ms)", |s| s.cold_echo_ms),
                ("Uffd load -> response (ms)", |s| s.uffd_load_ms),
                ("Uffd load -> echo (ms)", |s| s.uffd_echo_ms),
                ("Uffd pages served by then", |s| s.uffd_pages),
                ("Full memory file (MiB)", |s| s.mem_alloc_mib),
                ("Diff memory file (MiB)", |s| s.diff_alloc_mib),
            ];
            for (name, get) in rows {
                let ks = stats(&k.iter().map(get).collect::<Vec<_>>());
                if f.is_empty() {
                    println!("{name:<28} {:>22} {:>22} {:>8}", cell(ks, 2), "absent", "-");
                } else {
                    let fs = stats(&f.iter().map(get).collect::<Vec<_>>());
                    println!(
                        "{name:<28} {:>22} {:>22} {:>8}",
                        cell(ks, 2),
                        cell(fs, 2),
                        ratio(ks.median, fs.median)
                    );
                }
            }
            // kiln's second restore, its working set (recorded by the first) faulted in,
            // against Firecracker's and kiln's own plain restores.
            type Pair = (&'static str, fn(&Sample) -> f64, fn(&Sample) -> f64);
            let ws_rows: [Pair; 3] = [
                ("ws load -> response (ms)", |s| s.ws_load_ms, |s| s.load_ms),
                (
                    "ws load -> console echo (ms)",
                    |s| s.ws_echo_ms,
                    |s| s.echo_ms,
                ),
                (
                    "cold ws load -> echo (ms)",
                    |s| s.cold_ws_echo_ms,
                    |s| s.cold_echo_ms,
                ),
            ];
            for (name, ws, plain) in ws_rows {
                let ks = stats(&k.iter().map(ws).collect::<Vec<_>>());
                let kp = stats(&k.iter().map(plain).collect::<Vec<_>>());
                let fp = (!f.is_empty()).then(|| stats(&f.iter().map(plain).collect::<Vec<_>>()));
                println!(
                    "{name:<28} {:>22} {:>22} {:>8}   (kiln without: {}, {})",
                    cell(ks, 2),
                    fp.map_or_else(|| "absent".to_string(), |f| cell(f, 2)),
                    fp.map_or_else(|| "-".to_string(), |f| ratio(ks.median, f.median)),
                    cell(kp, 2),
                    ratio(ks.median, kp.median)
                );
            }
        }
        // Clones, kiln and Firecracker one after the other (each VMM's own snapshot).
        let n = env_usize("KILN_BENCH_SNAP_CLONES", 20);
        println!("\n{n} clones of one 128 MiB snapshot, 4 at a time");
        let (kt, ke) = clones(Vmm::Kiln, &kiln, &dir, n, 4)?;
        let fcc = match &fc {
            Some(bin) => Some(clones(Vmm::Firecracker, bin, &dir, n, 4)?),
            None => None,
        };
        let row = |name: &str, k: f64, f: Option<f64>, kc: String, fcell: String| {
            println!(
                "{name:<28} {kc:>22} {fcell:>22} {:>8}",
                f.map_or_else(|| "-".to_string(), |f| ratio(k, f))
            );
        };
        row(
            "all answered (ms)",
            kt,
            fcc.as_ref().map(|c| c.0),
            format!("{kt:.1}"),
            fcc.as_ref()
                .map_or_else(|| "absent".into(), |c| format!("{:.1}", c.0)),
        );
        let ks = stats(&ke);
        let fs = fcc.as_ref().map(|c| stats(&c.1));
        row(
            "clone load -> echo (ms)",
            ks.median,
            fs.map(|f| f.median),
            cell(ks, 2),
            fs.map_or_else(|| "absent".into(), |f| cell(f, 2)),
        );
        Ok(())
    });
}
