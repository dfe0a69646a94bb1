//! The source: streams a running VM's memory in pre-copy rounds on the migration thread
//! while the VMM loop keeps serving the guest, then has the VMM thread pause it and save its
//! state, sends the last dirty pages and the state, and waits for the destination to
//! resume it.

use std::sync::mpsc::{Receiver, Sender};
use std::time::{Duration, Instant};

use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, MemoryRegionAddress,
};

use super::protocol::{Channel, Hello, Kind, MAX_BATCH, PAGE, ProtocolError};
use super::{Backends, Endpoint, MigrationError, MigrationStats, SendParams};
use crate::snapshot::Key;
use crate::vstate::memory::GuestMemory;
use crate::vstate::vm::DirtyLog;

/// Pre-copy rounds after the first full pass before the migration gives up.
pub const DEFAULT_MAX_ROUNDS: u32 = 30;
/// The downtime budget when none is given.
pub const DEFAULT_MAX_DOWNTIME_MS: u64 = 300;

/// What the migration thread asks of the VMM thread.
#[derive(Debug)]
pub enum Request {
    /// Pause the vCPUs and save the whole state (a state file's bytes).
    PauseAndSave,
    /// The migration ended: the VM runs on the destination (`Ok`), or failed.
    Finished(Result<MigrationStats, MigrationError>),
}

/// The VMM thread's answers.
#[derive(Debug)]
pub enum Reply {
    /// The saved state, or why it could not be saved.
    State(Result<Vec<u8>, String>),
}

/// A migration to run on the migration thread.
pub struct Job {
    /// Where to and how.
    pub params: SendParams,
    /// The VM's dirty log and memory.
    pub dirty: DirtyLog,
    /// Whether the VM tracks dirty pages for Diff snapshots (KVM's logging stays on after a
    /// failed migration, and every page is marked dirty for the next Diff).
    pub track_dirty_pages: bool,
    /// Guest memory is served by a page-fault handler (a `Uffd` restore): a page not yet
    /// resident still has data, so the first round reads every page.
    pub every_page: bool,
    /// The key for the stream's MACs.
    pub key: Option<Key>,
    /// The TAPs and drives the destination takes over.
    pub backends: Backends,
}

impl std::fmt::Debug for Job {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Job")
            .field("params", &self.params)
            .finish_non_exhaustive()
    }
}

/// The migration thread's side of the VMM thread.
pub struct VmmLink<'a> {
    /// Requests to the VMM thread.
    pub requests: &'a Sender<Request>,
    /// Its answers.
    pub replies: &'a Receiver<Reply>,
    /// Wakes the VMM loop.
    pub wake: &'a dyn Fn(),
}

impl std::fmt::Debug for VmmLink<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmmLink").finish_non_exhaustive()
    }
}

impl VmmLink<'_> {
    fn ask(&self, request: Request) -> Result<Reply, MigrationError> {
        self.requests
            .send(request)
            .map_err(|_| MigrationError::VmmGone)?;
        (self.wake)();
        self.replies.recv().map_err(|_| MigrationError::VmmGone)
    }
}

/// Runs one migration. On any error the caller (the VMM thread) resumes the guest.
pub fn run(job: &Job, vmm: &VmmLink<'_>) -> Result<MigrationStats, MigrationError> {
    let started = Instant::now();
    let endpoint = Endpoint::parse(&job.params.destination, "destination")?;
    let stream = endpoint.connect()?;
    let mut ch = Channel::new(stream, job.key);
    let result = stream_vm(job, vmm, &mut ch, started);
    if let Err(e) = &result {
        if !matches!(e, MigrationError::Protocol(_) | MigrationError::InDoubt(_)) {
            ch.abort(&e.to_string());
        }
        // The guest stays here: take back whatever the destination was to take over (a
        // no-op unless released). When the outcome is in doubt the destination may hold
        // them: the guest stays paused and they stay released.
        if !matches!(e, MigrationError::InDoubt(_)) {
            job.backends.reacquire();
            if let Err(e) = job.dirty.set_logging(job.track_dirty_pages) {
                log::warn!("{e}");
            }
            // The rounds consumed the marks a later Diff snapshot needs.
            if job.track_dirty_pages {
                job.dirty.mark_all();
            }
        }
    }
    result
}

