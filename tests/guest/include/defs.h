/*
 * Constants shared by the C and the assembly sources (plain #defines only,
 * so that both languages can include this file).
 */
#ifndef KILN_DEFS_H
#define KILN_DEFS_H

/* Our own GDT (arch/gdt.S); the VMM's boot GDT is never used after entry. */
#define KERNEL_CS       0x08    /* 64-bit code */
#define KERNEL_DS       0x10    /* flat data */
#define KERNEL_CS32     0x18    /* 32-bit code: PVH entry and AP start-up */
#define GDT_ENTRIES     4
#define GDT_LIMIT       (GDT_ENTRIES * 8 - 1)

/* How the guest was entered; passed from the entry code to kmain(). */
#define BOOT_PROTO_LINUX64  1   /* 64-bit boot protocol, RSI = boot_params */
#define BOOT_PROTO_LINUX32  2   /* 32-bit boot protocol, ESI = boot_params */
#define BOOT_PROTO_PVH      3   /* PVH, EBX = hvm_start_info */

#define CR0_PE          0x00000001
#define CR0_PG          0x80000000
#define CR4_PAE         0x00000020
#define CR4_OSFXSR      0x00000200
#define CR4_OSXMMEXCPT  0x00000400
#define MSR_EFER        0xc0000080
#define EFER_LME        0x00000100
#define EFER_LMA        0x00000400
#define MSR_APIC_BASE   0x0000001b

/* Page-table entry bits. */
#define PTE_P           0x001
#define PTE_RW          0x002
#define PTE_PWT         0x008
#define PTE_PCD         0x010
#define PTE_PS          0x080   /* 2 MiB page in a page directory */

/* Per-CPU stacks live in the non-zeroed .stack section (arch/stacks.S). */
#define STACK_SIZE      16384
#define MAX_CPUS        64

/*
 * The AP start-up trampoline is copied to this physical page; SIPI vector
 * = address >> 12. Free RAM in the Firecracker layout (GDT 0x500, IDT 0x520,
 * PVH start_info 0x6000, zero page 0x7000, page tables 0x9000-0xbfff).
 */
#define AP_TRAMPOLINE_ADDR  0x1000

/* Virtual address of the movable 2 MiB window onto physical memory >= 4 GiB. */
#define PHYS_WINDOW_VA  0x8000000000

#endif
