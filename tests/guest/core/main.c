/* The BSP's C entry: bring-up in the order that keeps failures visible. */
#include "boot.h"
#include "console.h"
#include "cpu.h"
#include "entry.h"
#include "irq.h"
#include "report.h"
#include "scenario.h"

noreturn void kmain(u32 protocol, u64 boot_ptr)
{
    boot.bsp_apic_id = cpu_initial_apic_id();  /* tells the BSP from APs in traps */
    serial_init();
    trap_init();                /* from here on exceptions are reported */
    /* Legacy PICs could deliver to exception vectors once we sti. */
    pic_mask_all();
    kprintf("kiln-guest: start variant=%s\n", kiln_variant);
    boot_info_capture(protocol, boot_ptr);
    scenarios_run(boot.cmdline);
    finish();
}
