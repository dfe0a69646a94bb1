/* C functions entered from assembly (the .S files in arch/). */
#ifndef KILN_ENTRY_H
#define KILN_ENTRY_H

#include "irq.h"
#include "types.h"

/* BSP, from entry64.S: protocol = BOOT_PROTO_*, boot_ptr = boot structure. */
noreturn void kmain(u32 protocol, u64 boot_ptr);
/* Each AP, from trampoline.S, on its own stack. */
noreturn void ap_main(void);
/* Every interrupt and exception, from isr.S. */
void trap_dispatch(struct trap_frame *f);

#endif
