/*
 * The one deliberate non-general-register instruction of the guest, for the
 * emulation-failure scenario: xorps %xmm0,%xmm0 written as bytes so the
 * compiler rule holds. The build's instruction check (build.rs) allows it
 * exactly here, inside the symbol kiln_emulation_failure_insn, and nowhere
 * else. On the emulated KVM of these machines it makes KVM_RUN return
 * KVM_EXIT_INTERNAL_ERROR; on real hardware, with CR4.OSFXSR clear, it
 * raises #UD. If it ever completes, the call simply returns.
 */
    .section .text, "ax"
    .code64
    .globl kiln_emulation_failure_insn
    .type kiln_emulation_failure_insn, @function
kiln_emulation_failure_insn:
    .byte 0x0f, 0x57, 0xc0      /* xorps %xmm0,%xmm0 */
    .size kiln_emulation_failure_insn, 3

    /* A separate symbol, so the allowed range ends right after those 3 bytes. */
    .globl kiln_emulation_failure_ret
    .type kiln_emulation_failure_ret, @function
kiln_emulation_failure_ret:
    ret
    .size kiln_emulation_failure_ret, . - kiln_emulation_failure_ret
