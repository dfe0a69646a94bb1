//! Build script of the kiln package.
//!
//! `main` only dispatches; each build step is one function:
//! - `build_seccomp_filters`: compiles seccomp-filters/x86_64.json into BPF
//!   (one program per thread category) embedded in the binary;
//! - `build_test_guest` (cargo feature `test-guest`, on by default): compiles
//!   the freestanding test guest in tests/guest (see its README.md).

use std::env;
use std::path::PathBuf;
use std::process;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    build_seccomp_filters();
    if env::var_os("CARGO_FEATURE_TEST_GUEST").is_some() {
        build_test_guest();
    }
}

/// Compiles tests/guest with gcc/ld/objcopy into `$OUT_DIR/guest/`
/// (kiln-guest.elf, kiln-guest-pvh.elf, kiln-guest.bzImage), checks that
/// they only use general-purpose-register instructions, and exports the
/// directory to the crate as `KILN_TEST_GUEST_DIR`.
fn build_test_guest() {
    println!("cargo:rerun-if-changed=tests/guest");
    let src = PathBuf::from(env_var("CARGO_MANIFEST_DIR")).join("tests/guest");
    let out = PathBuf::from(env_var("OUT_DIR")).join("guest");
    if let Err(message) = test_guest::build(&src, &out) {
        // Cargo prints a failing build script's stderr.
        eprintln!("error: {message}");
        process::exit(1);
    }
    println!("cargo:rustc-env=KILN_TEST_GUEST_DIR={}", out.display());
}

/// Compiles the default seccomp filters with seccompiler into `$OUT_DIR/seccomp/`: for each
/// thread category `<name>.bpf` (the raw `sock_filter` array, little endian) and
/// `<name>.txt` (one allowed syscall per line, with its argument conditions), and exports
/// the directory as `KILN_SECCOMP_DIR`. Nothing is parsed when kiln runs.
fn build_seccomp_filters() {
    let json = PathBuf::from(env_var("CARGO_MANIFEST_DIR")).join("seccomp-filters/x86_64.json");
    println!("cargo:rerun-if-changed={}", json.display());
    let out = PathBuf::from(env_var("OUT_DIR")).join("seccomp");
    if let Err(message) = seccomp_filters::build(&json, &out) {
        eprintln!("error: seccomp-filters/x86_64.json: {message}");
        process::exit(1);
    }
    println!("cargo:rustc-env=KILN_SECCOMP_DIR={}", out.display());
}

mod seccomp_filters {
    use std::fs;
    use std::path::Path;

    /// The categories kiln installs; the JSON must define exactly these.
    const CATEGORIES: [&str; 4] = ["vmm", "vcpu", "api", "migration"];

    pub fn build(json: &Path, out: &Path) -> Result<(), String> {
        let text = fs::read_to_string(json).map_err(|e| e.to_string())?;
        let programs =
            seccompiler::compile_from_json(text.as_bytes(), seccompiler::TargetArch::x86_64)
                .map_err(|e| e.to_string())?;
        let doc: serde_json::Value = serde_json::from_str(&text).map_err(|e| e.to_string())?;
        check_dword_values(&doc)?;
        fs::create_dir_all(out).map_err(|e| e.to_string())?;
        for name in CATEGORIES {
            let program = programs
                .get(name)
                .ok_or_else(|| format!("no filter for thread category `{name}`"))?;
            let mut bytes = Vec::with_capacity(program.len() * 8);
            for insn in program {
                bytes.extend_from_slice(&insn.code.to_le_bytes());
                bytes.push(insn.jt);
                bytes.push(insn.jf);
                bytes.extend_from_slice(&insn.k.to_le_bytes());
            }
            fs::write(out.join(format!("{name}.bpf")), bytes).map_err(|e| e.to_string())?;
            fs::write(out.join(format!("{name}.txt")), allowlist(&doc, name)?)
                .map_err(|e| e.to_string())?;
        }
        if let Some(extra) = programs.keys().find(|k| !CATEGORIES.contains(&k.as_str())) {
            return Err(format!("unknown thread category `{extra}`"));
        }
        Ok(())
    }

