/*
 * smp: start every AP listed in the MP table with INIT, SIPI, SIPI (Intel
 * SDM "MP initialization", with its 10 ms / 200 us delays) through the BSP's
 * LAPIC ICR. Each AP runs arch/trampoline.S (real -> protected -> long mode
 * onto the guest's page tables), records its ids in ap_main() and parks.
 * APs are started one at a time, so they can share one trampoline and a
 * single "next stack" variable. INIT parks a started AP again, so the
 * scenario can run more than once.
 */
#include "boot.h"
#include "cpu.h"
#include "defs.h"
#include "entry.h"
#include "irq.h"
#include "lib.h"
#include "mm.h"
#include "mptable.h"
#include "report.h"
#include "scenario.h"

#define ICR_INIT            0x00000500
#define ICR_STARTUP         0x00000600
#define ICR_LEVEL_ASSERT    0x00004000
#define ICR_LEVEL_TRIGGER   0x00008000
#define ICR_BUSY            0x00001000
#define AP_START_TIMEOUT_MS 2000

/* Read by trampoline.S: the stack top of the AP being started. */
u64 ap_boot_stack;

struct ap_record {
    volatile u32 alive;
    u32 lapic_id;               /* LAPIC ID register >> 24 */
    u32 cpuid_apic_id;          /* CPUID leaf 1 initial APIC id */
};

static struct ap_record aps[MAX_CPUS];
static volatile u32 ap_index;   /* which record the starting AP fills */
/* triple-fault-ap: the AP started next waits for ap_fault_go, then triple-faults. */
static volatile u32 ap_fault_armed, ap_fault_go;

extern char ap_stacks[], ap_trampoline_start[], ap_trampoline_end[];

noreturn void ap_main(void)
{
    trap_load();
    struct ap_record *me = &aps[ap_index];
    me->lapic_id = lapic_id();
    me->cpuid_apic_id = cpu_initial_apic_id();
    barrier();
    me->alive = 1;
    if (ap_fault_armed) {
        while (!ap_fault_go)
            barrier();
        triple_fault();
    }
    halt_forever();
}

static bool send_ipi(u32 apic_id, u32 icr)
{
    if (!SPIN_UNTIL_MS(!(lapic_read(LAPIC_ICR_LOW) & ICR_BUSY), 100))
        return false;
    lapic_write(LAPIC_ICR_HIGH, apic_id << 24);
    lapic_write(LAPIC_ICR_LOW, icr);
    return SPIN_UNTIL_MS(!(lapic_read(LAPIC_ICR_LOW) & ICR_BUSY), 100);
}

static bool start_ap(u32 index, u32 apic_id)
{
    aps[index] = (struct ap_record){ 0 };
    ap_index = index;
    ap_boot_stack = (u64)(uintptr_t)ap_stacks + (u64)(index + 1) * STACK_SIZE;
    mb();

    const u32 sipi = ICR_STARTUP | (AP_TRAMPOLINE_ADDR >> 12);
    bool sent = send_ipi(apic_id, ICR_INIT | ICR_LEVEL_TRIGGER | ICR_LEVEL_ASSERT);
    delay_us(10000);
    sent &= send_ipi(apic_id, ICR_INIT | ICR_LEVEL_TRIGGER);   /* de-assert */
    sent &= send_ipi(apic_id, sipi);
    delay_us(200);
    sent &= send_ipi(apic_id, sipi);    /* ignored if the first one took */
    if (!sent)
        fail("smp", "icr-busy apic_id=%u", apic_id);
    return SPIN_UNTIL_MS(aps[index].alive, AP_START_TIMEOUT_MS);
}

/* Prints "a,b,c" (sorted) for the ok/fail lines. */
static void format_ids(char *buf, size_t size, u32 *ids, u32 n)
{
    for (u32 i = 1; i < n; i++)
        for (u32 j = i; j > 0 && ids[j - 1] > ids[j]; j--) {
            u32 t = ids[j];
            ids[j] = ids[j - 1];
            ids[j - 1] = t;
        }
    size_t len = 0;
    buf[0] = '\0';
    for (u32 i = 0; i < n && len < size; i++)
        len += ksnprintf(buf + len, size - len, i ? ",%u" : "%u", ids[i]);
}

