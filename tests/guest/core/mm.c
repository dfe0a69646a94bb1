/* In-use ranges, the physical window above 4 GiB and the DMA allocator. */
#include "boot.h"
#include "cpu.h"
#include "defs.h"
#include "lib.h"
#include "mm.h"
#include "report.h"

#define MAX_REGIONS 32

static struct region regions[MAX_REGIONS];
static u32 nregions;

void region_add(u64 start, u64 end, const char *what)
{
    if (end <= start)
        return;
    for (u32 i = 0; i < nregions; i++) {
        struct region *r = &regions[i];
        if (strcmp(r->what, what) != 0)
            continue;
        if (r->start <= start && end <= r->end)
            return;             /* already known */
        if (r->end == start) {  /* grows (the DMA arena): extend in place */
            r->end = end;
            return;
        }
    }
    if (nregions == MAX_REGIONS) {
        fail("memory", "region-table-full what=%s", what);
        return;
    }
    regions[nregions++] = (struct region){ start, end, what };
}

const struct region *region_overlapping(u64 start, u64 end, const char *ignore)
{
    for (u32 i = 0; i < nregions; i++) {
        const struct region *r = &regions[i];
        if (r->start < end && start < r->end && (!ignore || strcmp(r->what, ignore) != 0))
            return r;
    }
    return NULL;
}

/* arch/pagetables.S: entry 0 maps PHYS_WINDOW_VA. */
extern u64 kiln_window_pd[512];
static u64 window_frame = ~0ULL;

void *phys_window(u64 paddr)
{
    if (paddr < 4 * GiB)
        return (void *)(uintptr_t)paddr;
    u64 frame = ALIGN_DOWN(paddr, 2 * MiB);
    if (frame != window_frame) {
        kiln_window_pd[0] = frame | PTE_P | PTE_RW | PTE_PS;
        invlpg(PHYS_WINDOW_VA);
        window_frame = frame;
    }
    return (void *)(uintptr_t)(PHYS_WINDOW_VA + (paddr - frame));
}

void phys_read(void *dst, u64 paddr, u64 n)
{
    u8 *d = dst;
    while (n) {
        /* Never cross a 2 MiB frame within one window mapping. */
        u64 chunk = MIN(n, ALIGN_DOWN(paddr, 2 * MiB) + 2 * MiB - paddr);
        memcpy(d, phys_window(paddr), chunk);
        d += chunk;
        paddr += chunk;
        n -= chunk;
    }
}

#define PHYS_READ(bits)                                 \
    u##bits phys_read##bits(u64 paddr)                  \
    {                                                   \
        u##bits v;                                      \
        phys_read(&v, paddr, sizeof(v));                \
        return v;                                       \
    }
PHYS_READ(8)
PHYS_READ(16)
PHYS_READ(32)
PHYS_READ(64)

/* The next free byte for dma_alloc; 0 until first use. */
static u64 dma_next;

/* The RAM entry below 4 GiB holding [start, start + size), or the next one up. */
static bool dma_fit(u64 *start, u64 size)
{
    for (u32 i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        u64 lo = ALIGN_UP(MAX(e->addr, *start), PAGE_SIZE);
        u64 hi = MIN(e->addr + e->size, 4 * GiB);
        if (e->type != E820_RAM || e->addr + e->size <= *start || lo >= hi)
            continue;
        if (hi - lo >= size) {
            *start = lo;
            return true;
        }
    }
    return false;
}

void *dma_alloc(u64 size)
{
    size = ALIGN_UP(size ? size : 1, PAGE_SIZE);
    if (!dma_next)
        dma_next = ALIGN_UP(image_end(), PAGE_SIZE);
    /* Each round skips past one obstacle; the bound only guards bugs. */
    for (u32 round = 0; round < 2 * MAX_REGIONS + E820_MAX; round++) {
        u64 p = dma_next;
        if (!dma_fit(&p, size))
            return NULL;
        const struct region *r = region_overlapping(p, p + size, NULL);
        if (r) {
            dma_next = ALIGN_UP(r->end, PAGE_SIZE);
            continue;
        }
        region_add(p, p + size, "dma");
        dma_next = p + size;
        return memset((void *)(uintptr_t)p, 0, size);
    }
    return NULL;
}
