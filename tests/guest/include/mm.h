/*
 * Memory: the image's extent, a registry of physical ranges in use, access
 * to physical memory above 4 GiB, and a DMA buffer allocator.
 *
 * Page tables (arch/pagetables.S) identity-map [0, 4 GiB) with 2 MiB pages,
 * [3 GiB, 4 GiB) uncached. Physical memory above 4 GiB is reached only
 * through phys_window(), one movable 2 MiB window (BSP only).
 */
#ifndef KILN_MM_H
#define KILN_MM_H

#include "types.h"

#define PAGE_SIZE 4096ULL

/* Linker-script symbols (ld/image.ld). */
extern char __image_start[], __bss_start[], __bss_end[], _end[];

static inline u64 image_start(void) { return (u64)(uintptr_t)__image_start; }
static inline u64 image_end(void) { return (u64)(uintptr_t)_end; }

/*
 * Ranges the guest must never overwrite or treat as free: the image,
 * boot structures, command line, initrd, MP table, DMA arena...
 * Registering a range twice is harmless.
 */
struct region {
    u64 start, end;             /* [start, end) */
    const char *what;
};

void region_add(u64 start, u64 end, const char *what);
/*
 * First registered range overlapping [start, end), or NULL. Ranges named
 * `ignore` (NULL ignores none) are skipped, so a range
 * can be checked against everything but itself.
 */
const struct region *region_overlapping(u64 start, u64 end, const char *ignore);

/*
 * Pointer to physical address `paddr`. Below 4 GiB this is the identity
 * map. Above, it maps the 2 MiB-aligned frame around `paddr` at
 * PHYS_WINDOW_VA: the pointer is valid up to the end of that 2 MiB frame and
 * only until the next phys_window() call.
 */
void *phys_window(u64 paddr);

/* Copy between guest memory and any physical address (crosses windows). */
void phys_read(void *dst, u64 paddr, u64 n);
u8 phys_read8(u64 paddr);
u16 phys_read16(u64 paddr);
u32 phys_read32(u64 paddr);
u64 phys_read64(u64 paddr);

/*
 * Bump allocator for DMA buffers: page-aligned, zeroed, physically
 * contiguous, below 4 GiB (so virtual == physical, usable as a device
 * address). Carved from free e820 RAM after the image, avoiding every
 * registered region. Never freed. Returns NULL when out of space.
 */
void *dma_alloc(u64 size);
static inline u64 virt_to_phys(const void *p) { return (u64)(uintptr_t)p; }

#endif
