//! The filters, exercised in forked children: an allowed syscall works, a syscall outside
//! the list and an allowed ioctl with a request number outside the list both end in the
//! trap path (exit code 148), and a panic still ends as an abort (SIGABRT).

use super::*;

/// Runs `body` in a forked child with the filter of `cat` installed; returns the child's
/// wait status.
fn in_filtered_child(filters: &SeccompFilters, cat: ThreadCategory, body: fn()) -> i32 {
    // SAFETY: the child only calls async-signal-safe functions plus the filter install,
    // which the parent process set up; it ends with _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork failed");
    if pid == 0 {
        install_panic_hook();
        if install_sigsys_handler().is_err() || filters.install(cat).is_err() {
            // SAFETY: terminating the child.
            unsafe { libc::_exit(99) };
        }
        body();
        // SAFETY: terminating the child.
        unsafe { libc::_exit(0) };
    }
    let mut status = 0;
    // SAFETY: waiting for our own child with a valid status pointer.
    let r = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(r, pid);
    status
}

fn exited_with(status: i32) -> Option<i32> {
    libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status))
}

fn killed_by(status: i32) -> Option<i32> {
    libc::WIFSIGNALED(status).then(|| libc::WTERMSIG(status))
}

fn disallowed_syscall() {
    // getuid is in no category's list.
    // SAFETY: a plain syscall without arguments.
    unsafe { libc::syscall(libc::SYS_getuid) };
}

fn disallowed_ioctl() {
    // ioctl is allowed only with specific request numbers.
    // SAFETY: an ioctl on stdin with no argument; it never reaches the kernel's handler.
    unsafe { libc::ioctl(0, libc::FIONREAD, std::ptr::null_mut::<libc::c_int>()) };
}

fn allowed_syscalls() {
    // Both categories may write and use futexes; the result does not matter.
    // SAFETY: write of zero bytes to stderr.
    unsafe { libc::write(2, std::ptr::null(), 0) };
    // SAFETY: getpid has no arguments.
    unsafe { libc::getpid() };
}

fn panic_then_abort() {
    // What a panic does in kiln (panic = "abort"): the hook prints the message, then the
    // process aborts. Unwinding in this test build is a superset of those system calls.
    let _ = std::panic::catch_unwind(|| panic!("deliberate panic under the filter"));
    std::process::abort();
}

#[test]
fn every_category_traps_and_allows() {
    let filters = SeccompFilters::builtin();
    for cat in ThreadCategory::ALL {
        assert_eq!(
            exited_with(in_filtered_child(&filters, cat, allowed_syscalls)),
            Some(0),
            "{cat:?}: allowed syscalls"
        );
        assert_eq!(
            exited_with(in_filtered_child(&filters, cat, disallowed_syscall)),
            Some(148),
            "{cat:?}: a syscall outside the list"
        );
        assert_eq!(
            exited_with(in_filtered_child(&filters, cat, disallowed_ioctl)),
            Some(148),
            "{cat:?}: an ioctl request outside the list"
        );
    }
}

#[test]
fn vcpu_may_run_kvm_but_nothing_else_on_kvm() {
    fn kvm_run_on_bad_fd() {
        // KVM_RUN is allowed (the kernel answers EBADF), KVM_CREATE_VM is not.
        // SAFETY: an ioctl on an invalid fd.
        unsafe { libc::ioctl(-1, 0xae80) };
    }
    fn kvm_create_vm() {
        // SAFETY: an ioctl on an invalid fd.
        unsafe { libc::ioctl(-1, 0xae01) };
    }
    let filters = SeccompFilters::builtin();
    assert_eq!(
        exited_with(in_filtered_child(
            &filters,
            ThreadCategory::Vcpu,
            kvm_run_on_bad_fd
        )),
        Some(0)
    );
    assert_eq!(
        exited_with(in_filtered_child(
            &filters,
            ThreadCategory::Vcpu,
            kvm_create_vm
        )),
        Some(148)
    );
    // The VMM thread may not run a vCPU at all.
    assert_eq!(
        exited_with(in_filtered_child(
            &filters,
            ThreadCategory::Vmm,
            kvm_run_on_bad_fd
        )),
        Some(148)
    );
}

#[test]
fn a_panic_is_an_abort_not_a_seccomp_kill() {
    let filters = SeccompFilters::builtin();
    for cat in ThreadCategory::ALL {
        let status = in_filtered_child(&filters, cat, panic_then_abort);
        assert_eq!(
            killed_by(status),
            Some(libc::SIGABRT),
            "{cat:?}: status {status:#x}"
        );
    }
}

#[test]
fn disabled_filters_install_nothing() {
    let filters = SeccompFilters::disabled();
    assert_eq!(
        exited_with(in_filtered_child(
            &filters,
            ThreadCategory::Vcpu,
            disallowed_syscall
        )),
        Some(0)
    );
}

#[test]
fn audit_lists_names_and_counts() {
    let filters = SeccompFilters::builtin();
    let audit = filters.audit();
    assert!(audit.contains("[vcpu] "));
    assert!(audit.contains("ioctl  arg1 == 44672 (KVM_RUN)"));
    let vcpu = filters.unique_syscalls(ThreadCategory::Vcpu);
    let vmm = filters.unique_syscalls(ThreadCategory::Vmm);
    assert!(vcpu > 5 && vcpu < 27, "vcpu {vcpu}");
    assert!(vmm > 10 && vmm < 50, "vmm {vmm}");
    let api = filters.unique_syscalls(ThreadCategory::Api);
    assert!(api > 5 && api < 31, "api {api}");
    assert!(audit.contains("[api] "));
    assert!(audit.contains("accept4  arg3 == 524288 (SOCK_CLOEXEC)"));
}

#[test]
fn custom_filter_files() {
    let dir = std::env::temp_dir().join(format!("kiln-seccomp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.json");
    std::fs::write(
        &good,
        r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "write"}, {"syscall": "exit_group"}]},
            "vcpu": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "exit_group"}]},
            "api": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "exit_group"}]}}"#,
    )
    .unwrap();
    let f = SeccompFilters::from_file(&good).unwrap();
    assert_eq!(f.unique_syscalls(ThreadCategory::Vmm), 2);
    // A file without the `migration` category (written before live migration) still runs
    // the VM, without a migration thread.
    assert!(f.has(ThreadCategory::Vmm) && !f.has(ThreadCategory::Migration));
    assert!(SeccompFilters::builtin().has(ThreadCategory::Migration));
    assert!(SeccompFilters::disabled().has(ThreadCategory::Migration));
    // This filter does not even allow the SIGSYS report's write: the kernel kills the
    // process with SIGSYS instead of the handler's exit 148. Either way it does not survive.
    let status = in_filtered_child(&f, ThreadCategory::Vcpu, allowed_syscalls);
    assert!(
        exited_with(status) == Some(148) || killed_by(status) == Some(libc::SIGSYS),
        "status {status:#x}"
    );
    for (name, body) in [
        ("truncated.json", r#"{"vmm": {"default_action": "trap", "#),
        ("garbage.json", "\u{0}\u{1}garbage"),
        (
            "missing.json",
            r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#,
        ),
        (
            "badname.json",
            r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "no_such_call"}]}, "vcpu": {"default_action": "trap", "filter_action": "allow", "filter": []}, "api": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#,
        ),
    ] {
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let err = SeccompFilters::from_file(&p).unwrap_err().to_string();
        assert!(err.starts_with("--seccomp-filter "), "{name}: {err}");
        assert!(!err.contains('\n'), "{name}: {err}");
    }
    assert!(SeccompFilters::from_file(&dir.join("absent.json")).is_err());
    // A dword condition whose value or mask needs more than 32 bits (security case 30).
    for (name, cond) in [
        (
            "wide-value.json",
            r#"{"index": 1, "type": "dword", "op": "eq", "val": 4294967296}"#,
        ),
        (
            "wide-mask.json",
            r#"{"index": 1, "type": "dword", "op": {"masked_eq": 4294967297}, "val": 1}"#,
        ),
    ] {
        let body = format!(
            r#"{{"vmm": {{"default_action": "trap", "filter_action": "allow", "filter": []}},
                "vcpu": {{"default_action": "trap", "filter_action": "allow", "filter": [{{"syscall": "ioctl", "args": [{cond}]}}]}},
                "api": {{"default_action": "trap", "filter_action": "allow", "filter": []}}}}"#
        );
        let p = dir.join(name);
        std::fs::write(&p, body).unwrap();
        let err = SeccompFilters::from_file(&p).unwrap_err();
        assert!(
            matches!(err, SeccompError::DwordTooWide { .. }),
            "{name}: {err}"
        );
        let err = err.to_string();
        assert!(err.starts_with("--seccomp-filter "), "{name}: {err}");
        assert!(err.contains("`vcpu`, syscall `ioctl`: argument 1"), "{err}");
    }
    // The same value as a qword is fine.
    let qword = dir.join("qword.json");
    std::fs::write(
        &qword,
        r#"{"vmm": {"default_action": "trap", "filter_action": "allow", "filter": []},
            "vcpu": {"default_action": "trap", "filter_action": "allow", "filter": [{"syscall": "ioctl", "args": [{"index": 1, "type": "qword", "op": "eq", "val": 4294967296}]}]},
            "api": {"default_action": "trap", "filter_action": "allow", "filter": []}}"#,
    )
    .unwrap();
    assert!(SeccompFilters::from_file(&qword).is_ok());
    // Larger than the limit (or endless): refused without reading it all.
    let big = dir.join("big.json");
    std::fs::write(&big, vec![b' '; MAX_OPERATOR_FILE as usize + 1]).unwrap();
    let err = SeccompFilters::from_file(&big).unwrap_err().to_string();
    assert!(err.contains("larger than 1048576 bytes"), "{err}");
    let err = SeccompFilters::from_file(Path::new("/dev/zero"))
        .unwrap_err()
        .to_string();
    assert!(
        err.starts_with("--seccomp-filter /dev/zero: larger than"),
        "{err}"
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn decimal_formatting() {
    let mut b = [0u8; 20];
    assert_eq!(decimal(0, &mut b), b"0");
    assert_eq!(decimal(131, &mut b), b"131");
    assert_eq!(decimal(u64::MAX, &mut b), b"18446744073709551615");
}

/// Devices raise interrupts with KVM_IRQ_LINE on the VMM thread and on vCPU threads (the
/// kernel's own filter decides here: an allowed call on a bad fd ends in EBADF, exit 0);
/// a user's file decides by its rules whether kiln may, and one without them keeps irqfds.
#[test]
fn irq_line_where_devices_raise_interrupts() {
    fn irq_line_on_bad_fd() {
        // SAFETY: an ioctl on an invalid fd.
        unsafe { libc::ioctl(-1, KVM_IRQ_LINE as libc::Ioctl) };
    }
    let builtin = SeccompFilters::builtin();
    for cat in [ThreadCategory::Vmm, ThreadCategory::Vcpu] {
        let status = in_filtered_child(&builtin, cat, irq_line_on_bad_fd);
        assert_eq!(exited_with(status), Some(0), "{}", cat.name());
    }
    let status = in_filtered_child(&builtin, ThreadCategory::Api, irq_line_on_bad_fd);
    assert_eq!(exited_with(status), Some(148));
    assert!(builtin.allows_irq_line());
    assert!(SeccompFilters::disabled().allows_irq_line());

    let dir = std::env::temp_dir().join(format!("kiln-seccomp-irq-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let rule = format!(
        r#"{{"syscall": "ioctl", "args": [{{"index": 1, "type": "dword", "op": "eq", "val": {KVM_IRQ_LINE}}}]}}"#
    );
    let other = r#"{"syscall": "ioctl", "args": [{"index": 1, "type": "dword", "op": "eq", "val": 44672}]}"#;
    let file = |name: &str, vmm: &str, vcpu: &str| {
        let path = dir.join(name);
        let cat = |rules: &str| {
            format!(
                r#"{{"default_action": "trap", "filter_action": "allow", "filter": [{{"syscall": "exit_group"}}{rules}]}}"#
            )
        };
        std::fs::write(
            &path,
            format!(
                r#"{{"vmm": {}, "vcpu": {}, "api": {}}}"#,
                cat(vmm),
                cat(vcpu),
                cat("")
            ),
        )
        .unwrap();
        SeccompFilters::from_file(&path).unwrap()
    };
    let with = format!(", {rule}");
    let without = format!(", {other}");
    assert!(file("both.json", &with, &with).allows_irq_line());
    assert!(file("any-ioctl.json", r#", {"syscall": "ioctl"}"#, &with).allows_irq_line());
    assert!(!file("old.json", &without, &without).allows_irq_line());
    assert!(!file("vmm-only.json", &with, &without).allows_irq_line());
    assert!(!file("vcpu-only.json", "", &with).allows_irq_line());
    // Denylists: an `ioctl` rule there forbids, its absence allows.
    let denylist = |name: &str, rules: &str| {
        let path = dir.join(name);
        let cat = format!(
            r#"{{"default_action": "allow", "filter_action": "trap", "filter": [{{"syscall": "reboot"}}{rules}]}}"#
        );
        std::fs::write(
            &path,
            format!(r#"{{"vmm": {cat}, "vcpu": {cat}, "api": {cat}}}"#),
        )
        .unwrap();
        SeccompFilters::from_file(&path).unwrap()
    };
    assert!(!denylist("deny-irq-line.json", &with).allows_irq_line());
    assert!(!denylist("deny-ioctl.json", r#", {"syscall": "ioctl"}"#).allows_irq_line());
    assert!(denylist("deny-other.json", "").allows_irq_line());
    std::fs::remove_dir_all(&dir).unwrap();
}
