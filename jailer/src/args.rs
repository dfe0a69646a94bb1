//! Command line: Firecracker's jailer flags, parsed, then validated.
//!
//! [`parse`] checks everything that needs no file system access;
//! [`validate`] then opens the exec file and the chroot base directory.

use std::ffi::{OsStr, OsString};
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Component, Path, PathBuf};

use crate::cgroup::{CgroupSetting, CgroupVersion};
use crate::resource_limits::ResourceLimits;

/// Where jails are built when `--chroot-base-dir` is not given.
pub const DEFAULT_CHROOT_BASE: &str = "/srv/jailer";

/// Longest accepted `--id`.
pub const MAX_ID_LEN: usize = 64;

/// Printed by `--help`.
pub const USAGE: &str = "\
Usage: jailer --id <id> --exec-file <file> --uid <uid> --gid <gid> [options] [-- <exec args>...]

Builds a jail at <chroot-base-dir>/<exec file name>/<id>/root, moves into it and
execs a copy of <file> as <uid>:<gid>. Arguments after `--` are passed on to it.

  --id <id>                   VM id: 1 to 64 ASCII letters, digits or '-'
  --exec-file <file>          statically linked executable to copy into the jail and run
  --uid <uid>, --gid <gid>    numeric ids the executable runs as
  --chroot-base-dir <dir>     base directory of jails (default /srv/jailer)
  --netns <path>              network namespace to join (e.g. /var/run/netns/<name>)
  --daemonize                 setsid() and redirect stdin/stdout/stderr to /dev/null
  --new-pid-ns                exec in a new pid namespace (the pid goes to <file name>.pid)
  --cgroup <file>=<value>     cgroup setting, repeatable (e.g. cpu.shares=512)
  --cgroup-version <1|2>      cgroup hierarchy to use (default 1)
  --parent-cgroup <path>      relative cgroup under which <id> is created
                              (default: the exec file name)
  --resource-limit <r>=<n>    fsize=<bytes> or no-file=<count> (default no-file=2048)
  --help, --version
";

/// What the command line asks for.
#[derive(Debug)]
pub enum Command {
    /// `--help`.
    Help,
    /// `--version`.
    Version,
    /// Build a jail and exec in it.
    Jail(Box<JailArgs>),
}

/// The jailer's arguments after [`parse`]: every flag checked for form.
#[derive(Debug)]
pub struct JailArgs {
    pub id: String,
    pub exec_file: PathBuf,
    pub uid: u32,
    pub gid: u32,
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: Vec<CgroupSetting>,
    pub cgroup_version: CgroupVersion,
    /// `--parent-cgroup`, when given.
    pub parent_cgroup: Option<PathBuf>,
    pub resource_limits: ResourceLimits,
    /// Everything after `--`.
    pub exec_args: Vec<OsString>,
}

