/*
 * Port I/O and MMIO accessors. Every access is one instruction (a VM exit
 * for emulated devices) and a compiler barrier, so device accesses stay
 * ordered with the ordinary memory accesses around them (DMA buffers).
 * MMIO addresses are physical and must lie below 4 GiB, where the guest
 * maps memory 1:1 ([3 GiB, 4 GiB) uncached); use phys_window() above.
 */
#ifndef KILN_IO_H
#define KILN_IO_H

#include "types.h"

static inline void outb(u16 port, u8 v) { asm volatile("outb %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outw(u16 port, u16 v) { asm volatile("outw %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline void outl(u16 port, u32 v) { asm volatile("outl %0, %1" :: "a"(v), "Nd"(port) : "memory"); }
static inline u8 inb(u16 port) { u8 v; asm volatile("inb %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u16 inw(u16 port) { u16 v; asm volatile("inw %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }
static inline u32 inl(u16 port) { u32 v; asm volatile("inl %1, %0" : "=a"(v) : "Nd"(port) : "memory"); return v; }

#define MMIO_ACCESSORS(bits, type, suffix)                                      \
    static inline type mmio_read##bits(u64 addr)                                \
    {                                                                           \
        type v;                                                                 \
        asm volatile("mov" suffix " %1, %0"                                     \
                     : "=r"(v) : "m"(*(volatile type *)(uintptr_t)addr) : "memory"); \
        return v;                                                               \
    }                                                                           \
    static inline void mmio_write##bits(u64 addr, type v)                       \
    {                                                                           \
        asm volatile("mov" suffix " %1, %0"                                     \
                     : "=m"(*(volatile type *)(uintptr_t)addr) : "r"(v) : "memory"); \
    }

MMIO_ACCESSORS(8, u8, "b")
MMIO_ACCESSORS(16, u16, "w")
MMIO_ACCESSORS(32, u32, "l")
MMIO_ACCESSORS(64, u64, "q")

#undef MMIO_ACCESSORS

#endif