fn stream_vm(
    job: &Job,
    vmm: &VmmLink<'_>,
    ch: &mut Channel,
    started: Instant,
) -> Result<MigrationStats, MigrationError> {
    let memory = job.dirty.memory();
    let hello = Hello {
        kiln_version: env!("CARGO_PKG_VERSION").to_string(),
        regions: memory
            .iter()
            .map(|r| (r.start_addr().raw_value(), r.len()))
            .collect(),
    };
    let hello = serde_json::to_vec(&hello).map_err(|e| MigrationError::Internal(e.to_string()))?;
    ch.send(Kind::Hello, &[&hello])?;

    // From here every write is in the log: vCPUs' (KVM) and devices' (the bitmaps).
    job.dirty.set_logging(true)?;
    job.dirty.sync()?;
    job.dirty.clear();
    let max_downtime = job
        .params
        .max_downtime_ms
        .unwrap_or(DEFAULT_MAX_DOWNTIME_MS);
    let max_rounds = job.params.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS);
    let mut pages = touched_pages(memory, job.every_page)?;
    let mut sender = PageSender::default();
    let mut rounds = 0u32;
    let metrics = &super::METRICS;
    loop {
        let t = Instant::now();
        let sent = sender.send(ch, memory, &pages)?;
        ch.send(Kind::Sync, &[])?;
        ch.expect(Kind::Synced, "Synced")?;
        rounds += 1;
        metrics
            .rounds
            .store(u64::from(rounds), std::sync::atomic::Ordering::Relaxed);
        metrics
            .bytes_sent
            .store(ch.bytes_sent(), std::sync::atomic::Ordering::Relaxed);
        // The link's rate as this round saw it (delivered, not buffered).
        let secs = t.elapsed().as_secs_f64().max(1e-6);
        let rate = sent as f64 / secs;
        job.dirty.sync()?;
        pages = take_dirty(memory);
        let left = (pages.len() * PAGE) as f64;
        log::info!(
            "migration round {rounds}: {} pages sent in {:.1} ms, {} dirty",
            sent / PAGE as u64,
            secs * 1e3,
            pages.len()
        );
        // Half the budget for the pages, half for pausing, saving and the hand-over.
        if pages.is_empty() || left / rate.max(1.0) * 1e3 <= max_downtime as f64 / 2.0 {
            break;
        }
        if rounds > max_rounds {
            return Err(MigrationError::NotConverged {
                rounds,
                dirty_pages: pages.len(),
            });
        }
    }

    // Stop-and-copy.
    let asked = Instant::now();
    let Reply::State(state) = vmm.ask(Request::PauseAndSave)?;
    let state = state.map_err(MigrationError::Save)?;
    // The pause began when the VMM thread was asked (it answers with the saved state).
    let paused_at = asked;
    let saved = asked.elapsed();
    job.dirty.sync()?;
    pages.extend(take_dirty(memory));
    pages.sort_unstable();
    pages.dedup();
    sender.send(ch, memory, &pages)?;
    ch.send(Kind::State, &[&state])?;
    let sent = paused_at.elapsed();
    // The destination checked the state and this host's CPU: until here any failure
    // resumes the guest on this side.
    match ch.expect(Kind::Ready, "Ready") {
        Ok(()) => {}
        Err(ProtocolError::Aborted(reason)) => return Err(MigrationError::Refused(reason)),
        Err(e) => return Err(e.into()),
    }
    let ready = paused_at.elapsed();
    job.backends.release()?;
    let released = paused_at.elapsed();
    ch.send(Kind::Go, &[])?;
    // The destination takes the TAPs and drives, builds the VM and resumes it. A refusal
    // still resumes the guest here; silence leaves the outcome in doubt.
    match ch.expect(Kind::Resumed, "Resumed") {
        Ok(()) => {}
        Err(ProtocolError::Aborted(reason)) => return Err(MigrationError::Refused(reason)),
        Err(e) => return Err(MigrationError::InDoubt(e.to_string())),
    }
    log::info!(
        "migration downtime: paused and saved {:.1} ms, last {} pages and the state sent {:.1} ms, Ready {:.1} ms, released {:.1} ms, Resumed {:.1} ms",
        ms(saved),
        pages.len(),
        ms(sent),
        ms(ready),
        ms(released),
        ms(paused_at.elapsed())
    );
    let stats = MigrationStats {
        rounds,
        bytes_sent: ch.bytes_sent(),
        downtime_ms: paused_at.elapsed().as_millis() as u64,
        total_ms: started.elapsed().as_millis() as u64,
    };
    Ok(stats)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sends pages in batches through one reused buffer.
#[derive(Default)]
struct PageSender {
    addrs: Vec<u8>,
    data: Vec<u8>,
}

