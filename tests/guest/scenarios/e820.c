/* e820: the memory map, printed and checked for consistency. */
#include "boot.h"
#include "report.h"
#include "scenario.h"

void scn_e820(const char *arg)
{
    (void)arg;
    bool good = true;
    u64 ram = 0, prev_end = 0;

    if (boot.e820_reported > E820_MAX) {
        fail("e820", "entries=%u max=%u", boot.e820_reported, E820_MAX);
        good = false;
    }
    if (boot.e820_count == 0) {
        fail("e820", "entries=0");
        return;
    }
    for (u32 i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        const char *name = e820_type_name(e->type);
        u64 last = e->addr + e->size - 1;       /* inclusive end */
        if (name)
            info("e820", "0x%016llx-0x%016llx %s", e->addr, last, name);
        else
            info("e820", "0x%016llx-0x%016llx type=%u", e->addr, last, e->type);

        if (e->size == 0 || last < e->addr) {
            fail("e820", "bad-size index=%u", i);
            good = false;
            continue;
        }
        if (i > 0 && e->addr < prev_end) {
            fail("e820", "unsorted-or-overlapping index=%u", i);
            good = false;
        }
        prev_end = last + 1;
        if (e->type == E820_RAM)
            ram += e->size;
    }
    /* Linux needs RAM at 0 (real-mode area, trampolines) and at 1 MiB. */
    if (!e820_ram_containing(0, 1)) {
        fail("e820", "no-ram-at=0x0");
        good = false;
    }
    if (!e820_ram_containing(0x100000, 0x100001)) {
        fail("e820", "no-ram-at=0x100000");
        good = false;
    }
    if (good)
        ok("e820", "entries=%u ram_kib=%llu", boot.e820_count, ram / 1024);
}
