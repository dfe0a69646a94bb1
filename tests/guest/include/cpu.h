/*
 * Privileged-instruction wrappers. Only instructions the emulated KVM of
 * these machines can execute are used: notably no mfence/lfence (emulation
 * failures), so the full barrier is a locked no-op on the stack instead.
 */
#ifndef KILN_CPU_H
#define KILN_CPU_H

#include "types.h"

/* Compiler-only barrier: x86 is TSO, this is enough between plain stores. */
#define barrier() asm volatile("" ::: "memory")

/* Full barrier (store->load ordering) without mfence. */
static inline void mb(void)
{
    asm volatile("lock orq $0, (%%rsp)" ::: "memory", "cc");
}

static inline u64 read_cr0(void) { u64 v; asm volatile("mov %%cr0, %0" : "=r"(v)); return v; }
static inline u64 read_cr2(void) { u64 v; asm volatile("mov %%cr2, %0" : "=r"(v)); return v; }
static inline u64 read_cr3(void) { u64 v; asm volatile("mov %%cr3, %0" : "=r"(v)); return v; }
static inline u64 read_cr4(void) { u64 v; asm volatile("mov %%cr4, %0" : "=r"(v)); return v; }
static inline void write_cr4(u64 v) { asm volatile("mov %0, %%cr4" :: "r"(v) : "memory"); }

static inline u64 rdmsr(u32 msr)
{
    u32 lo, hi;
    asm volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(msr));
    return ((u64)hi << 32) | lo;
}

static inline void wrmsr(u32 msr, u64 v)
{
    asm volatile("wrmsr" :: "c"(msr), "a"((u32)v), "d"((u32)(v >> 32)) : "memory");
}

struct cpuid_regs { u32 eax, ebx, ecx, edx; };

static inline struct cpuid_regs cpuid(u32 leaf, u32 subleaf)
{
    struct cpuid_regs r;
    asm volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx)
                 : "a"(leaf), "c"(subleaf));
    return r;
}

/* Initial APIC id of the executing CPU (CPUID leaf 1 EBX[31:24]). */
static inline u32 cpu_initial_apic_id(void) { return cpuid(1, 0).ebx >> 24; }

static inline u64 rdtsc(void)
{
    u32 lo, hi;
    asm volatile("rdtsc" : "=a"(lo), "=d"(hi) :: "memory");
    return ((u64)hi << 32) | lo;
}

static inline void cli(void) { asm volatile("cli" ::: "memory"); }
static inline void sti(void) { asm volatile("sti" ::: "memory"); }
static inline void hlt(void) { asm volatile("hlt" ::: "memory"); }
/* sti's one-instruction interrupt shadow makes this free of lost wake-ups. */
static inline void sti_hlt(void) { asm volatile("sti; hlt" ::: "memory"); }

static inline void invlpg(u64 va) { asm volatile("invlpg (%0)" :: "r"(va) : "memory"); }

struct packed desc_ptr { u16 limit; u64 base; };

static inline void lidt(const struct desc_ptr *d) { asm volatile("lidt %0" :: "m"(*d)); }

static inline noreturn void halt_forever(void)
{
    for (;;)
        asm volatile("cli; hlt" ::: "memory");
}

/*
 * Bounded waits. The TSC frequency is unknown, so deadlines assume the
 * fastest plausible TSC: a wait lasts *at least* `ms` milliseconds and at
 * most TSC_HZ_MAX / (real TSC frequency) times as long.
 */
#define TSC_HZ_MAX 5000000000ULL

static inline u64 tsc_deadline_ms(u64 ms) { return rdtsc() + ms * (TSC_HZ_MAX / 1000); }
static inline bool tsc_passed(u64 deadline) { return (s64)(rdtsc() - deadline) >= 0; }

/* Evaluates to true once `cond` holds, false after `ms` milliseconds. */
#define SPIN_UNTIL_MS(cond, ms) ({                                      \
        u64 _deadline = tsc_deadline_ms(ms);                            \
        bool _met;                                                      \
        for (;;) {                                                      \
            if (cond) { _met = true; break; }                           \
            if (tsc_passed(_deadline)) { _met = (cond); break; }        \
            barrier();                                                  \
        }                                                               \
        _met;                                                           \
    })

/* Wait at least `us` microseconds (see TSC_HZ_MAX). */
static inline void delay_us(u64 us)
{
    u64 end = rdtsc() + us * (TSC_HZ_MAX / 1000000);
    while (!tsc_passed(end))
        barrier();
}

#endif
