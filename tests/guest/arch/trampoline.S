/*
 * Application-processor start-up.
 *
 * The real-mode part (.text16) is copied to AP_TRAMPOLINE_ADDR by smp.c and
 * entered through SIPI with CS = AP_TRAMPOLINE_ADDR >> 4, IP = 0. It only
 * uses offsets relative to its own start, loads the guest's GDT (base below
 * 4 GiB, reachable with a 32-bit lgdt) and far-jumps straight into the
 * image's 32-bit code, which enters long mode on the guest's page tables.
 * The BSP starts one AP at a time and leaves its stack top in ap_boot_stack.
 */
#include "defs.h"
#include "asm_macros.h"

    .section .text16, "ax"
    .code16
    .globl ap_trampoline_start, ap_trampoline_end
ap_trampoline_start:
    cli
    cld
    movw %cs, %ax
    movw %ax, %ds
    lgdtl (ap_trampoline_gdt_desc - ap_trampoline_start)
    movl %cr0, %eax
    orl $CR0_PE, %eax
    movl %eax, %cr0
    ljmpl $KERNEL_CS32, $ap_entry32

    .balign 8
ap_trampoline_gdt_desc:
    .word GDT_LIMIT
    .long kiln_gdt
ap_trampoline_end:

    .section .text32, "ax"
    .code32
ap_entry32:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    ENTER_LONG_MODE ap_entry64

    .section .text, "ax"
    .code64
ap_entry64:
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    movq ap_boot_stack, %rsp
    pushq $2
    popfq
    call ap_main                /* does not return */
1:  cli
    hlt
    jmp 1b
