/*
 * Start of the bzImage's protected-mode payload, loaded at code32_start
 * (0x100000). The boot protocol fixes two entry points relative to it:
 *   +0x000  32-bit entry (startup_32): ESI = boot_params
 *   +0x200  64-bit entry (startup_64): RSI = boot_params
 * Both just jump to the common entries; the bytes between are hlt.
 */
    .section .head.text, "ax"
    .code32
    .globl bz_startup_32
bz_startup_32:
    jmp linux32_entry           /* e9 rel32: the same bytes in 64-bit disassembly */

    .org 0x200, 0xf4
    .code64
    .globl bz_startup_64
bz_startup_64:
    jmp linux64_entry

/*
 * kernel_info (boot protocol 2.15, found through kernel_info_offset in the
 * setup header): the fixed part only. setup_type_max 0: the guest
 * understands no setup_data types.
 */
    .section .rodata.kernel_info, "a"
    .balign 4
    .globl kiln_kernel_info
kiln_kernel_info:
    .ascii "LToP"                               /* header */
    .long kernel_info_var_len_data - kiln_kernel_info   /* size */
    .long kernel_info_end - kiln_kernel_info    /* size_total */
    .long 0                                     /* setup_type_max */
kernel_info_var_len_data:
kernel_info_end:
