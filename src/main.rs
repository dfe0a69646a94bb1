//! The kiln binary: arguments → configuration → VM → run → exit code.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use kiln::api::actions::{ActionHandler, Outcome, SinkError};
use kiln::api::server::{ApiBridge, ApiError, ApiMetrics, start_api_server};
use kiln::builder::{RunOptions, StartError, build_and_start, restore, restore_migrated};
use kiln::cli::{self, Args, CliError, DEFAULT_API_SOCK};
use kiln::config::{ConfigError, VmConfig};
use kiln::devices::boot_timer::process_cpu_us;
use kiln::exit::{ExitCode, ExitReason};
use kiln::migration::ReceiveParams;
use kiln::migration::protocol::Kind as Protocol;
use kiln::seccomp::{
    SeccompError, SeccompFilters, ThreadCategory, install_panic_hook, install_sigsys_handler,
    pin_allocator,
};
use kiln::snapshot::{Key, SnapshotLoadParams, WorkingSetParams};
use kiln::terminal::RawTerminal;
use kiln::vmm::{ApiChannel, Vmm};

/// Why kiln could not run a VM. Each maps to one exit code (README's table).
#[derive(Debug, thiserror::Error)]
enum MainError {
    /// The command line is invalid.
    #[error(transparent)]
    Cli(#[from] CliError),
    /// The configuration file is unreadable or invalid.
    #[error("{}: {source}", path.display())]
    ConfigFile {
        /// The file.
        path: PathBuf,
        /// Why.
        source: ConfigError,
    },
    /// The quick flags describe an invalid VM.
    #[error(transparent)]
    Config(ConfigError),
    /// `--seccomp-filter` names an unusable file.
    #[error(transparent)]
    SeccompFile(SeccompError),
    /// The SIGSYS handler or the VMM thread's filter could not be installed.
    #[error(transparent)]
    Seccomp(SeccompError),
    /// `--log-path` (or the configuration's logger) cannot be used.
    #[error("--log-path: {0}")]
    LogPath(SinkError),
    /// `--metrics-path` cannot be used.
    #[error("--metrics-path: {0}")]
    MetricsPath(SinkError),
    /// The configuration's logger or metrics destination cannot be used.
    #[error(transparent)]
    Sink(SinkError),
    /// The API socket could not be served.
    #[error("--api-sock: {0}")]
    Api(#[from] ApiError),
    /// The API's eventfd could not be duplicated for the event loop.
    #[error("API eventfd: {0}")]
    ApiEvent(std::io::Error),
    /// The API thread ended before the VM was started.
    #[error("the API server stopped")]
    ApiGone,
    /// The VM could not be built.
    #[error(transparent)]
    Start(#[from] StartError),
    /// A snapshot could not be restored (after the API answered 400).
    #[error("{0}")]
    Restore(StartError),
    /// `--snapshot-key-file` cannot be used.
    #[error("--snapshot-key-file {path}: {reason}")]
    SnapshotKey {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A migration could not be received.
    #[error("migration: {0}")]
    Migration(kiln::migration::MigrationError),
    /// `--describe-snapshot` could not read the file.
    #[error("--describe-snapshot: {0}")]
    Describe(kiln::snapshot::SnapshotError),
}

impl MainError {
    fn exit_code(&self) -> ExitCode {
        match self {
            MainError::Cli(_)
            | MainError::ConfigFile { .. }
            | MainError::Config(_)
            | MainError::SeccompFile(_)
            | MainError::LogPath(_)
            | MainError::MetricsPath(_)
            | MainError::Sink(_)
            | MainError::SnapshotKey { .. }
            | MainError::Describe(_) => ExitCode::BadConfiguration,
            MainError::Restore(_) | MainError::Migration(_) => ExitCode::StartFailure,
            MainError::Start(e) => e.exit_code(),
            MainError::Seccomp(_)
            | MainError::Api(_)
            | MainError::ApiEvent(_)
            | MainError::ApiGone => ExitCode::StartFailure,
        }
    }
}

/// The snapshot key: the first 32 bytes of the file.
fn read_key(path: &std::path::Path) -> Result<Key, MainError> {
    use std::io::Read;
    let err = |reason: String| MainError::SnapshotKey {
        path: path.display().to_string(),
        reason,
    };
    let mut key = [0u8; 32];
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    file.read_exact(&mut key)
        .map_err(|_| err("needs at least 32 bytes (e.g. head -c 32 /dev/urandom)".into()))?;
    Ok(key)
}

/// The VM the arguments describe, if any: a config file, or the quick flags (with
/// `--no-api`, even none of them: the built-in test guest).
fn initial_config(args: &Args) -> Result<Option<VmConfig>, MainError> {
    if let Some(path) = &args.config_file {
        return VmConfig::from_file(path)
            .map(Some)
            .map_err(|source| MainError::ConfigFile {
                path: path.clone(),
                source,
            });
    }
    if args.restore_snapshot.is_some() {
        return Ok(None);
    }
    if args.no_api || args.has_quick_vm() {
        let config = args.quick_config();
        config.validate().map_err(MainError::Config)?;
        return Ok(Some(config));
    }
    Ok(None)
}

fn seccomp_filters(args: &Args) -> Result<SeccompFilters, MainError> {
    if args.no_seccomp {
        return Ok(SeccompFilters::disabled());
    }
    match &args.seccomp_filter {
        Some(path) => SeccompFilters::from_file(path).map_err(MainError::SeccompFile),
        None => Ok(SeccompFilters::builtin()),
    }
}

/// Starts the API thread and wires its counters into the metrics.
fn serve_api(
    args: &Args,
    seccomp: &Arc<SeccompFilters>,
    actions: &mut ActionHandler,
) -> Result<(ApiBridge, std::thread::JoinHandle<()>), MainError> {
    let path = args
        .api_sock
        .clone()
        .unwrap_or_else(|| PathBuf::from(DEFAULT_API_SOCK));
    let metrics = Arc::new(ApiMetrics::default());
    let max_payload = args
        .http_api_max_payload_size
        .unwrap_or(kiln::api::http::DEFAULT_MAX_PAYLOAD);
    let (bridge, thread) = start_api_server(&path, max_payload, seccomp.clone(), metrics.clone())?;
    actions.set_extra_metrics(Box::new(move || {
        vec![
            ("api_server".to_string(), metrics.to_json()),
            ("migration".to_string(), kiln::migration::METRICS.to_json()),
        ]
    }));
    Ok((bridge, thread))
}

/// Before boot the main thread only serves the API, until `InstanceStart` succeeds.
fn configure_through_api(
    bridge: &ApiBridge,
    actions: &mut ActionHandler,
    opts: &RunOptions,
) -> Result<Vmm, MainError> {
    loop {
        let action = bridge.recv().ok_or(MainError::ApiGone)?;
        match actions.handle_preboot(action) {
            Outcome::Respond(response) => bridge.respond(response),
            Outcome::Start(config) => match build_and_start(&config, opts) {
                Ok(vmm) => {
                    bridge.respond(ActionHandler::started(Ok(())));
                    return Ok(vmm);
                }
                Err(e) => bridge.respond(ActionHandler::started(Err(e))),
            },
            Outcome::Receive(params) => return receive_migration(bridge, actions, opts, &params),
            Outcome::Restore(params) => {
                let t = Instant::now();
                // A failed load ends the process (as Firecracker): the client starts anew.
                return match restore(&params, opts, actions.snapshot_key()) {
                    Ok((vmm, config)) => {
                        bridge.respond(actions.restored(Ok(config)));
                        actions.record_load(t);
                        Ok(vmm)
                    }
                    Err(e) => {
                        bridge.respond(actions.restored(Err(&e)));
                        Err(MainError::Restore(e))
                    }
                };
            }
        }
    }
}

/// `PUT /migration/receive`: listen, answer 204, receive the VM, build it and resume it,
/// and tell the source. Any failure ends the process (the source resumes the guest).
fn receive_migration(
    bridge: &ApiBridge,
    actions: &mut ActionHandler,
    opts: &RunOptions,
    params: &ReceiveParams,
) -> Result<Vmm, MainError> {
    let listener = match kiln::migration::receive::listen(&params.listen) {
        Ok(l) => {
            bridge.respond(kiln::api::VmmResponse::NoContent);
            l
        }
        Err(e) => {
            bridge.respond(kiln::api::VmmResponse::bad_request(format!(
                "Migration error: {e}"
            )));
            return Err(MainError::Migration(e));
        }
    };
    let key = actions.snapshot_key().copied();
    let mut incoming =
        kiln::migration::receive::receive(&listener, key).map_err(MainError::Migration)?;
    drop(listener);
    // This host must be able to run the guest's vCPUs before the source lets go of it.
    if let Err(e) = kiln::builder::check_host_cpu(&incoming.state) {
        incoming.channel.abort(&e.to_string());
        return Err(MainError::Restore(e));
    }
    let ch = &mut incoming.channel;
    ch.send(Protocol::Ready, &[])
        .and_then(|()| ch.expect(Protocol::Go, "Go"))
        .map_err(|e| MainError::Migration(e.into()))?;
    let built = restore_migrated(
        &incoming.state,
        incoming.memory.clone(),
        &params.network_overrides,
        &params.drive_overrides,
        opts,
    );
    match built {
        Ok((vmm, config)) => {
            actions.migrated_in(config);
            // The guest runs here now; a source that does not hear it keeps its copy
            // paused (the outcome is in doubt there, never two running guests).
            if let Err(e) = incoming.channel.send(Protocol::Resumed, &[]) {
                log::warn!("migration: the source did not get the word that the VM runs here: {e}");
            }
            log::info!(
                "migration received: {} pages, the VM runs here",
                incoming.pages
            );
            Ok(vmm)
        }
        Err(e) => {
            incoming.channel.abort(&e.to_string());
            Err(MainError::Restore(e))
        }
    }
}

/// Everything from the arguments to the VM's end. `Ok` carries the exit status.
fn main_exec(start: (Instant, u64)) -> Result<i32, MainError> {
    let args = cli::parse(std::env::args().skip(1))?;
    if args.help {
        print!("{}", cli::USAGE);
        return Ok(0);
    }
    if args.version {
        // Firecracker's first line, which clients parse for the API version, then kiln's.
        println!(
            "Firecracker v{}\nkiln {}",
            kiln::api::actions::FIRECRACKER_API_VERSION,
            env!("CARGO_PKG_VERSION")
        );
        return Ok(0);
    }
    let id = args
        .id
        .clone()
        .unwrap_or_else(|| "anonymous-instance".into());
    kiln::logger::init(args.level.unwrap_or_default().filter(), &id);
    let snapshot_key = match &args.snapshot_key_file {
        Some(path) => Some(read_key(path)?),
        None => None,
    };
    if let Some(path) = &args.describe_snapshot {
        let text =
            kiln::snapshot::describe(path, snapshot_key.as_ref()).map_err(MainError::Describe)?;
        print!("{text}");
        return Ok(0);
    }
    if args.enable_pci {
        log::warn!(
            "--enable-pci: kiln has no PCI bus; its virtio devices stay on virtio-mmio \
             (virtio_mmio.device= on the kernel command line)"
        );
    }
    let seccomp = seccomp_filters(&args)?;
    if args.print_seccomp {
        print!("{}", seccomp.audit());
        return Ok(0);
    }
    if args.no_seccomp {
        log::warn!("running without seccomp filters (--no-seccomp)");
    }
    install_panic_hook();
    install_sigsys_handler().map_err(MainError::Seccomp)?;
    let seccomp = Arc::new(seccomp);

    let opts = RunOptions {
        serial_out: args.serial_out.clone(),
        serial_in: true,
        boot_timer: args.boot_timer,
        start: Some(start),
        stop_on_signals: true,
        seccomp: seccomp.clone(),
        migration: !args.no_api,
    };
    let mut actions = ActionHandler::new(id);
    if let Some(key) = snapshot_key {
        actions.set_snapshot_key(key);
    }
    if args.log_path.is_some() || args.show_level || args.show_log_origin {
        let logger = kiln::config::LoggerConfig {
            log_path: args.log_path.as_ref().map(|p| p.display().to_string()),
            level: None,
            show_level: args.show_level.then_some(true),
            show_log_origin: args.show_log_origin.then_some(true),
            module: None,
        };
        kiln::api::actions::configure_logger(&logger).map_err(MainError::LogPath)?;
    }
    if let Some(path) = &args.metrics_path {
        actions
            .set_metrics_path(path)
            .map_err(MainError::MetricsPath)?;
    }
    let config = initial_config(&args)?;
    if let Some(config) = &config {
        actions
            .apply_config(config.clone())
            .map_err(MainError::Sink)?;
    }
    let (api, api_thread) = if args.no_api {
        (None, None)
    } else {
        let (bridge, thread) = serve_api(&args, &seccomp, &mut actions)?;
        (Some(bridge), Some(thread))
    };

    let _terminal = RawTerminal::enter();
    let restore_files = args
        .restore_snapshot
        .as_ref()
        .zip(args.restore_mem.as_ref());
    let mut vmm = match (restore_files, config, &api) {
        (Some((state, mem)), _, _) => {
            let mut params = SnapshotLoadParams::from_files(state, mem);
            params.working_set = args.working_set.as_ref().map(|p| WorkingSetParams {
                path: p.display().to_string(),
                record_after_ms: None,
            });
            let t = Instant::now();
            let (vmm, config) = restore(&params, &opts, actions.snapshot_key())?;
            actions.restored(Ok(config));
            actions.record_load(t);
            vmm
        }
        (None, Some(config), _) => build_and_start(&config, &opts)?,
        (None, None, Some(bridge)) => match configure_through_api(bridge, &mut actions, &opts) {
            Ok(vmm) => vmm,
            Err(e) => {
                // Let the API thread deliver the 400 before the process ends: without the
                // bridge it finishes its connections and stops.
                drop(api);
                if let Some(thread) = api_thread {
                    let deadline = Instant::now() + std::time::Duration::from_secs(2);
                    while !thread.is_finished() && Instant::now() < deadline {
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                }
                return Err(e);
            }
        },
        // `--no-api` always has a configuration (the quick flags default to the test guest).
        (None, None, None) => return Err(MainError::ApiGone),
    };
    if let Some(bridge) = &api {
        vmm.watch_api(bridge.eventfd().try_clone().map_err(MainError::ApiEvent)?);
    }

    // Set-up is done: the main thread jails itself before it serves any guest event.
    seccomp
        .install(ThreadCategory::Vmm)
        .map_err(MainError::Seccomp)?;
    let reason = vmm.run(api.as_ref().map(|b| b as &dyn ApiChannel), &mut actions);
    match &reason {
        ExitReason::GuestReset | ExitReason::GuestShutdown | ExitReason::Stopped => {
            log::info!("{reason}")
        }
        ExitReason::Signal { .. } => log::warn!("{reason}"),
        ExitReason::Migrated => {
            log::info!("{reason}");
            // Let the API thread deliver the answer to PUT /migration/send.
            drop(api);
            // (Under the VMM thread's filter: no sleeping, yielding is allowed.)
            if let Some(thread) = api_thread {
                let deadline = Instant::now() + std::time::Duration::from_secs(2);
                while !thread.is_finished() && Instant::now() < deadline {
                    std::thread::yield_now();
                }
            }
        }
        _ => log::error!("{reason}"),
    }
    Ok(reason.status())
}

/// Prints the one error line. Not `eprintln!`, which panics if stderr fails (e.g. a full
/// pipe made non-blocking along with the console it shares with stdout).
fn fail(code: ExitCode, message: impl std::fmt::Display) -> i32 {
    let _ = writeln!(std::io::stderr(), "kiln: error: {message}");
    code.code()
}

fn main() {
    let start = (Instant::now(), process_cpu_us());
    // Before any thread exists: no allocation may later step outside a seccomp filter, and a
    // guest write past RLIMIT_FSIZE fails (EFBIG, an IOERR for the guest) instead of killing.
    let prepared = pin_allocator().map_err(|e| e.to_string()).and_then(|()| {
        kiln::signals::ignore_file_size_signal().map_err(|e| format!("SIGXFSZ: {e}"))
    });
    let code = match prepared {
        Err(e) => fail(ExitCode::StartFailure, e),
        Ok(()) => match main_exec(start) {
            Ok(status) => status,
            Err(e) => fail(e.exit_code(), e),
        },
    };
    std::process::exit(code);
}
