/* Small scenarios driving the VMM's exit paths: hello, pio-bench,
 * triple-fault, emulation-failure, idle. */
#include "io.h"
#include "console.h"
#include "cpu.h"
#include "defs.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

/* Start-up cost probe: as little guest work as possible. */
void scn_hello(const char *arg)
{
    (void)arg;
    kprintf("kiln-guest: hello\n");
    finish();
}

#define PIO_BENCH_DEFAULT_N 10000

/* N one-byte outs to port 0x80 (the POST port): one VM exit each. */
void scn_pio_bench(const char *arg)
{
    u64 n = PIO_BENCH_DEFAULT_N;
    if (arg && !parse_u64(arg, strlen(arg), &n)) {
        fail("pio-bench", "bad-count=%s", arg);
        return;
    }
    u64 left = n;
    u64 t0 = rdtsc();
    asm volatile("test %0, %0\n\t"
                 "jz 2f\n"
                 "1:\n\t"
                 "outb %%al, $0x80\n\t"
                 "dec %0\n\t"
                 "jnz 1b\n"
                 "2:"
                 : "+c"(left) : "a"(0) : "memory", "cc");
    u64 t1 = rdtsc();
    bench("pio", "n=%llu tsc=%llu", n, t1 - t0);
}

#define SERIAL_FLOOD_DEFAULT_BYTES (256 * 1024)

/*
 * N bytes (default 256 KiB, rounded up to whole 64-byte lines) of serial
 * output as fast as the UART takes them: one VM exit per byte, for tests of
 * a console nobody reads.
 */
void scn_serial_flood(const char *arg)
{
    static const char line[] =
        "kiln-guest: flood 0123456789abcdefghijklmnopqrstuvwxyz.........\n";
    u64 n = SERIAL_FLOOD_DEFAULT_BYTES;
    if (arg && !parse_u64(arg, strlen(arg), &n)) {
        fail("serial-flood", "bad-count=%s", arg);
        return;
    }
    u64 sent = 0;
    while (sent < n) {
        serial_write(line, sizeof(line) - 1);
        sent += sizeof(line) - 1;
    }
    info("serial-flood", "bytes=%llu", sent);
}

void scn_triple_fault(const char *arg)
{
    (void)arg;
    info("triple-fault", "now");
    triple_fault();
}

/* arch/emulation_failure.S: xorps %xmm0,%xmm0; ret */
void kiln_emulation_failure_insn(void);

void scn_emulation_failure(const char *arg)
{
    (void)arg;
    info("emulation-failure", "now");
    /* Make sure real hardware raises #UD: SSE needs CR4.OSFXSR. */
    write_cr4(read_cr4() & ~(u64)(CR4_OSFXSR | CR4_OSXMMEXCPT));
    kiln_emulation_failure_insn();
    fail("emulation-failure", "executed");
}

/* For tests that stop the VMM from outside: never resets. */
void scn_idle(const char *arg)
{
    (void)arg;
    kprintf("info idle\n");    /* info() wants details; this line has none */
    for (;;)
        sti_hlt();
}

/* The end of a boot, as Firecracker's boot-timer device expects it: the byte 123 written
 * to MMIO 0xc0000000 (a VMM started with --boot-timer logs the time since it started). */
void scn_boot_timer(const char *arg)
{
    (void)arg;
    mmio_write8(0xc0000000ULL, 123);
    info("boot-timer", "signalled");
}
