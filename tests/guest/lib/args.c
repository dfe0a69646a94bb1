/* Scenario arguments: "a:b:c" tokens and decimal numbers. */
#include "lib.h"

/* Splits "a:b:c" (NULL: no tokens) into at most ARG_MAX_TOKENS tokens, in place. */
u32 split_arg(const char *arg, char *buf, size_t size, char **tok)
{
    if (!arg || !*arg)
        return 0;
    size_t len = strlen(arg);
    if (len >= size)
        len = size - 1;
    memcpy(buf, arg, len);
    buf[len] = '\0';
    u32 n = 0;
    char *p = buf;
    while (n < ARG_MAX_TOKENS) {
        tok[n++] = p;
        while (*p && *p != ':')
            p++;
        if (!*p)
            break;
        *p++ = '\0';
    }
    return n;
}

bool parse_num(const char *s, u64 *out)
{
    return parse_u64(s, strlen(s), out);
}

