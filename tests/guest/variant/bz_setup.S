/*
 * The bzImage real-mode part: the first (SETUP_SECTS + 1) * 512 bytes of the
 * file, with the setup header at 0x1f1 exactly as Documentation/x86/boot.rst
 * defines it (protocol 2.15). VMMs using the 64-bit entry never execute
 * anything here: they read the header, copy it into boot_params.hdr and load
 * the rest of the file (the payload, ld/bzimage.ld) at code32_start.
 * Values computed by the linker (sizes, offsets) come from ld/bzimage.ld.
 */
#define SETUP_SECTS                 1
#define LOADED_HIGH                 0x01
#define XLF_KERNEL_64               0x01
#define XLF_CAN_BE_LOADED_ABOVE_4G  0x02

    .section .bzsetup, "a"      /* not "x": it is never run in place */
    .code16
    .globl bz_sector0
bz_sector0:
    /* A BIOS booting this sector directly just halts. */
    cli
1:  hlt
    jmp 1b

    /*
     * boot_params.sentinel, as in Linux's header.S: a loader that copies
     * more than the setup header into boot_params carries this 0xff along,
     * which the guest reports (boot-params) and Linux would sanitize.
     */
    .org 0x1ef
sentinel:           .byte 0xff

    .org 0x1f1
setup_sects:        .byte SETUP_SECTS
root_flags:         .word 0
syssize:            .long kiln_bz_syssize       /* payload size / 16 */
ram_size:           .word 0
vid_mode:           .word 0xffff                /* "normal" */
root_dev:           .word 0
boot_flag:          .word 0xaa55

    /* 0x200: the real-mode entry jumps over the rest of the header. */
jump:               .byte 0xeb, setup_code - 2f
2:
header:             .ascii "HdrS"
version:            .word 0x020f
realmode_swtch:     .long 0
start_sys_seg:      .word 0x1000                /* obsolete */
kernel_version:     .word kernel_version_str - bz_sector0 - 0x200
type_of_loader:     .byte 0                     /* written by the loader */
loadflags:          .byte LOADED_HIGH
setup_move_size:    .word 0x8000
code32_start:       .long 0x100000
ramdisk_image:      .long 0                     /* written by the loader */
ramdisk_size:       .long 0                     /* written by the loader */
bootsect_kludge:    .long 0
heap_end_ptr:       .word 0
ext_loader_ver:     .byte 0
ext_loader_type:    .byte 0
cmd_line_ptr:       .long 0                     /* written by the loader */
initrd_addr_max:    .long 0x7fffffff
kernel_alignment:   .long 0x100000
relocatable_kernel: .byte 0                     /* must be loaded at 0x100000 */
min_alignment:      .byte 20                    /* log2(kernel_alignment) */
xloadflags:         .word XLF_KERNEL_64 | XLF_CAN_BE_LOADED_ABOVE_4G
cmdline_size:       .long 2047
hardware_subarch:   .long 0                     /* X86_SUBARCH_PC */
hardware_subarch_data: .quad 0
payload_offset:     .long 0                     /* no compressed payload */
payload_length:     .long 0
setup_data:         .quad 0
pref_address:       .quad 0x100000
init_size:          .long kiln_bz_init_size     /* image + .bss + stacks */
handover_offset:    .long 0                     /* no EFI handover */
kernel_info_offset: .long kiln_bz_kernel_info_offset
    .globl bz_setup_header_end  /* ld/bzimage.ld checks it is at 0x26c */
bz_setup_header_end:

setup_code:
    cli
3:  hlt
    jmp 3b

kernel_version_str:
    .asciz "kiln-guest"

    .org (SETUP_SECTS + 1) * 512
