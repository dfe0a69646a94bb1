/*
 * acpi: the ACPI tables, found and checked by the specification (ACPI 6.5,
 * chapter 5.2), not by what any VMM is known to write:
 *  - the RSDP by the spec's search (5.2.5.1): the first KiB of the EBDA
 *    (segment at BDA 0x40e), then 0xe0000-0xfffff, on 16-byte boundaries;
 *    signature "RSD PTR ", the ACPI 1.0 checksum over 20 bytes and, from
 *    revision 2 on, the extended checksum over its length. A pointer the
 *    boot protocol handed over (zero page acpi_rsdp_addr, PVH rsdp_paddr)
 *    must name the same RSDP;
 *  - every table the XSDT (or, without one, the RSDT) lists, and the DSDT
 *    the FADT names: signature, length, checksum;
 *  - the MADT: the local APIC address, one enabled local APIC per CPU with
 *    the APIC ids of the MP table's processors, the IOAPIC at 0xfec00000;
 *  - the DSDT: one "LNRO0005" (virtio-mmio) device per virtio_mmio.device=
 *    on the command line with the same window (Memory32Fixed) and GSI
 *    (Extended Interrupt), found by a byte-level search of the AML; COM1
 *    (PNP0501 with ports 0x3f8).
 */
#include "boot.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "mptable.h"
#include "report.h"
#include "scenario.h"
#include "virtio.h"

#define RSDP_V1_SIZE    20
#define SDT_HEADER_SIZE 36
#define TABLE_MAX       (64 * 1024)     /* larger is a VMM bug here */
#define DSDT_MAX        8192
#define MAX_TABLES      16

/* AML: String "LNRO0005" and the resource descriptors kept in _CRS. */
static const u8 aml_lnro0005[] = { 0x0d, 'L', 'N', 'R', 'O', '0', '0', '0', '5', 0x00 };
static const u8 aml_pnp0501[] = { 0x0c, 0x41, 0xd0, 0x05, 0x01 };   /* DWord EISAID */
#define DESC_MEMORY32_FIXED 0x86        /* large item, 9 bytes of data */
#define DESC_EXT_IRQ        0x89        /* large item, 6+ bytes of data */
#define DESC_IO             0x47        /* small item, 7 bytes of data */

static u8 dsdt[DSDT_MAX];

static u8 checksum(u64 addr, u32 len)
{
    u8 sum = 0;
    for (u32 i = 0; i < len; i++)
        sum += phys_read8(addr + i);
    return sum;
}

static bool is_rsdp(u64 a)
{
    static const char sig[8] = "RSD PTR ";
    for (u32 i = 0; i < 8; i++)
        if (phys_read8(a + i) != (u8)sig[i])
            return false;
    return checksum(a, RSDP_V1_SIZE) == 0;
}

static u64 scan(u64 base, u64 len)
{
    for (u64 a = base; a + RSDP_V1_SIZE <= base + len; a += 16)
        if (is_rsdp(a))
            return a;
    return 0;
}

static u64 find_rsdp(void)
{
    u64 ebda = (u64)phys_read16(0x40e) << 4;
    u64 a;
    if (ebda && (a = scan(ebda, 0x400)))
        return a;
    return scan(0xe0000, 0x20000);
}

/* A table's length after checking its header and checksum; 0 (and a fail line) if bad. */
static u32 check_table(u64 addr, const char *want_sig, char sig[5])
{
    for (u32 i = 0; i < 4; i++)
        sig[i] = (char)phys_read8(addr + i);
    sig[4] = '\0';
    if (want_sig && memcmp(sig, want_sig, 4) != 0) {
        fail("acpi", "signature at=0x%llx got=%s want=%s", addr, sig, want_sig);
        return 0;
    }
    u32 len = phys_read32(addr + 4);
    if (len < SDT_HEADER_SIZE || len > TABLE_MAX) {
        fail("acpi", "length table=%s len=%u", sig, len);
        return 0;
    }
    if (checksum(addr, len) != 0) {
        fail("acpi", "checksum table=%s", sig);
        return 0;
    }
    return len;
}

struct madt_result {
    u32 ncpus;
    u8 apic_ids[MAX_CPUS];
    u32 ioapics;
    u32 ioapic_addr;
    u32 lapic_addr;
};

static bool walk_madt(u64 t, u32 len, struct madt_result *r)
{
    r->lapic_addr = phys_read32(t + 36);
    for (u32 off = 44; off < len;) {
        if (off + 2 > len) {
            fail("acpi", "madt-truncated-entry off=%u", off);
            return false;
        }
        u8 type = phys_read8(t + off), elen = phys_read8(t + off + 1);
        if (elen < 2 || off + elen > len) {
            fail("acpi", "madt-entry-length type=%u len=%u off=%u", type, elen, off);
            return false;
        }
        if (type == 0 && elen >= 8) {               /* Processor Local APIC */
            u8 apic_id = phys_read8(t + off + 3);
            u32 flags = phys_read32(t + off + 4);
            if (flags & 1) {
                for (u32 j = 0; j < r->ncpus; j++)
                    if (r->apic_ids[j] == apic_id) {
                        fail("acpi", "madt-duplicate-apic-id=%u", apic_id);
                        return false;
                    }
                if (r->ncpus == MAX_CPUS) {
                    fail("acpi", "madt-too-many-cpus");
                    return false;
                }
                r->apic_ids[r->ncpus++] = apic_id;
            }
        } else if (type == 1 && elen >= 12) {       /* I/O APIC */
            if (r->ioapics++ == 0)
                r->ioapic_addr = phys_read32(t + off + 4);
        }
        off += elen;
    }
    return true;
}

