/*
 * serial-echo: read one line from COM1 using the receive interrupt (GSI 4
 * through the IOAPIC), sleeping in hlt between interrupts, and print it.
 */
#include "console.h"
#include "io.h"
#include "irq.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

#define ECHO_MAX        256
#define ECHO_VECTOR     0x24    /* 0x20 + GSI */
#define ECHO_TIMEOUT_MS 2000
#define FIFO_DRAIN_MAX  256     /* more than any UART FIFO */

static char line[ECHO_MAX + 1];
static volatile u32 line_len, line_done, interrupts;

static void uart_interrupt(struct trap_frame *f)
{
    (void)f;
    interrupts++;
    (void)inb(COM1 + UART_IIR);         /* identify = acknowledge */
    /* Drain completely: the next edge only comes with new data. */
    for (u32 i = 0; i < FIFO_DRAIN_MAX && (inb(COM1 + UART_LSR) & UART_LSR_DR); i++) {
        char c = (char)inb(COM1 + UART_RBR);
        if (line_done)
            continue;           /* past the line: dropped */
        if (c == '\n') {
            line_done = 1;
            continue;
        }
        line[line_len++] = c;
        if (line_len == ECHO_MAX)
            line_done = 1;      /* a full buffer ends the line too */
    }
}

void scn_serial_echo(const char *arg)
{
    (void)arg;
    line_len = line_done = interrupts = 0;
    if (!irq_route(COM1_GSI, ECHO_VECTOR, uart_interrupt)) {
        fail("serial-echo", "irq-route gsi=%u", COM1_GSI);
        return;
    }
    info("serial-echo", "waiting");
    outb(COM1 + UART_IER, UART_IER_RDA);
    bool got = wait_for_irq(&line_done, ECHO_TIMEOUT_MS);
    outb(COM1 + UART_IER, 0);
    irq_mask(COM1_GSI);
    if (!got) {
        fail("serial-echo", "timeout");
        info("serial-echo", "interrupts=%u", interrupts);
        return;
    }

    u32 len = line_len;
    if (len && line[len - 1] == '\r')
        len--;                  /* a terminal's CR LF */
    for (u32 i = 0; i < len; i++)
        if (line[i] < 0x20 || line[i] > 0x7e)
            line[i] = '?';      /* output stays printable ASCII */
    line[len] = '\0';
    ok("serial-echo", "\"%s\"", line);
    info("serial-echo", "interrupts=%u", interrupts);
}
