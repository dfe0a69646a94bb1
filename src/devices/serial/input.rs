//! Feeds host input (stdin, a pipe or a file) into the UART's receive FIFO from the event
//! loop, never holding more than the FIFO: when it is full the source is left unread (the
//! writer blocks on its pipe) until the guest drains the FIFO.

use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex, PoisonError};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use super::SerialDevice;

/// Largest read from the source at once (the FIFO holds 64 bytes).
const CHUNK: usize = 64;

/// The event-loop side of the serial console.
#[derive(Debug)]
pub struct SerialInput {
    device: Arc<Mutex<SerialDevice>>,
    source: Option<File>,
    /// Signalled by the UART when the guest empties the receive FIFO.
    input_ready: EventFd,
    /// Whether the source is registered with epoll (pipes, terminals, sockets).
    polled: bool,
    /// Whether epoll refused the source (regular files), so it is read on demand.
    on_demand: bool,
}

impl SerialInput {
    /// Pumps `source` into `device`; `input_ready` must be the eventfd given to the device.
    pub fn new(
        device: Arc<Mutex<SerialDevice>>,
        source: Option<File>,
        input_ready: EventFd,
    ) -> Self {
        SerialInput {
            device,
            source,
            input_ready,
            polled: false,
            on_demand: false,
        }
    }

    fn register(&mut self, ops: &mut EventOps) {
        let Some(source) = &self.source else { return };
        if self.polled || self.on_demand {
            return;
        }
        match ops.add(Events::new(source, EventSet::IN)) {
            Ok(()) => self.polled = true,
            Err(event_manager::Error::Epoll(e)) if e.errno() == libc::EPERM => {
                // Regular files and /dev/null cannot be polled: they are always readable.
                self.on_demand = true;
            }
            Err(e) => {
                log::warn!("serial input disabled: cannot watch the input: {e}");
                self.source = None;
            }
        }
    }

    fn unregister(&mut self, ops: &mut EventOps) {
        if let (true, Some(source)) = (self.polled, &self.source) {
            let _ = ops.remove(Events::new(source, EventSet::IN));
        }
        self.polled = false;
    }

    fn close(&mut self, ops: &mut EventOps) {
        self.unregister(ops);
        self.source = None;
        self.on_demand = false;
    }

    /// Moves as many bytes as the FIFO has room for; stops watching the source when the FIFO
    /// is full and closes it at end of file.
    fn pump(&mut self, ops: &mut EventOps) {
        let mut device = self.device.lock().unwrap_or_else(PoisonError::into_inner);
        let room = device.input_capacity().min(CHUNK);
        if room == 0 {
            drop(device);
            self.unregister(ops);
            return;
        }
        let Some(source) = self.source.as_mut() else {
            return;
        };
        let mut buf = [0u8; CHUNK];
        match source.read(&mut buf[..room]) {
            Ok(0) => {
                drop(device);
                self.close(ops);
            }
            Ok(n) => {
                device.enqueue_input(&buf[..n]);
                let full = device.input_capacity() == 0;
                drop(device);
                if full {
                    self.unregister(ops);
                }
            }
            Err(e) if matches!(e.kind(), ErrorKind::Interrupted | ErrorKind::WouldBlock) => {}
            Err(e) => {
                drop(device);
                log::warn!("serial input closed: {e}");
                self.close(ops);
            }
        }
    }
}

impl MutEventSubscriber for SerialInput {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.input_ready, EventSet::IN)) {
            log::warn!("serial input disabled: cannot watch the UART: {e}");
            self.source = None;
            return;
        }
        self.register(ops);
        if self.on_demand {
            self.pump(ops);
        }
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if events.fd() == self.input_ready.as_raw_fd() {
            let _ = self.input_ready.read();
            if self.on_demand {
                self.pump(ops);
            } else {
                self.register(ops);
            }
            return;
        }
        if events.event_set().contains(EventSet::IN) {
            self.pump(ops);
        } else if events
            .event_set()
            .intersects(EventSet::HANG_UP | EventSet::ERROR)
        {
            self.close(ops);
        }
    }
}
