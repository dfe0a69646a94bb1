/*
 * 32-bit entries: PVH (EBX = hvm_start_info) and the Linux 32-bit boot
 * protocol (ESI = boot_params; reached from the bzImage's startup_32).
 * Both arrive in flat 32-bit protected mode with paging off and no usable
 * stack; both switch to long mode on the guest's own page tables and
 * continue in common64_from32 (entry64.S) with EDI = protocol, ESI = the
 * boot structure.
 */
#include "defs.h"
#include "asm_macros.h"

    .section .text32, "ax"
    .code32

    .globl pvh_entry
    .type pvh_entry, @function
pvh_entry:
    cli
    cld
    movl %ebx, %esi
    movl $BOOT_PROTO_PVH, %edi
    jmp 1f

    .globl linux32_entry
    .type linux32_entry, @function
linux32_entry:
    cli
    cld
    movl $BOOT_PROTO_LINUX32, %edi
1:
    lgdt kiln_gdt_desc
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    ljmp $KERNEL_CS32, $2f      /* CS from our GDT as well */
2:
    ENTER_LONG_MODE common64_from32
    .size pvh_entry, . - pvh_entry
