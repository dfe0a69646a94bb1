/*
 * The guest's GDT. Accessed bits are preset so the CPU never writes to it.
 * The descriptor pointer works for lgdt in 32- and 64-bit mode (the base is
 * below 4 GiB); the AP trampoline carries its own copy (real mode cannot
 * address this one).
 */
#include "defs.h"

    .section .data, "aw"
    .balign 16
    .globl kiln_gdt
kiln_gdt:
    .quad 0                     /* null */
    .quad 0x00af9b000000ffff    /* KERNEL_CS: 64-bit code, DPL 0 */
    .quad 0x00cf93000000ffff    /* KERNEL_DS: flat 4 GiB data */
    .quad 0x00cf9b000000ffff    /* KERNEL_CS32: flat 4 GiB 32-bit code */
kiln_gdt_end:
    .if (kiln_gdt_end - kiln_gdt) != (GDT_LIMIT + 1)
    .error "GDT_LIMIT does not match the GDT"
    .endif

    .balign 8
    .skip 6                     /* so that the base field is 8-byte aligned */
    .globl kiln_gdt_desc
kiln_gdt_desc:
    .word GDT_LIMIT
    .quad kiln_gdt
