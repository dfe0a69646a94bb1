/* initrd: placement rules and a checksum of the contents. */
#include "boot.h"
#include "lib.h"
#include "mm.h"
#include "mptable.h"
#include "report.h"
#include "scenario.h"

void scn_initrd(const char *arg)
{
    (void)arg;
    u64 start = boot.initrd_addr, size = boot.initrd_size, end = start + size;

    if (!size) {
        ok("initrd", "none");
        return;
    }
    mp_info();                  /* registers the MP table, for the overlap check */
    if (end < start || !e820_ram_containing(start, end)) {
        fail("initrd", "not-in-ram addr=0x%llx size=%llu", start, size);
        return;
    }
    /* Image, command line, zero page / start_info, ... (all but itself). */
    const struct region *r = region_overlapping(start, end, "initrd");
    if (r) {
        fail("initrd", "overlaps=%s addr=0x%llx size=%llu", r->what, start, size);
        return;
    }
    /* FNV-1a over every byte, one 2 MiB window at a time. */
    u32 hash = FNV1A32_INIT;
    for (u64 p = start; p < end;) {
        u64 chunk = MIN(end - p, ALIGN_DOWN(p, 2 * MiB) + 2 * MiB - p);
        hash = fnv1a32(hash, phys_window(p), chunk);
        p += chunk;
    }
    ok("initrd", "size=%llu fnv1a=0x%08x", size, hash);
}
