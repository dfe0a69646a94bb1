//! Custom seccomp filters (`--seccomp-filter`): JSON text through
//! `SeccompFilters::from_file` (given a memfd's /proc/self/fd path, so no disk I/O) and
//! seccompiler.
//!
//! Invariants: nothing panics; accepted filters have a program for every thread category,
//! each one a well-formed classic BPF program the kernel would load: 1 to 4096
//! instructions, every jump landing inside the program, ending in a return; and kiln
//! accepts exactly the documents seccompiler compiles that define the three categories,
//! except those it refuses on purpose: a `dword` condition whose value or mask needs more
//! than 32 bits, and a file over the 1 MiB operator-file limit.

use std::os::fd::AsRawFd;
use std::path::PathBuf;

use kiln::config::MAX_OPERATOR_FILE;
use kiln::seccomp::{SeccompError, SeccompFilters, ThreadCategory};
use seccompiler::{BpfProgram, TargetArch};

/// BPF_MAXINSNS.
const MAX_INSNS: usize = 4096;
const BPF_JMP: u16 = 0x05;
const BPF_JA: u16 = 0x00;
const BPF_RET: u16 = 0x06;

/// Whether `p` is a program the kernel's classic-BPF checker accepts (jumps and length).
pub fn well_formed(p: &BpfProgram) -> Result<(), String> {
    if p.is_empty() || p.len() > MAX_INSNS {
        return Err(format!("{} instructions", p.len()));
    }
    for (pc, i) in p.iter().enumerate() {
        if i.code & 0x07 == BPF_JMP {
            let targets: Vec<usize> = if i.code & 0xf0 == BPF_JA {
                vec![pc + 1 + i.k as usize]
            } else {
                vec![pc + 1 + usize::from(i.jt), pc + 1 + usize::from(i.jf)]
            };
            if targets.iter().any(|t| *t >= p.len()) {
                return Err(format!("instruction {pc} ({i:?}) jumps out of the program"));
            }
        }
    }
    let last = &p[p.len() - 1];
    if last.code & 0x07 != BPF_RET {
        return Err(format!("the last instruction {last:?} is not a return"));
    }
    Ok(())
}

/// Runs one input.
pub fn run(data: &[u8]) {
    let file = crate::guest::memfd(data);
    let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
    let ours = SeccompFilters::from_file(&path);
    let theirs = seccompiler::compile_from_json(data, TargetArch::x86_64);
    let text_ok = std::str::from_utf8(data).is_ok();
    match (&ours, &theirs) {
        (Ok(f), Ok(compiled)) => {
            for cat in ThreadCategory::ALL {
                // `migration` may be absent (a file written before live migration): then
                // there is no program, and seccompiler compiled none either.
                let Some(p) = f.program(cat) else {
                    assert!(
                        cat == ThreadCategory::Migration && !f.has(cat),
                        "{} has no program",
                        cat.name()
                    );
                    assert!(
                        !compiled.contains_key(cat.name()),
                        "kiln dropped the {} category seccompiler compiled",
                        cat.name()
                    );
                    continue;
                };
                assert_eq!(
                    Some(p),
                    compiled.get(cat.name()),
                    "{} differs from seccompiler's",
                    cat.name()
                );
                if let Err(e) = well_formed(p) {
                    panic!("the {} filter is malformed: {e}", cat.name());
                }
            }
            let _ = f.audit();
        }
        (Ok(_), Err(e)) => panic!("kiln accepted what seccompiler refuses: {e}"),
        (Err(SeccompError::DwordTooWide { .. }), Ok(_)) => {}
        (Err(_), Ok(_)) if data.len() as u64 > MAX_OPERATOR_FILE => {}
        (Err(_), Ok(compiled)) => {
            let all = ThreadCategory::ALL
                .iter()
                .all(|c| compiled.contains_key(c.name()));
            assert!(
                !(all && text_ok),
                "kiln refused a document seccompiler compiles with every category: {ours:?}"
            );
        }
        (Err(_), Err(_)) => {}
    }
}
