//! The allocator, configured so that no allocation on any thread makes a system call
//! outside that thread's filter. kiln is a static binary linked with either libc: glibc
//! (`cargo build`, the default target) or musl (`--target x86_64-unknown-linux-musl`, the
//! release build, as Firecracker ships). Every filter allows what either libc's malloc does
//! once configured here.
//!
//! **glibc**'s malloc reaches for system calls no filter should need: a thread's own arena
//! (a "heap" of its own) grows with `mprotect`, and the first time one shrinks it opens
//! `/proc/sys/vm/overcommit_memory`; the first arena made for a new thread reads
//! `/sys/devices/system/cpu/online` to size the arena limit; a block over the mmap threshold
//! (128 KiB, adjusted upwards at run time) is `mmap`ed and, grown by `realloc`, `mremap`ed.
//! Which of those happen depends on what clients and guests make the threads allocate, so
//! allowing them one by one would never be finished. Instead, before any thread exists,
//! kiln pins two of malloc's parameters:
//! - `M_ARENA_MAX = 1`: every thread allocates from the main arena, which grows and shrinks
//!   with `brk` only (and, if `brk` ever fails, takes plain read-write anonymous `mmap`s);
//!   no per-thread heaps, so no `mprotect`, no `/proc` read, no CPU count;
//! - `M_MMAP_MAX = 0`: no allocation is served by its own mapping, so `realloc` never
//!   `mremap`s and `free` never `munmap`s.
//!
//! What is left for glibc's malloc is `brk` and `mmap(PROT_READ | PROT_WRITE)`. The cost: one
//! lock for every thread's allocations (kiln's threads allocate little on their hot paths),
//! and large freed blocks in the middle of the heap are reused rather than returned to the
//! host (the top of the heap is still trimmed with `brk`).
//!
//! **musl**'s malloc (mallocng) has no arenas and no tunables, and its system calls do not
//! depend on which thread allocates or on anything read from the file system: `brk` for its
//! first metadata pages; `mmap(PROT_NONE)` to reserve a metadata area and
//! `mprotect(PROT_READ | PROT_WRITE)` to open it a page at a time; `mmap(PROT_READ |
//! PROT_WRITE)` for groups of small blocks and for each large one; `munmap` and `madvise`
//! to give memory back; `mremap(MREMAP_MAYMOVE)` when `realloc` grows a large block. Every
//! filter allows exactly those, so [`pin_allocator`] has nothing to do there.

/// Errors configuring the allocator.
#[derive(Debug, thiserror::Error)]
pub enum MallocError {
    /// glibc refused a parameter.
    #[error("cannot configure malloc: mallopt({0}) failed")]
    Mallopt(&'static str),
}

/// Pins glibc's malloc to the main arena and to no per-allocation mappings. Must run before
/// kiln starts its first thread (the arena limit is read when a second thread first
/// allocates).
#[cfg(target_env = "gnu")]
pub fn pin_allocator() -> Result<(), MallocError> {
    let params = [
        (libc::M_ARENA_MAX, 1, "M_ARENA_MAX, 1"),
        (libc::M_MMAP_MAX, 0, "M_MMAP_MAX, 0"),
    ];
    for (param, value, name) in params {
        // SAFETY: mallopt only sets a malloc parameter; these two are valid with these values.
        if unsafe { libc::mallopt(param, value) } != 1 {
            return Err(MallocError::Mallopt(name));
        }
    }
    Ok(())
}

/// musl's malloc needs no configuration (see the module documentation).
#[cfg(not(target_env = "gnu"))]
pub fn pin_allocator() -> Result<(), MallocError> {
    Ok(())
}
