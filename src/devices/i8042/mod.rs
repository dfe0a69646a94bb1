//! The i8042 PS/2 controller, reduced to what a microVM guest needs: the CPU reset line
//! (command 0xFE, how Linux reboots with `reboot=k`), enough of the controller protocol for
//! Linux's probe, and a keyboard that can press Ctrl+Alt+Del.
//!
//! Ports 0x60 (data) and 0x64 (status/command); keyboard interrupts on GSI 1.

mod state;
pub use state::{I8042Snapshot, I8042StateError};

use std::sync::Arc;

use super::bus::BusDevice;
use super::{Counter, IrqLine};
use crate::exit::{ExitReason, ExitSignal};

/// First port of the controller (data); the command/status port is at +4.
pub const I8042_BASE: u64 = 0x60;
/// Ports decoded: 0x60..=0x64.
pub const I8042_PORTS: u64 = 5;

const OFS_DATA: u64 = 0;
const OFS_STATUS: u64 = 4;

// Status register bits.
const SB_OUT_DATA_AVAIL: u8 = 0x01;
const SB_SYS_FLAG: u8 = 0x04;
const SB_LAST_WAS_CMD: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Controller configuration byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_POST_OK: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;

// Controller commands (port 0x64).
const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTP: u8 = 0xd0;
const CMD_WRITE_OUTP: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands and replies (port 0x60).
const KBD_CMD_ECHO: u8 = 0xee;
const KBD_CMD_GET_ID: u8 = 0xf2;
const KBD_CMD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_BAT_OK: u8 = 0xaa;
const KBD_ID: [u8; 2] = [0xab, 0x83];
const SELF_TEST_OK: u8 = 0x55;
const PORT_TEST_OK: u8 = 0x00;
const AUX_TEST_ABSENT: u8 = 0xff;

/// Scan code set 2 make codes for Ctrl+Alt+Del, then their break codes.
pub const CTRL_ALT_DEL: [u8; 11] = [
    0x14, 0x11, 0xe0, 0x71, // Ctrl, Alt, Del down
    0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14, // Del, Alt, Ctrl up
];

/// Bytes the output buffer can hold (a key sequence and controller replies).
const BUF_SIZE: usize = 16;

/// i8042 counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct I8042Metrics {
    /// Resets requested by the guest.
    pub reset_count: Counter,
    /// Output bytes dropped because the buffer was full.
    pub missed_bytes: Counter,
    /// Interrupts that could not be raised.
    pub irq_failures: Counter,
    /// Accesses kiln does not model.
    pub bad_accesses: Counter,
}

/// Errors of the controller's host-side operations.
#[derive(Debug, thiserror::Error)]
pub enum I8042Error {
    /// The output buffer has no room for the key sequence.
    #[error("the i8042 output buffer is full")]
    BufferFull,
}

/// The controller.
#[derive(Debug)]
pub struct I8042Device {
    exit: Arc<ExitSignal>,
    kbd_irq: IrqLine,
    metrics: Arc<I8042Metrics>,
    status: u8,
    control: u8,
    outp: u8,
    /// A controller command waiting for its data byte.
    pending: Option<u8>,
    buf: [u8; BUF_SIZE],
    head: usize,
    len: usize,
}

