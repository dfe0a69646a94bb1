//! The `Async` engine's answers: when the io_uring completes requests (its eventfd fires on
//! the event loop), each one's status byte is written and its chain returned; before the VM
//! is paused or saved, everything in flight is drained the same way.

use vm_memory::Bytes;

use super::{Active, Block};
use crate::devices::virtio::block::async_io::Completed;
use crate::devices::virtio::block::io::IoKind;
use crate::devices::virtio::block::status;
use crate::devices::virtio::queue::return_chain;

impl Block {
    /// The engine's completion eventfd fired: answers every request that finished, then
    /// runs the queue again if it was waiting for room.
    pub fn process_completions(&mut self) {
        let Some(mut active) = self.active.take() else {
            // Nothing to answer: orphans (of a reset) are only forgotten.
            self.reap_into_scratch();
            self.completed.clear();
            return;
        };
        if self.answer_finished(&mut active) {
            self.notify(&mut active);
        }
        self.active = Some(active);
        if self.starved {
            self.starved = false;
            self.process_queue();
        }
    }

    /// Blocks until no request is in flight, answering each (before a pause or a snapshot:
    /// the saved queue positions then hold no request half-done, and every guest buffer a
    /// read filled is in memory).
    pub fn drain(&mut self) -> std::io::Result<()> {
        let Some(engine) = self.engine.as_deref_mut() else {
            return Ok(());
        };
        let mut done = std::mem::take(&mut self.completed);
        let result = engine.drain(&mut done);
        self.completed = done;
        match self.active.take() {
            Some(mut active) => {
                if self.answer_listed(&mut active) {
                    self.notify(&mut active);
                }
                self.active = Some(active);
            }
            None => self.completed.clear(),
        }
        result
    }

    /// Takes what the engine finished (the eventfd's count first, so a completion posted
    /// meanwhile signals it again) into the scratch list.
    fn reap_into_scratch(&mut self) {
        let Some(engine) = self.engine.as_deref_mut() else {
            return;
        };
        // Reading resets the counter; a failure only means there was nothing to read.
        let _ = engine.completion_event().read();
        let mut done = std::mem::take(&mut self.completed);
        engine.reap(&mut done);
        self.completed = done;
    }

    /// Answers whatever the engine has finished; true if a chain was returned (the caller
    /// interrupts the guest once). Also right after a submission: what completed inline is
    /// answered in the same run of the queue.
    pub(super) fn answer_finished(&mut self, active: &mut Active) -> bool {
        self.reap_into_scratch();
        self.answer_listed(active)
    }

    /// Writes the status of each listed finished request and returns its chain. Orphans
    /// (of a reset) are only forgotten.
    fn answer_listed(&mut self, active: &mut Active) -> bool {
        let mut done = std::mem::take(&mut self.completed);
        let mut used_any = false;
        for c in done.drain(..) {
            if c.orphan {
                continue;
            }
            let (code, data) = self.count_completion(&c);
            let _ = active.mem.write_obj(code, c.token.status);
            return_chain(&mut active.queue, &active.mem, c.token.head, data + 1);
            used_any = true;
        }
        self.completed = done;
        used_any
    }

    /// Counts a finished request (metrics, rate limiter); returns its status and the data
    /// bytes it wrote into the chain.
    fn count_completion(&mut self, c: &Completed) -> (u8, u32) {
        match c.error {
            None => {
                self.count_success(c.kind, c.len);
                self.metrics
                    .rate_limiter_admitted_bytes
                    .add(c.token.charged);
                let data = if c.kind == IoKind::Read { c.len } else { 0 };
                (status::OK, data as u32)
            }
            Some(errno) => {
                log::debug!(
                    "drive {}: I/O error: {}",
                    self.config.drive_id,
                    std::io::Error::from_raw_os_error(errno)
                );
                self.metrics.io_errors.inc();
                self.limiter.refund(c.token.charged);
                (status::IOERR, 0)
            }
        }
    }
}
