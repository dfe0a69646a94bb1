/*
 * Interrupts: the IDT (exceptions are fatal and reported), the xAPIC LAPIC,
 * the IOAPIC and a bounded wait-for-interrupt.
 *
 * Vector allocation: 0-31 exceptions; 0x20-0xef free for device interrupts
 * (irq_route); IRQ_VECTOR_TIMER for the LAPIC timer; 0xff spurious.
 */
#ifndef KILN_IRQ_H
#define KILN_IRQ_H

#include "types.h"

#define LAPIC_BASE          0xfee00000ULL
#define LAPIC_ID            0x020
#define LAPIC_TPR           0x080
#define LAPIC_EOI           0x0b0
#define LAPIC_SVR           0x0f0
#define LAPIC_ICR_LOW       0x300
#define LAPIC_ICR_HIGH      0x310
#define LAPIC_LVT_TIMER     0x320
#define LAPIC_TIMER_INIT    0x380
#define LAPIC_TIMER_DIV     0x3e0
#define IOAPIC_BASE         0xfec00000ULL

#define IRQ_VECTOR_TIMER    0xf0
#define IRQ_VECTOR_SPURIOUS 0xff

/* Register layout pushed by arch/isr.S (lowest address first). */
struct trap_frame {
    u64 rax, rbx, rcx, rdx, rsi, rdi, rbp;
    u64 r8, r9, r10, r11, r12, r13, r14, r15;
    u64 vector, error;
    u64 rip, cs, rflags, rsp, ss;           /* pushed by the CPU */
};

typedef void (*irq_handler)(struct trap_frame *f);

/* Builds the IDT with the exception vectors and loads it (BSP, early). */
void trap_init(void);
/* Loads the (shared) IDT on the calling CPU (APs). */
void trap_load(void);
/* Installs `handler` for `vector`; the LAPIC EOI is sent after it returns. */
void irq_set_handler(u8 vector, irq_handler handler);

/* Masks both 8259 PICs; the guest only uses the IOAPIC/LAPIC. */
void pic_mask_all(void);

u32 lapic_read(u32 reg);
void lapic_write(u32 reg, u32 value);
/*
 * Software-enables the LAPIC (SVR, spurious vector 0xff), TPR 0.
 * Idempotent. False if the LAPIC is not an enabled xAPIC at LAPIC_BASE.
 */
bool lapic_enable(void);
u32 lapic_id(void);
void lapic_eoi(void);

u32 ioapic_read(u32 index);
void ioapic_write(u32 index, u32 value);

/*
 * Routes IOAPIC pin `gsi` (edge, active high, fixed delivery) to `vector`
 * on the BSP and installs `handler`. Enables the LAPIC. Returns false if
 * the IOAPIC has no such pin or the vector is reserved.
 */
bool irq_route(u32 gsi, u8 vector, irq_handler handler);
void irq_mask(u32 gsi);

/*
 * Sleeps in `sti; hlt` until *flag becomes non-zero or `timeout_ms` pass
 * (at least; see TSC_HZ_MAX). A periodic LAPIC timer wakes hlt so the wait
 * is bounded even if the awaited interrupt never comes. Returns with
 * interrupts disabled; true if the flag was set.
 */
bool wait_for_irq(volatile u32 *flag, u64 timeout_ms);

#endif