    /// A `dword` condition's value or mask must fit in 32 bits (kiln refuses a custom
    /// filter that breaks this at start; the built-in one must not either).
    fn check_dword_values(doc: &serde_json::Value) -> Result<(), String> {
        for (name, filter) in doc.as_object().into_iter().flatten() {
            for rule in filter["filter"].as_array().into_iter().flatten() {
                for arg in rule["args"].as_array().into_iter().flatten() {
                    let wide = |v: &serde_json::Value| v.as_u64().is_some_and(|v| v > 0xffff_ffff);
                    if arg["type"] == "dword"
                        && (wide(&arg["val"]) || wide(&arg["op"]["masked_eq"]))
                    {
                        return Err(format!(
                            "`{name}`: `{}`: a dword argument's value or mask does not fit in 32 bits",
                            rule["syscall"].as_str().unwrap_or("?")
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// "syscall" or "syscall  arg1 == 44672 (KVM_RUN)" lines, one per rule.
    fn allowlist(doc: &serde_json::Value, name: &str) -> Result<String, String> {
        let rules = doc[name]["filter"]
            .as_array()
            .ok_or_else(|| format!("`{name}` has no filter array"))?;
        let mut lines = Vec::new();
        for rule in rules {
            let syscall = rule["syscall"].as_str().unwrap_or("?");
            let mut line = syscall.to_string();
            if let Some(args) = rule["args"].as_array() {
                let conds: Vec<String> = args
                    .iter()
                    .map(|a| {
                        let op = match a["op"].as_str() {
                            Some("eq") => "==",
                            Some("ne") => "!=",
                            Some("lt") => "<",
                            Some("le") => "<=",
                            Some("gt") => ">",
                            Some("ge") => ">=",
                            _ => "&",
                        };
                        let comment = a["comment"].as_str().unwrap_or("");
                        format!(
                            "arg{} {op} {} ({comment})",
                            a["index"].as_u64().unwrap_or(0),
                            a["val"].as_u64().unwrap_or(0)
                        )
                    })
                    .collect();
                line.push_str("  ");
                line.push_str(&conds.join(" && "));
            }
            lines.push(line);
        }
        Ok(lines.join("\n") + "\n")
    }
}

fn env_var(name: &str) -> String {
    env::var(name).unwrap_or_else(|_| {
        eprintln!("error: cargo did not set {name}");
        process::exit(1)
    })
}

/// The test guest's build steps. Every error is returned as a message.
mod test_guest {
    use std::fs;
    use std::io::ErrorKind;
    use std::path::{Path, PathBuf};
    use std::process::{Command, Output};

    type Result<T> = std::result::Result<T, String>;

    /// Tools used, and the Debian package that provides each.
    const TOOLS: [(&str, &str); 4] = [
        ("gcc", "gcc"),
        ("ld", "binutils"),
        ("objcopy", "binutils"),
        ("objdump", "binutils"),
    ];

    /// Freestanding, general-purpose registers only (the emulated KVM of the
    /// test machines cannot execute SSE/x87), no runtime, no CET (endbr64 is
    /// not emulated either), non-PIC: the images are linked for fixed
    /// addresses.
    const CFLAGS: &[&str] = &[
        "-ffreestanding",
        "-nostdlib",
        "-nostdinc",
        "-static",
        "-mgeneral-regs-only",
        "-mno-red-zone",
        "-fno-pic",
        "-fno-pie",
        "-no-pie",
        "-fno-stack-protector",
        "-fno-stack-clash-protection",
        "-fcf-protection=none",
        "-fno-asynchronous-unwind-tables",
        "-fno-builtin",
        "-fno-strict-aliasing",
        "-fno-common",
        "-O2",
        "-Wall",
        "-Wextra",
        "-Werror",
        "-std=gnu11",
        "-Wa,--fatal-warnings",
    ];

    /// One output image: its linker script and the sources only it uses.
    struct Variant {
        /// Passed to variant/variant.c as KILN_VARIANT.
        name: &'static str,
        output: &'static str,
        script: &'static str,
        sources: &'static [&'static str],
        /// bzImage: link to an ELF, then flatten with objcopy.
        flat: bool,
    }

    const VARIANTS: [Variant; 3] = [
        Variant {
            name: "elf",
            output: "kiln-guest.elf",
            script: "elf.ld",
            sources: &[],
            flat: false,
        },
        Variant {
            name: "pvh",
            output: "kiln-guest-pvh.elf",
            script: "pvh.ld",
            sources: &["variant/pvh_note.S"],
            flat: false,
        },
        Variant {
            name: "bzimage",
            output: "kiln-guest.bzImage",
            script: "bzimage.ld",
            sources: &["variant/bz_setup.S", "variant/bz_head.S"],
            flat: true,
        },
    ];

    /// Directories holding per-variant sources and linker scripts, which are
    /// not part of the common object set.
    const NOT_COMMON: [&str; 2] = ["variant", "ld"];

    pub fn build(src: &Path, out: &Path) -> Result<()> {
        check_tools()?;
        let obj_dir = out.join("obj");
        fs::create_dir_all(&obj_dir)
            .map_err(|e| format!("cannot create {}: {e}", obj_dir.display()))?;

        let mut common = Vec::new();
        for source in common_sources(src)? {
            common.push(compile(src, &source, &obj_dir, None)?);
        }
        for variant in &VARIANTS {
            build_variant(src, out, &obj_dir, &common, variant)?;
        }
        Ok(())
    }

    fn build_variant(
        src: &Path,
        out: &Path,
        obj_dir: &Path,
        common: &[PathBuf],
        variant: &Variant,
    ) -> Result<()> {
        let mut objects = common.to_vec();
        objects.push(compile(
            src,
            &src.join("variant/variant.c"),
            obj_dir,
            Some(variant.name),
        )?);
        for source in variant.sources {
            objects.push(compile(src, &src.join(source), obj_dir, None)?);
        }

        let output = out.join(variant.output);
        let elf = if variant.flat {
            obj_dir.join(format!("{}.elf", variant.output))
        } else {
            output.clone()
        };
        link(src, variant.script, &objects, &elf)?;
        check_instructions(&elf, variant.output)?;
        if variant.flat {
            run(Command::new("objcopy")
                .args(["-O", "binary"])
                .arg(&elf)
                .arg(&output))?;
            check_bzimage(&output)
        } else {
            check_elf(&output, variant.name == "pvh")
        }
    }

    /// A missing tool is the most likely failure: name it and its package.
    fn check_tools() -> Result<()> {
        for (tool, package) in TOOLS {
            if let Err(e) = Command::new(tool).arg("--version").output() {
                return Err(if e.kind() == ErrorKind::NotFound {
                    format!(
                        "`{tool}` not found: it is needed to build the test guest \
                         (tests/guest); install the Debian package `{package}` \
                         (or build without the `test-guest` feature)"
                    )
                } else {
                    format!("cannot run `{tool}`: {e}")
                });
            }
        }
        Ok(())
    }

    /// Every .c/.S under `src` except the per-variant ones, sorted.
    fn common_sources(src: &Path) -> Result<Vec<PathBuf>> {
        fn walk(dir: &Path, top: bool, found: &mut Vec<PathBuf>) -> Result<()> {
            let entries =
                fs::read_dir(dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
            for entry in entries {
                let path = entry
                    .map_err(|e| format!("cannot read {}: {e}", dir.display()))?
                    .path();
                let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
                if path.is_dir() {
                    if !(top && NOT_COMMON.contains(&name)) {
                        walk(&path, false, found)?;
                    }
                } else if name.ends_with(".c") || name.ends_with(".S") {
                    found.push(path);
                }
            }
            Ok(())
        }
        let mut found = Vec::new();
        walk(src, true, &mut found)?;
        found.sort();
        Ok(found)
    }

    /// Compiles one source; `variant` also sets KILN_VARIANT and names the
    /// object after it. Objects are named after the source's relative path.
    fn compile(
        src: &Path,
        source: &Path,
        obj_dir: &Path,
        variant: Option<&str>,
    ) -> Result<PathBuf> {
        let relative = source.strip_prefix(src).unwrap_or(source);
        let mut name = relative.to_string_lossy().replace(['/', '\\'], "_");
        if let Some(v) = variant {
            name = format!("{v}_{name}");
        }
        let object = obj_dir.join(format!("{name}.o"));

        let mut cmd = Command::new("gcc");
        cmd.args(CFLAGS).arg("-I").arg(src.join("include"));
        if let Some(v) = variant {
            cmd.arg(format!("-DKILN_VARIANT=\"{v}\""));
        }
        cmd.arg("-c").arg(source).arg("-o").arg(&object);
        run(&mut cmd)?;
        Ok(object)
    }

    fn link(src: &Path, script: &str, objects: &[PathBuf], output: &Path) -> Result<()> {
        let ld_dir = src.join("ld");
        run(Command::new("ld")
            .args(["-nostdlib", "-static", "--build-id=none"])
            .args(["-z", "max-page-size=0x1000", "-z", "noexecstack"])
            // Every input section must be placed by the scripts on purpose.
            .arg("--orphan-handling=error")
            // Search path of INCLUDE image.ld: must precede the script.
            .arg("-L")
            .arg(&ld_dir)
            .arg("-T")
            .arg(ld_dir.join(script))
            .arg("-o")
            .arg(output)
            .args(objects))
        .map(drop)
    }

    fn run(cmd: &mut Command) -> Result<Output> {
        let described = format!("{cmd:?}");
        let output = cmd
            .output()
            .map_err(|e| format!("cannot run {described}: {e}"))?;
        if !output.status.success() {
            return Err(format!(
                "test guest build step failed: {described}\n{}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        Ok(output)
    }

    /// The one deliberate non-general-register instruction (the
    /// emulation-failure scenario, arch/emulation_failure.S), allowed only
    /// as the single instruction of this symbol.
    const ALLOWED_SYMBOL: &str = "kiln_emulation_failure_insn";
    const ALLOWED_INSN: &str = "xorps %xmm0,%xmm0";

    /// Prefixes objdump prints before a mnemonic.
    const PREFIXES: &[&str] = &[
        "rep", "repz", "repe", "repnz", "repne", "lock", "data16", "data32", "addr16", "addr32",
        "cs", "ds", "es", "ss", "fs", "gs", "notrack", "bnd", "xacquire", "xrelease",
    ];

    /// Instructions that fail on the emulated KVM (or need SIMD/x87 state).
    const FORBIDDEN: &[&str] = &[
        "popcnt",
        "int3",
        "lfence",
        "mfence",
        "sfence",
        "ldmxcsr",
        "stmxcsr",
        "emms",
        "xgetbv",
        "xsetbv",
        "cmpxchg16b",
        "clac",
        "stac",
    ];
    const FORBIDDEN_PREFIXES: &[&str] = &["xsave", "xrstor", "vzero"];
    const FORBIDDEN_REGISTERS: &[&str] = &["%xmm", "%ymm", "%zmm", "%st", "%mm"];

    /// Disassembles every executable section with the decoder for its CPU
    /// mode and rejects any forbidden instruction.
    fn check_instructions(elf: &Path, name: &str) -> Result<()> {
        let mut bad = Vec::new();
        let mut allowed_seen = 0;
        for section in code_sections(elf)? {
            let mode = match section.as_str() {
                ".text" => "x86-64",
                ".text32" => "i386",
                ".text16" => "i8086",
                other => {
                    return Err(format!(
                        "{name}: executable section {other} has no known CPU mode \
                         (tests/guest/ld/image.ld)"
                    ));
                }
            };
            let listing = run(Command::new("objdump")
                .args(["-d", "--no-show-raw-insn", "-M", mode, "-j", &section])
                .arg(elf))?;
            let mut symbol = String::new();
            for line in String::from_utf8_lossy(&listing.stdout).lines() {
                if let Some(label) = parse_label(line) {
                    symbol = label.to_string();
                    continue;
                }
                let Some((address, insn)) = parse_instruction(line) else {
                    continue;
                };
                let Some(reason) = forbidden(insn) else {
                    continue;
                };
                // objdump pads the mnemonic: compare with single spaces.
                let insn = insn.split_whitespace().collect::<Vec<_>>().join(" ");
                if symbol == ALLOWED_SYMBOL && insn == ALLOWED_INSN {
                    allowed_seen += 1;
                } else {
                    bad.push(format!(
                        "  {section} 0x{address} <{symbol}>: {insn} ({reason})"
                    ));
                }
            }
        }
        if !bad.is_empty() {
            return Err(format!(
                "forbidden instruction(s) in the test guest {name}: it must use \
                 general-purpose registers only (tests/guest/README.md)\n{}",
                bad.join("\n")
            ));
        }
        if allowed_seen != 1 {
            return Err(format!(
                "{name}: expected exactly one `{ALLOWED_INSN}` in <{ALLOWED_SYMBOL}>, \
                 found {allowed_seen}"
            ));
        }
        Ok(())
    }

    /// Section names flagged CODE in `objdump -h`.
    fn code_sections(elf: &Path) -> Result<Vec<String>> {
        let headers = run(Command::new("objdump").arg("-h").arg(elf))?;
        let mut sections = Vec::new();
        let mut last = None;
        for line in String::from_utf8_lossy(&headers.stdout).lines() {
            let mut words = line.split_whitespace();
            match words.next() {
                Some(index) if index.bytes().all(|b| b.is_ascii_digit()) => {
                    last = words.next().map(str::to_string);
                }
                Some(_) if line.contains("CODE") => sections.extend(last.take()),
                _ => {}
            }
        }
        Ok(sections)
    }

    /// "0000000001000000 <linux64_entry>:" -> "linux64_entry"
    fn parse_label(line: &str) -> Option<&str> {
        let (address, rest) = line.split_once(" <")?;
        if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        rest.strip_suffix(">:")
    }

    /// "  1000000:\tcli" -> ("1000000", "cli")
    fn parse_instruction(line: &str) -> Option<(&str, &str)> {
        let (address, insn) = line.trim_start().split_once(":\t")?;
        if address.is_empty() || !address.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        Some((address, insn.trim()))
    }

    fn forbidden(insn: &str) -> Option<&'static str> {
        let text = insn.split('#').next().unwrap_or_default();
        let mnemonic = text
            .split_whitespace()
            .find(|w| !PREFIXES.contains(w) && !w.starts_with("rex") && !w.starts_with('{'))?;
        if mnemonic == "(bad)" {
            Some("undecodable bytes")
        } else if mnemonic.starts_with('f') {
            Some("x87/FXSAVE instruction")
        } else if FORBIDDEN.contains(&mnemonic)
            || FORBIDDEN_PREFIXES.iter().any(|p| mnemonic.starts_with(p))
        {
            Some("not executable by the emulated KVM")
        } else if FORBIDDEN_REGISTERS.iter().any(|r| text.contains(r)) {
            Some("SIMD/x87 register")
        } else {
            None
        }
    }

    fn read(path: &Path) -> Result<Vec<u8>> {
        fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
    }

    fn le(bytes: &[u8], offset: usize, len: usize) -> u64 {
        bytes.get(offset..offset + len).map_or(0, |b| {
            b.iter().rev().fold(0, |v, &x| (v << 8) | u64::from(x))
        })
    }

    /// Sanity of the linked ELF images: entry and load addresses >= 1 MiB
    /// (linux-loader rejects lower), and the PVH note where expected.
    fn check_elf(path: &Path, pvh: bool) -> Result<()> {
        const PT_LOAD: u64 = 1;
        const PT_NOTE: u64 = 4;
        let elf = read(path)?;
        let name = path.display();
        if elf.get(..5) != Some(b"\x7fELF\x02") {
            return Err(format!("{name}: not an ELF64 file"));
        }
        if le(&elf, 24, 8) < 0x10_0000 {
            return Err(format!("{name}: entry point below 1 MiB"));
        }
        let (phoff, phentsize, phnum) = (le(&elf, 32, 8), le(&elf, 54, 2), le(&elf, 56, 2));
        let (mut loads, mut notes) = (0, 0);
        for i in 0..phnum {
            let ph = usize::try_from(phoff + i * phentsize).unwrap_or(usize::MAX);
            match le(&elf, ph, 4) {
                PT_LOAD if le(&elf, ph + 24, 8) < 0x10_0000 => {
                    return Err(format!("{name}: PT_LOAD below 1 MiB"));
                }
                PT_LOAD => loads += 1,
                PT_NOTE => notes += 1,
                _ => {}
            }
        }
        if loads == 0 || notes != usize::from(pvh) {
            return Err(format!(
                "{name}: {loads} PT_LOAD and {notes} PT_NOTE program headers"
            ));
        }
        Ok(())
    }

    /// The setup header fields a loader relies on (Documentation/x86/boot.rst).
    fn check_bzimage(path: &Path) -> Result<()> {
        let image = read(path)?;
        let name = path.display();
        let setup_size = (le(&image, 0x1f1, 1) + 1) * 512;
        let payload = (image.len() as u64).saturating_sub(setup_size);
        let checks = [
            ("setup_sects", le(&image, 0x1f1, 1) == 1),
            ("boot_flag", le(&image, 0x1fe, 2) == 0xaa55),
            ("header", image.get(0x202..0x206) == Some(b"HdrS")),
            ("version", le(&image, 0x206, 2) == 0x020f),
            ("loadflags", le(&image, 0x211, 1) & 1 == 1),
            ("code32_start", le(&image, 0x214, 4) == 0x10_0000),
            ("xloadflags", le(&image, 0x236, 2) == 0x3),
            (
                "syssize",
                le(&image, 0x1f4, 4) * 16 == payload && payload > 0x200,
            ),
            ("init_size", le(&image, 0x260, 4) >= payload),
            ("pref_address", le(&image, 0x258, 8) == 0x10_0000),
        ];
        match checks.iter().find(|(_, good)| !good) {
            Some((field, _)) => Err(format!("{name}: bad setup header field {field}")),
            None => Ok(()),
        }
    }
}
