/*
 * 64-bit entry (Linux 64-bit boot protocol) and the start-up path common to
 * every entry.
 *
 * Linux 64-bit boot protocol state: long mode, paging on with (at least)
 * the first 1 GiB identity-mapped, RSI = physical address of boot_params,
 * interrupts off, segments flat, stack unknown. Nothing of the VMM's is
 * trusted beyond that: we switch to our own page tables, GDT and stack
 * before touching any memory of ours.
 */
#include "defs.h"

    /* First in .text (ld/image.ld): e_entry is the image start, as in vmlinux. */
    .section .text.entry, "ax"
    .code64

    .globl linux64_entry
    .type linux64_entry, @function
linux64_entry:
    cli
    cld
    movl $BOOT_PROTO_LINUX64, %edi
    /* %rsi = boot_params, as handed over */

    /*
     * The image is linked for one address (not relocatable). If a VMM
     * loaded it elsewhere, every absolute address below would be wrong:
     * say so with position-independent code only, then stop.
     */
    leaq linux64_entry(%rip), %rax
    movl $linux64_entry, %ecx
    cmpq %rcx, %rax
    jne wrong_load_address
    jmp common64

/*
 * From the 32-bit paths (entry32.S), now in 64-bit mode on our GDT and page
 * tables: %edi = protocol, %esi = boot structure. The upper halves of the
 * registers are undefined after the mode switch, so zero-extend.
 */
    .globl common64_from32
common64_from32:
    movl %edi, %edi
    movl %esi, %esi

common64:
    /*
     * Our own stack first: no protocol promises one (PVH sets no stack
     * pointer at all), and the far return below pushes.
     */
    movq $bsp_stack_top, %rsp
    /* Our page tables: 4 GiB identity map, built at link time. */
    movl $kiln_pml4, %eax
    movq %rax, %cr3

    lgdt kiln_gdt_desc
    movl $KERNEL_DS, %eax
    movl %eax, %ds
    movl %eax, %es
    movl %eax, %ss
    xorl %eax, %eax
    movl %eax, %fs
    movl %eax, %gs
    /* Reload CS from our GDT with a far return. */
    pushq $KERNEL_CS
    pushq $1f
    lretq
1:
    /*
     * Zero .bss: neither a flat bzImage nor linux-loader's ELF loader (it
     * copies p_filesz bytes only) does it. Save the arguments first:
     * rep stos uses %rdi/%rcx/%rax.
     */
    movq %rdi, %r12
    movq %rsi, %r13
    movl $__bss_start, %edi
    movl $__bss_end, %ecx
    subl %edi, %ecx
    shrl $3, %ecx
    xorl %eax, %eax
    rep stosq

    movq $bsp_stack_top, %rsp
    pushq $2                    /* RFLAGS: only the reserved bit (IF=0, DF=0) */
    popfq

    movl %r12d, %edi
    movq %r13, %rsi
    call kmain                  /* does not return */
    call machine_reset
2:  cli
    hlt
    jmp 2b
    .size linux64_entry, . - linux64_entry

/* Position-independent: prints a fixed message on COM1, then resets. */
wrong_load_address:
    leaq wrong_load_msg(%rip), %rsi
    movw $0x3f8, %dx
1:  movb (%rsi), %al
    testb %al, %al
    jz 2f
    outb %al, %dx
    incq %rsi
    jmp 1b
2:  movb $0xfe, %al             /* i8042 reset */
    outb %al, $0x64
3:  cli
    hlt
    jmp 3b

    .section .rodata, "a"
wrong_load_msg:
    .ascii "kiln-guest: fail load-address the image must be loaded at its link address\n"
    .asciz "kiln-guest: done ok=0 fail=1\n"
