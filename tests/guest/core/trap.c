/*
 * IDT and trap dispatch. Exceptions are always fatal: the BSP reports the
 * fault and ends the run (done line, reset); an AP reports and parks.
 */
#include "boot.h"
#include "cpu.h"
#include "defs.h"
#include "entry.h"
#include "irq.h"
#include "report.h"

struct packed idt_gate {
    u16 offset_low;
    u16 selector;
    u8 ist;
    u8 type_attr;
    u16 offset_mid;
    u32 offset_high;
    u32 reserved;
};

#define GATE_INTERRUPT 0x8e     /* present, DPL 0, 64-bit interrupt gate (IF cleared) */

static struct idt_gate idt[256] aligned(16);
static irq_handler handlers[256];
extern char isr_stubs[];        /* arch/isr.S: 16 bytes per vector */

static void set_gate(u8 vector)
{
    u64 a = (u64)(uintptr_t)(isr_stubs + 16 * vector);
    idt[vector] = (struct idt_gate){
        .offset_low = (u16)a,
        .selector = KERNEL_CS,
        .type_attr = GATE_INTERRUPT,
        .offset_mid = (u16)(a >> 16),
        .offset_high = (u32)(a >> 32),
    };
}

void trap_load(void)
{
    struct desc_ptr d = { sizeof(idt) - 1, (u64)(uintptr_t)idt };
    lidt(&d);
}

void trap_init(void)
{
    /* Only exceptions and the spurious vector; device vectors are installed
     * on demand, so a stray interrupt shows up as #NP instead of vanishing. */
    for (u32 v = 0; v < 32; v++)
        set_gate((u8)v);
    set_gate(IRQ_VECTOR_SPURIOUS);
    trap_load();
}

void irq_set_handler(u8 vector, irq_handler handler)
{
    handlers[vector] = handler;
    barrier();
    set_gate(vector);
}

static u32 in_exception;

static noreturn void exception(struct trap_frame *f)
{
    bool bsp = cpu_initial_apic_id() == boot.bsp_apic_id;
    /* An exception while reporting one: do not recurse. */
    if (__atomic_fetch_add(&in_exception, 1, __ATOMIC_RELAXED) != 0) {
        if (bsp)
            machine_reset();
        halt_forever();
    }
    fail("exception", "vector=%llu rip=0x%llx error=0x%llx cr2=0x%llx",
         f->vector, f->rip, f->error, read_cr2());
    if (!bsp) {
        /* The BSP's run goes on (and counts this failure); this CPU parks. */
        __atomic_fetch_sub(&in_exception, 1, __ATOMIC_RELAXED);
        halt_forever();
    }
    finish();
}

void trap_dispatch(struct trap_frame *f)
{
    if (f->vector < 32)
        exception(f);
    if (f->vector == IRQ_VECTOR_SPURIOUS)
        return;                 /* spurious interrupts take no EOI */
    irq_handler h = handlers[f->vector];
    if (h)
        h(f);
    lapic_eoi();
}
