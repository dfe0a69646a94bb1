//! The jail: `<chroot base>/<exec name>/<id>/root`, the copy of the exec file
//! in it, the move into it (new mount namespace + `pivot_root`), and the
//! device nodes.
//!
//! Everything the jailer creates is recorded, so that a failed run can remove
//! it again and a retry with the same id meets the state the first try met.

use std::ffi::{OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt, lchown};
use std::path::{Path, PathBuf};

use crate::sys;

/// Mode of the exec file's copy (owned by root).
const EXEC_MODE: u32 = 0o755;
/// Mode of the directories inside the jail (owned by the jailed uid:gid).
const JAIL_DIR_MODE: u32 = 0o700;
/// Mode of the device nodes (owned by the jailed uid:gid).
const DEVICE_MODE: libc::mode_t = 0o600;
/// Directories inside the jail, in creation order; `/run` is kiln's default
/// place for its API socket.
const JAIL_DIRS: [&str; 3] = ["dev", "dev/net", "run"];

/// A character device node made in every jail.
#[derive(Debug, Clone, Copy)]
pub struct Device {
    pub path: &'static str,
    pub major: u32,
    pub minor: u32,
}

/// `/dev/kvm` (Documentation/admin-guide/devices.txt) and `/dev/net/tun`
/// (Documentation/networking/tuntap.rst): all the host a VMM needs.
pub const DEVICES: [Device; 2] = [
    Device {
        path: "dev/kvm",
        major: 10,
        minor: 232,
    },
    Device {
        path: "dev/net/tun",
        major: 10,
        minor: 200,
    },
];

/// Where the host says which device number `/dev/userfaultfd` has (a misc device whose
/// minor is given out at boot, e.g. `10:126` or `10:257`); absent on hosts without it.
pub const USERFAULTFD_SYSFS: &str = "/sys/class/misc/userfaultfd/dev";

/// `/dev/userfaultfd` for the jail when the host has it (read before entering the jail),
/// as Firecracker's jailer makes it: a VMM without privileges needs it to restore a
/// snapshot whose memory a page-fault handler serves (the `Uffd` backend).
pub fn host_userfaultfd() -> Result<Option<Device>, ChrootError> {
    let text = match fs::read_to_string(USERFAULTFD_SYSFS) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(path_err("read", Path::new(USERFAULTFD_SYSFS))(e)),
    };
    parse_dev_numbers(&text)
        .map(|(major, minor)| {
            Some(Device {
                path: "dev/userfaultfd",
                major,
                minor,
            })
        })
        .ok_or_else(|| {
            path_err("parse", Path::new(USERFAULTFD_SYSFS))(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{:?} is not MAJOR:MINOR", text.trim()),
            ))
        })
}

/// `MAJOR:MINOR` (a sysfs `dev` file).
fn parse_dev_numbers(text: &str) -> Option<(u32, u32)> {
    let (major, minor) = text.trim().split_once(':')?;
    Some((major.parse().ok()?, minor.parse().ok()?))
}

/// A jail step failure, naming the path involved.
#[derive(Debug, thiserror::Error)]
pub enum ChrootError {
    #[error("{op} {path}: {source}")]
    Path {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(
        "refusing to use {0}: a file, symlink or hard link is already there \
         (remove the jail of this id first)"
    )]
    Exists(PathBuf),
    #[error("{0} exists and is not a directory")]
    NotADirectory(PathBuf),
    #[error("{op}: {source}")]
    Sys { op: &'static str, source: io::Error },
}

fn path_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ChrootError {
    let path = path.to_path_buf();
    move |source| ChrootError::Path { op, path, source }
}

fn sys_err(op: &'static str) -> impl FnOnce(io::Error) -> ChrootError {
    move |source| ChrootError::Sys { op, source }
}

/// What a created entry's path is relative to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    /// The chroot base directory (the jail's own directories).
    Base,
    /// The jail root (everything inside the jail).
    Root,
}

/// The jail of one run, and what this process created in it.
#[derive(Debug)]
pub struct Jail {
    /// The chroot base directory and the jail root, by descriptor: they stay
    /// valid after `pivot_root`, so cleanup works on both sides of the move.
    /// Entries inside the jail are removed through the root's descriptor,
    /// which works even after the drop to the jailed uid (it owns the root).
    base: File,
    root: Option<File>,
    /// The same on the host, for the steps before `pivot_root`.
    host_root: PathBuf,
    exec_name: OsString,
    /// Whether the process is inside the jail (after [`Jail::enter`]).
    inside: bool,
    /// Created entries (anchor, relative path, is a directory), oldest first.
    created: Vec<(Anchor, PathBuf, bool)>,
    /// Entries before this index belong to the parent process (see
    /// [`Jail::forked`]).
    owned_from: usize,
}

