//! From a parsed request to its answer: the checks every request passes (range, direction,
//! memory), GET_ID and unsupported types answered on the spot, the rate limiter, then the
//! file operation — done at once by the `Sync` engine, handed to the io_uring by `Async`.

use vm_memory::Bytes;

use super::{Active, Block, Handled};
use crate::devices::virtio::block::async_io::{SubmitError, Token};
use crate::devices::virtio::block::io::{IoKind, IoRequest, guest_written};
use crate::devices::virtio::block::request::{Request, RequestType};
use crate::devices::virtio::block::{
    BlockMetrics, ID_BYTES, SECTOR_SHIFT, SECTOR_SIZE, features, status,
};
use crate::devices::virtio::queue::host_buffers;
use crate::rate_limiter::now_ns;

/// What a request needs once checked.
enum Prepared {
    /// Answered without the backing file: its status and the data bytes written.
    Done(u8, u32),
    /// A transfer or flush.
    Io(IoRequest),
}

/// What became of a request that was let through.
enum Outcome {
    /// Answered: its status and the bytes written into the chain (data and status byte).
    Answered(u8, u32),
    /// With the async engine.
    Submitted,
    /// The async engine has no room now.
    Busy,
}

impl Block {
    /// Runs a parsed request, through the rate limiter if one limits.
    pub(super) fn run(&mut self, active: &Active, head: u16, request: Request) -> Handled {
        if self.limiter.is_limiting() {
            return self.limited(active, head, request);
        }
        match self.answer(active, head, request, 0) {
            Outcome::Answered(_, used) => Handled::Used(used),
            Outcome::Submitted => Handled::Submitted,
            Outcome::Busy => Handled::Later,
        }
    }

    /// Executes a request if the rate limiter lets it go now: one op, and its data bytes for
    /// reads and writes (charged only if the transfer was done; an async transfer is charged
    /// when submitted and refunded if it fails).
    fn limited(&mut self, active: &Active, head: u16, request: Request) -> Handled {
        let transfer = matches!(request.kind, RequestType::In | RequestType::Out);
        let bytes = if transfer { request.data_len } else { 0 };
        let now = *self.batch_now.get_or_insert_with(now_ns);
        if let Err(at) = self.limiter.check(bytes, now) {
            match self.limiter.throttle(at) {
                Ok(()) => {
                    self.metrics.rate_limiter_throttled_events.inc();
                    return Handled::Later;
                }
                // Without a timer the request would wait forever: let it go.
                Err(e) => log::warn!(
                    "drive {}: cannot arm the rate limiter's timer: {e}",
                    self.config.drive_id
                ),
            }
        }
        let (charged, handled) = match self.answer(active, head, request, bytes) {
            Outcome::Answered(code, used) => {
                let charged = if transfer && code == status::OK {
                    bytes
                } else {
                    0
                };
                self.metrics.rate_limiter_admitted_bytes.add(charged);
                (charged, Handled::Used(used))
            }
            // Bytes are counted as admitted when the transfer succeeds.
            Outcome::Submitted => (bytes, Handled::Submitted),
            // Nothing was taken: the limiter sees it again with the chain.
            Outcome::Busy => return Handled::Later,
        };
        self.limiter.commit(charged);
        self.metrics.rate_limiter_admitted_ops.inc();
        handled
    }

    /// Checks and executes a request; a synchronous answer has its status written.
    fn answer(&mut self, active: &Active, head: u16, request: Request, charge: u64) -> Outcome {
        let io = match self.prepare(active, &request) {
            Prepared::Done(code, data) => return self.finish(active, &request, code, data),
            Prepared::Io(io) => io,
        };
        let Some(engine) = self.engine.as_deref_mut() else {
            let (code, data) = self.execute_sync(active, &io);
            return self.finish(active, &request, code, data);
        };
        let token = Token {
            head,
            status: request.status,
            charged: charge,
        };
        match engine.submit(&self.disk, io, token) {
            Ok(()) => Outcome::Submitted,
            Err(SubmitError::Busy) => {
                self.starved = true;
                Outcome::Busy
            }
            Err(e) => {
                log::debug!("drive {}: {e}", self.config.drive_id);
                self.metrics.io_errors.inc();
                self.metrics.io_engine_errors.inc();
                self.finish(active, &request, status::IOERR, 0)
            }
        }
    }

    /// Writes a synchronous answer's status byte.
    fn finish(&self, active: &Active, request: &Request, code: u8, data: u32) -> Outcome {
        let _ = active.mem.write_obj(code, request.status);
        Outcome::Answered(code, data + 1)
    }

