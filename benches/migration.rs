//! Live migration: total time, bytes sent and downtime for guests of 128 MiB, 1 GiB and
//! 4 GiB over a Unix socket, idle (the test guest's workload between its steps) and after
//! writing 16 MiB (`ws=16`); the workload keeps rewriting 64 KiB every ~100 ms step, the
//! "set rate" it dirties memory at. Downtime is reported twice: the source's (its pause to
//! the destination's `Resumed`) and the guest's: a byte goes to each kiln's serial console
//! every 2 ms and the guest answers each (`info workload echo=`, a sign of life no guest
//! timer gates); the gap is from the source's last answer to the destination's first. Bytes
//! sent are compared with the guest memory the source had resident (touched) when the
//! migration began.
//!
//! `sudo cargo bench --bench migration` (`KILN_MIG_SIZES=128,1024` to choose sizes).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{Result, parse_smaps};
use testkit::{LineReader, TempDir};

struct Kiln {
    child: Child,
    lines: Option<LineReader>,
    sock: std::path::PathBuf,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ping: std::sync::Arc<std::sync::atomic::AtomicBool>,
    err: std::path::PathBuf,
}

impl Drop for Kiln {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path, name: &str, extra: &[&str]) -> Result<Kiln> {
    let sock = dir.join(format!("{name}.sock"));
    let mut child = Command::new(common::KILN)
        .args([
            "--api-sock",
            sock.to_str().ok_or("path")?,
            "--level",
            "Info",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(dir.join(format!("{name}.err")))?)
        .spawn()?;
    let lines = LineReader::spawn(child.stdout.take().ok_or("stdout")?);
    // Pings on the console: one byte every 2 ms, answered by the guest once it runs.
    let mut stdin = child.stdin.take().ok_or("stdin")?;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ping = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (halt, go) = (stop.clone(), ping.clone());
    std::thread::spawn(move || {
        use std::io::Write;
        use std::sync::atomic::Ordering::SeqCst;
        while !halt.load(SeqCst) {
            if go.load(SeqCst) && stdin.write_all(b"p").is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    });
    let start = Instant::now();
    while std::os::unix::net::UnixStream::connect(&sock).is_err() {
        if start.elapsed() > Duration::from_secs(20) {
            return Err("the API socket never accepted".into());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(Kiln {
        child,
        lines: Some(lines),
        sock,
        stop,
        ping,
        err: dir.join(format!("{name}.err")),
    })
}

/// The time of the next line starting with `prefix` (within `timeout`).
fn wait_line(k: &Kiln, prefix: &str, timeout: Duration) -> Result<Instant> {
    let deadline = Instant::now() + timeout;
    loop {
        let line = k
            .lines
            .as_ref()
            .ok_or("no output")?
            .recv_until(deadline)
            .map_err(|_| format!("no `{prefix}` line within {timeout:?}"))?;
        if line.text.starts_with("fail ") {
            return Err(format!("the guest failed: {}", line.text).into());
        }
        if line.text.starts_with(prefix) {
            return Ok(line.at);
        }
    }
}

/// Resident guest memory (KiB) of `pid`: its anonymous mappings of the regions' sizes.
fn touched_kib(pid: u32, mem_mib: u64) -> Result<u64> {
    // Above 3 GiB two regions, which the kernel may merge into one mapping.
    let sizes: Vec<u64> = if mem_mib <= 3072 {
        vec![mem_mib << 10]
    } else {
        vec![3072 << 10, (mem_mib - 3072) << 10, mem_mib << 10]
    };
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"))?;
    Ok(parse_smaps(&smaps)
        .iter()
        .filter(|m| m.name.is_empty() && m.perms == "rw-p" && sizes.contains(&m.size))
        .map(|m| m.rss)
        .sum())
}

struct Row {
    mem_mib: u64,
    ws_mib: u64,
    rounds: u64,
    bytes: u64,
    touched: u64,
    downtime_ms: u64,
    guest_gap: Duration,
    total_ms: u64,
    parts: String,
}

fn one(mem_mib: u64, ws_mib: u64) -> Result<Row> {
    let dir = TempDir::new("migbench");
    let disk = dir.file("disk.img", &vec![0u8; 4 << 20]);
    let cfg = dir.file(
        "vm.json",
        format!(
            r#"{{"boot-source": {{"kernel_image_path": "builtin:test-guest",
                  "boot_args": "console=ttyS0 reboot=k panic=1 kiln.run=workload:100000:blk:ws={ws_mib}"}},
                "machine-config": {{"vcpu_count": 1, "mem_size_mib": {mem_mib}}},
                "drives": [{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false}}]}}"#,
            disk.display()
        )
        .as_bytes(),
    );
    let src = spawn(
        dir.path(),
        "src",
        &["--config-file", cfg.to_str().ok_or("path")?],
    )?;
    let step3 = wait_line(&src, "info workload step=3 ", Duration::from_secs(180))?;
    let dst = spawn(dir.path(), "dst", &[])?;
    let listen = format!("unix:{}", dir.path().join("mig.sock").display());
    let (status, text) = testkit::http::request(
        &dst.sock,
        "PUT",
        "/migration/receive",
        Some(&format!(r#"{{"listen": "{listen}"}}"#)),
    );
    if status != 204 {
        return Err(format!("receive: {status} {text}").into());
    }
    let touched = touched_kib(src.child.id(), mem_mib)? * 1024;
    // Pings from now on (the guest reads its whole working set before each answer).
    for k in [&src, &dst] {
        k.ping.store(true, std::sync::atomic::Ordering::SeqCst);
    }
    std::thread::sleep(Duration::from_millis(50));
    let (status, body) = testkit::http::request(
        &src.sock,
        "PUT",
        "/migration/send",
        Some(&format!(
            r#"{{"destination": "{listen}", "max_downtime_ms": 50}}"#
        )),
    );
    if status != 200 {
        return Err(format!("send: {status} {body}").into());
    }
    let first_there = wait_line(&dst, "info workload echo=", Duration::from_secs(60))?;
    let mut src = src;
    src.child.wait()?;
    let last_here = src
        .lines
        .take()
        .ok_or("no output")?
        .rest()
        .into_iter()
        .filter(|l| l.text.starts_with("info workload echo="))
        .map(|l| l.at)
        .next_back()
        .unwrap_or(step3);
    let parts = std::fs::read_to_string(&src.err)?
        .lines()
        .find(|l| l.contains("migration downtime:"))
        .map(|l| {
            l.split("migration downtime: ")
                .nth(1)
                .unwrap_or("")
                .to_string()
        })
        .unwrap_or_default();
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let get = |k: &str| v[k].as_u64().unwrap_or(0);
    Ok(Row {
        mem_mib,
        ws_mib,
        rounds: get("rounds"),
        bytes: get("bytes_sent"),
        touched,
        downtime_ms: get("downtime_ms"),
        guest_gap: first_there.saturating_duration_since(last_here),
        total_ms: get("total_ms"),
        parts,
    })
}

fn main() {
    common::run("migration", "boots VMs", || {
        let sizes: Vec<u64> = std::env::var("KILN_MIG_SIZES")
            .unwrap_or_else(|_| "128,1024,4096".into())
            .split(',')
            .filter_map(|s| s.trim().parse().ok())
            .collect();
        println!(
            "| guest | written | rounds | bytes sent | touched | sent/touched | downtime (source) | guest silent | total |"
        );
        println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
        let mut parts = Vec::new();
        for &mem in &sizes {
            for ws in [0, 16] {
                let r = one(mem, ws)?;
                parts.push(format!("{mem} MiB, ws {ws} MiB: {}", r.parts));
                println!(
                    "| {} MiB | {} MiB | {} | {:.1} MiB | {:.1} MiB | {:.2} | {} ms | {} ms | {} ms |",
                    r.mem_mib,
                    r.ws_mib,
                    r.rounds,
                    r.bytes as f64 / 1048576.0,
                    r.touched as f64 / 1048576.0,
                    r.bytes as f64 / r.touched.max(1) as f64,
                    r.downtime_ms,
                    r.guest_gap.as_millis(),
                    r.total_ms
                );
            }
        }
        println!("\nWhere the source's downtime went (its log):");
        for p in parts {
            println!("  {p}");
        }
        Ok(())
    });
}
