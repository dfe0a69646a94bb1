/*
 * The guest's output protocol (asserted line by line by the host tests):
 *   kiln-guest: start variant=<elf|pvh|bzimage>
 *   ok <check> <details...>
 *   fail <check> <details...>
 *   info <topic> <details...>
 *   bench <topic> <details...>
 *   kiln-guest: done ok=<n> fail=<m>
 * An empty details format prints just "ok <check>".
 */
#ifndef KILN_REPORT_H
#define KILN_REPORT_H

#include "types.h"

void ok(const char *check, const char *fmt, ...) printf_like(2, 3);
void fail(const char *check, const char *fmt, ...) printf_like(2, 3);
void info(const char *topic, const char *fmt, ...) printf_like(2, 3);
void bench(const char *topic, const char *fmt, ...) printf_like(2, 3);

u32 fail_count(void);

/* Prints the done line and resets the machine. */
noreturn void finish(void);

/* Reset via the i8042 (0xFE to port 0x64); a forced triple fault if that fails. */
noreturn void machine_reset(void);
/* Loads a zero-limit IDT and executes ud2: #UD -> #DF -> shutdown. */
noreturn void triple_fault(void);

#endif
