/*
 * Console on the COM1 16550 UART (I/O port 0x3f8). Output only polls the
 * line status once per 16 bytes (the TX FIFO depth): each port access is a
 * VM exit, so keeping them few keeps printing cheap.
 */
#ifndef KILN_CONSOLE_H
#define KILN_CONSOLE_H

#include "types.h"

#define COM1            0x3f8
#define UART_RBR        0       /* receive buffer (read) */
#define UART_THR        0       /* transmit holding (write) */
#define UART_IER        1       /* interrupt enable */
#define UART_IIR        2       /* interrupt identification (read) */
#define UART_FCR        2       /* FIFO control (write) */
#define UART_LCR        3
#define UART_MCR        4
#define UART_LSR        5
#define UART_IER_RDA    0x01    /* received-data-available interrupt */
#define UART_LSR_DR     0x01    /* data ready */
#define UART_LSR_THRE   0x20    /* transmit FIFO empty */
#define COM1_GSI        4

void serial_init(void);
void serial_write(const char *s, size_t n);

/*
 * kprintf prints atomically with respect to other CPUs (a console lock), so
 * lines from an AP's exception handler are never interleaved mid-line.
 */
void kprintf(const char *fmt, ...) printf_like(1, 2);
/* Hold the console across several kprintf calls (one line). Re-entrant. */
void console_lock(void);
void console_unlock(void);
void kvprintf(const char *fmt, va_list ap);

#endif
