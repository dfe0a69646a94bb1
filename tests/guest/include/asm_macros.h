/* Assembly macros shared by the 32-bit entry paths (BSP and APs). */
#ifndef KILN_ASM_MACROS_H
#define KILN_ASM_MACROS_H

#include "defs.h"

/*
 * From flat 32-bit protected mode (paging off, our GDT loaded) to 64-bit
 * mode at `target`: PAE, our page tables, EFER.LME, then paging. Clobbers
 * EAX, ECX, EDX.
 */
.macro ENTER_LONG_MODE target
    movl %cr4, %eax
    orl $CR4_PAE, %eax
    movl %eax, %cr4
    movl $kiln_pml4, %eax
    movl %eax, %cr3
    movl $MSR_EFER, %ecx
    rdmsr
    orl $EFER_LME, %eax
    wrmsr
    movl %cr0, %eax
    orl $(CR0_PG | CR0_PE), %eax
    movl %eax, %cr0
    ljmp $KERNEL_CS, $\target
.endm

#endif
