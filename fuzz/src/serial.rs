//! The serial console (16550A UART): guest register reads and writes of any width and host
//! input, checked against a model of the receive FIFO and of the output.
//!
//! Invariants: the receive FIFO never holds more than 64 bytes (`input_capacity` is
//! 64 - the model's length, and host input takes only what fits); the guest reads the
//! bytes queued (host input, or its own output in loopback mode) in order, exactly once;
//! LSR's data-ready bit says whether the FIFO has data; every byte the guest writes (out of
//! loopback mode) reaches the output and is counted once; odd-width accesses change nothing.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use kiln::devices::IrqLine;
use kiln::devices::bus::BusDevice;
use kiln::devices::serial::SerialDevice;
use vmm_sys_util::eventfd::EventFd;

use crate::wire::{self, Enc, U, Wire};

const FIFO: usize = 64;
const MAX_OPS: usize = 512;

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A one-byte write at port offset `offset % 8`.
    Write(u8, u8),
    /// A one-byte read.
    Read(u8),
    /// Host input.
    Input(Vec<u8>),
    /// An access of `len % 8` bytes at `offset` (a write when `write`).
    Odd { offset: u8, len: u8, write: bool },
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 4 {
            0 => Op::Write(wire::u8(u), wire::u8(u)),
            1 => Op::Read(wire::u8(u)),
            2 => Op::Input(wire::bytes(u, 128)),
            _ => Op::Odd {
                offset: wire::u8(u),
                len: wire::u8(u),
                write: wire::bool(u),
            },
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::Write(o, v) => {
                e.u8(0).u8(*o).u8(*v);
            }
            Op::Read(o) => {
                e.u8(1).u8(*o);
            }
            Op::Input(b) => {
                e.u8(2).bytes(b);
            }
            Op::Odd { offset, len, write } => {
                e.u8(3).u8(*offset).u8(*len).bool(*write);
            }
        }
    }
}

/// A fuzz input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// The steps.
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

#[derive(Clone, Default)]
struct Out(Arc<Mutex<Vec<u8>>>);

impl Write for Out {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("lock").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// Runs one input.
pub fn run(input: &Input) {
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let ready = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let out = Out::default();
    let mut dev = SerialDevice::new(IrqLine::new(irq), Box::new(out.clone()), ready);
    let m = dev.metrics();
    let mut fifo: VecDeque<u8> = VecDeque::new();
    let mut sent: Vec<u8> = Vec::new();
    let (mut lcr, mut mcr) = (0u8, 0u8);
    // vm-superio's initial MCR has OUT2 set, loopback clear.
    let mut probe = [0u8];
    dev.read(4, &mut probe);
    mcr |= probe[0];
    for op in &input.ops {
        let dlab = lcr & 0x80 != 0;
        let loopback = mcr & 0x10 != 0;
        match op {
            Op::Write(o, v) => {
                let o = o % 8;
                dev.write(u64::from(o), &[*v]);
                match o {
                    0 if !dlab => {
                        if loopback {
                            if fifo.len() < FIFO {
                                fifo.push_back(*v);
                            }
                        } else {
                            sent.push(*v);
                        }
                    }
                    3 => lcr = *v,
                    4 => mcr = *v,
                    _ => {}
                }
            }
            Op::Read(o) => {
                let o = o % 8;
                let mut d = [0u8];
                dev.read(u64::from(o), &mut d);
                match o {
                    0 if !dlab => {
                        let want = fifo.pop_front().unwrap_or(0);
                        assert_eq!(d[0], want, "the guest read a byte out of order");
                    }
                    5 => assert_eq!(d[0] & 1 == 1, !fifo.is_empty(), "LSR data ready vs FIFO"),
                    _ => {}
                }
            }
            Op::Input(b) => {
                let room = FIFO - fifo.len();
                let n = dev.enqueue_input(b);
                let want = if loopback || b.is_empty() {
                    0
                } else {
                    b.len().min(room)
                };
                assert_eq!(
                    n,
                    want,
                    "host input taken ({} bytes offered, {room} free)",
                    b.len()
                );
                fifo.extend(&b[..n]);
            }
            Op::Odd { offset, len, write } => {
                let len = usize::from(len % 8);
                let len = if len == 1 { 2 } else { len };
                let mut d = vec![0u8; len];
                if *write {
                    dev.write(u64::from(*offset), &d);
                } else {
                    dev.read(u64::from(*offset), &mut d);
                    assert!(d.iter().all(|b| *b == 0xff), "an odd access read data");
                }
            }
        }
        assert!(fifo.len() <= FIFO);
        assert_eq!(dev.input_capacity(), FIFO - fifo.len(), "FIFO capacity");
        assert_eq!(*out.0.lock().expect("lock"), sent, "output bytes");
        assert_eq!(m.tx_bytes.get(), sent.len() as u64, "tx_bytes");
    }
}
