/*
 * mptable: the MP floating pointer and configuration table (Intel MP spec
 * 1.4), searched exactly where Linux looks (default_find_smp_config), then
 * walked entry by entry. smp.c uses the parsed CPU list.
 */
#include "boot.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "mptable.h"
#include "report.h"
#include "scenario.h"

#define MPF_SIGNATURE   0x5f504d5f      /* "_MP_" */
#define MPC_SIGNATURE   0x504d4350      /* "PCMP" */
#define MPC_HEADER_SIZE 44
#define MP_PROCESSOR    0
#define MP_BUS          1
#define MP_IOAPIC       2
#define MP_INTSRC       3
#define MP_LINTSRC      4
#define CPU_ENABLED     0x01
#define CPU_BSP         0x02
#define IOAPIC_ENABLED  0x01

static struct mp_info mp;
static bool mp_parsed;

/* All MP structures are below 4 GiB (32-bit pointers): identity-mapped. */
static const u8 *ptr(u64 paddr) { return (const u8 *)(uintptr_t)paddr; }
static u16 rd16(u64 a) { u16 v; memcpy(&v, ptr(a), 2); return v; }
static u32 rd32(u64 a) { u32 v; memcpy(&v, ptr(a), 4); return v; }

static u8 checksum(u64 addr, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += ptr(addr)[i];
    return sum;
}

/* A valid floating pointer in [base, base + len), 16-byte aligned, or 0. */
static u64 scan(u64 base, u64 len)
{
    for (u64 a = base; a + 16 <= base + len; a += 16) {
        if (rd32(a) != MPF_SIGNATURE)
            continue;
        if (ptr(a)[8] != 1) {               /* length, in 16-byte units */
            mp.error = "mpf-length";
            continue;
        }
        if (checksum(a, 16) != 0) {
            mp.error = "mpf-checksum";
            continue;
        }
        if (ptr(a)[9] != 1 && ptr(a)[9] != 4) {
            mp.error = "mpf-spec-revision";
            continue;
        }
        mp.error = NULL;
        return a;
    }
    return 0;
}

static u64 find_floating_pointer(void)
{
    u64 a;
    /* Linux's order: first KiB, last KiB of 640 KiB, BIOS ROM, then the EBDA. */
    if ((a = scan(0x0, 0x400)) || (a = scan(639 * 0x400, 0x400)) || (a = scan(0xf0000, 0x10000)))
        return a;
    u64 ebda = (u64)rd16(0x40e) << 4;       /* BDA: EBDA segment */
    if (ebda && (a = scan(ebda, 0x400)))
        return a;
    return 0;
}

static void walk_entries(u64 table, u32 len, u16 count)
{
    u64 off = MPC_HEADER_SIZE;
    for (u32 i = 0; i < count; i++) {
        if (off >= len) {
            mp.error = "entries-beyond-length";
            return;
        }
        u8 type = ptr(table + off)[0];
        u32 size = type == MP_PROCESSOR ? 20 : 8;
        if (type > MP_LINTSRC) {
            mp.error = "unknown-entry-type";
            return;
        }
        if (off + size > len) {
            mp.error = "entries-beyond-length";
            return;
        }
        const u8 *e = ptr(table + off);
        if (type == MP_PROCESSOR) {
            u8 id = e[1], flags = e[3];
            if (flags & CPU_BSP) {
                mp.bsp_count++;
                mp.bsp_apic_id = id;
            }
            if (flags & CPU_ENABLED) {
                for (u32 j = 0; j < mp.ncpus; j++)
                    if (mp.apic_ids[j] == id)
                        mp.error = "duplicate-apic-id";
                if (mp.ncpus == MAX_CPUS)
                    mp.error = "too-many-cpus";
                else
                    mp.apic_ids[mp.ncpus++] = id;
            }
        } else if (type == MP_IOAPIC && (e[3] & IOAPIC_ENABLED)) {
            if (mp.ioapic_count++ == 0)
                mp.ioapic_addr = rd32(table + off + 4);
        } else if (type == MP_INTSRC) {
            mp.irq_entries++;
        }
        off += size;
    }
    if (off != len && !mp.error)
        mp.error = "length-mismatch";
}

const struct mp_info *mp_info(void)
{
    if (mp_parsed)
        return &mp;
    mp_parsed = true;

    u64 mpf = find_floating_pointer();
    if (!mpf) {
        if (!mp.error)
            mp.error = "not-found";
        return &mp;
    }
    mp.found = true;
    mp.mpf_addr = mpf;
    mp.spec_rev = ptr(mpf)[9];
    region_add(mpf, mpf + 16, "mptable");

    u64 table = rd32(mpf + 4);
    if (!table) {
        mp.error = "default-configuration";  /* feature byte 1 set: no table */
        return &mp;
    }
    mp.table_addr = table;
    if (rd32(table) != MPC_SIGNATURE) {
        mp.error = "pcmp-signature";
        return &mp;
    }
    u32 len = rd16(table + 4);
    u32 ext_len = rd16(table + 40);
    mp.table_len = len;
    region_add(table, table + len + ext_len, "mptable");
    if (len < MPC_HEADER_SIZE) {
        mp.error = "pcmp-length";
        return &mp;
    }
    if (checksum(table, len) != 0) {
        mp.error = "pcmp-checksum";
        return &mp;
    }
    mp.lapic_addr = rd32(table + 36);
    walk_entries(table, len, rd16(table + 34));
    return &mp;
}

void scn_mptable(const char *arg)
{
    (void)arg;
    const struct mp_info *m = mp_info();
    if (m->error) {
        fail("mptable", "%s", m->error);
        return;
    }
    info("mptable", "mpf=0x%llx table=0x%llx length=%u spec=1.%u",
         m->mpf_addr, m->table_addr, m->table_len, m->spec_rev);

    bool good = true;
    if (m->bsp_count != 1) {
        fail("mptable", "bsp-count=%u", m->bsp_count);
        good = false;
    } else if (m->bsp_apic_id != boot.bsp_apic_id) {
        fail("mptable", "bsp-apic-id=%u running-on=%u", m->bsp_apic_id, boot.bsp_apic_id);
        good = false;
    }
    if (m->ncpus == 0) {
        fail("mptable", "cpus=0");
        good = false;
    }
    if (m->lapic_addr != LAPIC_BASE) {
        fail("mptable", "lapic=0x%x", m->lapic_addr);
        good = false;
    }
    if (m->ioapic_count == 0 || m->ioapic_addr != IOAPIC_BASE) {
        fail("mptable", "ioapics=%u ioapic=0x%x", m->ioapic_count, m->ioapic_addr);
        good = false;
    }
    if (good)
        ok("mptable", "cpus=%u ioapic=0x%x irq_entries=%u", m->ncpus, m->ioapic_addr, m->irq_entries);
}
