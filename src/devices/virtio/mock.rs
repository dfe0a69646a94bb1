//! The driver side of a split virtqueue, for tests and fuzz targets (the `test-utils` feature;
//! always in kiln's own unit tests): it lays a queue out in guest memory, writes descriptor
//! chains (well formed or not) and publishes them, and reads the used ring back, so device
//! code runs exactly as a guest drives it, without KVM. [`walk`] is a reference chain walk
//! (virtio 1.x, 2.7.5 and 2.7.5.3) a device's results are checked against.
//!
//! The driver writes guest memory without checking: a hostile test may point anything
//! anywhere, and a write outside RAM is simply lost, as it would be for a real guest.

use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::queue::{MAX_INDIRECT_ENTRIES, configured_queue};
use crate::vstate::memory::GuestMemory;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// Indirect table.
pub const F_INDIRECT: u16 = 4;

/// Where a queue lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    /// A queue of `size` entries laid out from `base`: the descriptor table, the available
    /// ring right after it, the used ring on the next 4 KiB boundary (16 * size + 4 KiB +
    /// 8 * size bytes of RAM at most).
    pub fn at(base: u64, size: u16) -> QueueLayout {
        let n = u64::from(size);
        let avail = base + 16 * n;
        QueueLayout {
            desc: base,
            avail,
            used: (avail + 6 + 2 * n + 4095) & !4095,
            size,
        }
    }

    /// The device-side queue for this layout, configured and ready (the default queue when
    /// the layout is not one a driver could configure).
    pub fn device_queue(&self) -> Queue {
        configured_queue(self.size, self.size, self.desc, self.avail, self.used).unwrap_or_default()
    }

    /// The bytes of the used ring, `avail_event` included.
    pub fn used_len(&self) -> u64 {
        6 + 8 * u64::from(self.size)
    }

    /// What a device adding `k` used entries from its `next_used` may write in the used
    /// ring, as `(address, length)` ranges added to `r`: the flags and `avail_event`
    /// (notification control), and with `k > 0` those entries and the index. The device
    /// never reads `used.idx` back (it keeps its own `next_used`), so a driver scribbling on
    /// it changes nothing but the memory.
    pub fn used_writes(&self, next_used: u16, k: u16, r: &mut impl Extend<(u64, u64)>) {
        r.extend([
            (self.used, 2),
            (self.used + 4 + 8 * u64::from(self.size), 2),
        ]);
        if k > 0 {
            r.extend([(self.used + 2, 2)]);
        }
        for i in 0..k {
            let slot = next_used.wrapping_add(i) % self.size;
            r.extend([(self.used + 4 + 8 * u64::from(slot), 8)]);
        }
    }
}

/// Writes descriptor `index` of the table at `table`: `(addr, len, flags, next)`.
pub fn write_desc(mem: &GuestMemory, table: u64, index: u16, d: (u64, u32, u16, u16)) {
    let desc = Descriptor::new(d.0, d.1, d.2, d.3);
    let _ = mem.write_obj(desc, GuestAddress(table + 16 * u64::from(index)));
}

/// The driver of one queue.
#[derive(Debug)]
pub struct Driver {
    /// The layout.
    pub q: QueueLayout,
    next_desc: u16,
    avail_idx: u16,
}

impl Driver {
    /// A driver of the queue at `q` (the rings' flags and indexes zeroed).
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

    /// Writes a chain of `(addr, len, writable)` buffers into consecutive free descriptors
    /// (wrapping around the table) and returns its head; does not publish it. An empty chain
    /// is one descriptor of all zeroes.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        if bufs.is_empty() {
            write_desc(mem, self.q.desc, head, (0, 0, 0, 0));
            self.next_desc = (head + 1) % self.q.size;
            return head;
        }
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.q.size;
            let mut flags = if writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            write_desc(mem, self.q.desc, index, (addr, len, flags, next));
            self.next_desc = next;
        }
        head
    }

    /// Writes `bufs` as an indirect table at `table` and one descriptor of the queue's table
    /// pointing at it; returns that head (not yet published).
    pub fn add_indirect(
        &mut self,
        mem: &GuestMemory,
        table: u64,
        bufs: &[(u64, u32, bool)],
    ) -> u16 {
        let head = self.next_desc;
        for (i, &(addr, len, writable)) in (0u16..).zip(bufs) {
            let mut flags = if writable { F_WRITE } else { 0 };
            if usize::from(i) + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            write_desc(mem, table, i, (addr, len, flags, i.wrapping_add(1)));
        }
        let len = u32::try_from(16 * bufs.len()).unwrap_or(u32::MAX);
        write_desc(mem, self.q.desc, head, (table, len, F_INDIRECT, 0));
        self.next_desc = (head + 1) % self.q.size;
        head
    }

    /// Puts `head` in the available ring and moves the index.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.q.size);
        let _ = mem.write_obj(head, GuestAddress(self.q.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.q.avail + 2));
    }

    /// Sets `avail.idx` directly (for hostile tests).
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.q.avail + 2));
    }

    /// The available index the driver published.
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// `avail.idx` as in memory (a hostile write may have overwritten it).
    pub fn avail_idx_in_memory(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.q.avail + 2)).unwrap_or(0)
    }

    /// Head in available-ring slot `i` (modulo the size).
    pub fn avail_head(&self, mem: &GuestMemory, i: u16) -> u16 {
        let slot = u64::from(i % self.q.size);
        mem.read_obj(GuestAddress(self.q.avail + 4 + 2 * slot))
            .unwrap_or(0)
    }

    /// Sets `used_event` (at the end of the available ring).
    pub fn set_used_event(&self, mem: &GuestMemory, v: u16) {
        let _ = mem.write_obj(v, GuestAddress(self.used_event_addr()));
    }

    /// `used_event` as the driver wrote it.
    pub fn used_event(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used_event_addr()))
            .unwrap_or(0)
    }

    fn used_event_addr(&self) -> u64 {
        self.q.avail + 4 + 2 * u64::from(self.q.size)
    }

    /// `used.idx`: the used index the device published.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.q.used + 2)).unwrap_or(0)
    }

    /// Used ring entry `i` (modulo the size): (head, length).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.q.used + 4 + 8 * u64::from(i % self.q.size);
        (
            mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX),
            mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX),
        )
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

/// `vring_need_event`: whether moving the used index from `old` to `new` crossed `event`.
pub fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}