/// A command line error; the message names the flag and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum ArgsError {
    #[error("unknown argument {0:?} (see --help)")]
    Unknown(OsString),
    #[error("--{0} needs a value")]
    MissingValue(&'static str),
    #[error("--{0} given more than once")]
    Duplicate(&'static str),
    #[error("--{0} is required")]
    Missing(&'static str),
    #[error("--{0} {1:?} is not valid UTF-8")]
    NotUtf8(&'static str, OsString),
    #[error("invalid --id {0:?}: {1}")]
    Id(String, &'static str),
    #[error("invalid --{0} {1:?}: expected a number from 0 to 4294967295")]
    NumericId(&'static str, String),
    #[error("invalid --cgroup-version {0:?}: expected 1 or 2")]
    CgroupVersion(String),
    #[error("invalid --cgroup {0:?}: {1}")]
    Cgroup(String, &'static str),
    #[error(
        "invalid --parent-cgroup {0:?}: must be a relative path without '.' or '..' components"
    )]
    ParentCgroup(String),
    #[error("invalid --resource-limit {0:?}: {1}")]
    ResourceLimit(String, &'static str),
    #[error("exec file {0}: {1}")]
    ExecFile(PathBuf, ExecFileError),
    #[error("chroot base dir {0}: {1}")]
    ChrootBase(PathBuf, io::Error),
    #[error("chroot base dir {0}: not a directory")]
    ChrootBaseNotDir(PathBuf),
}

/// Why an exec file cannot be run inside a jail.
#[derive(Debug, thiserror::Error)]
pub enum ExecFileError {
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("not a regular file")]
    NotAFile,
    #[error("not executable (mode {0:o})")]
    NotExecutable(u32),
    #[error("no file name")]
    NoFileName,
    #[error("not an ELF executable")]
    NotElf,
    #[error("not a 64-bit little-endian ELF file")]
    NotElf64,
    #[error("truncated or malformed ELF program headers")]
    BadProgramHeaders,
    #[error(
        "dynamically linked (ELF interpreter {0}): the jail holds no loader or libraries, \
         use a statically linked build"
    )]
    DynamicallyLinked(String),
}

/// The validated configuration the jailer runs with.
#[derive(Debug)]
pub struct JailConfig {
    pub id: String,
    pub exec_file: ExecFile,
    pub uid: u32,
    pub gid: u32,
    /// Canonical `--chroot-base-dir`.
    pub chroot_base: PathBuf,
    pub netns: Option<PathBuf>,
    pub daemonize: bool,
    pub new_pid_ns: bool,
    pub cgroups: Vec<CgroupSetting>,
    pub cgroup_version: CgroupVersion,
    /// `--parent-cgroup`, or the exec file name.
    pub parent_cgroup: PathBuf,
    pub parent_cgroup_given: bool,
    pub resource_limits: ResourceLimits,
    pub exec_args: Vec<OsString>,
}

/// The exec file, opened once: validated and copied through the same descriptor.
#[derive(Debug)]
pub struct ExecFile {
    /// Last path component: the name of the copy inside the jail.
    pub name: OsString,
    pub file: File,
}

/// Flags that take a value, by name.
const VALUE_FLAGS: [&str; 10] = [
    "id",
    "exec-file",
    "uid",
    "gid",
    "chroot-base-dir",
    "netns",
    "cgroup",
    "cgroup-version",
    "parent-cgroup",
    "resource-limit",
];

/// Parses the arguments (without `argv[0]`) and checks every value's form.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Command, ArgsError> {
    let mut single: [Option<OsString>; 10] = Default::default();
    let mut daemonize = false;
    let mut new_pid_ns = false;
    let mut cgroups = Vec::new();
    let mut resource_limits = Vec::new();
    let mut exec_args = Vec::new();

    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let Some(name) = arg.to_str().and_then(|a| a.strip_prefix("--")) else {
            return Err(ArgsError::Unknown(arg));
        };
        match name {
            "" => {
                exec_args.extend(args.by_ref());
                break;
            }
            "help" => return Ok(Command::Help),
            "version" => return Ok(Command::Version),
            "daemonize" => flag(&mut daemonize, "daemonize")?,
            "new-pid-ns" => flag(&mut new_pid_ns, "new-pid-ns")?,
            _ => {
                let Some(index) = VALUE_FLAGS.iter().position(|f| *f == name) else {
                    return Err(ArgsError::Unknown(arg));
                };
                let flag = VALUE_FLAGS[index];
                let value = args.next().ok_or(ArgsError::MissingValue(flag))?;
                match flag {
                    "cgroup" => cgroups.push(utf8(flag, value)?),
                    "resource-limit" => resource_limits.push(utf8(flag, value)?),
                    _ if single[index].is_some() => return Err(ArgsError::Duplicate(flag)),
                    _ => single[index] = Some(value),
                }
            }
        }
    }

    let [id, exec_file, uid, gid, base, netns, _, version, parent, _] = single;
    let id = utf8("id", id.ok_or(ArgsError::Missing("id"))?)?;
    validate_id(&id)?;
    let exec_file = PathBuf::from(exec_file.ok_or(ArgsError::Missing("exec-file"))?);
    let uid = numeric_id("uid", uid)?;
    let gid = numeric_id("gid", gid)?;
    let cgroup_version = match version.map(|v| utf8("cgroup-version", v)).transpose()? {
        None => CgroupVersion::V1,
        Some(v) if v == "1" => CgroupVersion::V1,
        Some(v) if v == "2" => CgroupVersion::V2,
        Some(v) => return Err(ArgsError::CgroupVersion(v)),
    };
    let parent_cgroup = parent
        .map(|p| utf8("parent-cgroup", p).and_then(|p| parent_cgroup(&p)))
        .transpose()?;

    Ok(Command::Jail(Box::new(JailArgs {
        id,
        exec_file,
        uid,
        gid,
        chroot_base: base.map_or_else(|| PathBuf::from(DEFAULT_CHROOT_BASE), PathBuf::from),
        netns: netns.map(PathBuf::from),
        daemonize,
        new_pid_ns,
        cgroups: cgroups
            .iter()
            .map(|c| cgroup_setting(c))
            .collect::<Result<_, _>>()?,
        cgroup_version,
        parent_cgroup,
        resource_limits: resource_limits_from(&resource_limits)?,
        exec_args,
    })))
}

