/*
 * Copies the VMM's boot structures into `boot` (boot.h). Runs once, before
 * any scenario, and registers every structure's memory as in use.
 */
#include "boot.h"
#include "defs.h"
#include "lib.h"
#include "mm.h"

struct boot_info boot;

static void capture_linux(u64 bp)
{
    region_add(bp, bp + BP_SIZE, "zero-page");

    boot.hdr.setup_sects = phys_read8(bp + BP_SETUP_SECTS);
    boot.hdr.boot_flag = phys_read16(bp + BP_BOOT_FLAG);
    boot.hdr.header = phys_read32(bp + BP_HEADER);
    boot.hdr.version = phys_read16(bp + BP_VERSION);
    boot.hdr.type_of_loader = phys_read8(bp + BP_TYPE_OF_LOADER);
    boot.hdr.loadflags = phys_read8(bp + BP_LOADFLAGS);
    boot.hdr.code32_start = phys_read32(bp + BP_CODE32_START);
    boot.hdr.kernel_alignment = phys_read32(bp + BP_KERNEL_ALIGNMENT);
    boot.hdr.relocatable_kernel = phys_read8(bp + BP_RELOCATABLE_KERNEL);
    boot.hdr.xloadflags = phys_read16(bp + BP_XLOADFLAGS);
    boot.hdr.cmdline_size = phys_read32(bp + BP_CMDLINE_SIZE);
    boot.hdr.pref_address = phys_read64(bp + BP_PREF_ADDRESS);
    boot.hdr.init_size = phys_read32(bp + BP_INIT_SIZE);
    boot.sentinel = phys_read8(bp + BP_SENTINEL);
    boot.acpi_rsdp_addr = phys_read64(bp + BP_ACPI_RSDP_ADDR);

    /*
     * The ext_* fields hold the upper 32 bits. Like Linux
     * (sanitize_boot_params), ignore them when the sentinel shows that the
     * loader copied more than the setup header into boot_params.
     */
    bool ext = boot.sentinel == 0;
    boot.cmdline_addr = phys_read32(bp + BP_CMD_LINE_PTR);
    boot.initrd_addr = phys_read32(bp + BP_RAMDISK_IMAGE);
    boot.initrd_size = phys_read32(bp + BP_RAMDISK_SIZE);
    if (ext) {
        boot.cmdline_addr |= (u64)phys_read32(bp + BP_EXT_CMD_LINE_PTR) << 32;
        boot.initrd_addr |= (u64)phys_read32(bp + BP_EXT_RAMDISK_IMAGE) << 32;
        boot.initrd_size |= (u64)phys_read32(bp + BP_EXT_RAMDISK_SIZE) << 32;
    }

    boot.e820_reported = phys_read8(bp + BP_E820_ENTRIES);
    boot.e820_count = MIN(boot.e820_reported, E820_MAX);
    for (u32 i = 0; i < boot.e820_count; i++) {
        u64 e = bp + BP_E820_TABLE + (u64)i * BP_E820_ENTRY_SIZE;
        boot.e820[i].addr = phys_read64(e);
        boot.e820[i].size = phys_read64(e + 8);
        boot.e820[i].type = phys_read32(e + 16);
    }
}

static void capture_pvh(u64 si)
{
    region_add(si, si + PVH_START_INFO_SIZE, "start-info");

    boot.pvh.magic = phys_read32(si + PVH_MAGIC);
    boot.pvh.version = phys_read32(si + PVH_VERSION);
    boot.pvh.flags = phys_read32(si + PVH_FLAGS);
    boot.pvh.nr_modules = phys_read32(si + PVH_NR_MODULES);
    boot.pvh.modlist_paddr = phys_read64(si + PVH_MODLIST_PADDR);
    boot.pvh.rsdp_paddr = phys_read64(si + PVH_RSDP_PADDR);
    if (boot.pvh.magic != PVH_MAGIC_VALUE)
        return;                 /* the pointers are not to be trusted */

    boot.cmdline_addr = phys_read64(si + PVH_CMDLINE_PADDR);

    /* The memory map only exists from version 1 on. */
    if (boot.pvh.version >= 1) {
        boot.pvh.memmap_paddr = phys_read64(si + PVH_MEMMAP_PADDR);
        boot.pvh.memmap_entries = phys_read32(si + PVH_MEMMAP_ENTRIES);
        u64 map = boot.pvh.memmap_paddr;
        boot.e820_reported = boot.pvh.memmap_entries;
        boot.e820_count = MIN(boot.e820_reported, E820_MAX);
        region_add(map, map + (u64)boot.e820_count * PVH_MEMMAP_ENTRY_SIZE, "memmap");
        for (u32 i = 0; i < boot.e820_count; i++) {
            u64 e = map + (u64)i * PVH_MEMMAP_ENTRY_SIZE;
            boot.e820[i].addr = phys_read64(e);
            boot.e820[i].size = phys_read64(e + 8);
            boot.e820[i].type = phys_read32(e + 16);
        }
    }

    /* Module 0 is the initrd. */
    if (boot.pvh.nr_modules >= 1) {
        u64 list = boot.pvh.modlist_paddr;
        region_add(list, list + PVH_MODLIST_ENTRY_SIZE, "modlist");
        boot.initrd_addr = phys_read64(list);
        boot.initrd_size = phys_read64(list + 8);
    }
}

/*
 * Copies the command line up to its NUL, in chunks that never cross a page
 * boundary, so no page beyond the one holding the NUL is ever read.
 */
static void capture_cmdline(void)
{
    u64 addr = boot.cmdline_addr;
    u32 len = 0;
    if (!addr)
        return;
    while (len < CMDLINE_MAX + 1) {
        u64 p = addr + len;
        u32 chunk = (u32)MIN(PAGE_SIZE - (p & (PAGE_SIZE - 1)), 64);
        chunk = MIN(chunk, CMDLINE_MAX + 1 - len);
        phys_read(boot.cmdline + len, p, chunk);
        size_t n = strnlen(boot.cmdline + len, chunk);
        len += (u32)n;
        if (n < chunk) {
            boot.cmdline_terminated = true;
            break;
        }
    }
    boot.cmdline_len = MIN(len, CMDLINE_MAX);
    boot.cmdline[boot.cmdline_len] = '\0';
    region_add(addr, addr + boot.cmdline_len + 1, "cmdline");
}

void boot_info_capture(u32 protocol, u64 boot_ptr)
{
    region_add(image_start(), image_end(), "image");
    boot.protocol = protocol;
    boot.boot_ptr = boot_ptr;
    if (protocol == BOOT_PROTO_PVH)
        capture_pvh(boot_ptr);
    else
        capture_linux(boot_ptr);
    capture_cmdline();
    if (boot.initrd_size)
        region_add(boot.initrd_addr, boot.initrd_addr + boot.initrd_size, "initrd");
}

const char *e820_type_name(u32 type)
{
    static const char *const names[] = {
        [E820_RAM] = "ram", [E820_RESERVED] = "reserved", [E820_ACPI] = "acpi",
        [E820_NVS] = "nvs", [E820_UNUSABLE] = "unusable",
    };
    return type < ARRAY_SIZE(names) ? names[type] : NULL;
}

const struct e820_entry *e820_ram_containing(u64 start, u64 end)
{
    for (u32 i = 0; i < boot.e820_count; i++) {
        const struct e820_entry *e = &boot.e820[i];
        if (e->type == E820_RAM && e->addr <= start && end <= e->addr + e->size)
            return e;
    }
    return NULL;
}
