/* Output protocol lines, the result counters, and the end of a run. */
#include "console.h"
#include "cpu.h"
#include "io.h"
#include "report.h"

static u32 n_ok, n_fail;

static void line(const char *kind, const char *name, const char *fmt, va_list ap)
{
    console_lock();
    kprintf("%s %s", kind, name);
    if (fmt[0]) {
        kprintf(" ");
        kvprintf(fmt, ap);
    }
    kprintf("\n");
    console_unlock();
}

#define LINE(kind, name, fmt)                   \
    do {                                        \
        va_list ap;                             \
        va_start(ap, fmt);                      \
        line(kind, name, fmt, ap);              \
        va_end(ap);                             \
    } while (0)

void ok(const char *check, const char *fmt, ...)
{
    __atomic_fetch_add(&n_ok, 1, __ATOMIC_RELAXED);
    LINE("ok", check, fmt);
}

void fail(const char *check, const char *fmt, ...)
{
    __atomic_fetch_add(&n_fail, 1, __ATOMIC_RELAXED);
    LINE("fail", check, fmt);
}

void info(const char *topic, const char *fmt, ...)
{
    LINE("info", topic, fmt);
}

void bench(const char *topic, const char *fmt, ...)
{
    LINE("bench", topic, fmt);
}

u32 fail_count(void)
{
    return __atomic_load_n(&n_fail, __ATOMIC_RELAXED);
}

noreturn void finish(void)
{
    kprintf("kiln-guest: done ok=%u fail=%u\n",
            __atomic_load_n(&n_ok, __ATOMIC_RELAXED), fail_count());
    machine_reset();
}

noreturn void machine_reset(void)
{
    cli();
    /* i8042: wait (bounded) for the input buffer to drain (status bit 1). */
    SPIN_UNTIL_MS(!(inb(0x64) & 0x02), 10);
    outb(0x64, 0xfe);           /* pulse the CPU reset line */
    /* A VMM acts on that exit; real hardware may take a moment. */
    delay_us(100000);
    triple_fault();
}

noreturn void triple_fault(void)
{
    static const struct desc_ptr no_idt = { 0, 0 };
    cli();
    lidt(&no_idt);
    /* #UD cannot be delivered -> #GP cannot -> #DF cannot -> shutdown. */
    asm volatile("ud2");
    halt_forever();
}