fn flag(seen: &mut bool, name: &'static str) -> Result<(), ArgsError> {
    if *seen {
        return Err(ArgsError::Duplicate(name));
    }
    *seen = true;
    Ok(())
}

fn utf8(flag: &'static str, value: OsString) -> Result<String, ArgsError> {
    value.into_string().map_err(|v| ArgsError::NotUtf8(flag, v))
}

/// `--id`: 1 to 64 ASCII letters, digits or '-'.
pub fn validate_id(id: &str) -> Result<(), ArgsError> {
    let reason = if id.is_empty() {
        "empty"
    } else if id.len() > MAX_ID_LEN {
        "longer than 64 characters"
    } else if !id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        "only ASCII letters, digits and '-' are allowed"
    } else {
        return Ok(());
    };
    Err(ArgsError::Id(id.to_owned(), reason))
}

fn numeric_id(flag: &'static str, value: Option<OsString>) -> Result<u32, ArgsError> {
    let value = utf8(flag, value.ok_or(ArgsError::Missing(flag))?)?;
    // `parse` alone would accept a leading '+'.
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(ArgsError::NumericId(flag, value));
    }
    value.parse().map_err(|_| ArgsError::NumericId(flag, value))
}

/// `--cgroup <file>=<value>`: the file is a single name `<controller>.<property>`.
fn cgroup_setting(arg: &str) -> Result<CgroupSetting, ArgsError> {
    let bad = |reason| Err(ArgsError::Cgroup(arg.to_owned(), reason));
    let Some((file, value)) = arg.split_once('=') else {
        return bad("expected <file>=<value>");
    };
    if value.is_empty() {
        return bad("empty value");
    }
    if value.contains('\n') {
        return bad("the value contains a newline");
    }
    if file.contains('/') || file == "." || file == ".." {
        return bad("the file must be a single name, without '/', '.' or '..' components");
    }
    match file.split_once('.') {
        Some((controller, property)) if !controller.is_empty() && !property.is_empty() => {}
        _ => return bad("the file must be named <controller>.<property>, e.g. cpu.shares"),
    }
    Ok(CgroupSetting {
        file: file.to_owned(),
        value: value.to_owned(),
    })
}

/// `--parent-cgroup`: relative, only normal components.
fn parent_cgroup(path: &str) -> Result<PathBuf, ArgsError> {
    let p = Path::new(path);
    let normal = p.components().all(|c| matches!(c, Component::Normal(_)));
    // `Path::components` drops interior "." components: look at the text too.
    let dotted = path.split('/').any(|c| c == "." || c == "..");
    if path.is_empty() || !normal || dotted {
        return Err(ArgsError::ParentCgroup(path.to_owned()));
    }
    Ok(p.to_path_buf())
}

