/*
 * Interrupt entry stubs: one 16-byte stub per vector (stub address =
 * isr_stubs + 16 * vector, so no address table is needed). Each pushes a
 * zero error code where the CPU pushes none, then the vector number, and
 * joins isr_common, which saves the general registers (the guest never
 * touches other register state) and calls trap_dispatch(frame).
 */
    .section .text, "ax"
    .code64

    .balign 16
    .globl isr_stubs
isr_stubs:
    .set vec, 0
    .rept 256
    .balign 16
    /* #DF #TS #NP #SS #GP #PF #AC #CP #VC #SX push an error code */
    .if (vec == 8) || (vec == 10) || (vec == 11) || (vec == 12) || (vec == 13) || (vec == 14) || (vec == 17) || (vec == 21) || (vec == 29) || (vec == 30)
    .else
    pushq $0
    .endif
    pushq $vec
    jmp isr_common
    .set vec, vec + 1
    .endr

    .balign 16
isr_common:
    /*
     * The CPU aligned RSP to 16 before its 5-word frame; error code, vector
     * and 15 registers (17 words) leave RSP 16-byte aligned for the call.
     */
    pushq %r15
    pushq %r14
    pushq %r13
    pushq %r12
    pushq %r11
    pushq %r10
    pushq %r9
    pushq %r8
    pushq %rbp
    pushq %rdi
    pushq %rsi
    pushq %rdx
    pushq %rcx
    pushq %rbx
    pushq %rax
    cld
    movq %rsp, %rdi
    call trap_dispatch
    popq %rax
    popq %rbx
    popq %rcx
    popq %rdx
    popq %rsi
    popq %rdi
    popq %rbp
    popq %r8
    popq %r9
    popq %r10
    popq %r11
    popq %r12
    popq %r13
    popq %r14
    popq %r15
    addq $16, %rsp              /* vector, error code */
    iretq
