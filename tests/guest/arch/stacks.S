/*
 * Stacks: 16 KiB for the BSP and for each AP. They are in their own NOBITS
 * section after .bss, part of the image's memory (p_memsz / init_size) but
 * never zeroed at start-up: a stack needs no initial contents, and zeroing
 * MAX_CPUS * 16 KiB would cost noticeable time on the emulated CPU.
 */
#include "defs.h"

    .section .stack, "aw", @nobits
    .balign 4096
    .globl bsp_stack_bottom, bsp_stack_top
bsp_stack_bottom:
    .skip STACK_SIZE
bsp_stack_top:

    .globl ap_stacks
ap_stacks:
    .skip STACK_SIZE * MAX_CPUS
