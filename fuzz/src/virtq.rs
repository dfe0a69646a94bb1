//! The device targets' virtqueues: kiln's mock driver (`devices::virtio::mock`, the
//! `test-utils` feature: the same driver kiln's unit tests use, with the reference chain
//! walk) fed with chains decoded from the fuzzer's bytes: where the guest memory layout
//! puts tables and buffers, and how a chain or a hostile descriptor is encoded.

use kiln::vstate::memory::GuestMemory;

pub use kiln::devices::virtio::mock::{
    Driver, F_INDIRECT, F_NEXT, F_WRITE, QueueLayout, Walked, need_event, walk, writable_len,
    write_desc,
};

use crate::guest::MEM_SIZE;
use crate::wire::{self, Enc, U, Wire};

/// Indirect tables live here, 16 slots of 128 descriptors.
pub const INDIRECT_BASE: u64 = 0x8000;
/// Bytes of one indirect slot.
pub const INDIRECT_SLOT: u64 = 0x800;
/// End of the area holding descriptor tables and rings; buffers come after it.
pub const CONTROL_END: u64 = 0x1_0000;
/// Start of the buffer arena.
pub const ARENA: u64 = CONTROL_END;
/// Bytes of the arena.
pub const ARENA_LEN: u64 = MEM_SIZE - ARENA;

/// A buffer address: mostly inside the arena, sometimes anywhere at all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addr {
    /// An offset into the arena (taken modulo its size).
    Arena(u32),
    /// Any guest-physical address.
    Raw(u64),
}

impl Addr {
    /// The guest-physical address.
    pub fn resolve(self) -> u64 {
        match self {
            Addr::Arena(o) => ARENA + u64::from(o) % ARENA_LEN,
            Addr::Raw(a) => a,
        }
    }
}

impl Wire for Addr {
    fn decode(u: &mut U<'_>) -> Self {
        if wire::u8(u) % 8 == 7 {
            Addr::Raw(wire::u64(u))
        } else {
            Addr::Arena(wire::u32(u))
        }
    }
    fn encode(&self, e: &mut Enc) {
        match *self {
            Addr::Arena(o) => e.u8(0).u32(o),
            Addr::Raw(a) => e.u8(7).u64(a),
        };
    }
}

/// One buffer of a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Buf {
    /// Where.
    pub addr: Addr,
    /// Bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

impl Wire for Buf {
    fn decode(u: &mut U<'_>) -> Self {
        Buf {
            addr: Addr::decode(u),
            len: wire::u32(u),
            writable: wire::bool(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        self.addr.encode(e);
        e.u32(self.len).bool(self.writable);
    }
}

/// A chain as the driver lays it out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainSpec {
    /// Consecutive descriptors of the queue's table.
    Direct(Vec<Buf>),
    /// One descriptor pointing at an indirect table in `slot`.
    Indirect {
        /// Which of the 16 indirect slots.
        slot: u8,
        /// The table's buffers.
        bufs: Vec<Buf>,
    },
}

impl Wire for ChainSpec {
    fn decode(u: &mut U<'_>) -> Self {
        if wire::u8(u) % 4 == 3 {
            ChainSpec::Indirect {
                slot: wire::u8(u),
                bufs: wire::list(u, 16),
            }
        } else {
            ChainSpec::Direct(wire::list(u, 16))
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            ChainSpec::Direct(bufs) => e.u8(0).list(bufs),
            ChainSpec::Indirect { slot, bufs } => e.u8(3).u8(*slot).list(bufs),
        };
    }
}

/// A descriptor written anywhere in a table, as a hostile driver would.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RawDesc {
    /// 0: the queue's table; n: indirect slot n - 1.
    pub table: u8,
    /// Index in the table.
    pub index: u16,
    /// The descriptor.
    pub addr: Addr,
    /// Its length.
    pub len: u32,
    /// Its flags.
    pub flags: u16,
    /// Its `next`.
    pub next: u16,
}

impl Wire for RawDesc {
    fn decode(u: &mut U<'_>) -> Self {
        RawDesc {
            table: wire::u8(u),
            index: wire::u16(u),
            addr: Addr::decode(u),
            len: wire::u32(u),
            flags: wire::u16(u),
            next: wire::u16(u),
        }
    }
    fn encode(&self, e: &mut Enc) {
        e.u8(self.table).u16(self.index);
        self.addr.encode(e);
        e.u32(self.len).u16(self.flags).u16(self.next);
    }
}

/// The slot address of indirect table `slot`.
pub fn indirect_table(slot: u8) -> u64 {
    INDIRECT_BASE + u64::from(slot % 16) * INDIRECT_SLOT
}

/// What the fuzz inputs write through a [`Driver`]: decoded chains and raw descriptors.
pub trait DriverExt {
    /// Writes a chain; returns its head (not yet published).
    fn add(&mut self, mem: &GuestMemory, chain: &ChainSpec) -> u16;
    /// Writes a raw descriptor.
    fn raw(&self, mem: &GuestMemory, d: &RawDesc);
}

/// The `(addr, len, writable)` triples the driver takes.
fn triples(bufs: &[Buf]) -> Vec<(u64, u32, bool)> {
    bufs.iter()
        .map(|b| (b.addr.resolve(), b.len, b.writable))
        .collect()
}

impl DriverExt for Driver {
    fn add(&mut self, mem: &GuestMemory, chain: &ChainSpec) -> u16 {
        match chain {
            ChainSpec::Direct(bufs) => self.add_chain(mem, &triples(bufs)),
            ChainSpec::Indirect { slot, bufs } => {
                self.add_indirect(mem, indirect_table(*slot), &triples(bufs))
            }
        }
    }

    fn raw(&self, mem: &GuestMemory, d: &RawDesc) {
        let (table, index) = match d.table % 17 {
            0 => (self.q.desc, d.index % self.q.size),
            n => (indirect_table(n - 1), d.index % 128),
        };
        write_desc(
            mem,
            table,
            index,
            (d.addr.resolve(), d.len, d.flags, d.next),
        );
    }
}

/// The area where descriptor tables and rings live (writes there invalidate the walk).
pub fn control_area_touched(r: &crate::guest::Ranges) -> bool {
    r.touches(0, CONTROL_END)
}
