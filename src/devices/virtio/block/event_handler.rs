//! The block device on the event loop: a queue notification runs the queue, and so does
//! the rate limiter's timer; the async engine's completions are answered.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::Block;
use crate::devices::virtio::VirtioDevice;

/// Subscribes a [`Block`]'s queue eventfd to the event loop.
#[derive(Debug)]
pub struct BlockEvents {
    device: Arc<Mutex<Block>>,
}

impl BlockEvents {
    /// Glue for `device`.
    pub fn new(device: Arc<Mutex<Block>>) -> Self {
        BlockEvents { device }
    }
}

impl MutEventSubscriber for BlockEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        for evt in device.queue_events() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!(
                    "drive {}: cannot watch its queue: {e}",
                    device.config().drive_id
                );
            }
        }
        let timer = device.rate_limiter().timer_fd();
        if let Err(e) = ops.add(Events::new_raw(timer, EventSet::IN)) {
            log::error!(
                "drive {}: cannot watch its rate limiter's timer: {e}",
                device.config().drive_id
            );
        }
        if let Some(evt) = device.completion_event()
            && let Err(e) = ops.add(Events::new(evt, EventSet::IN))
        {
            log::error!(
                "drive {}: cannot watch its async engine's completions: {e}",
                device.config().drive_id
            );
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        if events.fd() == device.rate_limiter().timer_fd() {
            device.rate_limiter_timer();
            return;
        }
        if device
            .completion_event()
            .is_some_and(|e| e.as_raw_fd() == events.fd())
        {
            device.process_completions();
            return;
        }
        let ours = device
            .queue_events()
            .iter()
            .any(|e| e.as_raw_fd() == events.fd());
        if !ours {
            return;
        }
        // Reading resets the counter; a failure only means there was nothing to read.
        let _ = device.queue_events()[0].read();
        device.metrics().queue_events.inc();
        device.process_queue();
    }
}
