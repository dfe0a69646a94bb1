//! A mock virtio driver: lays out a split queue in guest memory, writes descriptor chains and
//! publishes them, and reads the used ring back. Unit tests and fuzz targets drive devices
//! through it exactly as a guest would, without KVM.

use virtio_queue::Queue;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress};

use super::queue::configured_queue;
use crate::vstate::memory::GuestMemory;

/// Descriptor flags.
pub const F_NEXT: u16 = 1;
/// Device-writable.
pub const F_WRITE: u16 = 2;
/// Indirect table.
pub const F_INDIRECT: u16 = 4;

/// A queue as its driver sees it.
#[derive(Debug)]
pub struct MockQueue {
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub avail: u64,
    /// Used ring.
    pub used: u64,
    /// Entries.
    pub size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl MockQueue {
    /// A queue of `size` entries laid out from `base` (which needs 16 * size + 4 KiB + 8 * size
    /// bytes of RAM).
    pub fn new(base: u64, size: u16) -> MockQueue {
        let n = u64::from(size);
        let desc = base;
        let avail = desc + 16 * n;
        let used = (avail + 6 + 2 * n + 4095) & !4095;
        MockQueue {
            desc,
            avail,
            used,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    /// The device-side queue for this layout, ready.
    pub fn device_queue(&self) -> Queue {
        configured_queue(self.size, self.size, self.desc, self.avail, self.used).unwrap_or_default()
    }

    /// Writes descriptor `index` of the table at `table`.
    pub fn write_desc(mem: &GuestMemory, table: u64, index: u16, d: (u64, u32, u16, u16)) {
        let desc = Descriptor::new(d.0, d.1, d.2, d.3);
        let _ = mem.write_obj(desc, GuestAddress(table + 16 * u64::from(index)));
    }

    /// Writes a chain of `(addr, len, writable)` buffers into consecutive free descriptors
    /// (wrapping around the table) and returns its head; does not publish it.
    pub fn add_chain(&mut self, mem: &GuestMemory, bufs: &[(u64, u32, bool)]) -> u16 {
        let head = self.next_desc;
        for (i, (addr, len, writable)) in bufs.iter().enumerate() {
            let index = self.next_desc;
            let next = (index + 1) % self.size;
            let mut flags = if *writable { F_WRITE } else { 0 };
            if i + 1 < bufs.len() {
                flags |= F_NEXT;
            }
            Self::write_desc(mem, self.desc, index, (*addr, *len, flags, next));
            self.next_desc = next;
        }
        head
    }

    /// Puts `head` in the available ring and moves the index.
    pub fn publish(&mut self, mem: &GuestMemory, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        let _ = mem.write_obj(head, GuestAddress(self.avail + 4 + 2 * slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = mem.write_obj(self.avail_idx, GuestAddress(self.avail + 2));
    }

    /// Sets the available index directly (for hostile tests).
    pub fn set_avail_idx(&mut self, mem: &GuestMemory, idx: u16) {
        self.avail_idx = idx;
        let _ = mem.write_obj(idx, GuestAddress(self.avail + 2));
    }

    /// The available index the driver published.
    pub fn avail_idx_value(&self) -> u16 {
        self.avail_idx
    }

    /// The used index the device published.
    pub fn used_idx(&self, mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap_or(0)
    }

    /// Used ring entry `i`: (head, length).
    pub fn used_elem(&self, mem: &GuestMemory, i: u16) -> (u32, u32) {
        let at = self.used + 4 + 8 * u64::from(i % self.size);
        let id = mem.read_obj(GuestAddress(at)).unwrap_or(u32::MAX);
        let len = mem.read_obj(GuestAddress(at + 4)).unwrap_or(u32::MAX);
        (id, len)
    }
}
