//! The driver side of a split virtqueue, for the device targets: descriptor chains (well
//! formed or not) written into guest memory and published, the used ring read back, and a
//! reference chain walk (virtio 1.x, 2.7.5 and 2.7.5.3) the device's results are checked
//! against.

use kiln::devices::virtio::queue::MAX_INDIRECT_ENTRIES;
use kiln::vstate::memory::GuestMemory;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::guest::{MEM_SIZE, Ranges};
use crate::wire::{self, Enc, U, Wire};

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// Indirect table.
pub const F_INDIRECT: u16 = 4;

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

/// Where a queue lives.
#[derive(Clone, Copy, Debug)]
pub struct QueueLayout {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
}

impl QueueLayout {
    /// The bytes of the used ring, `avail_event` included.
    pub fn used_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// What a device adding `k` used entries from its `next_used` may write in the used
    /// ring: the flags and `avail_event` (notification control), and with `k > 0` those
    /// entries and the index. The device never reads `used.idx` back (it keeps its own
    /// `next_used`), so a driver scribbling on it changes nothing but the memory.
    pub fn used_writes(&self, next_used: u16, k: u16, r: &mut Ranges) {
        r.add(self.used, 2);
        r.add(self.used + 4 + 8 * u64::from(self.size), 2);
        if k > 0 {
            r.add(self.used + 2, 2);
        }
        for i in 0..k {
            let slot = next_used.wrapping_add(i) % self.size;
            r.add(self.used + 4 + 8 * u64::from(slot), 8);
        }
    }
}

/// The driver of one queue.
#[derive(Debug)]
pub struct Driver {
    /// The layout.
    pub q: QueueLayout,
    next_desc: u16,
    avail_idx: u16,
}

/// The slot address of indirect table `slot`.
pub fn indirect_table(slot: u8) -> u64 {
    INDIRECT_BASE + u64::from(slot % 16) * INDIRECT_SLOT
}

/// Writes descriptor `index` of the table at `table`.
pub fn write_desc(
    mem: &GuestMemory,
    table: u64,
    index: u16,
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
) {
    let d = Descriptor::new(addr, len, flags, next);
    let _ = mem.write_obj(d, GuestAddress(table + 16 * u64::from(index)));
}

impl Driver {
    /// A driver of the queue at `q` (rings zeroed).
    pub fn new(mem: &GuestMemory, q: QueueLayout) -> Driver {
        let d = Driver {
            q,
            next_desc: 0,
            avail_idx: 0,
        };
        d.zero_rings(mem);
        d
    }

    fn zero_rings(&self, mem: &GuestMemory) {
        let _ = mem.write_obj(0u32, GuestAddress(self.q.avail));
        let _ = mem.write_obj(0u32, GuestAddress(self.q.used));
    }

    /// Starts over after a device reset.
    pub fn reset(&mut self, mem: &GuestMemory) {
        self.next_desc = 0;
        self.avail_idx = 0;
        self.zero_rings(mem);
    }

    /// Writes a chain; returns its head (not yet published).
    pub fn add(&mut self, mem: &GuestMemory, chain: &ChainSpec) -> u16 {
        let head = self.next_desc;
        let size = self.q.size;
        match chain {
            ChainSpec::Direct(bufs) if bufs.is_empty() => {
                write_desc(mem, self.q.desc, head, 0, 0, 0, 0);
                self.next_desc = (head + 1) % size;
            }
            ChainSpec::Direct(bufs) => {
                for (i, b) in bufs.iter().enumerate() {
                    let index = self.next_desc;
                    let next = (index + 1) % size;
                    let mut flags = if b.writable { F_WRITE } else { 0 };
                    if i + 1 < bufs.len() {
                        flags |= F_NEXT;
                    }
                    write_desc(
                        mem,
                        self.q.desc,
                        index,
                        b.addr.resolve(),
                        b.len,
                        flags,
                        next,
                    );
                    self.next_desc = next;
                }
            }
            ChainSpec::Indirect { slot, bufs } => {
                let table = indirect_table(*slot);
                for (i, b) in bufs.iter().enumerate() {
                    let i = i as u16;
                    let mut flags = if b.writable { F_WRITE } else { 0 };
                    if usize::from(i) + 1 < bufs.len() {
                        flags |= F_NEXT;
                    }
                    write_desc(mem, table, i, b.addr.resolve(), b.len, flags, i + 1);
                }
                let len = 16 * bufs.len() as u32;
                write_desc(mem, self.q.desc, head, table, len, F_INDIRECT, 0);
                self.next_desc = (head + 1) % size;
            }
        }
        head
    }

    /// Writes a raw descriptor.
    pub fn raw(&self, mem: &GuestMemory, d: &RawDesc) {
        let (table, index) = match d.table % 17 {
            0 => (self.q.desc, d.index % self.q.size),
            n => (indirect_table(n - 1), d.index % 128),
        };
        write_desc(mem, table, index, d.addr.resolve(), d.len, d.flags, d.next);
    }

