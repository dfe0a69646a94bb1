//! The UART's registers and receive FIFO in a snapshot.

use serde::{Deserialize, Serialize};
use vm_superio::Serial;
use vm_superio::serial::SerialState;
use vmm_sys_util::eventfd::EventFd;

use super::{SerialDevice, UartEvents};
use crate::devices::IrqLine;

/// The UART's registers and the bytes waiting in its receive FIFO.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialSnapshot {
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// IER.
    pub interrupt_enable: u8,
    /// IIR.
    pub interrupt_identification: u8,
    /// LCR.
    pub line_control: u8,
    /// LSR.
    pub line_status: u8,
    /// MCR.
    pub modem_control: u8,
    /// MSR.
    pub modem_status: u8,
    /// Scratch register.
    pub scratch: u8,
    /// Received bytes the guest has not read.
    pub in_buffer: Vec<u8>,
}

/// Why a serial snapshot cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialStateError {
    /// An eventfd could not be duplicated.
    #[error("serial: {0}")]
    Io(#[from] std::io::Error),
    /// The UART model refused the state (e.g. more input than its FIFO holds).
    #[error("serial: invalid state: {0:?}")]
    Invalid(String),
}

impl SerialDevice {
    /// The registers and pending input.
    pub fn save(&self) -> SerialSnapshot {
        let s = self.uart.state();
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }

    fn events(&self) -> Result<UartEvents, SerialStateError> {
        Ok(UartEvents {
            metrics: self.metrics.clone(),
            input_ready: self.uart.events().input_ready.try_clone()?,
        })
    }

    /// Restores registers and pending input into this UART (same interrupt line, same
    /// output), refused if the UART model would not accept them.
    pub fn restore(&mut self, s: &SerialSnapshot) -> Result<(), SerialStateError> {
        let state = SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let irq = self.uart.interrupt_evt().try_clone()?;
        let placeholder = Serial::with_events(
            IrqLine::new(EventFd::new(libc::EFD_NONBLOCK)?),
            self.events()?,
            Box::new(std::io::sink()) as Box<dyn std::io::Write + Send>,
        );
        let events = self.events()?;
        let old = std::mem::replace(&mut self.uart, placeholder);
        let out = old.into_writer();
        match Serial::from_state(&state, irq, events, out) {
            Ok(uart) => {
                self.uart = uart;
                Ok(())
            }
            Err(e) => Err(SerialStateError::Invalid(format!("{e:?}"))),
        }
    }
}
