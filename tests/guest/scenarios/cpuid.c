/* cpuid: vendor, hypervisor bit, APIC ids (leaf 1 and leaf 0xB). */
#include "cpu.h"
#include "lib.h"
#include "report.h"
#include "scenario.h"

void scn_cpuid(const char *arg)
{
    (void)arg;
    struct cpuid_regs r0 = cpuid(0, 0), r1 = cpuid(1, 0);
    char vendor[13];
    memcpy(vendor, &r0.ebx, 4);
    memcpy(vendor + 4, &r0.edx, 4);
    memcpy(vendor + 8, &r0.ecx, 4);
    for (u32 i = 0; i < 12; i++)
        if (vendor[i] < 0x20 || vendor[i] > 0x7e)
            vendor[i] = '?';
    vendor[12] = '\0';

    u32 hypervisor = r1.ecx >> 31;
    u32 apic_id = r1.ebx >> 24;
    info("cpuid", "vendor=%s hypervisor=%u apic_id=%u", vendor, hypervisor, apic_id);

    bool good = true;
    if (!hypervisor) {
        fail("cpuid", "hypervisor=0");
        good = false;
    }
    /* Leaf 0xB exists if listed and subleaf 0 has a valid level type. */
    const char *x2apic = "absent";
    if (r0.eax >= 0xb && ((cpuid(0xb, 0).ecx >> 8) & 0xff) != 0) {
        struct cpuid_regs b1 = cpuid(0xb, 1);
        info("cpuid", "leaf=0xb logical=%u x2apic_id=%u", b1.ebx & 0xffff, b1.edx);
        if (b1.edx != apic_id) {
            fail("cpuid", "x2apic_id=%u apic_id=%u", b1.edx, apic_id);
            good = false;
        }
        x2apic = "match";
    }
    if (good)
        ok("cpuid", "hypervisor=1 x2apic=%s", x2apic);
}
