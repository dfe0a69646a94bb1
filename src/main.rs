//! The kiln binary: arguments → configuration → VM → run → exit code.

use std::sync::Arc;
use std::time::Instant;

use kiln::builder::{RunOptions, build_and_start};
use kiln::cli::{self, Args};
use kiln::config::VmConfig;
use kiln::devices::boot_timer::process_cpu_us;
use kiln::exit::{ExitCode, ExitReason};
use kiln::seccomp::{SeccompFilters, ThreadCategory, install_panic_hook, install_sigsys_handler};
use kiln::terminal::RawTerminal;

fn fail(code: ExitCode, message: impl std::fmt::Display) -> i32 {
    eprintln!("kiln: error: {message}");
    code.code()
}

fn load_config(args: &Args) -> Result<VmConfig, i32> {
    let config = match &args.config_file {
        Some(path) => VmConfig::from_file(path).map_err(|e| {
            fail(
                ExitCode::BadConfiguration,
                format!("{}: {e}", path.display()),
            )
        })?,
        None => {
            let config = args.quick_config();
            config
                .validate()
                .map_err(|e| fail(ExitCode::BadConfiguration, e))?;
            config
        }
    };
    Ok(config)
}

fn run(start: (Instant, u64)) -> i32 {
    let args = match cli::parse(std::env::args().skip(1)) {
        Ok(args) => args,
        Err(e) => return fail(ExitCode::BadConfiguration, e),
    };
    if args.help {
        print!("{}", cli::USAGE);
        return 0;
    }
    if args.version {
        println!("kiln {}", env!("CARGO_PKG_VERSION"));
        return 0;
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".into());
    kiln::logger::init(args.level.unwrap_or_default().filter(), &id);
    let seccomp = if args.no_seccomp {
        SeccompFilters::disabled()
    } else if let Some(path) = &args.seccomp_filter {
        match SeccompFilters::from_file(path) {
            Ok(f) => f,
            Err(e) => return fail(ExitCode::BadConfiguration, e),
        }
    } else {
        SeccompFilters::builtin()
    };
    if args.print_seccomp {
        print!("{}", seccomp.audit());
        return 0;
    }
    if args.no_seccomp {
        log::warn!("running without seccomp filters (--no-seccomp)");
    }
    install_panic_hook();
    if let Err(e) = install_sigsys_handler() {
        return fail(ExitCode::StartFailure, e);
    }
    let seccomp = Arc::new(seccomp);
    if !args.no_api {
        return fail(
            ExitCode::BadConfiguration,
            "the API server is not available in this build; run with --no-api",
        );
    }
    let mut config = match load_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(level) = config.logger.as_ref().and_then(|l| l.level) {
        log::set_max_level(level.filter());
    }
    config.logger.get_or_insert_default();

    let opts = RunOptions {
        serial_out: args.serial_out.clone(),
        serial_in: true,
        boot_timer: args.boot_timer,
        start: Some(start),
        stop_on_signals: true,
        seccomp: seccomp.clone(),
    };
    let _terminal = RawTerminal::enter();
    let mut vmm = match build_and_start(&config, &opts) {
        Ok(vmm) => vmm,
        Err(e) => return fail(e.exit_code(), e),
    };
    // Set-up is done: the main thread jails itself before it serves any guest event.
    if let Err(e) = seccomp.install(ThreadCategory::Vmm) {
        vmm.stop_vcpus();
        return fail(ExitCode::StartFailure, e);
    }
    let reason = vmm.run();
    match &reason {
        ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::Stopped => {
            log::info!("{reason}")
        }
        ExitReason::Signal { .. } => log::warn!("{reason}"),
        _ => log::error!("{reason}"),
    }
    reason.status()
}

fn main() {
    let start = (Instant::now(), process_cpu_us());
    let code = run(start);
    std::process::exit(code);
}
