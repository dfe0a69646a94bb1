//! The network device on the event loop: queue kicks run the queues, TAP readiness runs
//! receive (readable) or resumes transmit (writable), the rate limiters' timers resume
//! what they held back, and the TAP is watched only for what
//! the device currently waits for.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};

use super::{Net, RX_QUEUE, TX_QUEUE};
use crate::devices::virtio::VirtioDevice;

/// Subscribes a [`Net`] to the event loop.
#[derive(Debug)]
pub struct NetEvents {
    device: Arc<Mutex<Net>>,
    /// What the TAP is registered for (empty: not registered).
    tap_watch: EventSet,
    /// The TAP descriptor `tap_watch` is about ([`Net::tap_generation`]).
    tap_generation: u64,
}

impl NetEvents {
    /// Glue for `device`.
    pub fn new(device: Arc<Mutex<Net>>) -> Self {
        NetEvents {
            device,
            tap_watch: EventSet::empty(),
            tap_generation: 0,
        }
    }

    /// Makes the TAP registration match what the device waits for.
    fn sync_tap(&mut self, device: &Net, ops: &mut EventOps) {
        if device.tap_generation() != self.tap_generation {
            // A replaced descriptor: closing the old one ended its registration.
            self.tap_generation = device.tap_generation();
            self.tap_watch = EventSet::empty();
        }
        let want = device.tap_interest();
        if want == self.tap_watch {
            return;
        }
        let fd = device.tap().as_raw_fd();
        let result = if self.tap_watch.is_empty() {
            ops.add(Events::new_raw(fd, want))
        } else if want.is_empty() {
            ops.remove(Events::new_raw(fd, self.tap_watch))
        } else {
            ops.modify(Events::new_raw(fd, want))
        };
        match result {
            Ok(()) => self.tap_watch = want,
            Err(e) => log::error!(
                "interface {}: cannot watch its TAP: {e}",
                device.config().iface_id
            ),
        }
    }
}

impl MutEventSubscriber for NetEvents {
    fn init(&mut self, ops: &mut EventOps) {
        let device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        for evt in device.queue_events() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!(
                    "interface {}: cannot watch its queues: {e}",
                    device.config().iface_id
                );
            }
        }
        let (rx, tx) = device.rate_limiters();
        for fd in [rx.timer_fd(), tx.timer_fd()] {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!(
                    "interface {}: cannot watch its rate limiters' timers: {e}",
                    device.config().iface_id
                );
            }
        }
        drop(device);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let device_arc = self.device.clone();
        let mut device = device_arc.lock().unwrap_or_else(PoisonError::into_inner);
        let fd = events.fd();
        let set = events.event_set();
        if fd == device.queue_events()[RX_QUEUE].as_raw_fd() {
            let _ = device.queue_events()[RX_QUEUE].read();
            device.rx_queue_kicked();
        } else if fd == device.queue_events()[TX_QUEUE].as_raw_fd() {
            let _ = device.queue_events()[TX_QUEUE].read();
            device.process_tx();
        } else if fd == device.rate_limiters().0.timer_fd() {
            device.rx_rate_limiter_timer();
        } else if fd == device.rate_limiters().1.timer_fd() {
            device.tx_rate_limiter_timer();
        } else if fd == device.tap().as_raw_fd() {
            if set.intersects(EventSet::ERROR | EventSet::HANG_UP) {
                device.tap_failed();
            } else {
                if set.contains(EventSet::OUT) {
                    device.tap_writable();
                }
                if set.contains(EventSet::IN) {
                    device.process_rx();
                }
            }
        }
        // Activation and reset happen on vCPU threads: always reconcile.
        self.sync_tap(&device, ops);
    }
}
