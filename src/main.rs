//! The kiln binary: arguments → configuration → VM → run → exit code.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln::api::server::{ApiMetrics, start_api_server};
use kiln::builder::RunOptions;
use kiln::cli::{self, Args, DEFAULT_API_SOCK};
use kiln::config::VmConfig;
use kiln::controller::{ApiChannel, Controller};
use kiln::devices::boot_timer::process_cpu_us;
use kiln::exit::{ExitCode, ExitReason};
use kiln::seccomp::{
    SeccompFilters, ThreadCategory, install_panic_hook, install_sigsys_handler, pin_allocator,
};
use kiln::terminal::RawTerminal;

fn fail(code: ExitCode, message: impl std::fmt::Display) -> i32 {
    // Not eprintln!, which panics if stderr fails (e.g. a full pipe made non-blocking
    // along with the console it shares with stdout).
    let _ = writeln!(std::io::stderr(), "kiln: error: {message}");
    code.code()
}

/// The VM the arguments describe, if any: a config file, or the quick flags (with
/// `--no-api`, even none of them: the built-in test guest).
fn initial_config(args: &Args) -> Result<Option<VmConfig>, i32> {
    if let Some(path) = &args.config_file {
        return VmConfig::from_file(path).map(Some).map_err(|e| {
            fail(
                ExitCode::BadConfiguration,
                format!("{}: {e}", path.display()),
            )
        });
    }
    if args.no_api || args.has_quick_vm() {
        let config = args.quick_config();
        config
            .validate()
            .map_err(|e| fail(ExitCode::BadConfiguration, e))?;
        return Ok(Some(config));
    }
    Ok(None)
}

fn seccomp_filters(args: &Args) -> Result<SeccompFilters, i32> {
    if args.no_seccomp {
        return Ok(SeccompFilters::disabled());
    }
    match &args.seccomp_filter {
        Some(path) => {
            SeccompFilters::from_file(path).map_err(|e| fail(ExitCode::BadConfiguration, e))
        }
        None => Ok(SeccompFilters::builtin()),
    }
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
    let seccomp = match seccomp_filters(&args) {
        Ok(s) => s,
        Err(code) => return code,
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

    let opts = RunOptions {
        serial_out: args.serial_out.clone(),
        serial_in: true,
        boot_timer: args.boot_timer,
        start: Some(start),
        stop_on_signals: true,
        seccomp: seccomp.clone(),
    };
    let mut controller = Controller::new(id, opts);
    if args.log_path.is_some() || args.show_level || args.show_log_origin {
        let logger = kiln::config::LoggerConfig {
            log_path: args.log_path.as_ref().map(|p| p.display().to_string()),
            level: None,
            show_level: args.show_level.then_some(true),
            show_log_origin: args.show_log_origin.then_some(true),
            module: None,
        };
        if let Err(e) = controller.configure_logger(&logger) {
            return fail(ExitCode::BadConfiguration, format!("--log-path: {e}"));
        }
    }
    if let Some(path) = &args.metrics_path
        && let Err(e) = controller.set_metrics_path(path)
    {
        return fail(ExitCode::BadConfiguration, format!("--metrics-path: {e}"));
    }
    let config = match initial_config(&args) {
        Ok(c) => c,
        Err(code) => return code,
    };
    let booting_now = config.is_some();
    if let Some(config) = config
        && let Err(e) = controller.apply_config(config)
    {
        return fail(ExitCode::BadConfiguration, e);
    }

    // The API server, unless --no-api.
    let api = if args.no_api {
        None
    } else {
        let path = args
            .api_sock
            .clone()
            .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK));
        let metrics = Arc::new(ApiMetrics::default());
        let max_payload = args
            .http_api_max_payload_size
            .unwrap_or(kiln::api::http::DEFAULT_MAX_PAYLOAD);
        match start_api_server(&path, max_payload, seccomp.clone(), metrics.clone()) {
            Ok((bridge, _thread)) => {
                match bridge.eventfd().try_clone() {
                    Ok(evt) => controller.set_api_eventfd(evt),
                    Err(e) => return fail(ExitCode::StartFailure, format!("API eventfd: {e}")),
                }
                let section = metrics.clone();
                controller.set_extra_metrics(Box::new(move || {
                    vec![("api_server".to_string(), section.to_json())]
                }));
                Some(bridge)
            }
            Err(e) => return fail(ExitCode::StartFailure, format!("--api-sock: {e}")),
        }
    };

    let _terminal = RawTerminal::enter();
    if booting_now {
        if let Err(e) = controller.start() {
            return fail(e.exit_code(), e);
        }
    } else if let Some(bridge) = &api {
        // Before boot the main thread only serves the API, until InstanceStart succeeds.
        while !controller.started() {
            let Some(action) = bridge.recv() else {
                return fail(ExitCode::StartFailure, "the API server stopped");
            };
            let response = controller.handle(action);
            bridge.respond(response);
        }
    }

    // Set-up is done: the main thread jails itself before it serves any guest event.
    if let Err(e) = seccomp.install(ThreadCategory::Vmm) {
        if let Some(vmm) = controller.vmm_mut() {
            vmm.stop_vcpus();
        }
        return fail(ExitCode::StartFailure, e);
    }
    let reason = controller.run(api.as_ref().map(|b| b as &dyn ApiChannel));
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
    // Before any thread exists: no allocation may later step outside a seccomp filter.
    if let Err(e) = pin_allocator() {
        std::process::exit(fail(ExitCode::StartFailure, e));
    }
    if let Err(e) = kiln::signals::ignore_file_size_signal() {
        std::process::exit(fail(ExitCode::StartFailure, format!("SIGXFSZ: {e}")));
    }
    let code = run(start);
    std::process::exit(code);
}
