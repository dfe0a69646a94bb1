//! COM1: a 16550A UART (vm-superio's model) on port 0x3f8 / GSI 4, its output going to
//! stdout or a file through a bounded buffer the event loop flushes (output.rs), its input
//! fed from stdin by the event loop (input.rs).

mod input;
mod output;
mod state;

pub use input::SerialInput;
pub use output::{OUTPUT_BUFFER, OutputFlusher, SerialOutput, open_stdout, serial_output};
pub use state::{SerialSnapshot, SerialStateError};

use std::io::Write;
use std::sync::Arc;

use vm_superio::Serial;
use vm_superio::serial::SerialEvents;
use vmm_sys_util::eventfd::EventFd;

use super::bus::BusDevice;
use super::{Counter, IrqLine};

/// First port of COM1.
pub const COM1_BASE: u64 = 0x3f8;
/// Number of ports a UART decodes.
pub const UART_PORTS: u64 = 8;

/// Serial console counters.
#[derive(Debug, Default, serde::Serialize)]
pub struct SerialMetrics {
    /// Bytes the guest wrote.
    pub tx_bytes: Counter,
    /// Bytes the guest wrote that could not be delivered.
    pub tx_lost_bytes: Counter,
    /// Bytes handed to the guest.
    pub rx_bytes: Counter,
    /// Interrupts that could not be raised.
    pub irq_failures: Counter,
    /// Accesses of a width other than one byte.
    pub bad_accesses: Counter,
}

/// Callbacks from the UART model: counting, and waking the input pump when the guest has
/// drained the receive FIFO.
#[derive(Debug)]
pub struct UartEvents {
    metrics: Arc<SerialMetrics>,
    input_ready: EventFd,
}

impl SerialEvents for UartEvents {
    fn buffer_read(&self) {}

    fn out_byte(&self) {
        self.metrics.tx_bytes.inc();
    }

    fn tx_lost_byte(&self) {
        self.metrics.tx_lost_bytes.inc();
    }

    fn in_buffer_empty(&self) {
        // Best effort: if the counter is saturated the pump is already due to run.
        let _ = self.input_ready.write(1);
    }
}

/// The UART as a bus device.
pub struct SerialDevice {
    uart: Serial<IrqLine, UartEvents, Box<dyn Write + Send>>,
    metrics: Arc<SerialMetrics>,
}

impl std::fmt::Debug for SerialDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice")
            .field("metrics", &self.metrics)
            .finish_non_exhaustive()
    }
}

impl SerialDevice {
    /// A UART raising `irq`, writing guest output to `out`. `input_ready` is signalled when
    /// the receive FIFO empties.
    pub fn new(irq: IrqLine, out: Box<dyn Write + Send>, input_ready: EventFd) -> Self {
        let metrics = Arc::new(SerialMetrics::default());
        let events = UartEvents {
            metrics: metrics.clone(),
            input_ready,
        };
        SerialDevice {
            uart: Serial::with_events(irq, events, out),
            metrics,
        }
    }

    /// The counters.
    pub fn metrics(&self) -> Arc<SerialMetrics> {
        self.metrics.clone()
    }

    /// Free space in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.uart.fifo_capacity()
    }

    /// Queues bytes for the guest; returns how many fitted.
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        let room = self.uart.fifo_capacity();
        let queued = match self.uart.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(vm_superio::serial::Error::Trigger(_)) => {
                // The bytes are queued; only the interrupt failed.
                self.metrics.irq_failures.inc();
                bytes.len().min(room)
            }
            Err(_) => 0,
        };
        self.metrics.rx_bytes.add(queued as u64);
        queued
    }
}

impl BusDevice for SerialDevice {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if data.len() != 1 || offset >= UART_PORTS {
            self.metrics.bad_accesses.inc();
            data.fill(0xff);
            return;
        }
        data[0] = self.uart.read(offset as u8);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if data.len() != 1 || offset >= UART_PORTS {
            self.metrics.bad_accesses.inc();
            return;
        }
        if let Err(vm_superio::serial::Error::Trigger(_)) = self.uart.write(offset as u8, data[0]) {
            self.metrics.irq_failures.inc();
        }
        // Output errors are counted by `UartEvents::tx_lost_byte`.
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A writer the test can inspect.
    #[derive(Clone, Default)]
    pub(crate) struct SharedBuf(pub Arc<Mutex<Vec<u8>>>);

    impl Write for SharedBuf {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Failing;
    impl Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::from_raw_os_error(libc::EPIPE))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn device(out: Box<dyn Write + Send>) -> (SerialDevice, EventFd, EventFd) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let ready = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let dev = SerialDevice::new(
            IrqLine::new(irq.try_clone().unwrap()),
            out,
            ready.try_clone().unwrap(),
        );
        (dev, irq, ready)
    }

    #[test]
    fn output_reaches_the_writer() {
        let buf = SharedBuf::default();
        let (mut dev, _, _) = device(Box::new(buf.clone()));
        for b in b"hi\n" {
            dev.write(0, &[*b]);
        }
        assert_eq!(&*buf.0.lock().unwrap(), b"hi\n");
        assert_eq!(dev.metrics().tx_bytes.get(), 3);
        // LSR: transmitter empty.
        let mut lsr = [0u8];
        dev.read(5, &mut lsr);
        assert_eq!(lsr[0] & 0x60, 0x60);
    }

    #[test]
    fn lost_output_is_counted() {
        let (mut dev, _, _) = device(Box::new(Failing));
        dev.write(0, b"x");
        assert_eq!(dev.metrics().tx_lost_bytes.get(), 1);
    }

    #[test]
    fn input_is_bounded_by_the_fifo() {
        let (mut dev, irq, ready) = device(Box::new(std::io::sink()));
        // Enable the receive interrupt.
        dev.write(1, &[0x01]);
        let big = vec![b'a'; 1000];
        let taken = dev.enqueue_input(&big);
        assert_eq!(taken, 64);
        assert_eq!(dev.input_capacity(), 0);
        assert_eq!(dev.enqueue_input(b"more"), 0);
        assert!(irq.read().unwrap() >= 1);
        let mut d = [0u8];
        for _ in 0..64 {
            dev.read(0, &mut d);
            assert_eq!(d[0], b'a');
        }
        // Draining the FIFO wakes the input pump.
        assert_eq!(ready.read().unwrap(), 1);
        assert_eq!(dev.input_capacity(), 64);
    }

    #[test]
    fn odd_accesses_are_ignored() {
        let (mut dev, _, _) = device(Box::new(std::io::sink()));
        let mut wide = [0u8; 4];
        dev.read(0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.write(9, &[1]);
        dev.write(0, &[1, 2]);
        assert_eq!(dev.metrics().bad_accesses.get(), 3);
    }
}
