//! Linux boot milestones (issue 9): `cargo bench --test linux_boot_bench`, as root, on a host with
//! /dev/kvm.
//!
//! Boots the microVM guest kernel (`KILN_LINUX_KERNEL`, else the one `guest-kernel/build.sh`
//! builds or finds in its cache) exactly as the slow test does — 1 vCPU, 256 MiB, ext4 root
//! over virtio-blk, `ip=dhcp` from dnsmasq over virtio-net, kiln's default seccomp filters —
//! `KILN_LINUX_RUNS` times (default 3), one after the other, and prints the wall time from
//! kiln's spawn to each milestone (the console line that marks it arriving on kiln's
//! stdout): the first kernel line, the block device probed, the DHCP lease, the root mounted,
//! init started, and kiln's exit; per run and the median, with the emulation completions kiln
//! counted (`vcpu.emulation_completions` in its final metrics). Every run is also checked as
//! the test checks it. `KILN_LINUX_ECHO=1` prints the serial console as it comes and kiln's
//! stderr; `KILN_LINUX_KILN_ARGS` adds arguments to kiln's command line (space-separated,
//! e.g. `--no-seccomp` or `--level Debug`).
//!
//! Then the user-space workload of the test tier (tests/linux/workload.rs: busybox root
//! image, kiln under the jailer, 1 vCPU) `KILN_LINUX_WORKLOAD_RUNS` times (default: as many
//! as the boots above; 0 leaves it out), each checked as the test checks it, with its
//! milestones — kernel start, root mounted, first user-space line, workload done, kiln's
//! exit — and the guest's own timings of a 512 KiB file copy from the data drive onto the
//! root (synced), 256 KiB over TCP to the host, 256 KiB over TCP from the host and 256 KiB
//! over HTTP: per run and the median. The jailer must be built in the same profile first:
//! `cargo build --release -p jailer`.
#![allow(clippy::unwrap_used)]

mod linux;

use std::path::PathBuf;
use std::time::Duration;

const TIMEOUT: Duration = Duration::from_secs(15 * 60);

fn kernel() -> PathBuf {
    match std::env::var_os(linux::KERNEL_ENV).filter(|k| !k.is_empty()) {
        Some(k) => PathBuf::from(k),
        None => linux::build_kernel(),
    }
}

fn secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{:.1}", d.as_secs_f64()))
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` would pass nothing of ours.
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    let kernel = kernel();
    let runs: usize = std::env::var("KILN_LINUX_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let echo = std::env::var("KILN_LINUX_ECHO").is_ok_and(|v| v == "1");
    let kiln_args = std::env::var("KILN_LINUX_KILN_ARGS").unwrap_or_default();
    let kiln_args: Vec<&str> = kiln_args.split_whitespace().collect();
    eprintln!("kernel {}", kernel.display());
    eprintln!(
        "command line: {} (+ virtio_mmio.device=... root=/dev/vda rw)",
        linux::boot_args()
    );

    let mut boots = Vec::new();
    for run in 1..=runs {
        eprintln!("run {run}/{runs} ...");
        let boot = linux::boot(&kernel, &kiln_args, TIMEOUT, echo);
        if echo {
            eprint!("--- kiln stderr\n{}", boot.stderr);
        }
        linux::check_boot(&boot);
        eprintln!(
            "run {run}: init at {} s, exit at {:.1} s, emulation completions {:?}",
            secs(boot.milestones[linux::MILESTONES.len() - 1]),
            boot.end.as_secs_f64(),
            boot.vcpu_metric("emulation_completions")
        );
        boots.push(boot);
    }

    let mut header = format!("{:<20}", "milestone (s)");
    for run in 1..=runs {
        header.push_str(&format!("{:>9}", format!("run {run}")));
    }
    header.push_str(&format!("{:>9}", "median"));
    println!("{header}");
    let mut rows: Vec<(String, Vec<Option<Duration>>)> = linux::MILESTONES
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            (
                name.to_string(),
                boots.iter().map(|b| b.milestones[i]).collect(),
            )
        })
        .collect();
    rows.push((
        "kiln exit".to_string(),
        boots.iter().map(|b| Some(b.end)).collect(),
    ));
    for (name, values) in rows {
        let mut line = format!("{name:<20}");
        for v in &values {
            line.push_str(&format!("{:>9}", secs(*v)));
        }
        line.push_str(&format!(
            "{:>9}",
            secs(testkit::stats::median_duration(&values))
        ));
        println!("{line}");
    }
    let mut line = format!("{:<20}", "emulation compl.");
    let mut counts = Vec::new();
    for b in &boots {
        let c = b.vcpu_metric("emulation_completions");
        counts.push(c);
        line.push_str(&format!(
            "{:>9}",
            c.map_or_else(|| "-".to_string(), |c| c.to_string())
        ));
    }
    let mut sorted: Vec<u64> = counts.iter().flatten().copied().collect();
    sorted.sort_unstable();
    if let Some(m) = sorted.get(sorted.len() / 2) {
        line.push_str(&format!("{m:>9}"));
    }
    println!("{line}");
    let wl_runs: usize = std::env::var("KILN_LINUX_WORKLOAD_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(runs);
    if wl_runs > 0 {
        workload(&kernel, wl_runs, echo);
    }
}

/// The workload runs and their table.
fn workload(kernel: &std::path::Path, runs: usize, echo: bool) {
    use linux::workload;
    let mut all = Vec::new();
    for run in 1..=runs {
        eprintln!("workload run {run}/{runs} ...");
        let r = workload::run(kernel, 1, TIMEOUT, echo);
        workload::check(&r);
        workload::report(&r);
        all.push(r);
    }
    let mut header = format!("{:<20}", "workload (s)");
    for run in 1..=runs {
        header.push_str(&format!("{:>9}", format!("run {run}")));
    }
    header.push_str(&format!("{:>9}", "median"));
    println!("{header}");
    let mut rows: Vec<(String, Vec<Option<Duration>>)> = workload::MILESTONES
        .iter()
        .enumerate()
        .map(|(i, (name, _))| {
            (
                name.to_string(),
                all.iter().map(|r| r.milestones()[i]).collect(),
            )
        })
        .collect();
    rows.push((
        "kiln exit".to_string(),
        all.iter().map(|r| Some(r.console.end)).collect(),
    ));
    for (check, what) in [
        ("file-copy", "copy 512 KiB"),
        ("tcp-out", "TCP out 256 KiB"),
        ("tcp-in", "TCP in 256 KiB"),
        ("http", "HTTP 256 KiB"),
    ] {
        rows.push((
            what.to_string(),
            all.iter()
                .map(|r| {
                    r.value(check, "ms")
                        .and_then(|v| v.parse().ok())
                        .map(Duration::from_millis)
                })
                .collect(),
        ));
    }
    for (name, values) in rows {
        let mut line = format!("{name:<20}");
        for v in &values {
            line.push_str(&format!("{:>9}", secs(*v)));
        }
        line.push_str(&format!(
            "{:>9}",
            secs(testkit::stats::median_duration(&values))
        ));
        println!("{line}");
    }
}