static size_t find(const u8 *hay, size_t n, size_t from, const u8 *needle, size_t m)
{
    for (size_t i = from; i + m <= n; i++)
        if (memcmp(hay + i, needle, m) == 0)
            return i;
    return n;
}

static u32 rd32le(const u8 *p) { u32 v; memcpy(&v, p, 4); return v; }

struct aml_device { u32 base, size, gsi; u8 irq_flags; bool has_window, has_irq; };

/*
 * The virtio-mmio devices of the DSDT: each "LNRO0005" string starts one,
 * which ends where the next starts; its Memory32Fixed and first Extended
 * Interrupt descriptor in between are its window and GSI.
 */
static u32 dsdt_virtio(u32 len, struct aml_device *out, u32 max)
{
    u32 n = 0;
    size_t at = find(dsdt, len, SDT_HEADER_SIZE, aml_lnro0005, sizeof(aml_lnro0005));
    while (at < len && n < max) {
        size_t next = find(dsdt, len, at + 1, aml_lnro0005, sizeof(aml_lnro0005));
        struct aml_device *d = &out[n++];
        memset(d, 0, sizeof(*d));
        for (size_t i = at; i < next; i++) {
            if (!d->has_window && dsdt[i] == DESC_MEMORY32_FIXED && i + 12 <= next
                && dsdt[i + 1] == 9 && dsdt[i + 2] == 0) {
                d->base = rd32le(&dsdt[i + 4]);
                d->size = rd32le(&dsdt[i + 8]);
                d->has_window = true;
            } else if (!d->has_irq && dsdt[i] == DESC_EXT_IRQ && i + 9 <= next
                       && dsdt[i + 1] >= 6 && dsdt[i + 2] == 0 && dsdt[i + 4] >= 1) {
                d->irq_flags = dsdt[i + 3];
                d->gsi = rd32le(&dsdt[i + 5]);
                d->has_irq = true;
            }
        }
        at = next;
    }
    return n;
}

/* COM1: a PNP0501 device whose I/O descriptor covers 0x3f8. */
static bool dsdt_com1(u32 len)
{
    size_t at = find(dsdt, len, SDT_HEADER_SIZE, aml_pnp0501, sizeof(aml_pnp0501));
    for (; at < len; at = find(dsdt, len, at + 1, aml_pnp0501, sizeof(aml_pnp0501))) {
        size_t end = find(dsdt, len, at + 1, aml_pnp0501, sizeof(aml_pnp0501));
        for (size_t i = at; i + 8 <= end; i++)
            if (dsdt[i] == DESC_IO && dsdt[i + 2] == 0xf8 && dsdt[i + 3] == 0x03)
                return true;
    }
    return false;
}

static bool check_dsdt(u64 addr, u32 *virtio_count, bool *com1)
{
    char sig[5];
    u32 len = check_table(addr, "DSDT", sig);
    if (!len)
        return false;
    if (len > DSDT_MAX) {
        fail("acpi", "dsdt-too-large len=%u", len);
        return false;
    }
    phys_read(dsdt, addr, len);

    struct aml_device found[VIRTIO_MAX_DEVICES];
    u32 n = dsdt_virtio(len, found, VIRTIO_MAX_DEVICES);
    struct virtio_dev *devs;
    u32 want = virtio_mmio_scan(&devs);
    bool good = true;
    if (n != want) {
        fail("acpi", "dsdt-virtio-devices=%u cmdline=%u", n, want);
        good = false;
    }
    for (u32 i = 0; i < want; i++) {
        const struct virtio_mmio_slot *s = &devs[i].slot;
        bool matched = false;
        for (u32 j = 0; j < n; j++)
            if (found[j].has_window && found[j].has_irq && found[j].base == s->base
                && found[j].size == s->size && found[j].gsi == s->gsi)
                matched = true;
        if (!matched) {
            fail("acpi", "dsdt-no-device base=0x%llx size=0x%llx gsi=%u", s->base, s->size, s->gsi);
            good = false;
        }
    }
    *virtio_count = n;
    *com1 = dsdt_com1(len);
    return good;
}

