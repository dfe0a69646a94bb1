//! cgroups v1 and v2, following Firecracker's layout: every setting lives in
//! `<hierarchy mount>/<parent cgroup>/<id>`, and the jailer moves itself there.
//!
//! [`CgroupPlan::new`] resolves the hierarchies from `/proc/mounts` and checks
//! the controllers before anything is created; [`CgroupPlan::apply`] creates
//! the directories, writes the values and moves the process in.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

/// The cgroup hierarchy version (`--cgroup-version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CgroupVersion {
    /// One hierarchy per controller (or group of controllers).
    V1,
    /// The unified hierarchy.
    V2,
}

/// One `--cgroup <file>=<value>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupSetting {
    /// `<controller>.<property>`, e.g. `cpu.shares`: a single file name.
    pub file: String,
    pub value: String,
}

impl CgroupSetting {
    /// The controller the file belongs to: the name up to the first '.'.
    pub fn controller(&self) -> &str {
        self.file.split('.').next().unwrap_or_default()
    }
}

/// A cgroup step failure; each names the path or controller involved.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("read {0}: {1}")]
    Read(PathBuf, io::Error),
    #[error("no cgroup v1 hierarchy with the {0} controller is mounted (see /proc/mounts)")]
    NoV1Hierarchy(String),
    #[error("no cgroup v2 hierarchy is mounted (see /proc/mounts)")]
    NoV2Hierarchy,
    #[error(
        "controller {controller} is not available in the cgroup v2 hierarchy {mount} (its cgroup.controllers lists: {available})"
    )]
    ControllerUnavailable {
        controller: String,
        mount: PathBuf,
        available: String,
    },
    #[error("create {0}: {1}")]
    CreateDir(PathBuf, io::Error),
    #[error("write {value:?} to {path}: {source}")]
    Write {
        path: PathBuf,
        value: String,
        source: io::Error,
    },
    #[error("{0} is empty in {1} and its parent: nothing to inherit")]
    Inherit(String, PathBuf),
}

/// A mounted cgroup hierarchy, from one line of `/proc/mounts`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mount {
    dir: PathBuf,
    version: CgroupVersion,
    options: Vec<String>,
}

/// The cgroup of the jailed process in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Group {
    /// Mount point of the hierarchy.
    mount: PathBuf,
    /// `<parent cgroup>/<id>`, relative to `mount`.
    relative: PathBuf,
    /// v2: controllers to enable in `cgroup.subtree_control` above the leaf.
    enable: Vec<String>,
    /// v1 cpuset hierarchy: new levels inherit cpus and mems from their parent.
    cpuset: bool,
    settings: Vec<CgroupSetting>,
}

impl Group {
    fn leaf(&self) -> PathBuf {
        self.mount.join(&self.relative)
    }

    /// Every directory from the first level below the mount to the leaf.
    fn levels(&self) -> Vec<PathBuf> {
        let mut dir = self.mount.clone();
        self.relative
            .components()
            .map(|c| {
                dir.push(c);
                dir.clone()
            })
            .collect()
    }
}

/// The cgroups to set up, resolved but not created yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CgroupPlan {
    groups: Vec<Group>,
}

