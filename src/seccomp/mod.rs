//! Per-thread seccomp filters. Each kind of thread (the VMM's event loop, the vCPUs, the
//! API server) installs its own allowlist, compiled from seccomp-filters/x86_64.json into
//! BPF at build time, as its first act before it touches anything a guest or client
//! controls. A syscall outside the list traps into a SIGSYS handler that writes one line
//! naming the thread and the syscall, then ends the process with exit code 148.

mod malloc;

pub use malloc::{MallocError, pin_allocator};

use std::cell::Cell;
use std::collections::HashMap;
use std::path::Path;

use seccompiler::{BpfProgram, TargetArch, sock_filter};

use crate::config::{FileReadError, MAX_OPERATOR_FILE, read_capped};
use crate::exit::ExitCode;

/// The kinds of threads, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ThreadCategory {
    /// The main thread: event loop and device back-ends.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The API server thread.
    Api,
    /// The live-migration thread (src/migration/worker.rs).
    Migration,
}

impl ThreadCategory {
    /// Every category, in the order the audit prints them.
    pub const ALL: [ThreadCategory; 4] = [
        ThreadCategory::Vmm,
        ThreadCategory::Vcpu,
        ThreadCategory::Api,
        ThreadCategory::Migration,
    ];

    /// The category's key in the JSON.
    pub fn name(self) -> &'static str {
        match self {
            ThreadCategory::Vmm => "vmm",
            ThreadCategory::Vcpu => "vcpu",
            ThreadCategory::Api => "api",
            ThreadCategory::Migration => "migration",
        }
    }

    fn default_program(self) -> &'static [u8] {
        match self {
            ThreadCategory::Vmm => include_bytes!(concat!(env!("KILN_SECCOMP_DIR"), "/vmm.bpf")),
            ThreadCategory::Vcpu => {
                include_bytes!(concat!(env!("KILN_SECCOMP_DIR"), "/vcpu.bpf"))
            }
            ThreadCategory::Api => include_bytes!(concat!(env!("KILN_SECCOMP_DIR"), "/api.bpf")),
            ThreadCategory::Migration => {
                include_bytes!(concat!(env!("KILN_SECCOMP_DIR"), "/migration.bpf"))
            }
        }
    }

    fn default_allowlist(self) -> &'static str {
        match self {
            ThreadCategory::Vmm => include_str!(concat!(env!("KILN_SECCOMP_DIR"), "/vmm.txt")),
            ThreadCategory::Vcpu => include_str!(concat!(env!("KILN_SECCOMP_DIR"), "/vcpu.txt")),
            ThreadCategory::Api => include_str!(concat!(env!("KILN_SECCOMP_DIR"), "/api.txt")),
            ThreadCategory::Migration => {
                include_str!(concat!(env!("KILN_SECCOMP_DIR"), "/migration.txt"))
            }
        }
    }
}

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The custom filter file could not be read.
    #[error("--seccomp-filter {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        source: FileReadError,
    },
    /// The custom filter file does not compile.
    #[error("--seccomp-filter {path}: {message}")]
    Compile {
        /// The file.
        path: String,
        /// seccompiler's message.
        message: String,
    },
    /// A condition on a 32-bit (`dword`) argument names a value that does not fit in it.
    #[error(
        "--seccomp-filter {path}: category `{category}`, syscall `{syscall}`: argument {index} \
         is a dword (32 bits) but its {what} {value:#x} does not fit in 32 bits; use \
         \"type\": \"qword\" or a 32-bit value"
    )]
    DwordTooWide {
        /// The file.
        path: String,
        /// The category.
        category: String,
        /// The syscall of the rule.
        syscall: String,
        /// The argument index.
        index: u64,
        /// "value" or "mask".
        what: &'static str,
        /// The value.
        value: u64,
    },
    /// A category is missing from the custom filter file.
    #[error("--seccomp-filter {path}: no filter for thread category `{category}`")]
    MissingCategory {
        /// The file.
        path: String,
        /// The category.
        category: &'static str,
    },
    /// Installing a filter failed.
    #[error("cannot install the seccomp filter of the {category} thread: {message}")]
    Install {
        /// The category.
        category: &'static str,
        /// Why.
        message: String,
    },
    /// The SIGSYS handler could not be installed.
    #[error("cannot install the SIGSYS handler: {0}")]
    Handler(#[source] vmm_sys_util::errno::Error),
}