impl PageSender {
    /// Sends `pages` (guest addresses); returns the bytes of page data sent.
    fn send(
        &mut self,
        ch: &mut Channel,
        memory: &GuestMemory,
        pages: &[u64],
    ) -> Result<u64, MigrationError> {
        for batch in pages.chunks(MAX_BATCH) {
            self.addrs.clear();
            self.addrs
                .extend_from_slice(&(batch.len() as u32).to_le_bytes());
            self.data.resize(batch.len() * PAGE, 0);
            for (i, a) in batch.iter().enumerate() {
                self.addrs.extend_from_slice(&a.to_le_bytes());
                // A volatile copy: the guest may be writing this page right now (then it is
                // dirty again and goes in a later round).
                memory
                    .read_slice(&mut self.data[i * PAGE..(i + 1) * PAGE], GuestAddress(*a))
                    .map_err(|e| MigrationError::Internal(e.to_string()))?;
            }
            ch.send(Kind::Pages, &[&self.addrs, &self.data])?;
        }
        Ok((pages.len() * PAGE) as u64)
    }
}

/// The pages marked dirty in the bitmaps, each bit cleared before its page is read (a write
/// after the clear marks it again for the next round).
fn take_dirty(memory: &GuestMemory) -> Vec<u64> {
    let mut out = Vec::new();
    for region in memory.iter() {
        let bitmap = std::ops::Deref::deref(region).bitmap();
        let base = region.start_addr().raw_value();
        let pages = (region.len() as usize).div_ceil(PAGE);
        for p in 0..pages {
            if bitmap.is_bit_set(p) {
                bitmap.reset_addr_range(p * PAGE, PAGE);
                out.push(base + (p * PAGE) as u64);
            }
        }
    }
    out
}

/// The pages the first round sends: those with data. Anonymous memory the guest never
/// touched is not resident (mincore) and never sent; a restored VM's file-backed memory
/// has its data in the file, resident or not, and so has memory a page-fault handler serves
/// (`every_page`). All-zero pages are not sent either (the destination's memory starts zero).
fn touched_pages(memory: &GuestMemory, every_page: bool) -> Result<Vec<u64>, MigrationError> {
    let mut out = Vec::new();
    let mut flags = Vec::new();
    let mut page = vec![0u8; PAGE];
    const CHUNK: usize = 2 << 20;
    for region in memory.iter() {
        let host = region
            .get_host_address(MemoryRegionAddress(0))
            .map_err(|e| MigrationError::Internal(e.to_string()))?;
        let base = region.start_addr().raw_value();
        let len = region.len() as usize;
        let anonymous = region.file_offset().is_none() && !every_page;
        let mut off = 0;
        while off < len {
            let chunk = CHUNK.min(len - off);
            if anonymous {
                flags.resize(chunk.div_ceil(PAGE), 0);
                let start = host.wrapping_add(off).cast::<libc::c_void>();
                // SAFETY: `start .. start + chunk` lies inside this region's live mapping
                // (kept by `memory`), and `flags` holds one byte per page of it.
                let ret = unsafe { libc::mincore(start, chunk, flags.as_mut_ptr()) };
                if ret != 0 {
                    return Err(MigrationError::Internal(format!(
                        "mincore: {}",
                        std::io::Error::last_os_error()
                    )));
                }
            }
            for p in 0..chunk / PAGE {
                if anonymous && flags.get(p).is_none_or(|f| f & 1 == 0) {
                    continue;
                }
                let addr = base + (off + p * PAGE) as u64;
                memory
                    .read_slice(&mut page, GuestAddress(addr))
                    .map_err(|e| MigrationError::Internal(e.to_string()))?;
                if page.iter().any(|b| *b != 0) {
                    out.push(addr);
                }
            }
            off += chunk;
        }
    }
    Ok(out)
}

/// How long a socket operation may block before the migration is given up.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::vstate::memory::create_guest_memory;

    #[test]
    fn the_first_round_sends_the_touched_pages_with_data_and_nothing_else() {
        let mem = create_guest_memory(64).unwrap();
        let written: Vec<u64> = (0..2000u64).map(|p| 0x10_0000 + p * 3 * 4096).collect();
        for a in &written {
            mem.write_obj(0x5a5a_u64, GuestAddress(*a)).unwrap();
        }
        // Touched but zero: not sent either.
        mem.write_obj(0u64, GuestAddress(0x8000)).unwrap();
        assert_eq!(touched_pages(&mem, false).unwrap(), written);
        // Every page read (as for memory a page-fault handler serves): the same pages.
        assert_eq!(touched_pages(&mem, true).unwrap(), written);
    }
}