void scn_acpi(const char *arg)
{
    (void)arg;
    u64 rsdp = find_rsdp();
    if (!rsdp) {
        fail("acpi", "no-rsdp");
        return;
    }
    u8 rev = phys_read8(rsdp + 15);
    u64 handed = boot.protocol == BOOT_PROTO_PVH ? boot.pvh.rsdp_paddr : boot.acpi_rsdp_addr;
    if (handed && handed != rsdp) {
        fail("acpi", "handed-rsdp=0x%llx found=0x%llx", handed, rsdp);
        return;
    }

    /* The root table: the XSDT from revision 2 on (if it has one), else the RSDT. */
    u64 root = 0;
    u32 entry_size = 4;
    const char *root_sig = "RSDT";
    if (rev >= 2) {
        u32 len = phys_read32(rsdp + 20);
        if (len < 36 || len > 4096 || checksum(rsdp, len) != 0) {
            fail("acpi", "rsdp-extended length=%u", len);
            return;
        }
        root = phys_read64(rsdp + 24);
        entry_size = 8;
        root_sig = "XSDT";
    }
    if (!root) {
        root = phys_read32(rsdp + 16);
        entry_size = 4;
        root_sig = "RSDT";
    }
    char sig[5];
    u32 root_len = root ? check_table(root, root_sig, sig) : 0;
    if (!root_len) {
        if (!root)
            fail("acpi", "no-root-table");
        return;
    }

    char names[MAX_TABLES * 5 + 1] = "";
    size_t names_len = 0;
    u64 fadt = 0, madt = 0;
    u32 fadt_len = 0, madt_len = 0;
    u32 count = (root_len - SDT_HEADER_SIZE) / entry_size;
    if (count > MAX_TABLES) {
        fail("acpi", "root-entries=%u", count);
        return;
    }
    for (u32 i = 0; i < count; i++) {
        u64 e = root + SDT_HEADER_SIZE + (u64)i * entry_size;
        u64 t = entry_size == 8 ? phys_read64(e) : phys_read32(e);
        u32 len = check_table(t, NULL, sig);
        if (!len)
            return;
        if (names_len)
            names[names_len++] = ',';
        memcpy(names + names_len, sig, 4);
        names_len += 4;
        names[names_len] = '\0';
        if (memcmp(sig, "FACP", 4) == 0) {
            fadt = t;
            fadt_len = len;
        } else if (memcmp(sig, "APIC", 4) == 0) {
            madt = t;
            madt_len = len;
        }
    }
    info("acpi", "rsdp=0x%llx revision=%u root=%s tables=%s", rsdp, rev, root_sig, names);
    if (!fadt || !madt) {
        fail("acpi", "missing fadt=%d madt=%d", fadt != 0, madt != 0);
        return;
    }

    /* FADT: X_DSDT (offset 140) when the table is long enough and it is set, else DSDT (40). */
    u64 dsdt_addr = fadt_len >= 148 ? phys_read64(fadt + 140) : 0;
    if (!dsdt_addr)
        dsdt_addr = phys_read32(fadt + 40);
    u32 flags = fadt_len >= 116 ? phys_read32(fadt + 112) : 0;
    u32 virtio = 0;
    bool com1 = false;
    if (!dsdt_addr) {
        fail("acpi", "fadt-no-dsdt");
        return;
    }
    bool good = check_dsdt(dsdt_addr, &virtio, &com1);

    struct madt_result m;
    memset(&m, 0, sizeof(m));
    if (!walk_madt(madt, madt_len, &m))
        return;
    if (m.lapic_addr != LAPIC_BASE) {
        fail("acpi", "madt-lapic=0x%x", m.lapic_addr);
        good = false;
    }
    if (m.ioapics != 1 || m.ioapic_addr != IOAPIC_BASE) {
        fail("acpi", "madt-ioapics=%u ioapic=0x%x", m.ioapics, m.ioapic_addr);
        good = false;
    }
    /* The same processors as the MP table, and the CPU running this among them. */
    const struct mp_info *mp = mp_info();
    if (!mp->error && mp->ncpus != m.ncpus) {
        fail("acpi", "madt-cpus=%u mptable-cpus=%u", m.ncpus, mp->ncpus);
        good = false;
    }
    bool bsp_listed = false;
    char ids[MAX_CPUS * 4 + 1] = "";
    size_t ids_len = 0;
    for (u32 i = 0; i < m.ncpus; i++) {
        if (m.apic_ids[i] == boot.bsp_apic_id)
            bsp_listed = true;
        if (!mp->error && (i >= mp->ncpus || mp->apic_ids[i] != m.apic_ids[i])) {
            fail("acpi", "madt-apic-id[%u]=%u mptable=%u", i, m.apic_ids[i],
                 i < mp->ncpus ? mp->apic_ids[i] : 0xff);
            good = false;
        }
        ids_len += (size_t)ksnprintf(ids + ids_len, sizeof(ids) - ids_len, "%s%u",
                                     i ? "," : "", m.apic_ids[i]);
    }
    if (!bsp_listed) {
        fail("acpi", "madt-no-bsp apic_id=%u", boot.bsp_apic_id);
        good = false;
    }
    if (!com1) {
        fail("acpi", "dsdt-no-com1");
        good = false;
    }
    if (good)
        ok("acpi", "cpus=%u apic_ids=%s ioapic=0x%x virtio=%u com1=1 hw_reduced=%u",
           m.ncpus, ids, m.ioapic_addr, virtio, (flags >> 20) & 1);
}
