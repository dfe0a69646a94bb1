/* A small printf engine writing through a per-character sink. */
#include "lib.h"

struct spec {
    bool zero_pad, left;
    u32 width;
    int precision;              /* -1: none */
};

static void pad(format_sink sink, void *ctx, char c, u32 n)
{
    while (n--)
        sink(c, ctx);
}

static void emit(format_sink sink, void *ctx, const struct spec *sp,
                 const char *s, u32 len, bool negative)
{
    u32 total = len + (negative ? 1 : 0);
    u32 fill = sp->width > total ? sp->width - total : 0;

    if (!sp->left && !sp->zero_pad)
        pad(sink, ctx, ' ', fill);
    if (negative)
        sink('-', ctx);
    if (!sp->left && sp->zero_pad)
        pad(sink, ctx, '0', fill);
    for (u32 i = 0; i < len; i++)
        sink(s[i], ctx);
    if (sp->left)
        pad(sink, ctx, ' ', fill);
}

static void emit_number(format_sink sink, void *ctx, const struct spec *sp,
                        u64 v, u32 base, bool upper, bool negative)
{
    const char *digits = upper ? "0123456789ABCDEF" : "0123456789abcdef";
    char buf[24];
    u32 i = sizeof(buf);
    do {
        buf[--i] = digits[v % base];
        v /= base;
    } while (v);
    emit(sink, ctx, sp, buf + i, sizeof(buf) - i, negative);
}

void vformat(format_sink sink, void *ctx, const char *fmt, va_list ap)
{
    for (; *fmt; fmt++) {
        if (*fmt != '%') {
            sink(*fmt, ctx);
            continue;
        }
        struct spec sp = { .precision = -1 };
        fmt++;
        for (;; fmt++) {
            if (*fmt == '0')
                sp.zero_pad = true;
            else if (*fmt == '-')
                sp.left = true;
            else
                break;
        }
        while (*fmt >= '0' && *fmt <= '9')
            sp.width = sp.width * 10 + (u32)(*fmt++ - '0');
        if (*fmt == '.') {
            fmt++;
            if (*fmt == '*') {
                sp.precision = va_arg(ap, int);
                fmt++;
            } else {
                sp.precision = 0;
                while (*fmt >= '0' && *fmt <= '9')
                    sp.precision = sp.precision * 10 + (*fmt++ - '0');
            }
        }
        int longs = 0;
        while (*fmt == 'l' || *fmt == 'z') {
            longs += *fmt == 'z' ? 2 : 1;
            fmt++;
        }

        switch (*fmt) {
        case 'd':
        case 'i': {
            s64 v = longs ? va_arg(ap, s64) : va_arg(ap, int);
            u64 mag = v < 0 ? (u64)0 - (u64)v : (u64)v;
            emit_number(sink, ctx, &sp, mag, 10, false, v < 0);
            break;
        }
        case 'u':
        case 'x':
        case 'X': {
            u64 v = longs ? va_arg(ap, u64) : va_arg(ap, unsigned int);
            emit_number(sink, ctx, &sp, v, *fmt == 'u' ? 10 : 16, *fmt == 'X', false);
            break;
        }
        case 'p': {
            sink('0', ctx);
            sink('x', ctx);
            emit_number(sink, ctx, &sp, (u64)(uintptr_t)va_arg(ap, void *), 16, false, false);
            break;
        }
        case 'c': {
            char c = (char)va_arg(ap, int);
            emit(sink, ctx, &sp, &c, 1, false);
            break;
        }
        case 's': {
            const char *s = va_arg(ap, const char *);
            if (!s)
                s = "(null)";
            size_t len = sp.precision >= 0 ? strnlen(s, (size_t)sp.precision) : strlen(s);
            emit(sink, ctx, &sp, s, (u32)len, false);
            break;
        }
        case '%':
            sink('%', ctx);
            break;
        case '\0':
            return;
        default:                /* unknown conversion: print it verbatim */
            sink('%', ctx);
            sink(*fmt, ctx);
            break;
        }
    }
}

struct buf_sink {
    char *buf;
    size_t size, len;
};

static void buf_put(char c, void *ctx)
{
    struct buf_sink *b = ctx;
    if (b->len + 1 < b->size)
        b->buf[b->len] = c;
    b->len++;
}

size_t ksnprintf(char *buf, size_t size, const char *fmt, ...)
{
    struct buf_sink b = { buf, size, 0 };
    va_list ap;
    va_start(ap, fmt);
    vformat(buf_put, &b, fmt, ap);
    va_end(ap);
    if (size)
        buf[MIN(b.len, size - 1)] = '\0';
    return b.len;
}