impl I8042Device {
    /// A controller that posts [`ExitReason::GuestReset`] on `exit` and raises `kbd_irq`.
    pub fn new(exit: Arc<ExitSignal>, kbd_irq: IrqLine) -> Self {
        I8042Device {
            exit,
            kbd_irq,
            metrics: Arc::new(I8042Metrics::default()),
            status: SB_KBD_ENABLED,
            control: CB_POST_OK | CB_KBD_INT,
            outp: 0,
            pending: None,
            buf: [0; BUF_SIZE],
            head: 0,
            len: 0,
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<I8042Metrics> {
        self.metrics.clone()
    }

    /// Presses and releases Ctrl+Alt+Del on the keyboard.
    pub fn trigger_ctrl_alt_del(&mut self) -> Result<(), I8042Error> {
        if BUF_SIZE - self.len < CTRL_ALT_DEL.len() {
            return Err(I8042Error::BufferFull);
        }
        for b in CTRL_ALT_DEL {
            self.push(b);
        }
        self.raise_kbd_irq();
        Ok(())
    }

    fn push(&mut self, byte: u8) {
        if self.len == BUF_SIZE {
            self.metrics.missed_bytes.inc();
            return;
        }
        self.buf[(self.head + self.len) % BUF_SIZE] = byte;
        self.len += 1;
        self.status |= SB_OUT_DATA_AVAIL;
    }

    fn pop(&mut self) -> Option<u8> {
        if self.len == 0 {
            return None;
        }
        let b = self.buf[self.head];
        self.head = (self.head + 1) % BUF_SIZE;
        self.len -= 1;
        if self.len == 0 {
            self.status &= !SB_OUT_DATA_AVAIL;
        }
        Some(b)
    }

    fn flush(&mut self) {
        self.head = 0;
        self.len = 0;
        self.status &= !SB_OUT_DATA_AVAIL;
    }

    fn raise_kbd_irq(&mut self) {
        if self.control & CB_KBD_INT != 0 && self.len > 0 && self.kbd_irq.trigger().is_err() {
            self.metrics.irq_failures.inc();
        }
    }

    fn reply(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.push(*b);
        }
        self.raise_kbd_irq();
    }

    fn command(&mut self, cmd: u8) {
        self.status |= SB_LAST_WAS_CMD;
        match cmd {
            CMD_READ_CTR => self.reply(&[self.control]),
            CMD_WRITE_CTR | CMD_WRITE_OUTP => self.pending = Some(cmd),
            CMD_READ_OUTP => self.reply(&[self.outp]),
            CMD_DISABLE_AUX => self.control |= CB_AUX_DISABLED,
            CMD_ENABLE_AUX => self.control &= !CB_AUX_DISABLED,
            CMD_TEST_AUX => self.reply(&[AUX_TEST_ABSENT]),
            CMD_SELF_TEST => {
                self.status |= SB_SYS_FLAG;
                self.reply(&[SELF_TEST_OK]);
            }
            CMD_TEST_KBD => self.reply(&[PORT_TEST_OK]),
            CMD_DISABLE_KBD => self.control |= CB_KBD_DISABLED,
            CMD_ENABLE_KBD => self.control &= !CB_KBD_DISABLED,
            CMD_RESET_CPU => {
                self.metrics.reset_count.inc();
                self.exit.post(ExitReason::GuestReset);
            }
            // Pulses of other output lines and unknown commands do nothing.
            _ => self.metrics.bad_accesses.inc(),
        }
    }

    fn data(&mut self, byte: u8) {
        self.status &= !SB_LAST_WAS_CMD;
        match self.pending.take() {
            Some(CMD_WRITE_CTR) => {
                self.control = byte;
                if byte & CB_KBD_INT != 0 {
                    self.raise_kbd_irq();
                }
            }
            Some(_) => self.outp = byte,
            None => {
                // A command for the keyboard behind the controller.
                self.flush();
                match byte {
                    KBD_CMD_RESET => self.reply(&[KBD_ACK, KBD_BAT_OK]),
                    KBD_CMD_GET_ID => self.reply(&[KBD_ACK, KBD_ID[0], KBD_ID[1]]),
                    KBD_CMD_ECHO => self.reply(&[KBD_CMD_ECHO]),
                    _ => self.reply(&[KBD_ACK]),
                }
            }
        }
    }
}

impl BusDevice for I8042Device {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 {
            self.metrics.bad_accesses.inc();
            data.fill(0xff);
            return;
        }
        data[0] = match offset {
            OFS_DATA => {
                let byte = self.pop().unwrap_or(0);
                // More bytes queued: interrupt again for the next one.
                self.raise_kbd_irq();
                byte
            }
            OFS_STATUS => self.status,
            _ => {
                self.metrics.bad_accesses.inc();
                0xff
            }
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 {
            self.metrics.bad_accesses.inc();
            return;
        }
        match offset {
            OFS_DATA => self.data(data[0]),
            OFS_STATUS => self.command(data[0]),
            _ => self.metrics.bad_accesses.inc(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm_sys_util::eventfd::EventFd;

    fn device() -> (I8042Device, Arc<ExitSignal>, EventFd) {
        let exit = Arc::new(ExitSignal::new().unwrap());
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = I8042Device::new(exit.clone(), IrqLine::new(irq.try_clone().unwrap()));
        (dev, exit, irq)
    }

    fn read(dev: &mut I8042Device, off: u64) -> u8 {
        let mut d = [0u8];
        dev.read(off, &mut d);
        d[0]
    }

    #[test]
    fn reset_command_posts_guest_reset() {
        let (mut dev, exit, _) = device();
        // Linux waits for the input buffer to be empty first.
        assert_eq!(read(&mut dev, 4) & 0x02, 0);
        dev.write(4, &[0xfe]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
        assert_eq!(dev.metrics().reset_count.get(), 1);
    }

    #[test]
    fn controller_probe() {
        let (mut dev, exit, _) = device();
        dev.write(4, &[0xaa]);
        assert_eq!(read(&mut dev, 4) & 0x01, 1);
        assert_eq!(read(&mut dev, 0), 0x55);
        assert_eq!(read(&mut dev, 4) & 0x01, 0);
        dev.write(4, &[0x20]);
        let ctr = read(&mut dev, 0);
        assert_eq!(ctr, CB_POST_OK | CB_KBD_INT);
        dev.write(4, &[0x60]);
        dev.write(0, &[0x45]);
        dev.write(4, &[0x20]);
        assert_eq!(read(&mut dev, 0), 0x45);
        dev.write(0, &[0xf2]);
        assert_eq!(
            [read(&mut dev, 0), read(&mut dev, 0), read(&mut dev, 0)],
            [0xfa, 0xab, 0x83]
        );
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn ctrl_alt_del_sequence_and_interrupts() {
        let (mut dev, _, irq) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        assert_eq!(irq.read().unwrap(), 1);
        let mut got = Vec::new();
        while read(&mut dev, 4) & 1 == 1 {
            got.push(read(&mut dev, 0));
        }
        assert_eq!(got, CTRL_ALT_DEL);
        // One interrupt per remaining byte after each read.
        assert_eq!(irq.read().unwrap(), CTRL_ALT_DEL.len() as u64 - 1);
    }

    #[test]
    fn full_buffer_refuses_the_sequence() {
        let (mut dev, _, _) = device();
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(dev.trigger_ctrl_alt_del().is_err());
        for _ in 0..BUF_SIZE + 4 {
            dev.push(1);
        }
        assert!(dev.metrics().missed_bytes.get() > 0);
    }

    #[test]
    fn no_interrupt_when_disabled() {
        let (mut dev, _, irq) = device();
        dev.write(4, &[0x60]);
        dev.write(0, &[0x00]);
        dev.trigger_ctrl_alt_del().unwrap();
        assert!(irq.read().is_err());
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut dev, exit, _) = device();
        let mut wide = [0u8; 2];
        dev.read(0, &mut wide);
        dev.write(4, &[0xfe, 0]);
        dev.write(2, &[0xfe]);
        assert_eq!(read(&mut dev, 1), 0xff);
        assert_eq!(exit.reason(), None);
    }
}
