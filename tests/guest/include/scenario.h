/*
 * Scenarios: selected by kiln.run=<name>[:<arg>],... on the command line
 * and listed in scenarios/table.c. A scenario prints ok/fail/info/bench
 * lines through report.h; to end the run early it calls finish().
 */
#ifndef KILN_SCENARIO_H
#define KILN_SCENARIO_H

#include "types.h"

/* `arg` is the text after ':' (NUL-terminated), or NULL if none was given. */
typedef void (*scenario_fn)(const char *arg);

struct scenario {
    const char *name;
    scenario_fn run;
    bool takes_arg;             /* ":<arg>" allowed */
    const char *help;
};

/* Runs the scenarios named on the command line (default: boot). */
void scenarios_run(const char *cmdline);

void scn_boot(const char *arg);
void scn_boot_params(const char *arg);
void scn_cmdline(const char *arg);
void scn_e820(const char *arg);
void scn_memory(const char *arg);
void scn_initrd(const char *arg);
void scn_cpuid(const char *arg);
void scn_mptable(const char *arg);
void scn_acpi(const char *arg);
void scn_smp(const char *arg);
void scn_hello(const char *arg);
void scn_serial_echo(const char *arg);
void scn_ctrl_alt_del(const char *arg);
void scn_boot_timer(const char *arg);
void scn_pio_bench(const char *arg);
void scn_triple_fault(const char *arg);
void scn_triple_fault_ap(const char *arg);
void scn_emulation_failure(const char *arg);
void scn_idle(const char *arg);
void scn_virtio(const char *arg);
void scn_blk(const char *arg);
void scn_blk_read(const char *arg);
void scn_blk_write(const char *arg);
void scn_blk_bench(const char *arg);
void scn_blk_hostile(const char *arg);
void scn_net(const char *arg);
void scn_net_rx_big(const char *arg);
void scn_net_rx_stall(const char *arg);
void scn_net_tap_gone(const char *arg);
void scn_net_hostile(const char *arg);
void scn_net_bench(const char *arg);
void scn_net_offload(const char *arg);
void scn_blk_flood(const char *arg);
void scn_net_flood(const char *arg);
void scn_blk_resize(const char *arg);
void scn_blk_rand(const char *arg);
void scn_blk_slow(const char *arg);
void scn_blk_fuzz(const char *arg);
void scn_workload(const char *arg);
void scn_serial_flood(const char *arg);
void scn_soak(const char *arg);

#endif