/// The filters kiln installs (none at all with `--no-seccomp`).
#[derive(Clone, Debug, Default)]
pub struct SeccompFilters {
    programs: HashMap<&'static str, BpfProgram>,
    /// The allowlists as text, for the audit.
    allowlists: HashMap<&'static str, String>,
    enabled: bool,
    /// The VMM and vCPU categories allow KVM_IRQ_LINE (see [`SeccompFilters::allows_irq_line`]).
    irq_line: bool,
}

/// KVM_IRQ_LINE: `_IOW(KVMIO, 0x61, struct kvm_irq_level)`.
pub const KVM_IRQ_LINE: u64 = 0x4008_ae61;

/// Whether one category of a filter file lets `ioctl(_, request, ...)` through, whatever
/// its other arguments. An allowlist (`filter_action` "allow") must have a rule for `ioctl`
/// with no condition, or with exactly the condition "argument 1 equals `request`"; a
/// denylist (`default_action` "allow") must have no rule for `ioctl` at all. Anything else
/// counts as not allowed: kiln then keeps to the calls the file surely allows.
fn allows_ioctl(category: &serde_json::Value, request: u64) -> bool {
    let Some(rules) = category["filter"].as_array() else {
        return false;
    };
    let mut ioctl_rules = rules
        .iter()
        .filter(|rule| rule["syscall"].as_str() == Some("ioctl"));
    if category["filter_action"].as_str() == Some("allow") {
        ioctl_rules.any(|rule| match rule["args"].as_array() {
            None => true,
            Some(args) if args.is_empty() => true,
            Some(args) => {
                args.len() == 1
                    && args[0]["index"].as_u64() == Some(1)
                    && args[0]["op"].as_str() == Some("eq")
                    && args[0]["val"].as_u64() == Some(request)
            }
        })
    } else {
        category["default_action"].as_str() == Some("allow") && ioctl_rules.next().is_none()
    }
}

fn decode(bytes: &[u8]) -> BpfProgram {
    bytes
        .chunks_exact(8)
        .map(|c| sock_filter {
            code: u16::from_le_bytes([c[0], c[1]]),
            jt: c[2],
            jf: c[3],
            k: u32::from_le_bytes([c[4], c[5], c[6], c[7]]),
        })
        .collect()
}

impl SeccompFilters {
    /// The filters built into kiln.
    pub fn builtin() -> SeccompFilters {
        let mut f = SeccompFilters {
            enabled: true,
            irq_line: true,
            ..Default::default()
        };
        for cat in ThreadCategory::ALL {
            f.programs.insert(cat.name(), decode(cat.default_program()));
            f.allowlists
                .insert(cat.name(), cat.default_allowlist().to_string());
        }
        f
    }

    /// No filters (`--no-seccomp`).
    pub fn disabled() -> SeccompFilters {
        SeccompFilters::default()
    }

