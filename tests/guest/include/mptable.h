/* The Intel MultiProcessor Specification 1.4 table, as VMMs write it. */
#ifndef KILN_MPTABLE_H
#define KILN_MPTABLE_H

#include "types.h"
#include "defs.h"

struct mp_info {
    bool found;
    u64 mpf_addr;               /* floating pointer structure */
    u64 table_addr;             /* "PCMP" configuration table */
    u32 table_len;
    u8 spec_rev;
    u32 lapic_addr;
    u32 ncpus;                  /* enabled processors */
    u8 apic_ids[MAX_CPUS];      /* enabled processors, table order */
    u8 bsp_count;
    u8 bsp_apic_id;
    u32 ioapic_count;
    u32 ioapic_addr;
    u32 irq_entries;            /* I/O interrupt assignment entries */
    const char *error;          /* first structural problem, or NULL */
};

/*
 * Finds and parses the MP table (cached after the first call) and registers
 * its memory as in use. Structural problems are left in ->error.
 */
const struct mp_info *mp_info(void);

#endif
