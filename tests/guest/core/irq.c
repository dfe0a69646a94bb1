/* LAPIC (xAPIC MMIO), IOAPIC, legacy PIC masking, bounded interrupt waits. */
#include "boot.h"
#include "cpu.h"
#include "defs.h"
#include "io.h"
#include "irq.h"

#define APIC_BASE_ENABLE    (1ULL << 11)
#define APIC_BASE_X2APIC    (1ULL << 10)
#define SVR_ENABLE          0x100
#define LVT_MASKED          (1u << 16)
#define LVT_TIMER_PERIODIC  (1u << 17)
#define IOAPIC_REGSEL       0x00
#define IOAPIC_WIN          0x10
#define IOAPIC_VER          0x01
#define IOAPIC_REDIR(pin)   (0x10 + 2 * (pin))
#define REDIR_MASKED        (1u << 16)

void pic_mask_all(void)
{
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}

u32 lapic_read(u32 reg) { return mmio_read32(LAPIC_BASE + reg); }
void lapic_write(u32 reg, u32 value) { mmio_write32(LAPIC_BASE + reg, value); }
u32 lapic_id(void) { return lapic_read(LAPIC_ID) >> 24; }
void lapic_eoi(void) { lapic_write(LAPIC_EOI, 0); }

/* False if the LAPIC is not an xAPIC at LAPIC_BASE (the only kind handled). */
static bool lapic_usable(void)
{
    u64 base = rdmsr(MSR_APIC_BASE);
    return (base & APIC_BASE_ENABLE) && !(base & APIC_BASE_X2APIC)
        && (base & 0xfffff000ULL) == LAPIC_BASE;
}

bool lapic_enable(void)
{
    if (!lapic_usable())
        return false;
    lapic_write(LAPIC_TPR, 0);
    lapic_write(LAPIC_SVR, SVR_ENABLE | IRQ_VECTOR_SPURIOUS);
    return true;
}

u32 ioapic_read(u32 index)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, index);
    return mmio_read32(IOAPIC_BASE + IOAPIC_WIN);
}

void ioapic_write(u32 index, u32 value)
{
    mmio_write32(IOAPIC_BASE + IOAPIC_REGSEL, index);
    mmio_write32(IOAPIC_BASE + IOAPIC_WIN, value);
}

bool irq_route(u32 gsi, u8 vector, irq_handler handler)
{
    if (vector < 0x20 || vector >= IRQ_VECTOR_TIMER)
        return false;
    u32 max_pin = (ioapic_read(IOAPIC_VER) >> 16) & 0xff;
    if (gsi > max_pin || !lapic_enable())
        return false;
    irq_set_handler(vector, handler);
    /* High word first (destination), then the low word unmasks. */
    ioapic_write(IOAPIC_REDIR(gsi) + 1, lapic_id() << 24);
    /* Fixed delivery, physical destination, active high, edge: ISA style. */
    ioapic_write(IOAPIC_REDIR(gsi), vector);
    return true;
}

void irq_mask(u32 gsi)
{
    ioapic_write(IOAPIC_REDIR(gsi), REDIR_MASKED);
}

static void timer_tick(struct trap_frame *f)
{
    (void)f;
}

/*
 * KVM's LAPIC timer runs at 1 GHz (APIC_BUS_CYCLE_NS 1): divide by 16 and
 * count 625000 for a 10 ms period. Elsewhere the period differs; it only
 * bounds how long hlt may sleep between deadline checks.
 */
#define TIMER_DIVIDE_16     0x3
#define TIMER_COUNT         625000

bool wait_for_irq(volatile u32 *flag, u64 timeout_ms)
{
    bool timer = lapic_enable();
    if (timer) {
        irq_set_handler(IRQ_VECTOR_TIMER, timer_tick);
        lapic_write(LAPIC_TIMER_DIV, TIMER_DIVIDE_16);
        lapic_write(LAPIC_LVT_TIMER, LVT_TIMER_PERIODIC | IRQ_VECTOR_TIMER);
        lapic_write(LAPIC_TIMER_INIT, TIMER_COUNT);
    }
    u64 deadline = tsc_deadline_ms(timeout_ms);
    bool met;
    for (;;) {
        cli();
        if (*flag) {
            met = true;
            break;
        }
        if (tsc_passed(deadline)) {
            met = false;
            break;
        }
        if (timer) {
            sti_hlt();          /* an interrupt pending since cli wakes it at once */
        } else {
            sti();              /* no timer to bound hlt: poll instead */
            delay_us(100);
        }
    }
    cli();
    if (timer) {
        lapic_write(LAPIC_LVT_TIMER, LVT_MASKED);
        lapic_write(LAPIC_TIMER_INIT, 0);
    }
    return met;
}
