/*
 * The scenario table and the kiln.run= command-line parser.
 * To add a scenario: write `void scn_<name>(const char *arg)` in its own
 * file under scenarios/, declare it in include/scenario.h and add a row
 * here. Nothing else (build.rs compiles every .c/.S it finds).
 */
#include "boot.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

static const struct scenario scenarios[] = {
    { "boot",              scn_boot,              false, "every boot check below, in order" },
    { "boot-params",       scn_boot_params,       false, "entry protocol and boot structure" },
    { "cmdline",           scn_cmdline,           false, "the command line" },
    { "e820",              scn_e820,              false, "the memory map" },
    { "memory",            scn_memory,            false, "write/read RAM at range ends" },
    { "initrd",            scn_initrd,            false, "initrd placement and FNV-1a" },
    { "cpuid",             scn_cpuid,             false, "vendor, hypervisor bit, APIC ids" },
    { "mptable",           scn_mptable,           false, "the MP table" },
    { "acpi",              scn_acpi,              false, "the ACPI tables (RSDP, XSDT, FADT, MADT, DSDT devices)" },
    { "smp",               scn_smp,               false, "start every AP (INIT/SIPI/SIPI)" },
    { "hello",             scn_hello,             false, "one line, then reset" },
    { "serial-echo",       scn_serial_echo,       false, "read a line by UART interrupt" },
    { "ctrl-alt-del",      scn_ctrl_alt_del,      false, "wait for Ctrl+Alt+Del on the keyboard" },
    { "boot-timer",        scn_boot_timer,        false, "write 123 to MMIO 0xc0000000 (boot timer)" },
    { "pio-bench",         scn_pio_bench,         true,  "N outs to port 0x80, timed" },
    { "soak",              scn_soak,              true,  "block and network traffic in a loop, [<rounds>[:<idle_ms>]]" },
    { "serial-flood",      scn_serial_flood,      true,  "<n> bytes of serial output, 64-byte lines" },
    { "triple-fault",      scn_triple_fault,      false, "shut down by triple fault" },
    { "triple-fault-ap",   scn_triple_fault_ap,   false, "the first AP shuts down by triple fault" },
    { "emulation-failure", scn_emulation_failure, false, "execute an SSE instruction" },
    { "idle",              scn_idle,              false, "sti; hlt forever" },
    { "virtio",            scn_virtio,            false, "list the virtio-mmio devices" },
    { "blk",               scn_blk,               true,  "virtio-blk: read, write, flush, get-id, last sector" },
    { "blk-read",          scn_blk_read,          true,  "virtio-blk: read <dev>:<sector>:<count>, FNV-1a" },
    { "blk-write",         scn_blk_write,         true,  "virtio-blk: write the pattern at <dev>:<sector>:<count>" },
    { "blk-bench",         scn_blk_bench,         true,  "virtio-blk: <n> sequential reads of <size> bytes" },
    { "blk-hostile",       scn_blk_hostile,       true,  "virtio-blk: a hostile driver, [<dev>:]<case>|all" },
    { "net",               scn_net,               true,  "virtio-net: ARP, ping the peer, answer its pings" },
    { "net-rx-big",        scn_net_rx_big,        true,  "virtio-net: frames larger than the receive buffers" },
    { "net-rx-stall",      scn_net_rx_stall,      true,  "virtio-net: receive queue and TAP full, then drained" },
    { "net-tap-gone",      scn_net_tap_gone,      true,  "virtio-net: TAP deleted during TX and block I/O" },
    { "net-hostile",       scn_net_hostile,       true,  "virtio-net: malformed transmit chains, <case>|all" },
    { "net-bench",         scn_net_bench,         true,  "virtio-net: <tx|rx>:<n>:<size>:<batch> frames, timed" },
    { "net-offload",       scn_net_offload,       true,  "virtio-net: checksum and TSO offloads against the host stack" },
    { "blk-flood",         scn_blk_flood,         true,  "virtio-blk: <size>[:<dev>] reads, 80 in flight, forever, progress lines" },
    { "net-flood",         scn_net_flood,         true,  "virtio-net: <tx|rx>:<size> UDP frames flat out, forever, progress lines" },
    { "blk-rand",          scn_blk_rand,          true,  "virtio-blk: <n>:<size>:<depth> random reads, <depth> in flight, timed" },
    { "blk-slow",          scn_blk_slow,          true,  "virtio-blk: <n> reads and a FLUSH in flight while answering ping" },
    { "blk-resize",        scn_blk_resize,        true,  "virtio-blk: wait for a backing-file swap, new capacity" },
    { "blk-fuzz",          scn_blk_fuzz,          true,  "virtio-blk: random register/queue/chain abuse, <seed>[:<batches>[:<ops>]]" },
    { "workload",          scn_workload,          true,  "run <steps> steps: memory pattern (and blk, net) checked, progress lines" },
};

void scn_boot(const char *arg)
{
    (void)arg;
    scn_boot_params(NULL);
    scn_cmdline(NULL);
    scn_e820(NULL);
    scn_memory(NULL);
    scn_initrd(NULL);
    scn_cpuid(NULL);
    scn_mptable(NULL);
    scn_acpi(NULL);
    scn_smp(NULL);
}

/* Runs one "<name>[:<arg>]" item of a kiln.run= list. */
static void run_item(const char *item, size_t len)
{
    char buf[128];
    if (len >= sizeof(buf)) {
        fail("scenario", "too-long=%.*s", 64, item);
        return;
    }
    memcpy(buf, item, len);
    buf[len] = '\0';

    char *arg = NULL;
    for (size_t i = 0; i < len; i++) {
        if (buf[i] == ':') {
            buf[i] = '\0';
            arg = &buf[i + 1];
            break;
        }
    }
    for (size_t i = 0; i < ARRAY_SIZE(scenarios); i++) {
        const struct scenario *s = &scenarios[i];
        if (strcmp(s->name, buf) != 0)
            continue;
        if (arg && !s->takes_arg) {
            fail("scenario", "unexpected-arg=%s:%s", buf, arg);
            return;
        }
        s->run(arg);
        return;
    }
    fail("scenario", "unknown=%s", buf);
}

static bool is_space(char c)
{
    return c == ' ' || c == '\t' || c == '\n' || c == '\r';
}

void scenarios_run(const char *cmdline)
{
    static const char key[] = "kiln.run=";
    bool selected = false;
    const char *p = cmdline;

    /* Every kiln.run= token counts, in order of appearance. */
    while (*p) {
        while (is_space(*p))
            p++;
        const char *tok = p;
        while (*p && !is_space(*p))
            p++;
        if ((size_t)(p - tok) < sizeof(key) - 1 || strncmp(tok, key, sizeof(key) - 1) != 0)
            continue;
        selected = true;
        for (const char *item = tok + sizeof(key) - 1; item < p;) {
            const char *end = item;
            while (end < p && *end != ',')
                end++;
            if (end > item)
                run_item(item, (size_t)(end - item));
            item = end + 1;
        }
    }
    if (!selected)
        scn_boot(NULL);
}
