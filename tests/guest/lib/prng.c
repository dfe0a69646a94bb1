/* xorshift64* (Vigna): tiny, fast, and reproducible from a seed. */
#include "lib.h"

void prng_seed(struct prng *p, u64 seed)
{
    /* The all-zero state is a fixed point; map seed 0 to a constant. */
    p->state = seed ? seed : 0x9e3779b97f4a7c15ULL;
}

u64 prng_next(struct prng *p)
{
    u64 x = p->state;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    p->state = x;
    return x * 0x2545f4914f6cdd1dULL;
}

u64 prng_below(struct prng *p, u64 bound)
{
    /* Rejection sampling: no modulo bias. */
    u64 limit = ~0ULL - (~0ULL % bound);
    u64 r;
    do
        r = prng_next(p);
    while (r >= limit);
    return r % bound;
}
