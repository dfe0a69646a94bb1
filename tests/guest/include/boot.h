/*
 * Everything the guest needs from the VMM's boot structures, copied into
 * guest-owned memory at start-up (boot_info_capture) so that no later code
 * reads the zero page / hvm_start_info, which the guest does not own.
 * Offsets: Documentation/x86/boot.rst, asm/bootparam.h, Xen's
 * arch-x86/hvm/start_info.h.
 */
#ifndef KILN_BOOT_H
#define KILN_BOOT_H

#include "types.h"

/* struct boot_params ("zero page") offsets. */
#define BP_ACPI_RSDP_ADDR       0x070
#define BP_EXT_RAMDISK_IMAGE    0x0c0
#define BP_EXT_RAMDISK_SIZE     0x0c4
#define BP_EXT_CMD_LINE_PTR     0x0c8
#define BP_E820_ENTRIES         0x1e8
#define BP_SENTINEL             0x1ef   /* 0 unless the loader copied too much */
#define BP_HDR                  0x1f1   /* struct setup_header */
#define BP_SETUP_SECTS          0x1f1
#define BP_BOOT_FLAG            0x1fe
#define BP_HEADER               0x202
#define BP_VERSION              0x206
#define BP_TYPE_OF_LOADER       0x210
#define BP_LOADFLAGS            0x211
#define BP_CODE32_START         0x214
#define BP_RAMDISK_IMAGE        0x218
#define BP_RAMDISK_SIZE         0x21c
#define BP_CMD_LINE_PTR         0x228
#define BP_KERNEL_ALIGNMENT     0x230
#define BP_RELOCATABLE_KERNEL   0x234
#define BP_XLOADFLAGS           0x236
#define BP_CMDLINE_SIZE         0x238
#define BP_PREF_ADDRESS         0x258
#define BP_INIT_SIZE            0x260
#define BP_E820_TABLE           0x2d0
#define BP_SIZE                 0x1000
#define BP_E820_ENTRY_SIZE      20      /* packed {u64 addr, u64 size, u32 type} */

#define BOOT_FLAG_MAGIC         0xaa55
#define HDRS_MAGIC              0x53726448      /* "HdrS" */

/* struct hvm_start_info offsets. */
#define PVH_MAGIC_VALUE         0x336ec578
#define PVH_MAGIC               0
#define PVH_VERSION             4
#define PVH_FLAGS               8
#define PVH_NR_MODULES          12
#define PVH_MODLIST_PADDR       16
#define PVH_CMDLINE_PADDR       24
#define PVH_RSDP_PADDR          32
#define PVH_MEMMAP_PADDR        40
#define PVH_MEMMAP_ENTRIES      48
#define PVH_START_INFO_SIZE     56
#define PVH_MEMMAP_ENTRY_SIZE   24      /* {u64 addr, u64 size, u32 type, u32 reserved} */
#define PVH_MODLIST_ENTRY_SIZE  32      /* {u64 paddr, u64 size, u64 cmdline, u64 reserved} */

#define E820_RAM        1
#define E820_RESERVED   2
#define E820_ACPI       3
#define E820_NVS        4
#define E820_UNUSABLE   5
#define E820_MAX        128     /* E820_MAX_ENTRIES_ZEROPAGE */

#define CMDLINE_MAX     4095    /* longest command line copied */

struct e820_entry {
    u64 addr;
    u64 size;
    u32 type;
};

struct boot_info {
    u32 protocol;               /* BOOT_PROTO_* */
    u64 boot_ptr;               /* physical address of boot_params / hvm_start_info */

    /* Linux protocols: setup header as the VMM left it in boot_params.hdr. */
    struct {
        u8 setup_sects, type_of_loader, loadflags, relocatable_kernel;
        u16 boot_flag, version, xloadflags;
        u32 header, code32_start, kernel_alignment, cmdline_size, init_size;
        u64 pref_address;
    } hdr;
    u8 sentinel;                /* boot_params.sentinel */
    u64 acpi_rsdp_addr;         /* boot_params.acpi_rsdp_addr (0: not given) */

    /* PVH: hvm_start_info. */
    struct {
        u32 magic, version, flags, nr_modules;
        u64 rsdp_paddr, memmap_paddr, modlist_paddr;
        u32 memmap_entries;
    } pvh;

    u64 cmdline_addr;           /* 0: no command line */
    u32 cmdline_len;
    bool cmdline_terminated;    /* a NUL was found within CMDLINE_MAX bytes */
    char cmdline[CMDLINE_MAX + 1];

    u32 e820_count;             /* entries copied (at most E820_MAX) */
    u32 e820_reported;          /* entries the VMM claimed */
    struct e820_entry e820[E820_MAX];

    u64 initrd_addr;
    u64 initrd_size;            /* 0: no initrd */

    u32 bsp_apic_id;            /* CPUID initial APIC id of the boot CPU */
};

extern struct boot_info boot;

/* Copies the boot structures (called once, early, by kmain). */
void boot_info_capture(u32 protocol, u64 boot_ptr);

/* Name of an e820 type ("ram", "reserved", ...); NULL for unknown types. */
const char *e820_type_name(u32 type);

/* The e820 RAM entry containing all of [start, end), or NULL. */
const struct e820_entry *e820_ram_containing(u64 start, u64 end);

extern const char kiln_variant[];   /* "elf", "pvh" or "bzimage" */

#endif
