/*
 * COM1 output. Line-oriented ASCII with '\n' line ends; the VMM (or a test)
 * reads it from the emulated UART.
 */
#include "console.h"
#include "cpu.h"
#include "io.h"
#include "lib.h"

/* Bytes that may still be written before the TX FIFO must be checked. */
static u32 tx_room;

void serial_init(void)
{
    outb(COM1 + UART_IER, 0x00);        /* no interrupts until a scenario asks */
    outb(COM1 + UART_LCR, 0x80);        /* DLAB: divisor follows */
    outb(COM1 + 0, 0x01);               /* 115200 baud (divisor 1) */
    outb(COM1 + 1, 0x00);
    outb(COM1 + UART_LCR, 0x03);        /* 8N1 */
    outb(COM1 + UART_FCR, 0x07);        /* enable and clear both FIFOs */
    outb(COM1 + UART_MCR, 0x0b);        /* DTR, RTS, OUT2 (IRQ line enable on PCs) */
    tx_room = 0;
}

static void serial_putc(char c)
{
    if (tx_room == 0) {
        /*
         * THRE set means the whole 16-byte FIFO is empty. Bounded: a UART
         * that never drains must not hang the guest (output is then lost).
         */
        SPIN_UNTIL_MS(inb(COM1 + UART_LSR) & UART_LSR_THRE, 50);
        tx_room = 16;
    }
    outb(COM1 + UART_THR, (u8)c);
    tx_room--;
}

void serial_write(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        serial_putc(s[i]);
}

/*
 * Console lock, so that an AP reporting an exception cannot interleave with
 * the BSP mid-line. The owner's APIC id makes it re-entrant for the
 * exception path (an exception while printing must not deadlock), and
 * acquisition is bounded so a CPU that died holding it cannot hang us.
 */
static volatile u32 console_owner = ~0u;
static u32 console_depth;

static bool console_try_lock(u32 me)
{
    u32 expected = ~0u;
    return __atomic_compare_exchange_n(&console_owner, &expected, me, false,
                                       __ATOMIC_ACQUIRE, __ATOMIC_RELAXED);
}

void console_lock(void)
{
    u32 me = cpu_initial_apic_id();
    if (console_owner == me) {
        console_depth++;
        return;
    }
    if (!SPIN_UNTIL_MS(console_try_lock(me), 1000))
        console_owner = me;             /* the holder is gone: take over */
    console_depth = 1;
}

void console_unlock(void)
{
    if (--console_depth == 0) {
        barrier();
        console_owner = ~0u;
    }
}

static void console_sink(char c, void *ctx)
{
    (void)ctx;
    serial_putc(c);
}

void kvprintf(const char *fmt, va_list ap)
{
    console_lock();
    vformat(console_sink, NULL, fmt, ap);
    console_unlock();
}

void kprintf(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    kvprintf(fmt, ap);
    va_end(ap);
}
