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
//! - the memory files' allocated sizes.
//!
//! Medians (min–max) over `KILN_BENCH_SNAP_RUNS` runs (default 5) for each size in
//! `KILN_BENCH_SNAP_MIB` (default `128,1024`), and the ratio kiln / Firecracker.

mod common;

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Result, Scratch, cell, env_usize, guest_elf, ratio, stats};
use testkit::LineReader;
use testkit::http::request;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vmm {
    Kiln,
    Firecracker,
}

#[derive(Debug, Default, Clone, Copy)]
struct Sample {
    create_ms: f64,
    diff_ms: f64,
    load_ms: f64,
    running_ms: f64,
    echo_ms: f64,
    mem_alloc_mib: f64,
    diff_alloc_mib: f64,
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

fn cycle(vmm: Vmm, bin: &Path, dir: &Scratch, mem_mib: usize, run: usize) -> Result<Sample> {
    let tag = format!("{vmm:?}-{mem_mib}-{run}");
    let disk = dir.path(&format!("{tag}.img"));
    std::fs::write(&disk, vec![0u8; 4 << 20])?;
    let state = dir.path(&format!("{tag}.state"));
    let mem = dir.path(&format!("{tag}.mem"));
    let src = spawn(bin, &dir.path(&format!("{tag}-src.sock")))?;
    api(
        &src,
        "PUT",
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=workload:1000000:blk"}}"#,
            guest_elf().display()
        ),
    )?;
    api(
        &src,
        "PUT",
        "/machine-config",
        &format!(r#"{{"vcpu_count": 1, "mem_size_mib": {mem_mib}, "track_dirty_pages": true}}"#),
    )?;
    api(
        &src,
        "PUT",
        "/drives/scratch",
        &format!(
            r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false, "is_read_only": false}}"#,
            disk.display()
        ),
    )?;
    api(
        &src,
        "PUT",
        "/actions",
        r#"{"action_type": "InstanceStart"}"#,
    )?;
    wait_line(&src, "info workload step=2 ", Duration::from_secs(60))?;
    api(&src, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let t = Instant::now();
    api(
        &src,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Full", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state.display(),
            mem.display()
        ),
    )?;
    let create_ms = common::ms(t.elapsed());
    api(&src, "PATCH", "/vm", r#"{"state": "Resumed"}"#)?;
    wait_line(&src, "info workload step=4 ", Duration::from_secs(60))?;
    api(&src, "PATCH", "/vm", r#"{"state": "Paused"}"#)?;
    let diff_state = dir.path(&format!("{tag}.diff-state"));
    let diff = dir.path(&format!("{tag}.diff"));
    let t = Instant::now();
    api(
        &src,
        "PUT",
        "/snapshot/create",
        &format!(
            r#"{{"snapshot_type": "Diff", "snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            diff_state.display(),
            diff.display()
        ),
    )?;
    let diff_ms = common::ms(t.elapsed());
    drop(src);
    let alloc = |p: &Path| -> Result<f64> {
        Ok(std::fs::metadata(p)?.blocks() as f64 * 512.0 / f64::from(1 << 20))
    };
    let mem_alloc_mib = alloc(&mem)?;
    let diff_alloc_mib = alloc(&diff)?;

    let dst = spawn(bin, &dir.path(&format!("{tag}-dst.sock")))?;
    let t = Instant::now();
    api(
        &dst,
        "PUT",
        "/snapshot/load",
        &format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state.display(),
            mem.display()
        ),
    )?;
    let load_ms = common::ms(t.elapsed());
    {
        use std::io::Write;
        let stdin = dst.stdin.as_ref().ok_or("no stdin")?;
        (&*stdin).write_all(b"k")?;
    }
    let (mut running_ms, mut echo_ms) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(60);
    while running_ms.is_none() || echo_ms.is_none() {
        let line = dst
            .lines
            .recv_until(deadline)
            .map_err(|_| "the restored guest went quiet")?;
        let at = common::ms(t.elapsed());
        if std::env::var_os("KILN_BENCH_SNAP_TRACE").is_some() {
            println!("  {vmm:?} +{at:.1} ms: {}", line.text);
        }
        if line.text.starts_with("info workload step=") {
            running_ms.get_or_insert(at);
        } else if line.text.starts_with("info workload echo=") {
            echo_ms.get_or_insert(at);
        }
    }
    drop(dst);
    for f in [&disk, &state, &mem, &diff, &diff_state] {
        let _ = std::fs::remove_file(f);
    }
    Ok(Sample {
        create_ms,
        diff_ms,
        load_ms,
        running_ms: running_ms.unwrap_or_default(),
        echo_ms: echo_ms.unwrap_or_default(),
        mem_alloc_mib,
        diff_alloc_mib,
    })
}

fn main() {
    common::run("snapshot", "boots VMs", || {
        let runs = env_usize("KILN_BENCH_SNAP_RUNS", 5);
        let sizes: Vec<usize> = std::env::var("KILN_BENCH_SNAP_MIB")
            .unwrap_or_else(|_| "128,1024".into())
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
            let rows: [(&str, Get); 7] = [
                ("create Full (ms)", |s| s.create_ms),
                ("create Diff, 2 steps (ms)", |s| s.diff_ms),
                ("load -> response (ms)", |s| s.load_ms),
                ("load -> next progress (ms)", |s| s.running_ms),
                ("load -> console echo (ms)", |s| s.echo_ms),
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
        }
        Ok(())
    });
}
