//! The channel between the API thread and the VMM thread: the VMM's [`ApiBridge`] receives
//! actions and sends responses; the API thread's [`VmmLink`] does the reverse and writes
//! the eventfd the VMM's event loop watches.

use std::sync::mpsc::{self, Receiver, Sender};

use vmm_sys_util::eventfd::EventFd;

use crate::api::{VmmAction, VmmResponse};

/// The VMM thread's end of the API: actions in, responses out.
#[derive(Debug)]
pub struct ApiBridge {
    actions: Receiver<VmmAction>,
    responses: Sender<VmmResponse>,
    eventfd: EventFd,
}

impl ApiBridge {
    /// Readable when an action may be waiting (for the VMM's event loop).
    pub fn eventfd(&self) -> &EventFd {
        &self.eventfd
    }

    /// The waiting action, if any, without blocking. The eventfd is left alone: whoever
    /// watches it (the event loop) clears it before looking, so an action sent after the
    /// look writes it again and is not missed.
    pub fn try_recv(&self) -> Option<VmmAction> {
        self.actions.try_recv().ok()
    }

    /// Waits for the next action; `None` once the API thread is gone. (Before boot nothing
    /// watches the eventfd; its count is cleared by the first wake-up after boot.)
    pub fn recv(&self) -> Option<VmmAction> {
        self.actions.recv().ok()
    }

    /// Answers the action last received.
    pub fn respond(&self, response: VmmResponse) {
        // If the API thread is gone nobody waits for the answer.
        let _ = self.responses.send(response);
    }
}

/// The API thread's end of the bridge.
#[derive(Debug)]
pub(super) struct VmmLink {
    actions: Sender<VmmAction>,
    responses: Receiver<VmmResponse>,
    eventfd: EventFd,
}

impl VmmLink {
    /// Hands `action` to the VMM and waits for its answer; `None` if the VMM side is gone.
    pub(super) fn call(&self, action: VmmAction) -> Option<VmmResponse> {
        self.actions.send(action).ok()?;
        if let Err(e) = self.eventfd.write(1) {
            log::warn!("API: cannot signal the VMM thread: {e}");
        }
        self.responses.recv().ok()
    }
}

/// A connected pair: the VMM's end (signalled through `eventfd`) and the API thread's end
/// (which writes `api_eventfd`, a clone of it).
pub(super) fn pair(eventfd: EventFd, api_eventfd: EventFd) -> (ApiBridge, VmmLink) {
    let (action_tx, action_rx) = mpsc::channel();
    let (response_tx, response_rx) = mpsc::channel();
    let bridge = ApiBridge {
        actions: action_rx,
        responses: response_tx,
        eventfd,
    };
    let link = VmmLink {
        actions: action_tx,
        responses: response_rx,
        eventfd: api_eventfd,
    };
    (bridge, link)
}
