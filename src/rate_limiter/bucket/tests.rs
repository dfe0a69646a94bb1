use super::*;

const MS: u64 = 1_000_000;
const SEC: u64 = 1_000_000_000;

fn bucket(size: u64, burst: u64, refill_ms: u64) -> TokenBucket {
    TokenBucket::new(size, burst, refill_ms, 0).expect("a bucket")
}

/// Runs requests of `tokens` back to back, each at the earliest moment it can go, and
/// returns how many went through by `until`.
fn saturate(b: &mut TokenBucket, tokens: u64, until: u64) -> u64 {
    let mut now = 0u64;
    let mut n = 0;
    loop {
        match b.reduce(tokens, now) {
            Ok(()) => n += 1,
            Err(wait) => {
                assert!(wait > 0);
                now = now.saturating_add(wait);
                if now > until {
                    return n;
                }
            }
        }
    }
}

#[test]
fn size_or_refill_zero_is_no_bucket() {
    assert!(TokenBucket::new(0, 5, 100, 0).is_none());
    assert!(TokenBucket::new(5, 5, 0, 0).is_none());
    assert!(TokenBucket::new(0, 0, 0, 0).is_none());
}

#[test]
fn starts_full_and_spends_the_burst_first() {
    let mut b = bucket(100, 50, 1000);
    assert_eq!(b.reduce(30, 0), Ok(()));
    assert_eq!((b.burst_left(), b.level()), (20, 100));
    assert_eq!(b.reduce(30, 0), Ok(()));
    assert_eq!((b.burst_left(), b.level()), (0, 90));
    // The burst never refills.
    b.refill(10 * SEC);
    assert_eq!((b.burst_left(), b.level()), (0, 100));
}

#[test]
fn burst_larger_than_size() {
    let mut b = bucket(10, 1000, 1000);
    // 1010 tokens at once: burst then the whole bucket.
    assert_eq!(b.reduce(1010, 0), Ok(()));
    assert_eq!((b.burst_left(), b.level()), (0, 0));
    assert_eq!(b.reduce(1, 0), Err(100 * MS));
}

#[test]
fn waits_exactly_for_the_missing_tokens() {
    let mut b = bucket(10, 0, 10);
    assert_eq!(b.reduce(10, 0), Ok(()));
    // 1 token per ms.
    assert_eq!(b.reduce(1, 0), Err(MS));
    assert_eq!(b.reduce(1, MS - 1), Err(1));
    assert_eq!(b.reduce(1, MS), Ok(()));
    assert_eq!(b.reduce(3, MS), Err(3 * MS));
}

#[test]
fn non_integral_rates_round_the_wait_up_and_carry_the_rest() {
    // 3 tokens per 10 ms: one token every 3.333... ms.
    let mut b = bucket(3, 0, 10);
    assert_eq!(b.reduce(3, 0), Ok(()));
    let w = b.reduce(1, 0).unwrap_err();
    assert_eq!(w, 3_333_334);
    assert_eq!(b.reduce(1, w - 1), Err(1));
    assert_eq!(b.reduce(1, w), Ok(()));
    // The fraction carried over: the second token is due at exactly 6.666..7 ms.
    let w2 = b.reduce(1, w).unwrap_err();
    assert_eq!(w + w2, 6_666_667);
}

#[test]
fn many_small_refills_add_up_to_one_big_one() {
    for (size, refill) in [
        (3u64, 10u64),
        (7, 1),
        (1_000_003, 997),
        (u64::MAX, 1),
        (1, 1),
    ] {
        let mut a = bucket(size, 0, refill);
        let mut b = bucket(size, 0, refill);
        a.take(size);
        b.take(size);
        let mut t = 0;
        for step in [1u64, 7, 999, 333_333, 1, 12_345] {
            t += step;
            a.refill(t);
        }
        b.refill(t);
        assert_eq!(a, b, "size {size} refill {refill}");
    }
}

#[test]
fn the_long_run_rate_is_exact_at_every_refill_time() {
    for refill_ms in [1u64, 10, 100, 1000] {
        for (size, tokens) in [(1u64, 1u64), (10, 1), (10, 3), (4096, 512), (7, 7)] {
            let mut b = bucket(size, 0, refill_ms);
            let horizon = 10 * SEC;
            let n = saturate(&mut b, tokens, horizon);
            // Allowed: the initial bucket plus the refill over the horizon.
            let allowed = (size + size * (horizon / (refill_ms * MS))) / tokens;
            assert!(
                n == allowed || n + 1 == allowed,
                "refill {refill_ms} size {size} tokens {tokens}: {n} vs {allowed}"
            );
        }
    }
}