impl CgroupPlan {
    /// Resolves where each setting goes, reading the hierarchies from
    /// `mounts` (the text of `/proc/mounts`). Returns `None` when there is
    /// nothing to do. A v2 run given only `--parent-cgroup` moves the
    /// process into that cgroup if it exists, as Firecracker does.
    pub fn new(
        version: CgroupVersion,
        settings: &[CgroupSetting],
        parent: &Path,
        parent_given: bool,
        id: &str,
        mounts: &str,
    ) -> Result<Option<Self>, CgroupError> {
        let mounts = parse_mounts(mounts);
        let relative = parent.join(id);
        let mut groups: Vec<Group> = Vec::new();
        match version {
            CgroupVersion::V1 => {
                for setting in settings {
                    let controller = setting.controller();
                    let mount = mounts
                        .iter()
                        .find(|m| {
                            m.version == CgroupVersion::V1
                                && m.options.iter().any(|o| o == controller)
                        })
                        .ok_or_else(|| CgroupError::NoV1Hierarchy(controller.to_owned()))?;
                    match groups.iter_mut().find(|g| g.mount == mount.dir) {
                        Some(group) => group.settings.push(setting.clone()),
                        None => groups.push(Group {
                            mount: mount.dir.clone(),
                            relative: relative.clone(),
                            enable: Vec::new(),
                            cpuset: mount.options.iter().any(|o| o == "cpuset"),
                            settings: vec![setting.clone()],
                        }),
                    }
                }
            }
            CgroupVersion::V2 => {
                if settings.is_empty() && !parent_given {
                    return Ok(None);
                }
                let mount = mounts
                    .iter()
                    .find(|m| m.version == CgroupVersion::V2)
                    .ok_or(CgroupError::NoV2Hierarchy)?;
                if settings.is_empty() {
                    let parent_dir = mount.dir.join(parent);
                    if !parent_dir.is_dir() {
                        return Ok(None);
                    }
                    groups.push(Group {
                        mount: mount.dir.clone(),
                        relative: parent.to_path_buf(),
                        enable: Vec::new(),
                        cpuset: false,
                        settings: Vec::new(),
                    });
                    return Ok(Some(CgroupPlan { groups }));
                }
                let list = mount.dir.join("cgroup.controllers");
                let available =
                    fs::read_to_string(&list).map_err(|e| CgroupError::Read(list.clone(), e))?;
                let available: Vec<&str> = available.split_whitespace().collect();
                let mut enable: Vec<String> = Vec::new();
                for setting in settings {
                    let controller = setting.controller();
                    // cgroup.* files are the core's, present in every cgroup.
                    if controller == "cgroup" || enable.iter().any(|c| c == controller) {
                        continue;
                    }
                    if !available.contains(&controller) {
                        return Err(CgroupError::ControllerUnavailable {
                            controller: controller.to_owned(),
                            mount: mount.dir.clone(),
                            available: available.join(" "),
                        });
                    }
                    enable.push(controller.to_owned());
                }
                groups.push(Group {
                    mount: mount.dir.clone(),
                    relative,
                    enable,
                    cpuset: false,
                    settings: settings.to_vec(),
                });
            }
        }
        if groups.is_empty() {
            return Ok(None);
        }
        Ok(Some(CgroupPlan { groups }))
    }

    /// The cgroup directory the process ends up in, one per hierarchy.
    #[cfg(test)]
    fn leaves(&self) -> Vec<PathBuf> {
        self.groups.iter().map(Group::leaf).collect()
    }

    /// Creates the cgroups, writes every value, then moves `pid` into each.
    /// On failure, removes the directories it created (those still empty).
    pub fn apply(&self, pid: u32) -> Result<(), CgroupError> {
        let mut created = Vec::new();
        let result = self.apply_tracked(pid, &mut created);
        if result.is_err() {
            for dir in created.iter().rev() {
                let _ = fs::remove_dir(dir);
            }
        }
        result
    }

