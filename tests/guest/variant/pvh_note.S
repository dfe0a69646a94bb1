/*
 * PVH boot: an ELF note (name "Xen", type XEN_ELFNOTE_PHYS32_ENTRY = 18)
 * whose descriptor is the physical address of the 32-bit PVH entry. The
 * descriptor is 8 bytes like Linux's (_ASM_PTR on x86_64); loaders such as
 * rust-vmm's linux-loader read its first 32 bits. ld/pvh.ld puts this
 * section in a PT_NOTE program header.
 */
#define XEN_ELFNOTE_PHYS32_ENTRY 18

    .section .note.Xen, "a", @note
    .balign 4
    .long 2f - 1f               /* namesz, including the NUL */
    .long 4f - 3f               /* descsz */
    .long XEN_ELFNOTE_PHYS32_ENTRY
1:  .asciz "Xen"
2:  .balign 4
3:  .quad pvh_entry
4:  .balign 4
