//! The i8042 controller's registers and output buffer in a snapshot.

use serde::{Deserialize, Serialize};

use super::{BUF_SIZE, I8042Device};

/// The controller's registers and the bytes waiting for the guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042Snapshot {
    /// Status register.
    pub status: u8,
    /// Controller configuration byte.
    pub control: u8,
    /// Output port.
    pub outp: u8,
    /// A command waiting for its data byte.
    pub pending: Option<u8>,
    /// Bytes waiting, oldest first.
    pub buffer: Vec<u8>,
}

/// Why an i8042 snapshot cannot be restored.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum I8042StateError {
    /// More bytes than the buffer holds.
    #[error("i8042: {0} buffered bytes, the buffer holds {BUF_SIZE}")]
    Buffer(usize),
}

impl I8042Device {
    /// The registers and buffered bytes.
    pub fn save(&self) -> I8042Snapshot {
        let buffer = (0..self.len)
            .map(|i| self.buf[(self.head + i) % BUF_SIZE])
            .collect();
        I8042Snapshot {
            status: self.status,
            control: self.control,
            outp: self.outp,
            pending: self.pending,
            buffer,
        }
    }

    /// Restores registers and buffered bytes.
    pub fn restore(&mut self, s: &I8042Snapshot) -> Result<(), I8042StateError> {
        if s.buffer.len() > BUF_SIZE {
            return Err(I8042StateError::Buffer(s.buffer.len()));
        }
        self.status = s.status;
        self.control = s.control;
        self.outp = s.outp;
        self.pending = s.pending;
        self.buf = [0; BUF_SIZE];
        self.buf[..s.buffer.len()].copy_from_slice(&s.buffer);
        self.head = 0;
        self.len = s.buffer.len();
        Ok(())
    }
}