/* The trampoline page must be RAM nobody else uses. */
static bool install_trampoline(void)
{
    u64 len = (u64)(ap_trampoline_end - ap_trampoline_start);
    const struct region *r = region_overlapping(AP_TRAMPOLINE_ADDR, AP_TRAMPOLINE_ADDR + PAGE_SIZE, "ap-trampoline");
    if (r) {
        fail("smp", "trampoline-busy=%s", r->what);
        return false;
    }
    if (!e820_ram_containing(AP_TRAMPOLINE_ADDR, AP_TRAMPOLINE_ADDR + PAGE_SIZE) || len > PAGE_SIZE) {
        fail("smp", "trampoline-not-ram addr=0x%x", AP_TRAMPOLINE_ADDR);
        return false;
    }
    region_add(AP_TRAMPOLINE_ADDR, AP_TRAMPOLINE_ADDR + PAGE_SIZE, "ap-trampoline");
    memcpy((void *)(uintptr_t)AP_TRAMPOLINE_ADDR, ap_trampoline_start, len);
    return true;
}

void scn_smp(const char *arg)
{
    (void)arg;
    const struct mp_info *m = mp_info();
    if (m->error) {
        fail("smp", "no-mptable=%s", m->error);
        return;
    }
    if (m->ncpus <= 1) {
        ok("smp", "cpus=1");
        return;
    }
    if (!install_trampoline())
        return;
    if (!lapic_enable()) {
        fail("smp", "no-xapic");
        return;
    }

    u32 bsp = lapic_id();
    u32 started_ids[MAX_CPUS], missing_ids[MAX_CPUS];
    u32 started = 0, missing = 0, expected = 0;
    bool good = true;
    started_ids[started++] = bsp;

    for (u32 i = 0; i < m->ncpus; i++) {
        u32 id = m->apic_ids[i];
        if (id == bsp)
            continue;
        u32 index = expected++;
        if (!start_ap(index, id)) {
            missing_ids[missing++] = id;
            continue;
        }
        started_ids[started++] = aps[index].lapic_id;
        if (aps[index].lapic_id != id || aps[index].cpuid_apic_id != id) {
            fail("smp", "apic-id-mismatch mptable=%u lapic=%u cpuid=%u",
                 id, aps[index].lapic_id, aps[index].cpuid_apic_id);
            good = false;
        }
    }

    char list[4 * MAX_CPUS + 1];
    if (missing) {
        format_ids(list, sizeof(list), missing_ids, missing);
        fail("smp", "started=%u/%u missing=%s", started - 1, expected, list);
        return;
    }
    format_ids(list, sizeof(list), started_ids, started);
    if (good)
        ok("smp", "started=%u/%u apic_ids=%s", started - 1, expected, list);
}

/*
 * triple-fault-ap: start the first AP of the MP table, make it (not the BSP)
 * triple-fault, and keep the BSP running: the VMM must stop the whole VM on
 * the AP's shutdown exit. If it does not within 5 s, the BSP says so and
 * resets the machine normally.
 */
void scn_triple_fault_ap(const char *arg)
{
    (void)arg;
    const struct mp_info *m = mp_info();
    if (m->error) {
        fail("triple-fault-ap", "no-mptable=%s", m->error);
        return;
    }
    if (m->ncpus <= 1) {
        fail("triple-fault-ap", "cpus=1");
        return;
    }
    if (!install_trampoline())
        return;
    if (!lapic_enable()) {
        fail("triple-fault-ap", "no-xapic");
        return;
    }
    u32 bsp = lapic_id(), id = bsp;
    for (u32 i = 0; i < m->ncpus && id == bsp; i++)
        id = m->apic_ids[i];
    ap_fault_armed = 1;
    ap_fault_go = 0;
    mb();
    if (!start_ap(0, id)) {
        fail("triple-fault-ap", "not-started apic_id=%u", id);
        return;
    }
    info("triple-fault-ap", "apic_id=%u now", id);
    ap_fault_go = 1;
    mb();
    delay_us(5000000);
    fail("triple-fault-ap", "still-running apic_id=%u", id);
}