impl Jail {
    /// Creates `<base>/<exec name>/<id>/root` (the parts that are missing).
    pub fn create(base: &Path, exec_name: &OsStr, id: &str) -> Result<Jail, ChrootError> {
        let base_dir = File::open(base).map_err(path_err("open", base))?;
        let mut jail = Jail {
            base: base_dir,
            root: None,
            host_root: base.join(exec_name).join(id).join("root"),
            exec_name: exec_name.to_os_string(),
            inside: false,
            created: Vec::new(),
            owned_from: 0,
        };
        match jail.create_dirs(base, exec_name, id) {
            Ok(()) => Ok(jail),
            Err(e) => {
                jail.remove_created();
                Err(e)
            }
        }
    }

    fn create_dirs(&mut self, base: &Path, exec_name: &OsStr, id: &str) -> Result<(), ChrootError> {
        let mut rel = PathBuf::new();
        for part in [exec_name, OsStr::new(id), OsStr::new("root")] {
            rel.push(part);
            let host = base.join(&rel);
            match fs::DirBuilder::new().mode(0o755).create(&host) {
                Ok(()) => self.created.push((Anchor::Base, rel.clone(), true)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(path_err("create", &host)(e)),
            }
            // Never follow a symlink out of the base directory.
            let meta = fs::symlink_metadata(&host).map_err(path_err("stat", &host))?;
            if !meta.is_dir() {
                return Err(ChrootError::NotADirectory(host));
            }
        }
        let root = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW)
            .open(&self.host_root)
            .map_err(path_err("open", &self.host_root))?;
        self.root = Some(root);
        Ok(())
    }

    /// The jail root on the host.
    #[cfg(test)]
    fn host_root(&self) -> &Path {
        &self.host_root
    }

    /// Path of the exec file's copy as the jailed process sees it.
    pub fn exec_path(&self) -> PathBuf {
        Path::new("/").join(&self.exec_name)
    }

    /// `path` (relative to the jail root) as this process reaches it now.
    fn path(&self, path: impl AsRef<Path>) -> PathBuf {
        if self.inside {
            Path::new("/").join(path)
        } else {
            self.host_root.join(path)
        }
    }

    fn record(&mut self, path: impl AsRef<Path>, is_dir: bool) {
        self.created
            .push((Anchor::Root, path.as_ref().to_path_buf(), is_dir));
    }

