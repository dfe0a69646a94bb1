//! The jailer's command line (`jailer::args::parse`) and its exec-file check
//! (`jailer::args::check_static_elf`, on a memfd).
//!
//! Invariants: nothing panics; arguments that parse satisfy every rule the jailer relies on
//! later (an id of 1-64 ASCII letters, digits or '-'; cgroup files that are one
//! `<controller>.<property>` name with a non-empty, single-line value; a relative parent
//! cgroup of normal components only); and the parsed arguments, written back as a command
//! line, parse to the same thing. An exec file accepted as static is a 64-bit
//! little-endian ELF.

use std::ffi::OsString;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::path::Component;

use jailer::CgroupVersion;
use jailer::args::{Command, JailArgs, check_static_elf, parse, validate_id};

use crate::wire::{self, Enc, U, Wire};

/// Flag spellings the structured arguments pick from.
pub const FLAGS: [&str; 16] = [
    "--id",
    "--exec-file",
    "--uid",
    "--gid",
    "--chroot-base-dir",
    "--netns",
    "--daemonize",
    "--new-pid-ns",
    "--cgroup",
    "--cgroup-version",
    "--parent-cgroup",
    "--resource-limit",
    "--help",
    "--version",
    "--",
    "vm-1",
];

/// One argument: a known flag or any bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Arg {
    /// `FLAGS[n % 16]`.
    Flag(u8),
    /// Any bytes.
    Raw(Vec<u8>),
}

impl Wire for Arg {
    fn decode(u: &mut U<'_>) -> Self {
        let t = wire::u8(u);
        if t < 0x80 {
            Arg::Flag(t)
        } else {
            Arg::Raw(wire::bytes(u, 128))
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Arg::Flag(n) => e.u8(*n % 0x80),
            Arg::Raw(b) => e.u8(0x80).bytes(b),
        };
    }
}

impl Arg {
    fn os(&self) -> OsString {
        match self {
            Arg::Flag(n) => FLAGS[usize::from(*n) % FLAGS.len()].into(),
            Arg::Raw(b) => OsString::from_vec(b.clone()),
        }
    }
}

/// A fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The arguments after `argv[0]`.
    pub args: Vec<Arg>,
    /// An exec file's contents.
    pub exec: Vec<u8>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            args: wire::list(u, 40),
            exec: wire::rest(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.list(&self.args).raw(&self.exec);
    }
}

crate::arbitrary_via_wire!(Input);

/// The command line that expresses `a`.
fn unparse(a: &JailArgs) -> Vec<OsString> {
    let mut v: Vec<OsString> = Vec::new();
    let mut push = |f: &str, val: OsString| {
        v.push(f.into());
        v.push(val);
    };
    push("--id", a.id.clone().into());
    push("--exec-file", a.exec_file.clone().into_os_string());
    push("--uid", a.uid.to_string().into());
    push("--gid", a.gid.to_string().into());
    push("--chroot-base-dir", a.chroot_base.clone().into_os_string());
    if let Some(n) = &a.netns {
        push("--netns", n.clone().into_os_string());
    }
    for c in &a.cgroups {
        push("--cgroup", format!("{}={}", c.file, c.value).into());
    }
    let version = if a.cgroup_version == CgroupVersion::V2 {
        "2"
    } else {
        "1"
    };
    push("--cgroup-version", version.into());
    if let Some(p) = &a.parent_cgroup {
        push("--parent-cgroup", p.clone().into_os_string());
    }
    if let Some(f) = a.resource_limits.fsize {
        push("--resource-limit", format!("fsize={f}").into());
    }
    push(
        "--resource-limit",
        format!("no-file={}", a.resource_limits.no_file).into(),
    );
    if a.daemonize {
        v.push("--daemonize".into());
    }
    if a.new_pid_ns {
        v.push("--new-pid-ns".into());
    }
    v.push("--".into());
    v.extend(a.exec_args.iter().cloned());
    v
}

/// Runs one input.
pub fn run(input: &Input) {
    let args: Vec<OsString> = input.args.iter().map(Arg::os).collect();
    if let Ok(Command::Jail(a)) = parse(args) {
        assert!(validate_id(&a.id).is_ok(), "id {:?}", a.id);
        for c in &a.cgroups {
            assert!(
                !c.file.contains('/') && c.file != "." && c.file != "..",
                "cgroup file {:?}",
                c.file
            );
            let (ctl, prop) = c
                .file
                .split_once('.')
                .expect("a <controller>.<property> name");
            assert!(
                !ctl.is_empty() && !prop.is_empty(),
                "cgroup file {:?}",
                c.file
            );
            assert!(
                !c.value.is_empty() && !c.value.contains('\n'),
                "cgroup value {:?}",
                c.value
            );
        }
        if let Some(p) = &a.parent_cgroup {
            assert!(
                p.components().all(|c| matches!(c, Component::Normal(_))),
                "parent cgroup {p:?}"
            );
            assert!(
                !p.as_os_str()
                    .as_bytes()
                    .split(|b| *b == b'/')
                    .any(|s| s == b"." || s == b".."),
                "parent cgroup {p:?}"
            );
        }
        let again = match parse(unparse(&a)) {
            Ok(Command::Jail(b)) => b,
            other => panic!("{a:?} written back parses as {other:?}"),
        };
        assert_eq!(
            format!("{a:?}"),
            format!("{again:?}"),
            "parse(unparse(args))"
        );
    }
    let file = crate::guest::memfd(&input.exec);
    if check_static_elf(&file).is_ok() {
        let e = &input.exec;
        assert!(
            e.len() >= 64 && e[..4] == *b"\x7fELF" && e[4] == 2 && e[5] == 1,
            "accepted a non-ELF64"
        );
    }
}