    /// Publishes `head` in the available ring.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.q.size);
        let _ = mem.write_obj(head, GuestAddress(self.q.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.q.avail + 2));
    }

    /// Sets `avail.idx` directly.
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.q.avail + 2));
    }

    /// Sets `used_event` (at the end of the available ring).
    pub fn set_used_event(&self, mem: &GuestMemory, v: u16) {
        let at = self.q.avail + 4 + 2 * u64::from(self.q.size);
        let _ = mem.write_obj(v, GuestAddress(at));
    }

    /// `used_event` as the guest wrote it.
    pub fn used_event(&self, mem: &GuestMemory) -> u16 {
        let at = self.q.avail + 4 + 2 * u64::from(self.q.size);
        mem.read_obj(GuestAddress(at)).unwrap_or(0)
    }

    /// `avail.idx` as in memory (a hostile op may have overwritten it).
    pub fn avail_idx_in_memory(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.q.avail + 2)).unwrap_or(0)
    }

    /// Head in available-ring slot `i` (modulo the size).
    pub fn avail_head(&self, mem: &GuestMemory, i: u16) -> u16 {
        let slot = u64::from(i % self.q.size);
        mem.read_obj(GuestAddress(self.q.avail + 4 + 2 * slot))
            .unwrap_or(0)
    }

    /// `used.idx`.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.q.used + 2)).unwrap_or(0)
    }

    /// The `k` used entries from `next_used` as (id, len), checking that the device moved
    /// `used.idx` past them. A batch longer than the ring (a driver that publishes heads the
    /// device still holds can make one) overwrote its first entries with its last: those
    /// are `None`, they cannot be seen any more.
    pub fn used_entries(
        &self,
        mem: &GuestMemory,
        next_used: u16,
        k: u16,
    ) -> Vec<Option<(u32, u32)>> {
        if k > 0 {
            assert_eq!(
                self.used_idx(mem),
                next_used.wrapping_add(k),
                "used.idx after {k} used entries from {next_used}"
            );
        }
        let hidden = k.saturating_sub(self.q.size);
        (0..k)
            .map(|i| (i >= hidden).then(|| self.used_elem(mem, next_used.wrapping_add(i))))
            .collect()
    }

    /// Used element `i`: (id, len).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.q.used + 4 + 8 * u64::from(i % self.q.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX),
            mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX),
        )
    }
}

/// One buffer of a walked chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Walked {
    /// Guest-physical address.
    pub addr: u64,
    /// Bytes.
    pub len: u32,
    /// Device-writable.
    pub writable: bool,
}

/// The reference walk: the buffers of chain `head`, or `None` when the chain is invalid
/// (head or next out of the table, a loop, more than 4 GiB, a buffer or table outside RAM,
/// an indirect descriptor not negotiated, nested, chained, empty, misaligned or too large).
pub fn walk(
    mem: &GuestMemory,
    q: &QueueLayout,
    head: u16,
    indirect_ok: bool,
) -> Option<Vec<Walked>> {
    let mut table = q.desc;
    let mut size = u32::from(q.size);
    if u32::from(head) >= size {
        return None;
    }
    let mut index = u32::from(head);
    let mut budget = size;
    let mut indirect = false;
    let mut total = 0u64;
    let mut out = Vec::new();
    loop {
        if budget == 0 {
            return None;
        }
        budget -= 1;
        let at = table.checked_add(u64::from(index) * 16)?;
        let d: Descriptor = mem.read_obj(GuestAddress(at)).ok()?;
        let (addr, len, flags) = (d.addr().0, d.len(), d.flags());
        if flags & F_INDIRECT != 0 {
            if !indirect_ok
                || indirect
                || flags & F_NEXT != 0
                || len == 0
                || len % 16 != 0
                || len / 16 > MAX_INDIRECT_ENTRIES
                || !mem.check_range(GuestAddress(addr), len as usize)
            {
                return None;
            }
            table = addr;
            size = len / 16;
            index = 0;
            budget = size;
            indirect = true;
            continue;
        }
        total += u64::from(len);
        if total > u64::from(u32::MAX) {
            return None;
        }
        if len > 0 && !mem.check_range(GuestAddress(addr), len as usize) {
            return None;
        }
        out.push(Walked {
            addr,
            len,
            writable: flags & F_WRITE != 0,
        });
        if flags & F_NEXT == 0 {
            return Some(out);
        }
        index = u32::from(d.next());
        if index >= size {
            return None;
        }
    }
}

/// Total device-writable bytes of a walked chain.
pub fn writable_len(bufs: &[Walked]) -> u64 {
    bufs.iter()
        .filter(|b| b.writable)
        .map(|b| u64::from(b.len))
        .sum()
}

/// The area where descriptor tables and rings live (writes there invalidate the walk).
pub fn control_area_touched(r: &crate::guest::Ranges) -> bool {
    r.touches(0, CONTROL_END)
}

/// `vring_need_event`: whether moving the used index from `old` to `new` crossed `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
