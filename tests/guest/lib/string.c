/*
 * Memory and string helpers. The mem* functions use rep movsb/stosb: one
 * instruction the emulator handles in a single step, and gcc cannot turn
 * them back into calls to themselves.
 */
#include "lib.h"

void *memcpy(void *dst, const void *src, size_t n)
{
    void *d = dst;
    asm volatile("rep movsb" : "+D"(d), "+S"(src), "+c"(n) :: "memory");
    return dst;
}

void *memmove(void *dst, const void *src, size_t n)
{
    if ((uintptr_t)dst <= (uintptr_t)src || (uintptr_t)dst >= (uintptr_t)src + n)
        return memcpy(dst, src, n);
    /* Overlapping, destination above: copy backwards. */
    char *d = (char *)dst + n - 1;
    const char *s = (const char *)src + n - 1;
    asm volatile("std; rep movsb; cld" : "+D"(d), "+S"(s), "+c"(n) :: "memory", "cc");
    return dst;
}

void *memset(void *dst, int c, size_t n)
{
    void *d = dst;
    asm volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return dst;
}

int memcmp(const void *a, const void *b, size_t n)
{
    const volatile u8 *x = a, *y = b;   /* volatile: keep gcc from calling memcmp */
    for (size_t i = 0; i < n; i++)
        if (x[i] != y[i])
            return x[i] < y[i] ? -1 : 1;
    return 0;
}

size_t strlen(const char *s)
{
    size_t n = 0;
    while (s[n])
        n++;
    return n;
}

size_t strnlen(const char *s, size_t max)
{
    size_t n = 0;
    while (n < max && s[n])
        n++;
    return n;
}

int strncmp(const char *a, const char *b, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        if (a[i] != b[i])
            return (u8)a[i] < (u8)b[i] ? -1 : 1;
        if (!a[i])
            break;
    }
    return 0;
}

int strcmp(const char *a, const char *b)
{
    return strncmp(a, b, (size_t)-1);
}

bool str_starts_with(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

static int digit_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return 99;
}

bool parse_u64(const char *s, size_t len, u64 *out)
{
    u64 base = 10, v = 0;
    if (len > 2 && s[0] == '0' && (s[1] == 'x' || s[1] == 'X')) {
        base = 16;
        s += 2;
        len -= 2;
    }
    if (len == 0)
        return false;
    for (size_t i = 0; i < len; i++) {
        u64 d = (u64)digit_value(s[i]);
        if (d >= base || v > (~0ULL - d) / base)
            return false;
        v = v * base + d;
    }
    *out = v;
    return true;
}

u32 fnv1a32(u32 hash, const void *data, size_t n)
{
    const u8 *p = data;
    for (size_t i = 0; i < n; i++) {
        hash ^= p[i];
        hash *= 0x01000193u;
    }
    return hash;
}
