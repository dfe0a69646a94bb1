//! cgroups v1 on this host's hierarchies, and v2 on a cgroup2 hierarchy
//! mounted in a private mount namespace. Every cgroup a test makes is removed
//! at its end. Needs root.

mod common;

use std::fs;
use std::path::{Path, PathBuf};

use common::{CgroupDirs, INSPECTOR_NAME, Jailer, cgroup_mount, cgroups_of, require_root, unique};

fn read(path: impl AsRef<Path>) -> String {
    let path = path.as_ref();
    fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
        .trim()
        .to_owned()
}

fn v1_mount(controller: &str) -> PathBuf {
    cgroup_mount(Some(controller))
        .unwrap_or_else(|| panic!("no cgroup v1 hierarchy with {controller} is mounted"))
}

/// The cgroup of `pid` in the hierarchy whose controllers are `controllers`.
fn cgroup_in(pid: i32, controllers: &str) -> String {
    cgroups_of(pid)
        .into_iter()
        .find(|(c, _)| c == controllers)
        .map(|(_, path)| path)
        .unwrap_or_else(|| panic!("no {controllers:?} line in /proc/{pid}/cgroup"))
}

#[test]
fn v1_cpu_pids_and_cpuset() {
    require_root();
    let (cpu, pids, cpuset) = (v1_mount("cpu"), v1_mount("pids"), v1_mount("cpuset"));
    let parent = unique("kiln-jt-cg");
    let jailer = Jailer::inspector()
        .arg("--cgroup-version")
        .arg("1")
        .arg("--parent-cgroup")
        .arg(&parent)
        .arg("--cgroup")
        .arg("cpu.shares=512")
        .arg("--cgroup")
        .arg("pids.max=20")
        .arg("--cgroup")
        .arg("cpuset.cpus=0")
        .exec_args(["--hold"]);
    let relative = Path::new(&parent).join(&jailer.id);
    let mut dirs = CgroupDirs::default();
    for mount in [&cpu, &pids, &cpuset] {
        dirs.add(mount, &relative);
    }

    let mut run = jailer.spawn();
    run.read_report();
    let pid = run.pid();
    let expected = format!("/{}", relative.display());
    for controller in ["cpu", "pids", "cpuset"] {
        assert_eq!(cgroup_in(pid, controller), expected, "{controller}");
    }
    // Hierarchies without a setting are left alone.
    let own = i32::try_from(std::process::id()).expect("pid");
    assert_eq!(cgroup_in(pid, "freezer"), cgroup_in(own, "freezer"));

    assert_eq!(read(cpu.join(&relative).join("cpu.shares")), "512");
    assert_eq!(read(pids.join(&relative).join("pids.max")), "20");
    assert_eq!(read(cpuset.join(&relative).join("cpuset.cpus")), "0");
    // cpus and mems inherited down the new levels, as Firecracker does.
    let host_mems = read(cpuset.join("cpuset.mems"));
    assert_eq!(read(cpuset.join(&relative).join("cpuset.mems")), host_mems);
    assert_eq!(read(cpuset.join(&parent).join("cpuset.mems")), host_mems);
    assert_eq!(
        read(cpuset.join(&parent).join("cpuset.cpus")),
        read(cpuset.join("cpuset.cpus"))
    );

    run.kill();
    assert_eq!(run.finish().code, 128 + libc::SIGKILL);
}

#[test]
fn v1_memory_nested_under_this_test_cgroup() {
    require_root();
    let memory = v1_mount("memory");
    // Stay inside the memory cgroup this test runs in.
    let own = i32::try_from(std::process::id()).expect("pid");
    let here = cgroup_in(own, "memory");
    let here = here.trim_start_matches('/');
    let leaf = unique("kiln-jt-mem");
    let parent = Path::new(here).join(&leaf);
    let jailer = Jailer::inspector()
        .arg("--parent-cgroup")
        .arg(&parent)
        .arg("--cgroup")
        .arg("memory.limit_in_bytes=268435456")
        .exec_args(["--hold"]);
    let mut dirs = CgroupDirs::default();
    dirs.add(&memory.join(here), &Path::new(&leaf).join(&jailer.id));

    let mut run = jailer.spawn();
    run.read_report();
    let relative = parent.join(&jailer.id);
    assert_eq!(
        cgroup_in(run.pid(), "memory"),
        format!("/{}", relative.display())
    );
    assert_eq!(
        read(memory.join(&relative).join("memory.limit_in_bytes")),
        "268435456"
    );
    run.kill();
    run.finish();
}

#[test]
fn v1_default_parent_is_the_exec_file_name() {
    require_root();
    let pids = v1_mount("pids");
    let jailer = Jailer::inspector().arg("--cgroup").arg("pids.max=30");
    let relative = Path::new(INSPECTOR_NAME).join(&jailer.id);
    let mut dirs = CgroupDirs::default();
    dirs.add(&pids, &relative);
    let mut run = jailer.spawn();
    run.read_report();
    assert_eq!(run.finish().code, 0);
    assert_eq!(read(pids.join(&relative).join("pids.max")), "30");
}

#[test]
fn v1_missing_hierarchy_is_a_clear_error() {
    require_root();
    let jailer = Jailer::inspector().arg("--cgroup").arg("nosuchctl.max=1");
    jailer.run().assert_failed(
        6,
        "cgroups",
        "no cgroup v1 hierarchy with the nosuchctl controller is mounted",
    );
    assert_eq!(fs::read_dir(jailer.base.path()).expect("base").count(), 0);
}