    /// Hands what the requests of this run queued to the kernel (one `io_uring_enter`).
    pub(super) fn submit_batch(&mut self) {
        if let Some(engine) = self.engine.as_deref_mut()
            && let Err(e) = engine.flush_submissions()
        {
            // The operations stay queued; the next run or completion submits them.
            log::debug!("drive {}: {e}", self.config.drive_id);
            self.metrics.io_engine_errors.inc();
        }
    }

    /// Checks a parsed request: answers what needs no file I/O, turns the rest into an
    /// [`IoRequest`].
    fn prepare(&mut self, active: &Active, req: &Request) -> Prepared {
        let invalid = |m: &BlockMetrics| {
            m.invalid_requests.inc();
            Prepared::Done(status::IOERR, 0)
        };
        match req.kind {
            RequestType::In | RequestType::Out => {
                if !req.data_len.is_multiple_of(SECTOR_SIZE) {
                    return invalid(&self.metrics);
                }
                let sectors = req.data_len >> SECTOR_SHIFT;
                match req.sector.checked_add(sectors) {
                    Some(end) if end <= self.disk.sectors() => {}
                    _ => return invalid(&self.metrics),
                }
                let write = req.kind == RequestType::Out;
                if write && self.avail_features & features::VIRTIO_BLK_F_RO != 0 {
                    return invalid(&self.metrics);
                }
                let Some(host) = host_buffers(&active.mem, &req.data) else {
                    return invalid(&self.metrics);
                };
                Prepared::Io(IoRequest {
                    kind: if write { IoKind::Write } else { IoKind::Read },
                    offset: req.sector << SECTOR_SHIFT,
                    data: req.data.clone(),
                    host,
                    len: req.data_len,
                })
            }
            RequestType::Flush => {
                if active.features & features::VIRTIO_BLK_F_FLUSH == 0 {
                    self.metrics.unsupported.inc();
                    return Prepared::Done(status::UNSUPP, 0);
                }
                Prepared::Io(IoRequest {
                    kind: IoKind::Flush,
                    offset: 0,
                    data: Vec::new(),
                    host: Vec::new(),
                    len: 0,
                })
            }
            RequestType::GetId => self.get_id(active, req),
            RequestType::Unsupported(_) => {
                self.metrics.unsupported.inc();
                Prepared::Done(status::UNSUPP, 0)
            }
        }
    }

    /// GET_ID: the drive id, up to 20 bytes, into the request's buffers.
    fn get_id(&self, active: &Active, req: &Request) -> Prepared {
        let mut id = [0u8; ID_BYTES];
        let bytes = self.config.drive_id.as_bytes();
        let n = bytes.len().min(ID_BYTES);
        id[..n].copy_from_slice(&bytes[..n]);
        let mut written = 0usize;
        for b in &req.data {
            let take = (b.len as usize).min(ID_BYTES - written);
            if take == 0 {
                break;
            }
            if active
                .mem
                .write_slice(&id[written..written + take], b.addr)
                .is_err()
            {
                self.metrics.invalid_requests.inc();
                return Prepared::Done(status::IOERR, 0);
            }
            written += take;
        }
        self.metrics.get_id_count.inc();
        Prepared::Done(status::OK, written as u32)
    }

    /// The `Sync` engine: the file operation on this thread, now. Returns the status and the
    /// data bytes produced.
    fn execute_sync(&mut self, active: &Active, io: &IoRequest) -> (u8, u32) {
        let result = match io.kind {
            // SAFETY: every host buffer lies inside guest memory mapped by `active.mem` (the
            // chain walk checked each one is inside one region), alive for the call.
            IoKind::Write => unsafe { self.disk.write_at(io.offset, &io.host) },
            IoKind::Read => {
                // SAFETY: as above; the buffers are device-writable guest memory.
                let r = unsafe { self.disk.read_at(io.offset, &io.host) };
                guest_written(&active.mem, &io.data);
                r
            }
            IoKind::Flush => self.disk.flush(),
        };
        match result {
            Ok(()) => {
                self.count_success(io.kind, io.len);
                let data = if io.kind == IoKind::Read { io.len } else { 0 };
                (status::OK, data as u32)
            }
            Err(e) => {
                log::debug!("drive {}: I/O error: {e}", self.config.drive_id);
                self.metrics.io_errors.inc();
                (status::IOERR, 0)
            }
        }
    }

    /// Counts a successful file operation of `len` data bytes.
    pub(super) fn count_success(&self, kind: IoKind, len: u64) {
        let m = &self.metrics;
        match kind {
            IoKind::Read => {
                m.read_count.inc();
                m.read_bytes.add(len);
            }
            IoKind::Write => {
                m.write_count.inc();
                m.write_bytes.add(len);
            }
            IoKind::Flush => m.flush_count.inc(),
        }
    }
}