fn resource_limits_from(args: &[String]) -> Result<ResourceLimits, ArgsError> {
    let mut limits = ResourceLimits::default();
    for arg in args {
        let bad = |reason| ArgsError::ResourceLimit(arg.clone(), reason);
        let (name, value) = arg
            .split_once('=')
            .ok_or_else(|| bad("expected fsize=<bytes> or no-file=<count>"))?;
        let value: u64 = value
            .parse()
            .map_err(|_| bad("the value must be a non-negative integer"))?;
        match name {
            "fsize" => limits.fsize = Some(value),
            "no-file" => limits.no_file = value,
            _ => return Err(bad("unknown resource; expected fsize or no-file")),
        }
    }
    Ok(limits)
}

/// Checks what needs the file system: the exec file (a statically linked
/// executable) and the chroot base directory.
pub fn validate(args: JailArgs) -> Result<JailConfig, ArgsError> {
    let exec_file = open_exec_file(&args.exec_file)
        .map_err(|e| ArgsError::ExecFile(args.exec_file.clone(), e))?;
    let chroot_base = args
        .chroot_base
        .canonicalize()
        .map_err(|e| ArgsError::ChrootBase(args.chroot_base.clone(), e))?;
    if !chroot_base.is_dir() {
        return Err(ArgsError::ChrootBaseNotDir(chroot_base));
    }
    let parent_cgroup_given = args.parent_cgroup.is_some();
    let parent_cgroup = args
        .parent_cgroup
        .unwrap_or_else(|| PathBuf::from(&exec_file.name));
    Ok(JailConfig {
        id: args.id,
        exec_file,
        uid: args.uid,
        gid: args.gid,
        chroot_base,
        netns: args.netns,
        daemonize: args.daemonize,
        new_pid_ns: args.new_pid_ns,
        cgroups: args.cgroups,
        cgroup_version: args.cgroup_version,
        parent_cgroup,
        parent_cgroup_given,
        resource_limits: args.resource_limits,
        exec_args: args.exec_args,
    })
}

fn open_exec_file(path: &Path) -> Result<ExecFile, ExecFileError> {
    let path = path.canonicalize()?;
    let file = File::open(&path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(ExecFileError::NotAFile);
    }
    let mode = meta.permissions().mode();
    if mode & 0o111 == 0 {
        return Err(ExecFileError::NotExecutable(mode & 0o7777));
    }
    check_static_elf(&file)?;
    let name = path
        .file_name()
        .ok_or(ExecFileError::NoFileName)?
        .to_os_string();
    Ok(ExecFile { name, file })
}

const PT_INTERP: u32 = 3;
const ELF_HEADER_LEN: usize = 64;
const PHDR_LEN: usize = 56;

/// Refuses anything but a 64-bit little-endian ELF file without a `PT_INTERP`
/// program header: inside the jail there is no loader to run anything else.
pub fn check_static_elf(file: &File) -> Result<(), ExecFileError> {
    let mut header = [0u8; ELF_HEADER_LEN];
    read_exact_at(file, &mut header, 0).map_err(|_| ExecFileError::NotElf)?;
    if header[..4] != *b"\x7fELF" {
        return Err(ExecFileError::NotElf);
    }
    // EI_CLASS = ELFCLASS64, EI_DATA = ELFDATA2LSB.
    if header[4] != 2 || header[5] != 1 {
        return Err(ExecFileError::NotElf64);
    }
    let phoff = u64_at(&header, 0x20);
    let phentsize = usize::from(u16_at(&header, 0x36));
    let phnum = u64::from(u16_at(&header, 0x38));
    if phnum == 0 {
        return Ok(());
    }
    if phentsize < PHDR_LEN {
        return Err(ExecFileError::BadProgramHeaders);
    }
    for i in 0..phnum {
        let offset = i
            .checked_mul(phentsize as u64)
            .and_then(|o| o.checked_add(phoff))
            .ok_or(ExecFileError::BadProgramHeaders)?;
        let mut phdr = [0u8; PHDR_LEN];
        read_exact_at(file, &mut phdr, offset).map_err(|_| ExecFileError::BadProgramHeaders)?;
        if u32::from_le_bytes([phdr[0], phdr[1], phdr[2], phdr[3]]) == PT_INTERP {
            return Err(ExecFileError::DynamicallyLinked(interpreter(file, &phdr)));
        }
    }
    Ok(())
}

