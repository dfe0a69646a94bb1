/* boot-params and cmdline: what the VMM handed over at entry. */
#include "boot.h"
#include "cpu.h"
#include "defs.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

/* What bz_setup.S declares; the VMM must pass the header on unchanged. */
#define BZ_VERSION      0x020f
#define BZ_CODE32_START 0x100000

static bool is_bzimage(void)
{
    return strcmp(kiln_variant, "bzimage") == 0;
}

/* Long mode as the 64-bit code runs in it (true on every entry path). */
static bool check_cpu_mode(void)
{
    bool good = true;
    if (!(read_cr0() & CR0_PG)) {
        fail("boot-params", "cr0.pg=0");
        good = false;
    }
    if (!(read_cr4() & CR4_PAE)) {
        fail("boot-params", "cr4.pae=0");
        good = false;
    }
    if (!(rdmsr(MSR_EFER) & EFER_LMA)) {
        fail("boot-params", "efer.lma=0");
        good = false;
    }
    return good;
}

static void check_pvh(bool good)
{
    if (boot.pvh.magic != PVH_MAGIC_VALUE) {
        fail("boot-params", "pvh-magic=0x%08x", boot.pvh.magic);
        good = false;
    }
    if (boot.pvh.version < 1) {
        fail("boot-params", "pvh-version=%u", boot.pvh.version);
        good = false;
    }
    if (good)
        ok("boot-params", "protocol=pvh version=%u", boot.pvh.version);
    info("boot-params", "start_info=0x%llx modules=%u", boot.boot_ptr, boot.pvh.nr_modules);
}

static void check_linux(bool good)
{
    /* The entry register pointed at a zero page: its magic numbers prove it. */
    if (boot.hdr.boot_flag != BOOT_FLAG_MAGIC) {
        fail("boot-params", "boot_flag=0x%04x", boot.hdr.boot_flag);
        good = false;
    }
    if (boot.hdr.header != HDRS_MAGIC) {
        fail("boot-params", "header=0x%08x", boot.hdr.header);
        good = false;
    }
    if (boot.hdr.type_of_loader != 0xff) {
        fail("boot-params", "type_of_loader=0x%02x", boot.hdr.type_of_loader);
        good = false;
    }
    if (boot.sentinel != 0) {
        fail("boot-params", "sentinel=0x%02x", boot.sentinel);
        good = false;
    }
    const char *proto = boot.protocol == BOOT_PROTO_LINUX32 ? "linux32" : "linux64";
    if (is_bzimage()) {
        if (boot.hdr.version != BZ_VERSION) {
            fail("boot-params", "version=0x%04x", boot.hdr.version);
            good = false;
        }
        if (boot.hdr.code32_start != BZ_CODE32_START) {
            fail("boot-params", "code32_start=0x%x", boot.hdr.code32_start);
            good = false;
        }
        if (good)
            ok("boot-params", "protocol=%s version=0x%04x code32_start=0x%x",
               proto, boot.hdr.version, boot.hdr.code32_start);
    } else if (good) {
        ok("boot-params", "protocol=%s", proto);
    }
    info("boot-params", "zero_page=0x%llx", boot.boot_ptr);
}

void scn_boot_params(const char *arg)
{
    (void)arg;
    bool good = check_cpu_mode();
    if (boot.protocol == BOOT_PROTO_PVH)
        check_pvh(good);
    else
        check_linux(good);
}

void scn_cmdline(const char *arg)
{
    (void)arg;
    static char shown[CMDLINE_MAX + 1];
    bool good = true;

    if (!boot.cmdline_addr) {
        ok("cmdline", "none");
        return;
    }
    if (!boot.cmdline_terminated) {
        fail("cmdline", "unterminated len>%u", CMDLINE_MAX);
        good = false;
    }
    /* The loader must respect the kernel's limit (boot protocol >= 2.06). */
    if (boot.protocol != BOOT_PROTO_PVH && boot.hdr.cmdline_size
        && boot.cmdline_len > boot.hdr.cmdline_size) {
        fail("cmdline", "len=%u cmdline_size=%u", boot.cmdline_len, boot.hdr.cmdline_size);
        good = false;
    }
    /* Output stays ASCII: show anything else as '?', and flag it. */
    u32 odd = 0;
    for (u32 i = 0; i < boot.cmdline_len; i++) {
        char c = boot.cmdline[i];
        bool printable = c >= 0x20 && c <= 0x7e;
        odd += !printable;
        shown[i] = printable ? c : '?';
    }
    shown[boot.cmdline_len] = '\0';
    if (odd) {
        fail("cmdline", "non-printable=%u", odd);
        good = false;
    }
    if (good)
        ok("cmdline", "len=%u", boot.cmdline_len);
    info("cmdline", "%s", shown);
}