/// A controller the host's v2 hierarchy does not offer (a made-up name if
/// it offers every real one).
fn unavailable_v2_controller(v2: &Path) -> String {
    let available = read(v2.join("cgroup.controllers"));
    let available: Vec<&str> = available.split_whitespace().collect();
    ["pids", "memory", "cpu", "io", "cpuset"]
        .into_iter()
        .find(|c| !available.contains(c))
        .unwrap_or("kilnnosuch")
        .to_owned()
}

#[test]
fn v2_missing_controller_is_a_clear_error() {
    require_root();
    let v2 = common::cgroup2_mount().expect("a cgroup2 hierarchy");
    let controller = unavailable_v2_controller(&v2);
    let jailer = Jailer::inspector()
        .private_cgroup2()
        .arg("--cgroup-version")
        .arg("2")
        .arg("--cgroup")
        .arg(format!("{controller}.max=10"));
    jailer.run().assert_failed(
        6,
        "cgroups",
        &format!(
            "controller {controller} is not available in the cgroup v2 hierarchy /sys/fs/cgroup"
        ),
    );
    // Checked before anything was made.
    assert_eq!(fs::read_dir(jailer.base.path()).expect("base").count(), 0);
    assert!(!v2.join(INSPECTOR_NAME).join(&jailer.id).exists());
}

/// Restores a controller's state in a `cgroup.subtree_control` on drop.
struct RestoreSubtreeControl {
    file: PathBuf,
    controller: &'static str,
    was_enabled: bool,
}

impl Drop for RestoreSubtreeControl {
    fn drop(&mut self) {
        if !self.was_enabled {
            let _ = fs::write(&self.file, format!("-{}", self.controller));
        }
    }
}

/// cgroup v2 with only the core's files (`cgroup.*`, present in every cgroup whatever
/// controllers the host offers): this runs on any host with a cgroup2 hierarchy, so the v2
/// path is always exercised for real.
#[test]
fn v2_core_setting_in_private_mount_namespace() {
    require_root();
    let v2 = common::cgroup2_mount().expect("a cgroup2 hierarchy");
    let parent = unique("kiln-jt-v2core");
    let jailer = Jailer::inspector()
        .private_cgroup2()
        .arg("--cgroup-version")
        .arg("2")
        .arg("--parent-cgroup")
        .arg(&parent)
        .arg("--cgroup")
        .arg("cgroup.max.descendants=3")
        .exec_args(["--hold"]);
    let relative = Path::new(&parent).join(&jailer.id);
    let mut dirs = CgroupDirs::default();
    dirs.add(&v2, &relative);

    let mut run = jailer.spawn();
    run.read_report();
    assert_eq!(cgroup_in(run.pid(), ""), format!("/{}", relative.display()));
    assert_eq!(read(v2.join(&relative).join("cgroup.max.descendants")), "3");
    // The parent level keeps the kernel's default: the setting went to the leaf only.
    assert_eq!(read(v2.join(&parent).join("cgroup.max.descendants")), "max");
    // No controller was asked for, so none was enabled on the way down.
    assert_eq!(read(v2.join(&parent).join("cgroup.subtree_control")), "");
    run.kill();
    assert_eq!(run.finish().code, 128 + libc::SIGKILL);
}

/// A v2 controller enabled down the hierarchy. Its precondition (the hugetlb controller with
/// 2 MB pages in the host's cgroup2 hierarchy, as on the project's machines) is checked and
/// its absence fails the test: a host without it must not make this test pass unseen.
#[test]
fn v2_hugetlb_in_private_mount_namespace() {
    require_root();
    let v2 = common::cgroup2_mount().expect("a cgroup2 hierarchy");
    let controllers = read(v2.join("cgroup.controllers"));
    assert!(
        controllers.split_whitespace().any(|c| c == "hugetlb"),
        "precondition: {}/cgroup.controllers lists no hugetlb ({controllers:?}); this test \
         needs a host whose cgroup2 hierarchy offers it",
        v2.display()
    );
    assert!(
        Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists(),
        "precondition: the host has no 2 MB huge pages (/sys/kernel/mm/hugepages/hugepages-2048kB)"
    );
    let subtree = v2.join("cgroup.subtree_control");
    // Dropped last: the controller can be disabled at the root only once the
    // test's cgroups are gone.
    let _restore = RestoreSubtreeControl {
        was_enabled: read(&subtree).split_whitespace().any(|c| c == "hugetlb"),
        file: subtree.clone(),
        controller: "hugetlb",
    };
    let parent = unique("kiln-jt-v2");
    let jailer = Jailer::inspector()
        .private_cgroup2()
        .arg("--cgroup-version")
        .arg("2")
        .arg("--parent-cgroup")
        .arg(&parent)
        .arg("--cgroup")
        .arg("hugetlb.2MB.max=4194304")
        .exec_args(["--hold"]);
    let relative = Path::new(&parent).join(&jailer.id);
    let mut dirs = CgroupDirs::default();
    dirs.add(&v2, &relative);

    let mut run = jailer.spawn();
    run.read_report();
    assert_eq!(cgroup_in(run.pid(), ""), format!("/{}", relative.display()));
    assert_eq!(read(v2.join(&relative).join("hugetlb.2MB.max")), "4194304");
    for dir in [v2.clone(), v2.join(&parent)] {
        let enabled = read(dir.join("cgroup.subtree_control"));
        assert!(
            enabled.split_whitespace().any(|c| c == "hugetlb"),
            "{dir:?}: {enabled}"
        );
    }
    assert_eq!(read(v2.join(&relative).join("cgroup.subtree_control")), "");
    run.kill();
    assert_eq!(run.finish().code, 128 + libc::SIGKILL);
}