#[test]
fn a_request_larger_than_the_bucket_goes_when_full_and_leaves_debt() {
    let mut b = bucket(10, 0, 10);
    assert_eq!(b.reduce(5, 0), Ok(()));
    // Not full: wait until it is (5 ms), then the 35-token request goes.
    assert_eq!(b.reduce(35, 0), Err(5 * MS));
    assert_eq!(b.reduce(35, 5 * MS), Ok(()));
    assert_eq!(b.level(), -25);
    // The next token waits for the debt and one token: 26 ms.
    assert_eq!(b.reduce(1, 5 * MS), Err(26 * MS));
    assert_eq!(b.reduce(1, 31 * MS), Ok(()));
}

#[test]
fn u64_sizes_and_requests() {
    let mut b = bucket(u64::MAX, u64::MAX, 1);
    assert_eq!(b.reduce(u64::MAX, 0), Ok(()));
    assert_eq!(b.burst_left(), 0);
    assert_eq!(b.reduce(u64::MAX, 0), Ok(()));
    assert_eq!(b.level(), 0);
    // u64::MAX tokens per ms: one ms refills it all.
    assert_eq!(b.reduce(u64::MAX, 0), Err(MS));
    assert_eq!(b.reduce(u64::MAX, MS), Ok(()));
    // A tiny bucket and the largest request: debt of almost 2^64, paid at one token per
    // u64::MAX ms: the wait saturates.
    let mut b = bucket(1, 0, u64::MAX);
    assert_eq!(b.reduce(u64::MAX, 0), Ok(()));
    assert_eq!(b.level(), 1 - i128::from(u64::MAX));
    assert_eq!(b.reduce(1, 0), Err(MAX_WAIT_NS));
    // Time passing by the largest amount does not overflow.
    b.refill(u64::MAX);
    assert!(b.level() <= 1);
}

#[test]
fn largest_refill_time_and_huge_elapsed_times() {
    let mut b = bucket(u64::MAX, 0, u64::MAX);
    b.take(u64::MAX);
    b.refill(u64::MAX);
    // u64::MAX ns of u64::MAX ms: about 10^-6 of the bucket.
    assert_eq!(b.level(), i128::from(u64::MAX / 1_000_000));
    let mut b = bucket(1, 0, 1);
    b.take(1);
    b.refill(u64::MAX);
    assert_eq!(b.level(), 1);
}

#[test]
fn a_clock_going_backwards_adds_nothing() {
    let mut b = bucket(10, 0, 10);
    b.refill(5 * MS);
    b.take(10);
    b.refill(MS);
    assert_eq!(b.level(), 0);
    b.refill(6 * MS);
    assert_eq!(b.level(), 1);
}

#[test]
fn one_ms_refill_of_one_token_is_a_thousand_per_second() {
    let mut b = bucket(1, 0, 1);
    assert_eq!(saturate(&mut b, 1, SEC), 1001);
}

#[test]
fn wait_is_never_zero_when_blocked_and_enough_after_it() {
    // Every small configuration and level: after the reported wait the request goes, and
    // one ns earlier it does not.
    for size in 1..=12u64 {
        for refill_ms in [1u64, 2, 3, 7] {
            for taken in 0..=2 * size {
                for tokens in 1..=size + 3 {
                    let mut b = bucket(size, 0, refill_ms);
                    if taken > size {
                        b.take(size);
                        b.refill(0);
                        b.take(taken - size);
                    } else {
                        b.take(taken);
                    }
                    b.refill(0);
                    let wait = b.wait_ns(tokens);
                    if wait == 0 {
                        continue;
                    }
                    let mut early = b.clone();
                    early.refill(wait - 1);
                    assert!(
                        !early.can_take(tokens),
                        "{size} {refill_ms} {taken} {tokens}"
                    );
                    b.refill(wait);
                    assert!(b.can_take(tokens), "{size} {refill_ms} {taken} {tokens}");
                }
            }
        }
    }
}

#[test]
fn save_and_restore_credit_nothing_for_the_time_between() {
    let mut b = bucket(100, 40, 100);
    assert_eq!(b.reduce(90, 0), Ok(()));
    assert_eq!(b.reduce(60, 10 * MS), Ok(()));
    let state = b.save(15 * MS);
    assert_eq!(state.burst_left, 0);
    assert_eq!(state.tokens, 5);
    // Restored an hour later: the same tokens, refilling from then on.
    let mut r = TokenBucket::restore(&state, 3600 * SEC).expect("bucket");
    assert_eq!(r.level(), 5);
    assert_eq!(r.reduce(6, 3600 * SEC), Err(MS));
    // Debt survives too.
    let mut d = bucket(10, 0, 10);
    d.take(10);
    d.take(25);
    let s = d.save(0);
    assert_eq!((s.tokens, s.debt), (0, 25));
    let r = TokenBucket::restore(&s, 5).expect("bucket");
    assert_eq!(r.level(), -25);
    // The state round-trips through JSON (u128 fraction included).
    let json = serde_json::to_string(&state).expect("json");
    let back: BucketState = serde_json::from_str(&json).expect("parse");
    assert_eq!(back, state);
}
