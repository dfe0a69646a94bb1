/* Freestanding library: memory/string helpers, formatting, PRNG. */
#ifndef KILN_LIB_H
#define KILN_LIB_H

#include "types.h"

/* gcc may emit calls to these four itself, so they keep their C names. */
void *memcpy(void *dst, const void *src, size_t n);
void *memmove(void *dst, const void *src, size_t n);
void *memset(void *dst, int c, size_t n);
int memcmp(const void *a, const void *b, size_t n);

size_t strlen(const char *s);
size_t strnlen(const char *s, size_t max);
int strcmp(const char *a, const char *b);
int strncmp(const char *a, const char *b, size_t n);
bool str_starts_with(const char *s, const char *prefix);

/*
 * Parses an unsigned number (decimal, or hex with 0x) from s[0..len).
 * Returns false on an empty string, a bad digit or overflow.
 */
bool parse_u64(const char *s, size_t len, u64 *out);

/* Scenario arguments (lib/args.c). */
#define ARG_MAX_TOKENS 8
/* Splits "a:b:c" (NULL: no tokens) into at most ARG_MAX_TOKENS tokens, copied into buf. */
u32 split_arg(const char *arg, char *buf, size_t size, char **tok);
/* A whole NUL-terminated decimal number. */
bool parse_num(const char *s, u64 *out);

/*
 * printf-style formatting: %d %i %u %x %X %c %s %p %%, flags '0' and '-',
 * a field width, a precision for %s (".N" or ".*"), and the length
 * modifiers l, ll and z. No floating point.
 */
typedef void (*format_sink)(char c, void *ctx);
void vformat(format_sink sink, void *ctx, const char *fmt, va_list ap);
/* Always NUL-terminates (if size > 0); returns the untruncated length. */
size_t ksnprintf(char *buf, size_t size, const char *fmt, ...) printf_like(3, 4);

/* xorshift64*: small, fast, deterministic for a given seed (for fuzzing). */
struct prng { u64 state; };
void prng_seed(struct prng *p, u64 seed);
u64 prng_next(struct prng *p);
u64 prng_below(struct prng *p, u64 bound);   /* uniform in [0, bound), bound > 0 */

/* FNV-1a 32-bit. Chainable: pass the previous result as `hash`. */
#define FNV1A32_INIT 0x811c9dc5u
u32 fnv1a32(u32 hash, const void *data, size_t n);

#endif
