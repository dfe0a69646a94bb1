/*
 * memory: RAM really is where the e820 map says. For each RAM range above
 * 1 MiB, test the last page (and, from 4 GiB on, the first page): it must
 * read as zero (fresh memory), hold a written pattern, and is zeroed again
 * afterwards so the scenario can run twice. Pages in use (image, boot
 * structures, initrd, MP table, DMA) are never touched: the nearest free
 * page inward is taken instead.
 */
#include "boot.h"
#include "lib.h"
#include "mm.h"
#include "mptable.h"
#include "report.h"
#include "scenario.h"

#define WORDS (PAGE_SIZE / 8)

/* Distinct for every word of physical memory: catches aliasing too. */
static u64 pattern(u64 paddr)
{
    return (paddr * 0x9e3779b97f4a7c15ULL) ^ 0x5a5a5a5a5a5a5a5aULL;
}

static bool test_page(u64 page)
{
    volatile u64 *w = phys_window(page);
    for (u32 i = 0; i < WORDS; i++) {
        if (w[i] != 0) {
            fail("memory", "not-zero page=0x%llx offset=0x%x", page, i * 8);
            return false;
        }
    }
    for (u32 i = 0; i < WORDS; i++)
        w[i] = pattern(page + i * 8);
    bool good = true;
    for (u32 i = 0; i < WORDS && good; i++) {
        if (w[i] != pattern(page + i * 8)) {
            fail("memory", "mismatch page=0x%llx offset=0x%x", page, i * 8);
            good = false;
        }
    }
    for (u32 i = 0; i < WORDS; i++)
        w[i] = 0;
    return good;
}

/* Highest free page in [lo, page], or ~0 if none. */
static u64 free_page_down(u64 page, u64 lo)
{
    const struct region *r;
    while (page >= lo && (r = region_overlapping(page, page + PAGE_SIZE, NULL)) != NULL) {
        if (r->start < lo + PAGE_SIZE)
            return ~0ULL;
        page = ALIGN_DOWN(r->start, PAGE_SIZE) - PAGE_SIZE;
    }
    return page >= lo ? page : ~0ULL;
}

/* Lowest free page in [page, hi), or ~0 if none. */
static u64 free_page_up(u64 page, u64 hi)
{
    const struct region *r;
    while (page + PAGE_SIZE <= hi && (r = region_overlapping(page, page + PAGE_SIZE, NULL)) != NULL)
        page = ALIGN_UP(r->end, PAGE_SIZE);
    return page + PAGE_SIZE <= hi ? page : ~0ULL;
}

void scn_memory(const char *arg)
{
    (void)arg;
    u32 ranges = 0, pages = 0;
    bool good = true;

    mp_info();                  /* registers the MP table as in use */

    if (!e820_ram_containing(image_start(), image_end())) {
        fail("memory", "image-not-in-ram start=0x%llx end=0x%llx", image_start(), image_end());
        good = false;
    }
    for (u32 i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        u64 lo = ALIGN_UP(MAX(e->addr, 0x100000ULL), PAGE_SIZE);
        u64 hi = ALIGN_DOWN(e->addr + e->size, PAGE_SIZE);
        if (e->type != E820_RAM || hi <= lo)
            continue;
        ranges++;

        u64 last = free_page_down(hi - PAGE_SIZE, lo);
        if (last == ~0ULL) {
            fail("memory", "no-free-page range=0x%llx", e->addr);
            good = false;
            continue;
        }
        good &= test_page(last);
        pages++;

        if (e->addr >= 4 * GiB) {
            u64 first = free_page_up(lo, hi);
            if (first != ~0ULL && first != last) {
                good &= test_page(first);
                pages++;
            }
        }
    }
    if (good)
        ok("memory", "ranges=%u pages=%u", ranges, pages);
}