    fn apply_tracked(&self, pid: u32, created: &mut Vec<PathBuf>) -> Result<(), CgroupError> {
        // Values first, in every hierarchy, then the moves: a v1 cpuset
        // cgroup, for one, accepts no process before its cpus and mems are set.
        for group in &self.groups {
            for dir in group.levels() {
                match fs::create_dir(&dir) {
                    Ok(()) => created.push(dir.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(CgroupError::CreateDir(dir, e)),
                }
                if group.cpuset {
                    inherit_from_parent(&dir, "cpuset.cpus")?;
                    inherit_from_parent(&dir, "cpuset.mems")?;
                }
            }
            for controller in &group.enable {
                // Enable the controller for the children of every level above the leaf.
                let mut dirs = vec![group.mount.clone()];
                dirs.extend(group.levels());
                dirs.pop();
                for dir in dirs {
                    enable_controller(&dir, controller)?;
                }
            }
            let leaf = group.leaf();
            for setting in &group.settings {
                write(&leaf.join(&setting.file), &setting.value)?;
            }
        }
        for group in &self.groups {
            write(&group.leaf().join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }
}

/// Writes `value` and a newline to a cgroup file.
fn write(path: &Path, value: &str) -> Result<(), CgroupError> {
    fs::write(path, format!("{value}\n")).map_err(|source| CgroupError::Write {
        path: path.to_path_buf(),
        value: value.to_owned(),
        source,
    })
}

fn read_line(path: &Path) -> Result<String, CgroupError> {
    fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| CgroupError::Read(path.to_path_buf(), e))
}

/// A new v1 cpuset cgroup starts with empty `cpuset.cpus` and `cpuset.mems`
/// and accepts no process until both are set: copy the parent's values.
fn inherit_from_parent(dir: &Path, file: &str) -> Result<(), CgroupError> {
    let own = dir.join(file);
    if !read_line(&own)?.is_empty() {
        return Ok(());
    }
    let parent = dir.parent().unwrap_or(dir).join(file);
    let value = read_line(&parent)?;
    if value.is_empty() {
        return Err(CgroupError::Inherit(file.to_owned(), dir.to_path_buf()));
    }
    write(&own, &value)
}

/// Adds `controller` to `<dir>/cgroup.subtree_control` unless it is there.
fn enable_controller(dir: &Path, controller: &str) -> Result<(), CgroupError> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = read_line(&file)?;
    if enabled.split_whitespace().any(|c| c == controller) {
        return Ok(());
    }
    write(&file, &format!("+{controller}"))
}

/// The cgroup mounts in the text of `/proc/mounts`.
fn parse_mounts(text: &str) -> Vec<Mount> {
    text.lines()
        .filter_map(|line| {
            let mut fields = line.split(' ');
            let _source = fields.next()?;
            let dir = fields.next()?;
            let version = match fields.next()? {
                "cgroup" => CgroupVersion::V1,
                "cgroup2" => CgroupVersion::V2,
                _ => return None,
            };
            let options = fields.next()?.split(',').map(str::to_owned).collect();
            Some(Mount {
                dir: PathBuf::from(unescape(dir)),
                version,
                options,
            })
        })
        .collect()
}

/// Undoes the octal escapes (`\040` for a space) of `/proc/mounts`.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = match bytes[i] {
            b'\\' => bytes.get(i + 1..i + 4).and_then(|digits| {
                let text = std::str::from_utf8(digits).ok()?;
                u8::from_str_radix(text, 8).ok()
            }),
            _ => None,
        };
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (b, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MOUNTS: &str = "\
tmpfs /sys/fs/cgroup tmpfs rw,relatime,mode=755 0 0
cgroup /sys/fs/cgroup/cpu,cpuacct cgroup rw,relatime,cpu,cpuacct 0 0
cgroup /sys/fs/cgroup/cpuset cgroup rw,relatime,cpuset 0 0
cgroup /sys/fs/cgroup/my\\040pids cgroup rw,relatime,pids 0 0
cgroup /sys/fs/cgroup/systemd cgroup rw,relatime,name=systemd 0 0
cgroup2 /sys/fs/cgroup/unified cgroup2 rw,relatime 0 0
";

    fn setting(file: &str, value: &str) -> CgroupSetting {
        CgroupSetting {
            file: file.to_owned(),
            value: value.to_owned(),
        }
    }

    #[test]
    fn mounts_are_parsed() {
        let m = parse_mounts(MOUNTS);
        assert_eq!(m.len(), 5);
        assert_eq!(m[0].dir, Path::new("/sys/fs/cgroup/cpu,cpuacct"));
        assert_eq!(m[2].dir, Path::new("/sys/fs/cgroup/my pids"));
        assert_eq!(m[4].version, CgroupVersion::V2);
        assert_eq!(unescape("a\\134b\\011c\\0"), "a\\b\tc\\0");
        // Digits are only an escape after a backslash; \777 is no byte.
        assert_eq!(unescape("/tmp/x-540-999\\777"), "/tmp/x-540-999\\777");
    }

    #[test]
    fn v1_groups_by_hierarchy() {
        let settings = [
            setting("cpu.shares", "512"),
            setting("cpuacct.x", "1"),
            setting("pids.max", "10"),
            setting("cpuset.cpus", "0"),
        ];
        let plan = CgroupPlan::new(
            CgroupVersion::V1,
            &settings,
            Path::new("kiln"),
            false,
            "vm1",
            MOUNTS,
        )
        .unwrap()
        .unwrap();
        assert_eq!(
            plan.leaves(),
            [
                "/sys/fs/cgroup/cpu,cpuacct/kiln/vm1",
                "/sys/fs/cgroup/my pids/kiln/vm1",
                "/sys/fs/cgroup/cpuset/kiln/vm1"
            ]
            .map(PathBuf::from)
        );
        assert_eq!(plan.groups[0].settings.len(), 2);
        assert!(plan.groups[2].cpuset && !plan.groups[0].cpuset);
    }

    #[test]
    fn v1_missing_controller_is_an_error() {
        let err = CgroupPlan::new(
            CgroupVersion::V1,
            &[setting("memory.limit_in_bytes", "1")],
            Path::new("kiln"),
            false,
            "vm1",
            MOUNTS,
        )
        .unwrap_err();
        assert!(
            matches!(&err, CgroupError::NoV1Hierarchy(c) if c == "memory"),
            "{err}"
        );
        // "name=systemd" is not a controller called "systemd".
        let err = CgroupPlan::new(
            CgroupVersion::V1,
            &[setting("systemd.x", "1")],
            Path::new("kiln"),
            false,
            "vm1",
            MOUNTS,
        );
        assert!(err.is_err());
    }

    #[test]
    fn nothing_to_do() {
        for version in [CgroupVersion::V1, CgroupVersion::V2] {
            let plan = CgroupPlan::new(version, &[], Path::new("kiln"), false, "vm1", MOUNTS);
            assert_eq!(plan.unwrap(), None);
        }
        let err = CgroupPlan::new(
            CgroupVersion::V2,
            &[setting("pids.max", "1")],
            Path::new("kiln"),
            false,
            "vm1",
            "cgroup /a cgroup rw,pids 0 0\n",
        )
        .unwrap_err();
        assert!(matches!(err, CgroupError::NoV2Hierarchy));
    }

    /// A directory tree standing in for a cgroup v2 mount: plain files
    /// where the kernel would show its interface files.
    struct FakeHierarchy(
        PathBuf,
        #[allow(dead_code, reason = "removed on drop")] testkit::TempDir,
    );

    impl FakeHierarchy {
        fn new(name: &str, controllers: &str) -> Self {
            let dir = testkit::TempDir::new(&format!("jailer-ut-cg-{name}"));
            let root = dir.path().to_path_buf();
            fs::write(root.join("cgroup.controllers"), controllers).unwrap();
            fs::write(root.join("cgroup.subtree_control"), "").unwrap();
            FakeHierarchy(root, dir)
        }

        fn mounts(&self) -> String {
            format!("cgroup2 {} cgroup2 rw 0 0\n", self.0.display())
        }

        fn read(&self, rel: &str) -> String {
            fs::read_to_string(self.0.join(rel)).unwrap()
        }
    }

    #[test]
    fn v2_writes_subtree_control_values_and_procs() {
        let fake = FakeHierarchy::new("v2", "cpuset cpu io memory pids\n");
        let settings = [
            setting("cpu.max", "50000 100000"),
            setting("memory.max", "268435456"),
            setting("pids.max", "64"),
            setting("cgroup.max.depth", "2"),
        ];
        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &settings,
            Path::new("machine/kiln"),
            true,
            "vm1",
            &fake.mounts(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(plan.leaves(), [fake.0.join("machine/kiln/vm1")]);
        assert_eq!(plan.groups[0].enable, ["cpu", "memory", "pids"]);

        // The kernel would create the interface files of new directories.
        fs::create_dir_all(fake.0.join("machine/kiln")).unwrap();
        fs::write(fake.0.join("machine/cgroup.subtree_control"), "").unwrap();
        fs::write(fake.0.join("machine/kiln/cgroup.subtree_control"), "cpu").unwrap();

        plan.apply(4242).unwrap();
        // A plain file keeps only the last write of each "+controller".
        assert_eq!(fake.read("cgroup.subtree_control"), "+pids\n");
        assert_eq!(fake.read("machine/cgroup.subtree_control"), "+pids\n");
        // "cpu" was already enabled there: only the others are written.
        assert_eq!(fake.read("machine/kiln/cgroup.subtree_control"), "+pids\n");
        assert!(
            !fake
                .0
                .join("machine/kiln/vm1/cgroup.subtree_control")
                .exists()
        );
        assert_eq!(fake.read("machine/kiln/vm1/cpu.max"), "50000 100000\n");
        assert_eq!(fake.read("machine/kiln/vm1/memory.max"), "268435456\n");
        assert_eq!(fake.read("machine/kiln/vm1/pids.max"), "64\n");
        assert_eq!(fake.read("machine/kiln/vm1/cgroup.max.depth"), "2\n");
        assert_eq!(fake.read("machine/kiln/vm1/cgroup.procs"), "4242\n");
    }

    #[test]
    fn v2_missing_controller_is_a_clear_error() {
        let fake = FakeHierarchy::new("missing", "hugetlb\n");
        let err = CgroupPlan::new(
            CgroupVersion::V2,
            &[setting("pids.max", "10")],
            Path::new("kiln"),
            false,
            "vm1",
            &fake.mounts(),
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.starts_with("controller pids is not available"), "{msg}");
        assert!(msg.ends_with("lists: hugetlb)"), "{msg}");
        // Nothing was created.
        assert!(!fake.0.join("kiln").exists());
    }

    #[test]
    fn v2_parent_only_moves_into_an_existing_parent() {
        let fake = FakeHierarchy::new("parent", "");
        let plan = |given| {
            CgroupPlan::new(
                CgroupVersion::V2,
                &[],
                Path::new("pool"),
                given,
                "vm1",
                &fake.mounts(),
            )
            .unwrap()
        };
        assert_eq!(plan(true), None);
        fs::create_dir(fake.0.join("pool")).unwrap();
        assert_eq!(plan(false), None);
        let p = plan(true).unwrap();
        assert_eq!(p.leaves(), [fake.0.join("pool")]);
        p.apply(7).unwrap();
        assert_eq!(fake.read("pool/cgroup.procs"), "7\n");
    }

    #[test]
    fn failed_apply_removes_what_it_created() {
        let fake = FakeHierarchy::new("fail", "pids\n");
        let plan = CgroupPlan::new(
            CgroupVersion::V2,
            &[setting("pids.max", "10")],
            Path::new("a/b"),
            true,
            "vm1",
            &fake.mounts(),
        )
        .unwrap()
        .unwrap();
        // No a/cgroup.subtree_control: enabling the controller fails.
        let err = plan.apply(1).unwrap_err();
        assert!(matches!(err, CgroupError::Read(..)), "{err}");
        assert!(!fake.0.join("a").exists());
    }

    #[test]
    fn v1_cpuset_inherits_cpus_and_mems() {
        let fake = FakeHierarchy::new("cpuset", "");
        fs::write(fake.0.join("cpuset.cpus"), "0-3\n").unwrap();
        fs::write(fake.0.join("cpuset.mems"), "0\n").unwrap();
        let mounts = format!("cgroup {} cgroup rw,cpuset 0 0\n", fake.0.display());
        let plan = CgroupPlan::new(
            CgroupVersion::V1,
            &[setting("cpuset.cpus", "1")],
            Path::new("kiln"),
            false,
            "vm1",
            &mounts,
        )
        .unwrap()
        .unwrap();
        // Real cpuset directories come with empty files; plain ones do not
        // exist, so create them as the kernel would.
        for dir in ["kiln", "kiln/vm1"] {
            fs::create_dir(fake.0.join(dir)).unwrap();
            fs::write(fake.0.join(dir).join("cpuset.cpus"), "").unwrap();
            fs::write(fake.0.join(dir).join("cpuset.mems"), "\n").unwrap();
        }
        plan.apply(9).unwrap();
        assert_eq!(fake.read("kiln/cpuset.cpus"), "0-3\n");
        assert_eq!(fake.read("kiln/cpuset.mems"), "0\n");
        assert_eq!(fake.read("kiln/vm1/cpuset.cpus"), "1\n");
        assert_eq!(fake.read("kiln/vm1/cpuset.mems"), "0\n");
        assert_eq!(fake.read("kiln/vm1/cgroup.procs"), "9\n");
    }
}
