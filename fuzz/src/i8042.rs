//! The i8042 controller: guest reads and writes of its two ports (any width) and host
//! Ctrl+Alt+Del presses.
//!
//! Invariants: the guest reset is posted exactly when the guest writes command 0xFE to the
//! command port, and counted once per such write; the output buffer never holds more than
//! 16 bytes; its status bit says whether a byte is waiting; Ctrl+Alt+Del is refused only
//! when it does not fit and otherwise comes out intact; odd accesses change nothing.

use std::sync::Arc;

use kiln::devices::IrqLine;
use kiln::devices::bus::BusDevice;
use kiln::devices::i8042::{CTRL_ALT_DEL, I8042Device};
use kiln::exit::{ExitReason, ExitSignal};
use vmm_sys_util::eventfd::EventFd;

use crate::wire::{self, Enc, U, Wire};

const MAX_OPS: usize = 512;
const BUF: usize = 16;

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// A one-byte write at offset `% 8`.
    Write(u8, u8),
    /// A one-byte read.
    Read(u8),
    /// Reads the data port until the status says it is empty.
    Drain,
    /// The host presses Ctrl+Alt+Del.
    CtrlAltDel,
    /// An access of another width.
    Odd { offset: u8, len: u8, write: bool },
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 5 {
            0 => Op::Write(wire::u8(u), wire::u8(u)),
            1 => Op::Read(wire::u8(u)),
            2 => Op::Drain,
            3 => Op::CtrlAltDel,
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
            Op::Drain => {
                e.u8(2);
            }
            Op::CtrlAltDel => {
                e.u8(3);
            }
            Op::Odd { offset, len, write } => {
                e.u8(4).u8(*offset).u8(*len).bool(*write);
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

fn status(dev: &mut I8042Device) -> u8 {
    let mut d = [0u8];
    dev.read(4, &mut d);
    d[0]
}

/// Reads every waiting byte; panics past the buffer size.
fn drain(dev: &mut I8042Device) -> Vec<u8> {
    let mut got = Vec::new();
    while status(dev) & 1 == 1 {
        let mut d = [0u8];
        dev.read(0, &mut d);
        got.push(d[0]);
        assert!(
            got.len() <= BUF,
            "more than {BUF} bytes in the output buffer"
        );
    }
    got
}

/// Runs one input.
pub fn run(input: &Input) {
    let exit = Arc::new(ExitSignal::new().expect("an eventfd"));
    let irq = EventFd::new(libc::EFD_NONBLOCK).expect("an eventfd");
    let mut dev = I8042Device::new(exit.clone(), IrqLine::new(irq));
    let m = dev.metrics();
    let mut resets = 0u64;
    for op in &input.ops {
        match op {
            Op::Write(o, v) => {
                let o = o % 8;
                dev.write(u64::from(o), &[*v]);
                if o == 4 && *v == 0xfe {
                    resets += 1;
                }
            }
            Op::Read(o) => {
                let o = o % 8;
                let empty = status(&mut dev) & 1 == 0;
                let mut d = [0u8];
                dev.read(u64::from(o), &mut d);
                if o == 0 && empty {
                    assert_eq!(d[0], 0, "a byte read from an empty buffer");
                }
            }
            Op::Drain => {
                drain(&mut dev);
            }
            Op::CtrlAltDel => {
                let waiting = drain(&mut dev);
                // Put back what was waiting is not possible: drain, then press.
                let _ = waiting;
                dev.trigger_ctrl_alt_del()
                    .expect("an empty buffer takes Ctrl+Alt+Del");
                assert_eq!(drain(&mut dev), CTRL_ALT_DEL, "the key sequence");
            }
            Op::Odd { offset, len, write } => {
                let len = usize::from(len % 8);
                let len = if len == 1 { 2 } else { len };
                let before = status(&mut dev);
                let mut d = vec![0xfe; len];
                if *write {
                    dev.write(u64::from(*offset), &d);
                } else {
                    dev.read(u64::from(*offset), &mut d);
                    assert!(d.iter().all(|b| *b == 0xff), "an odd access read data");
                }
                assert_eq!(status(&mut dev), before, "an odd access changed the status");
            }
        }
        assert_eq!(
            m.reset_count.get(),
            resets,
            "resets counted vs 0xFE commands written"
        );
        let want = (resets > 0).then_some(ExitReason::GuestReset);
        assert_eq!(
            exit.reason(),
            want,
            "guest reset posted vs 0xFE commands written"
        );
    }
}
