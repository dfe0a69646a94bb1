//! Jailer start to exec of the jailed program: `cargo bench -p jailer` (root).
//!
//! Each run spawns the jailer, which jails and execs `jailer-inspector
//! --stamp /stamp`; the inspector writes CLOCK_MONOTONIC at the top of its
//! main. The time from just before the spawn to that stamp is one sample.
//! The baseline is a plain fork+exec of the same program, in the same
//! invocation. Prints the median (and 10th/90th percentiles) per mode, and
//! the ratio of medians against the baseline. `JAILER_BENCH_RUNS` sets the
//! number of runs per mode (default 100).

use std::ffi::OsString;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use testkit::stats::percentile;

const JAILER: &str = env!("CARGO_BIN_EXE_jailer");
const PROGRAM: &str = env!("CARGO_BIN_EXE_jailer-inspector");

fn main() {
    if !testkit::is_root() {
        eprintln!("jailer startup benchmark: skipped, needs root");
        return;
    }
    // Daemonized and pid-namespace children are orphaned: reap them here.
    // SAFETY: PR_SET_CHILD_SUBREAPER takes an integer flag.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) } != 0 {
        panic!("prctl: {}", std::io::Error::last_os_error());
    }
    let runs: usize = std::env::var("JAILER_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100);
    let base = testkit::TempDir::new("jailer-bench");
    let base = base.path();
    let size = fs::metadata(PROGRAM).expect("program").len();
    println!(
        "jailer start -> exec of a static program ({size} bytes, copied into each jail), {runs} runs per mode"
    );

    let modes: [(&str, &[&str]); 4] = [
        ("jailer", &[]),
        ("jailer --new-pid-ns", &["--new-pid-ns"]),
        ("jailer --daemonize", &["--daemonize"]),
        (
            "jailer --daemonize --new-pid-ns",
            &["--daemonize", "--new-pid-ns"],
        ),
    ];
    let mut results: Vec<(&str, Vec<u64>)> = vec![("fork+exec (baseline)", Vec::new())];
    results.extend(modes.iter().map(|(name, _)| (*name, Vec::new())));
    // Interleave the modes so that drift affects them alike.
    for i in 0..runs {
        results[0].1.push(baseline(base));
        for (m, (_, flags)) in modes.iter().enumerate() {
            results[m + 1]
                .1
                .push(jailed(base, &format!("bench-{m}-{i}"), flags));
        }
    }
    let base_median = median(&mut results[0].1.clone());
    println!(
        "{:<34} {:>10} {:>10} {:>10} {:>8}",
        "mode", "median µs", "p10 µs", "p90 µs", "ratio"
    );
    for (name, samples) in &mut results {
        samples.sort_unstable();
        let m = median(samples);
        let pct = |p: usize| percentile(samples, p).unwrap_or(0);
        let ratio = m as f64 / base_median.max(1) as f64;
        println!(
            "{name:<34} {m:>10} {:>10} {:>10} {ratio:>7.1}x",
            pct(10),
            pct(90)
        );
    }
}

fn monotonic_us() -> u64 {
    testkit::procfs::monotonic_ns() / 1000
}

/// Waits for every child (and reparented orphan) to end.
fn reap_all() {
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid, writable int.
        if unsafe { libc::waitpid(-1, &mut status, 0) } == -1
            && std::io::Error::last_os_error().raw_os_error() != Some(libc::EINTR)
        {
            return;
        }
    }
}

fn stamp_delta(stamp: &Path, start: u64) -> u64 {
    let text =
        fs::read_to_string(stamp).unwrap_or_else(|e| panic!("read {}: {e}", stamp.display()));
    text.trim().parse::<u64>().expect("a stamp") - start
}

fn baseline(base: &Path) -> u64 {
    let dir = base.join("baseline");
    fs::create_dir_all(&dir).expect("create the baseline dir");
    let start = monotonic_us();
    Command::new(PROGRAM)
        .args(["--stamp", "stamp"])
        .current_dir(&dir)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the program")
        .wait()
        .expect("wait for the program");
    let delta = stamp_delta(&dir.join("stamp"), start);
    fs::remove_dir_all(&dir).expect("remove the baseline dir");
    delta
}

fn jailed(base: &Path, id: &str, flags: &[&str]) -> u64 {
    let mut args: Vec<OsString> = [
        "--id",
        id,
        "--exec-file",
        PROGRAM,
        "--uid",
        "40123",
        "--gid",
        "40100",
    ]
    .iter()
    .map(OsString::from)
    .collect();
    args.extend(["--chroot-base-dir".into(), base.as_os_str().to_owned()]);
    args.extend(flags.iter().map(OsString::from));
    args.extend(["--", "--stamp", "/stamp"].iter().map(OsString::from));

    let start = monotonic_us();
    let mut jailer = Command::new(JAILER)
        .args(&args)
        .stdin(Stdio::null())
        .spawn()
        .expect("spawn the jailer");
    let status = jailer.wait().expect("wait for the jailer");
    reap_all();
    assert!(status.success(), "jailer {args:?}: {status}");
    let jail: PathBuf = base.join("jailer-inspector").join(id);
    let delta = stamp_delta(&jail.join("root/stamp"), start);
    fs::remove_dir_all(&jail).expect("remove the jail");
    delta
}

fn median(samples: &mut [u64]) -> u64 {
    samples.sort_unstable();
    percentile(samples, 50).unwrap_or(0)
}
