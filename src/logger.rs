//! kiln's logger: one line per record, to stderr or a file/FIFO, with the thread name.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};

use log::{LevelFilter, Log, Metadata, Record};

use crate::metrics::{LineOutcome, LineSink};

/// Log lines dropped because the sink had no room (a FIFO nobody reads).
static MISSED_LOG_COUNT: AtomicU64 = AtomicU64::new(0);
/// Log lines that could not be written because writing failed.
static LOG_FAILS: AtomicU64 = AtomicU64::new(0);

/// Log lines dropped because the sink had no room (Firecracker's `missed_log_count`).
pub fn missed_log_count() -> u64 {
    MISSED_LOG_COUNT.load(Ordering::Relaxed)
}

/// Log lines whose write failed (Firecracker's `log_fails`).
pub fn log_fails() -> u64 {
    LOG_FAILS.load(Ordering::Relaxed)
}

/// Where log lines go and how they look. Lines are written whole or dropped and counted,
/// never blocking on a sink nobody reads ([`LineSink`]).
struct Logger {
    out: Mutex<LineSink<Box<dyn Write + Send>>>,
    show_level: Mutex<bool>,
    show_origin: Mutex<bool>,
    module: Mutex<Option<String>>,
    instance: Mutex<String>,
}

static LOGGER: OnceLock<Logger> = OnceLock::new();

fn logger() -> &'static Logger {
    LOGGER.get_or_init(|| Logger {
        out: Mutex::new(LineSink::new(Box::new(std::io::stderr()))),
        show_level: Mutex::new(true),
        show_origin: Mutex::new(false),
        module: Mutex::new(None),
        instance: Mutex::new("anonymous-instance".to_string()),
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Log for Logger {
    fn enabled(&self, metadata: &Metadata) -> bool {
        if metadata.level() > log::max_level() {
            return false;
        }
        match &*lock(&self.module) {
            Some(module) => metadata.target().starts_with(module.as_str()),
            None => true,
        }
    }

    fn log(&self, record: &Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("thread");
        let mut line = format!("[{}:{}", lock(&self.instance), name);
        if *lock(&self.show_level) {
            line.push(':');
            line.push_str(record.level().as_str());
        }
        if *lock(&self.show_origin) {
            line.push_str(&format!(
                ":{}:{}",
                record.file().unwrap_or("?"),
                record.line().unwrap_or(0)
            ));
        }
        line.push_str(&format!("] {}\n", record.args()));
        // A log line that cannot be written has nowhere else to go: it is counted.
        match lock(&self.out).write_line(line.as_bytes()) {
            Ok(LineOutcome::Written) => {}
            Ok(LineOutcome::Dropped) => {
                MISSED_LOG_COUNT.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                LOG_FAILS.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    fn flush(&self) {
        let _ = lock(&self.out).flush();
    }
}

/// Installs the logger at `level`; later calls only change the level.
pub fn init(level: LevelFilter, instance_id: &str) {
    let l = logger();
    *lock(&l.instance) = instance_id.to_string();
    // Fails only if a logger is already set, which is then this one.
    let _ = log::set_logger(l);
    log::set_max_level(level);
}

/// Redirects log output (e.g. to a file or FIFO) and sets the line format.
pub fn configure(
    out: Option<Box<dyn Write + Send>>,
    level: Option<LevelFilter>,
    show_level: Option<bool>,
    show_origin: Option<bool>,
    module: Option<String>,
) {
    let l = logger();
    if let Some(out) = out {
        *lock(&l.out) = LineSink::new(out);
    }
    if let Some(level) = level {
        log::set_max_level(level);
    }
    if let Some(v) = show_level {
        *lock(&l.show_level) = v;
    }
    if let Some(v) = show_origin {
        *lock(&l.show_origin) = v;
    }
    if module.is_some() {
        *lock(&l.module) = module;
    }
}