/// The interpreter path a PT_INTERP header names, for the error message.
fn interpreter(file: &File, phdr: &[u8; PHDR_LEN]) -> String {
    let offset = u64_at(phdr, 8);
    let size = u64_at(phdr, 32).min(256);
    let mut buf = vec![0u8; usize::try_from(size).unwrap_or(0)];
    if read_exact_at(file, &mut buf, offset).is_err() {
        return String::from("unreadable");
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    OsStr::from_bytes(&buf[..end])
        .to_string_lossy()
        .into_owned()
}

fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    file.read_exact_at(buf, offset)
}

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

fn u64_at(bytes: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[at..at + 8]);
    u64::from_le_bytes(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(args: &[&str]) -> Vec<OsString> {
        args.iter().map(OsString::from).collect()
    }

    const REQUIRED: [&str; 8] = [
        "--id",
        "vm-1",
        "--exec-file",
        "/bin/kiln",
        "--uid",
        "123",
        "--gid",
        "100",
    ];

    fn parse_with(extra: &[&str]) -> Result<JailArgs, ArgsError> {
        let mut args = os(&REQUIRED);
        args.extend(os(extra));
        match parse(args)? {
            Command::Jail(a) => Ok(*a),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn defaults() {
        let a = parse_with(&[]).unwrap();
        assert_eq!(a.id, "vm-1");
        assert_eq!(a.exec_file, Path::new("/bin/kiln"));
        assert_eq!((a.uid, a.gid), (123, 100));
        assert_eq!(a.chroot_base, Path::new(DEFAULT_CHROOT_BASE));
        assert_eq!(a.cgroup_version, CgroupVersion::V1);
        assert!(a.netns.is_none() && !a.daemonize && !a.new_pid_ns);
        assert!(a.cgroups.is_empty() && a.parent_cgroup.is_none());
        assert_eq!(a.resource_limits, ResourceLimits::default());
        assert_eq!(a.resource_limits.no_file, 2048);
        assert!(a.exec_args.is_empty());
    }

    #[test]
    fn every_flag() {
        let a = parse_with(&[
            "--chroot-base-dir",
            "/tmp/j",
            "--netns",
            "/var/run/netns/n",
            "--daemonize",
            "--new-pid-ns",
            "--cgroup",
            "cpu.shares=512",
            "--cgroup",
            "cpu.max=max 100000",
            "--cgroup-version",
            "2",
            "--parent-cgroup",
            "a/b",
            "--resource-limit",
            "fsize=10",
            "--resource-limit",
            "no-file=64",
            "--",
            "--config-file",
            "vm.json",
            "--id",
        ])
        .unwrap();
        assert_eq!(a.chroot_base, Path::new("/tmp/j"));
        assert_eq!(a.netns.as_deref(), Some(Path::new("/var/run/netns/n")));
        assert!(a.daemonize && a.new_pid_ns);
        assert_eq!(a.cgroups.len(), 2);
        assert_eq!(a.cgroups[1].file, "cpu.max");
        assert_eq!(a.cgroups[1].value, "max 100000");
        assert_eq!(a.cgroups[0].controller(), "cpu");
        assert_eq!(a.cgroup_version, CgroupVersion::V2);
        assert_eq!(a.parent_cgroup.as_deref(), Some(Path::new("a/b")));
        assert_eq!(a.resource_limits.fsize, Some(10));
        assert_eq!(a.resource_limits.no_file, 64);
        assert_eq!(a.exec_args, os(&["--config-file", "vm.json", "--id"]));
    }

    #[test]
    fn help_and_version() {
        assert!(matches!(parse(os(&["--help"])), Ok(Command::Help)));
        assert!(matches!(parse(os(&["--version"])), Ok(Command::Version)));
    }

    #[test]
    fn bad_ids_are_rejected() {
        let long = "a".repeat(65);
        for id in [
            "",
            long.as_str(),
            "a/b",
            "..",
            "a..b",
            "vm_1",
            "vm 1",
            "vmé",
            "ß",
        ] {
            let mut args = os(&["--id", id]);
            args.extend(os(&REQUIRED[2..]));
            let err = parse(args).unwrap_err();
            assert!(matches!(err, ArgsError::Id(..)), "{id:?}: {err}");
        }
        assert!(validate_id(&"a".repeat(64)).is_ok());
        assert!(validate_id("A-z-0-9").is_ok());
    }

    #[test]
    fn bad_cgroups_are_rejected() {
        for c in [
            "../cpu.max=1",
            "cpu.max=",
            "cpu.max",
            "=1",
            "a/cpu.max=1",
            "/cpu.max=1",
            ".=1",
            "..=1",
            "cpu=1",
            ".max=1",
            "cpu.=1",
            "cpu.max=1\n2",
        ] {
            let err = parse_with(&["--cgroup", c]).unwrap_err();
            assert!(matches!(err, ArgsError::Cgroup(..)), "{c:?}: {err}");
        }
        let a = parse_with(&["--cgroup", "hugetlb.2MB.max=4194304"]).unwrap();
        assert_eq!(a.cgroups[0].controller(), "hugetlb");
        let a = parse_with(&["--cgroup", "cpu.shares=a=b"]).unwrap();
        assert_eq!(a.cgroups[0].value, "a=b");
    }

    #[test]
    fn bad_parent_cgroups_are_rejected() {
        for p in ["../x", "x/..", "/x", ".", "a/./b", "", "./a"] {
            let err = parse_with(&["--parent-cgroup", p]).unwrap_err();
            assert!(matches!(err, ArgsError::ParentCgroup(..)), "{p:?}: {err}");
        }
        let a = parse_with(&["--parent-cgroup", "machine/vms"]).unwrap();
        assert_eq!(a.parent_cgroup.as_deref(), Some(Path::new("machine/vms")));
    }

    #[test]
    fn bad_numbers_are_rejected() {
        for v in ["abc", "-1", "+1", "4294967296", "", "1.0"] {
            for (uid, gid) in [(v, "1"), ("1", v)] {
                let mut args = os(&REQUIRED[..4]);
                args.extend(os(&["--uid", uid, "--gid", gid]));
                let err = parse(args).unwrap_err();
                assert!(matches!(err, ArgsError::NumericId(..)), "{v:?}: {err}");
            }
        }
        for r in ["fsize", "fsize=-1", "fsize=x", "cpu=1", "no-file="] {
            let err = parse_with(&["--resource-limit", r]).unwrap_err();
            assert!(matches!(err, ArgsError::ResourceLimit(..)), "{r:?}: {err}");
        }
        for v in ["0", "3", "v2", ""] {
            let err = parse_with(&["--cgroup-version", v]).unwrap_err();
            assert!(matches!(err, ArgsError::CgroupVersion(..)), "{err}");
        }
    }

    #[test]
    fn malformed_command_lines() {
        let err = parse(os(&["--id"])).unwrap_err();
        assert!(matches!(err, ArgsError::MissingValue("id")));
        let err = parse(os(&["--id", "a", "--exec-file", "x", "--uid", "1"])).unwrap_err();
        assert!(matches!(err, ArgsError::Missing("gid")));
        let err = parse_with(&["--bogus"]).unwrap_err();
        assert!(matches!(err, ArgsError::Unknown(_)));
        let err = parse_with(&["positional"]).unwrap_err();
        assert!(matches!(err, ArgsError::Unknown(_)));
        let err = parse_with(&["--daemonize", "--daemonize"]).unwrap_err();
        assert!(matches!(err, ArgsError::Duplicate("daemonize")));
        let err = parse_with(&["--netns", "a", "--netns", "b"]).unwrap_err();
        assert!(matches!(err, ArgsError::Duplicate("netns")));
    }

    /// A scratch file removed on drop.
    /// A file with `mode`, in a temporary directory removed on drop.
    struct Scratch(
        PathBuf,
        #[allow(dead_code, reason = "removed on drop")] testkit::TempDir,
    );

    impl Scratch {
        fn new(name: &str, bytes: &[u8], mode: u32) -> Self {
            let dir = testkit::TempDir::new("jailer-ut");
            let path = dir.file(name, bytes);
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            Scratch(path, dir)
        }
    }

    /// A minimal ELF64 header with `phnum` program headers of type `types`.
    fn elf(types: &[u32]) -> Vec<u8> {
        let mut b = vec![0u8; ELF_HEADER_LEN];
        b[..4].copy_from_slice(b"\x7fELF");
        b[4] = 2;
        b[5] = 1;
        b[0x20..0x28].copy_from_slice(&(ELF_HEADER_LEN as u64).to_le_bytes());
        b[0x36..0x38].copy_from_slice(&(PHDR_LEN as u16).to_le_bytes());
        b[0x38..0x3a].copy_from_slice(&(types.len() as u16).to_le_bytes());
        let interp_at = (ELF_HEADER_LEN + PHDR_LEN * types.len()) as u64;
        for t in types {
            let mut p = [0u8; PHDR_LEN];
            p[..4].copy_from_slice(&t.to_le_bytes());
            p[8..16].copy_from_slice(&interp_at.to_le_bytes());
            p[32..40].copy_from_slice(&11u64.to_le_bytes());
            b.extend_from_slice(&p);
        }
        b.extend_from_slice(b"/lib/ld.so\0");
        b
    }

    #[test]
    fn static_elf_is_accepted() {
        let f = Scratch::new("static", &elf(&[1, 1, 4]), 0o755);
        let exec = open_exec_file(&f.0).unwrap();
        assert_eq!(exec.name, f.0.file_name().unwrap());
        // This test binary is built with crt-static.
        let me = File::open("/proc/self/exe").unwrap();
        check_static_elf(&me).unwrap();
    }

    #[test]
    fn dynamic_elf_is_refused() {
        let f = Scratch::new("dynamic", &elf(&[1, PT_INTERP]), 0o755);
        let err = open_exec_file(&f.0).unwrap_err();
        assert!(matches!(&err, ExecFileError::DynamicallyLinked(i) if i == "/lib/ld.so"));
        assert!(err.to_string().contains("statically linked"), "{err}");
    }

    #[test]
    fn non_executables_are_refused() {
        let f = Scratch::new("script", b"#!/bin/sh\necho hi\n", 0o755);
        assert!(matches!(open_exec_file(&f.0), Err(ExecFileError::NotElf)));
        let f = Scratch::new("short", b"\x7fEL", 0o755);
        assert!(matches!(open_exec_file(&f.0), Err(ExecFileError::NotElf)));
        let mut elf32 = elf(&[]);
        elf32[4] = 1;
        let f = Scratch::new("elf32", &elf32, 0o755);
        assert!(matches!(open_exec_file(&f.0), Err(ExecFileError::NotElf64)));
        let mut cut = elf(&[1, 1]);
        cut.truncate(ELF_HEADER_LEN + 10);
        let f = Scratch::new("cut", &cut, 0o755);
        assert!(matches!(
            open_exec_file(&f.0),
            Err(ExecFileError::BadProgramHeaders)
        ));
        let f = Scratch::new("noexec", &elf(&[1]), 0o644);
        assert!(matches!(
            open_exec_file(&f.0),
            Err(ExecFileError::NotExecutable(0o644))
        ));
        let dir = std::env::temp_dir();
        assert!(matches!(open_exec_file(&dir), Err(ExecFileError::NotAFile)));
        let missing = dir.join("jailer-ut-does-not-exist");
        assert!(matches!(
            open_exec_file(&missing),
            Err(ExecFileError::Io(_))
        ));
    }
}