    /// Copies the exec file into the jail root, never overwriting anything:
    /// a file, symlink or hard link already at the destination is refused.
    /// A copy, not a link: two VMMs never share the pages of one binary.
    pub fn copy_exec_file(&mut self, source: &File) -> Result<(), ChrootError> {
        let dest = self.path(&self.exec_name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(EXEC_MODE)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&dest)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ChrootError::Exists(dest.clone()),
                _ => ChrootError::Path {
                    op: "create",
                    path: dest.clone(),
                    source: e,
                },
            })?;
        self.record(self.exec_name.clone(), false);
        let mut reader = source;
        io::copy(&mut reader, &mut file).map_err(path_err("copy to", &dest))?;
        // The umask may have taken bits off the creation mode.
        file.set_permissions(fs::Permissions::from_mode(EXEC_MODE))
            .map_err(path_err("chmod", &dest))
    }

    /// Moves the process into the jail: a new mount namespace whose mounts
    /// are slaves of the host's (nothing propagates back), the jail
    /// bind-mounted on itself, `pivot_root` into it, the old root detached.
    pub fn enter(&mut self) -> Result<(), ChrootError> {
        let root = sys::cstring(self.host_root.as_os_str().as_bytes())
            .map_err(path_err("use", &self.host_root))?;
        sys::unshare(libc::CLONE_NEWNS).map_err(sys_err("unshare the mount namespace"))?;
        sys::mount(None, c"/", None, libc::MS_SLAVE | libc::MS_REC)
            .map_err(sys_err("make all mounts slaves"))?;
        sys::mount(Some(&root), &root, None, libc::MS_BIND | libc::MS_REC)
            .map_err(path_err("bind-mount", &self.host_root))?;
        std::env::set_current_dir(&self.host_root).map_err(path_err("chdir", &self.host_root))?;
        // pivot_root(".", ".") stacks the old root on the new one: no
        // directory for it is needed in the jail (see pivot_root(2)).
        sys::pivot_root(c".", c".").map_err(sys_err("pivot_root"))?;
        self.inside = true;
        sys::umount2(c".", libc::MNT_DETACH).map_err(sys_err("detach the old root"))?;
        std::env::set_current_dir("/").map_err(path_err("chdir", Path::new("/")))
    }

    /// Inside the jail: gives the jail root to `uid:gid` (mode 0700), makes
    /// `/dev`, `/dev/net` and `/run` likewise, and the device nodes
    /// `/dev/kvm`, `/dev/net/tun` and `extra` (`/dev/userfaultfd` when the host
    /// has it), mode 0600.
    pub fn make_devices(
        &mut self,
        uid: u32,
        gid: u32,
        extra: Option<Device>,
    ) -> Result<(), ChrootError> {
        self.own_dir(Path::new("/"), uid, gid)?;
        for dir in JAIL_DIRS {
            let path = self.path(dir);
            match fs::DirBuilder::new().mode(JAIL_DIR_MODE).create(&path) {
                Ok(()) => self.record(dir, true),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(path_err("create", &path)(e)),
            }
            self.own_dir(&path, uid, gid)?;
        }
        for device in DEVICES.into_iter().chain(extra) {
            let path = self.path(device.path);
            let c_path =
                sys::cstring(path.as_os_str().as_bytes()).map_err(path_err("mknod", &path))?;
            sys::mknod_char(&c_path, DEVICE_MODE, device.major, device.minor).map_err(
                |e| match e.kind() {
                    io::ErrorKind::AlreadyExists => ChrootError::Exists(path.clone()),
                    _ => path_err("mknod", &path)(e),
                },
            )?;
            self.record(device.path, false);
            lchown(&path, Some(uid), Some(gid)).map_err(path_err("chown", &path))?;
        }
        Ok(())
    }

    /// A directory of the jail: must be a real directory (a symlink left by a
    /// previous jailed process is refused), then mode 0700 and `uid:gid`.
    fn own_dir(&self, path: &Path, uid: u32, gid: u32) -> Result<(), ChrootError> {
        let meta = fs::symlink_metadata(path).map_err(path_err("stat", path))?;
        if !meta.is_dir() {
            return Err(ChrootError::NotADirectory(path.to_path_buf()));
        }
        fs::set_permissions(path, fs::Permissions::from_mode(JAIL_DIR_MODE))
            .map_err(path_err("chmod", path))?;
        lchown(path, Some(uid), Some(gid)).map_err(path_err("chown", path))
    }

    /// Writes `pid` to `/<exec name>.pid` (a new file) in the jail.
    pub fn write_pid_file(&mut self, pid: u32) -> Result<(), ChrootError> {
        let name = self.pid_file_name();
        let path = self.path(&name);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(|e| match e.kind() {
                io::ErrorKind::AlreadyExists => ChrootError::Exists(path.clone()),
                _ => path_err("create", &path)(e),
            })?;
        self.record(name, false);
        write!(file, "{pid}").map_err(path_err("write", &path))
    }

    /// Called in the child of [`Jail::write_pid_file`]'s caller once the
    /// parent has written the pid file: it is the child's to remove.
    pub fn adopt_pid_file(&mut self) {
        self.record(self.pid_file_name(), false);
    }

    fn pid_file_name(&self) -> OsString {
        let mut name = self.exec_name.clone();
        name.push(".pid");
        name
    }

    /// Called in a forked child: what was created so far is the parent's to
    /// remove, not this process's.
    pub fn forked(&mut self) {
        self.owned_from = self.created.len();
    }

    /// Removes what this process created, newest first. Best effort: a
    /// directory something else was put in stays.
    pub fn remove_created(&mut self) {
        while self.created.len() > self.owned_from {
            let Some((anchor, path, is_dir)) = self.created.pop() else {
                break;
            };
            let dir = match anchor {
                Anchor::Base => Some(&self.base),
                Anchor::Root => self.root.as_ref(),
            };
            let flags = if is_dir { libc::AT_REMOVEDIR } else { 0 };
            if let (Some(dir), Ok(c_path)) = (dir, sys::cstring(path.as_os_str().as_bytes())) {
                let _ = sys::unlinkat(dir.as_fd(), &c_path, flags);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::{MetadataExt, symlink};

    use super::*;

    /// A chroot base directory (removed with the temporary directory).
    struct Base(
        PathBuf,
        #[allow(dead_code, reason = "removed on drop")] testkit::TempDir,
    );

    impl Base {
        fn new(name: &str) -> Self {
            let dir = testkit::TempDir::new(&format!("jailer-ut-jail-{name}"));
            Base(dir.path().to_path_buf(), dir)
        }
    }

    fn source(base: &Base) -> File {
        let path = base.0.join("source");
        fs::write(&path, b"\x7fELF pretend").unwrap();
        File::open(path).unwrap()
    }

    #[test]
    fn copy_and_remove() {
        let base = Base::new("copy");
        let src = source(&base);
        let mut jail = Jail::create(&base.0, OsStr::new("kiln"), "vm1").unwrap();
        assert_eq!(jail.host_root(), base.0.join("kiln/vm1/root"));
        assert_eq!(jail.exec_path(), Path::new("/kiln"));
        jail.copy_exec_file(&src).unwrap();
        let copy = base.0.join("kiln/vm1/root/kiln");
        assert_eq!(fs::read(&copy).unwrap(), b"\x7fELF pretend");
        let meta = fs::metadata(&copy).unwrap();
        assert_eq!(meta.mode() & 0o7777, EXEC_MODE);
        assert_eq!(meta.nlink(), 1);
        assert_ne!(meta.ino(), src.metadata().unwrap().ino());
        jail.write_pid_file(42).unwrap();
        assert_eq!(
            fs::read_to_string(base.0.join("kiln/vm1/root/kiln.pid")).unwrap(),
            "42"
        );
        jail.remove_created();
        assert_eq!(
            fs::read_dir(&base.0).unwrap().count(),
            1,
            "only source left"
        );
    }

    #[test]
    fn existing_entries_are_refused_and_kept() {
        let base = Base::new("exists");
        let src = source(&base);
        let root = base.0.join("kiln/vm1/root");
        fs::create_dir_all(&root).unwrap();
        let target = base.0.join("target");
        fs::write(&target, b"precious").unwrap();
        type Plant<'a> = &'a dyn Fn(&Path);
        let plant: [(&str, Plant); 3] = [
            ("file", &|p| fs::write(p, b"old").unwrap()),
            ("symlink", &|p| symlink(&target, p).unwrap()),
            ("hard link", &|p| fs::hard_link(&target, p).unwrap()),
        ];
        for (what, plant) in plant {
            let dest = root.join("kiln");
            plant(&dest);
            let mut jail = Jail::create(&base.0, OsStr::new("kiln"), "vm1").unwrap();
            let err = jail.copy_exec_file(&src).unwrap_err();
            assert!(
                matches!(&err, ChrootError::Exists(p) if *p == dest),
                "{what}: {err}"
            );
            jail.remove_created();
            assert!(fs::symlink_metadata(&dest).is_ok(), "{what} kept");
            assert_eq!(fs::read(&target).unwrap(), b"precious", "{what}");
            fs::remove_file(&dest).unwrap();
        }
        // The pre-existing directories were not created by the jailer: kept.
        assert!(root.is_dir());
    }

    #[test]
    fn symlinked_jail_directory_is_refused() {
        let base = Base::new("symlinked");
        let elsewhere = base.0.join("elsewhere");
        fs::create_dir(&elsewhere).unwrap();
        fs::create_dir(base.0.join("kiln")).unwrap();
        symlink(&elsewhere, base.0.join("kiln/vm1")).unwrap();
        let err = Jail::create(&base.0, OsStr::new("kiln"), "vm1").unwrap_err();
        assert!(matches!(err, ChrootError::NotADirectory(_)), "{err}");
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }

    #[test]
    fn a_forked_child_removes_only_its_own() {
        let base = Base::new("forked");
        let src = source(&base);
        let mut jail = Jail::create(&base.0, OsStr::new("kiln"), "vm1").unwrap();
        jail.copy_exec_file(&src).unwrap();
        jail.forked();
        jail.write_pid_file(1).unwrap();
        jail.remove_created();
        assert!(base.0.join("kiln/vm1/root/kiln").exists());
        assert!(!base.0.join("kiln/vm1/root/kiln.pid").exists());
    }

    #[test]
    fn userfaultfd_numbers_come_from_sysfs() {
        assert_eq!(parse_dev_numbers("10:126\n"), Some((10, 126)));
        assert_eq!(parse_dev_numbers("10:257"), Some((10, 257)));
        assert_eq!(parse_dev_numbers("10"), None);
        assert_eq!(parse_dev_numbers("10:x"), None);
        // On this host: present exactly when sysfs lists it, with its numbers.
        let host = host_userfaultfd().unwrap();
        match fs::read_to_string(USERFAULTFD_SYSFS) {
            Ok(text) => {
                let d = host.expect("sysfs lists userfaultfd");
                assert_eq!(format!("{}:{}", d.major, d.minor), text.trim());
                assert_eq!(d.path, "dev/userfaultfd");
            }
            Err(_) => assert!(host.is_none()),
        }
    }
}