    /// Filters compiled from a user's JSON file, in the same format.
    pub fn from_file(path: &Path) -> Result<SeccompFilters, SeccompError> {
        let shown = path.display().to_string();
        let text = read_capped(path, MAX_OPERATOR_FILE).map_err(|source| SeccompError::Read {
            path: shown.clone(),
            source,
        })?;
        let compiled = seccompiler::compile_from_json(text.as_bytes(), TargetArch::x86_64)
            .map_err(|e| SeccompError::Compile {
                path: shown.clone(),
                message: e.to_string().replace('\n', " "),
            })?;
        let doc: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| SeccompError::Compile {
                path: shown.clone(),
                message: e.to_string(),
            })?;
        check_dword_values(&doc, &shown)?;
        let mut f = SeccompFilters {
            enabled: true,
            irq_line: [ThreadCategory::Vmm, ThreadCategory::Vcpu]
                .iter()
                .all(|cat| allows_ioctl(&doc[cat.name()], KVM_IRQ_LINE)),
            ..Default::default()
        };
        for cat in ThreadCategory::ALL {
            // A file written before live migration existed still runs the VM; without a
            // `migration` category there is no migration thread (`has`).
            if cat == ThreadCategory::Migration && !compiled.contains_key(cat.name()) {
                continue;
            }
            let program =
                compiled
                    .get(cat.name())
                    .cloned()
                    .ok_or(SeccompError::MissingCategory {
                        path: shown.clone(),
                        category: cat.name(),
                    })?;
            f.programs.insert(cat.name(), program);
            let names: Vec<String> = doc[cat.name()]["filter"]
                .as_array()
                .map(|rules| {
                    rules
                        .iter()
                        .filter_map(|r| r["syscall"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            f.allowlists.insert(cat.name(), names.join("\n") + "\n");
        }
        Ok(f)
    }

    /// Whether a thread of category `cat` can run: filters are off, or `cat` has one.
    pub fn has(&self, cat: ThreadCategory) -> bool {
        !self.enabled || self.programs.contains_key(cat.name())
    }

    /// Whether device interrupts may be raised with KVM_IRQ_LINE, which device code calls on
    /// the VMM thread and on vCPU threads: always with kiln's filters or none; with a user's
    /// file only if its `vmm` and `vcpu` categories allow that ioctl (a file written for an
    /// earlier kiln does not, and keeps the irqfds).
    pub fn allows_irq_line(&self) -> bool {
        !self.enabled || self.irq_line
    }

    /// Whether filters are installed at all.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// The program of a category.
    pub fn program(&self, cat: ThreadCategory) -> Option<&BpfProgram> {
        self.programs.get(cat.name())
    }

    /// Each category's allowlist as syscall names (one rule per line, with its argument
    /// conditions), and the number of distinct syscalls.
    pub fn audit(&self) -> String {
        let mut out = String::new();
        for cat in ThreadCategory::ALL {
            let list = self.allowlists.get(cat.name()).map_or("", String::as_str);
            let mut unique: Vec<&str> = list
                .lines()
                .filter_map(|l| l.split_whitespace().next())
                .collect();
            unique.sort_unstable();
            unique.dedup();
            out.push_str(&format!(
                "[{}] {} syscalls\n{}",
                cat.name(),
                unique.len(),
                list
            ));
        }
        out
    }

    /// Distinct syscalls allowed to a category.
    pub fn unique_syscalls(&self, cat: ThreadCategory) -> usize {
        let mut names: Vec<&str> = self
            .allowlists
            .get(cat.name())
            .map_or("", String::as_str)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .collect();
        names.sort_unstable();
        names.dedup();
        names.len()
    }

    /// Installs the filter of `cat` on the calling thread (and names the thread for the
    /// SIGSYS report). Does nothing when filters are disabled.
    pub fn install(&self, cat: ThreadCategory) -> Result<(), SeccompError> {
        set_thread_label();
        if !self.enabled {
            return Ok(());
        }
        let program = self.program(cat).ok_or(SeccompError::Install {
            category: cat.name(),
            message: "no program".to_string(),
        })?;
        seccompiler::apply_filter(program).map_err(|e| SeccompError::Install {
            category: cat.name(),
            message: e.to_string(),
        })
    }
}

/// Refuses a `dword` argument condition whose value (or `masked_eq` mask) needs more than
/// 32 bits: seccompiler accepts it, but a 32-bit argument can never equal it, so the filter
/// does not say what the file says (at best the rule never matches and the call ends kiln
/// with 148 while the VM runs; with seccompiler 0.5 the high bits are silently dropped).
fn check_dword_values(doc: &serde_json::Value, path: &str) -> Result<(), SeccompError> {
    let Some(categories) = doc.as_object() else {
        return Ok(());
    };
    for (category, filter) in categories {
        let rules = filter["filter"].as_array().map_or(&[][..], Vec::as_slice);
        for rule in rules {
            let args = rule["args"].as_array().map_or(&[][..], Vec::as_slice);
            for arg in args.iter().filter(|a| a["type"] == "dword") {
                let values = [
                    ("value", arg["val"].as_u64()),
                    ("mask", arg["op"]["masked_eq"].as_u64()),
                ];
                for (what, value) in values {
                    if let Some(value) = value.filter(|v| *v > u64::from(u32::MAX)) {
                        return Err(SeccompError::DwordTooWide {
                            path: path.to_string(),
                            category: category.clone(),
                            syscall: rule["syscall"].as_str().unwrap_or("?").to_string(),
                            index: arg["index"].as_u64().unwrap_or(0),
                            what,
                            value,
                        });
                    }
                }
            }
        }
    }
    Ok(())
}

// ---- the SIGSYS report ---------------------------------------------------------------------

thread_local! {
    /// The thread's name, copied where the signal handler can read it without allocating.
    static THREAD_LABEL: Cell<[u8; 16]> = const { Cell::new([0; 16]) };
}

fn set_thread_label() {
    let mut label = [0u8; 16];
    let current = std::thread::current();
    let name = current.name().unwrap_or("kiln").as_bytes();
    let n = name.len().min(15);
    label[..n].copy_from_slice(&name[..n]);
    THREAD_LABEL.with(|l| l.set(label));
}

/// Formats `n` in decimal into `buf`, returning the digits.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    &buf[i..]
}

fn raw_write(bytes: &[u8]) {
    // SAFETY: write(2) on stderr with a valid buffer; async-signal-safe.
    unsafe { libc::write(2, bytes.as_ptr().cast(), bytes.len()) };
}

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // siginfo_t for SIGSYS: si_signo, si_errno, si_code, padding, then _sigsys { call_addr
    // (8 bytes), syscall (int), arch }: the syscall number is at byte 24.
    let nr = if info.is_null() {
        -1
    } else {
        let field = info.cast::<u8>().wrapping_add(24).cast::<i32>();
        // SAFETY: the kernel passes a valid siginfo_t, which is 128 bytes long, so bytes
        // 24..28 are inside it.
        unsafe { std::ptr::read_unaligned(field) }
    };
    let label = THREAD_LABEL.with(Cell::get);
    let len = label.iter().position(|b| *b == 0).unwrap_or(label.len());
    let mut digits = [0u8; 20];
    raw_write(b"kiln: seccomp: thread ");
    raw_write(if len == 0 { b"unnamed" } else { &label[..len] });
    raw_write(b" made system call ");
    raw_write(decimal(u64::from(nr.unsigned_abs()), &mut digits));
    raw_write(b", which its filter does not allow; exiting with code 148\n");
    // SAFETY: _exit(2) ends the process at once; it is async-signal-safe.
    unsafe { libc::_exit(ExitCode::BadSyscall.code()) };
}

/// Replaces the default panic hook with one that prints a single line and never captures
/// a backtrace: symbolising one would need system calls (getcwd, open, mmap) no thread's
/// filter allows, turning a panic into a seccomp kill instead of the abort that follows.
pub fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        eprintln!("kiln: thread {name} panicked: {info}");
    }));
}

/// Installs the SIGSYS handler (process-wide).
pub fn install_sigsys_handler() -> Result<(), SeccompError> {
    vmm_sys_util::signal::register_signal_handler(libc::SIGSYS, on_sigsys)
        .map_err(SeccompError::Handler)
}

#[cfg(test)]
mod tests;
