/* Fixed-size types and tiny helpers; the guest includes no system header. */
#ifndef KILN_TYPES_H
#define KILN_TYPES_H

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef unsigned long long u64;
typedef signed char s8;
typedef short s16;
typedef int s32;
typedef long long s64;
typedef unsigned long size_t;
typedef unsigned long uintptr_t;
typedef _Bool bool;

#define true 1
#define false 0
#define NULL ((void *)0)

#define KiB 1024ULL
#define MiB (1024ULL * KiB)
#define GiB (1024ULL * MiB)

#define ARRAY_SIZE(a) (sizeof(a) / sizeof((a)[0]))
#define ALIGN_DOWN(x, a) ((u64)(x) & ~((u64)(a) - 1))
#define ALIGN_UP(x, a) ALIGN_DOWN((u64)(x) + (u64)(a) - 1, (a))
#define MIN(a, b) ((a) < (b) ? (a) : (b))
#define MAX(a, b) ((a) > (b) ? (a) : (b))

#define noreturn __attribute__((noreturn))
#define packed __attribute__((packed))
#define aligned(n) __attribute__((aligned(n)))
#define printf_like(f, a) __attribute__((format(printf, f, a)))

typedef __builtin_va_list va_list;
#define va_start(ap, last) __builtin_va_start(ap, last)
#define va_arg(ap, type) __builtin_va_arg(ap, type)
#define va_end(ap) __builtin_va_end(ap)

#endif
