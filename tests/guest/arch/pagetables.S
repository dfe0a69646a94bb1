/*
 * The guest's page tables, built by the assembler and linker rather than at
 * run time: on this emulated KVM every guest instruction is slow, and even
 * the PVH entry (no stack, no zeroed .bss) can simply load CR3.
 *
 *   PML4[0] -> identity PDPT: [0, 4 GiB) with 2 MiB pages; [3 GiB, 4 GiB)
 *              (the MMIO hole: LAPIC, IOAPIC, virtio-mmio) uncached PCD|PWT.
 *   PML4[1] -> window PDPT -> window PD: entry 0 is the movable 2 MiB window
 *              at PHYS_WINDOW_VA (mm.c: phys_window).
 *
 * Everything stays below 4 GiB so APs can load CR3 from 32-bit code.
 */
#include "defs.h"

#define PDE_RAM   (PTE_P | PTE_RW | PTE_PS)
#define PDE_MMIO  (PTE_P | PTE_RW | PTE_PS | PTE_PWT | PTE_PCD)
#define TABLE     (PTE_P | PTE_RW)

    .section .data.pagetables, "aw"
    .balign 4096

    .globl kiln_pml4
kiln_pml4:
    .quad kiln_pdpt + TABLE
    .quad kiln_window_pdpt + TABLE
    .fill 510, 8, 0

kiln_pdpt:
    .quad kiln_pd + TABLE
    .quad kiln_pd + 0x1000 + TABLE
    .quad kiln_pd + 0x2000 + TABLE
    .quad kiln_pd + 0x3000 + TABLE
    .fill 508, 8, 0

    /* 4 page directories, 2048 entries of 2 MiB: 0 .. 4 GiB. */
kiln_pd:
    .set pde, 0
    .rept 2048
    .if pde >= 1536             /* 1536 * 2 MiB = 3 GiB */
    .quad (pde << 21) + PDE_MMIO
    .else
    .quad (pde << 21) + PDE_RAM
    .endif
    .set pde, pde + 1
    .endr

kiln_window_pdpt:
    .quad kiln_window_pd + TABLE
    .fill 511, 8, 0

    .globl kiln_window_pd
kiln_window_pd:
    .fill 512, 8, 0
