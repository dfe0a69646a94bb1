//! One token bucket, in exact integer arithmetic.
//!
//! A bucket of `size` tokens refills at `size` tokens per `refill_time`. Time is in
//! nanoseconds and passed in by the caller, so the arithmetic is tested and fuzzed without a
//! clock. The level is kept as whole tokens plus a fraction counted in units of
//! `1 / refill_ns` of a token: refilling by `dt` adds exactly `dt * size` such units, so any
//! number of refills at any times adds up to exactly what one refill over the whole span
//! would (no drift), and nothing overflows: `dt * size < 2^128` because both are below
//! `2^64`, and the fraction stays below `refill_ns < 2^84`.
//!
//! Semantics (Firecracker's, where users depend on them):
//! - the bucket starts full; the one-time burst is spent first and never refills;
//! - a request needs `min(rest, size)` tokens in the bucket, where `rest` is what the burst
//!   did not cover; it then takes all of `rest`, so a request larger than the bucket goes
//!   through once the bucket is full and leaves it in debt (negative), and the next request
//!   waits until the debt is repaid — nothing blocks forever, and the rate stays exact.

/// Nanoseconds per millisecond (`refill_time` is in milliseconds).
pub const NANOS_PER_MILLI: u128 = 1_000_000;

/// The longest wait ever reported (the timer is armed for at most this long): about 584 years.
pub const MAX_WAIT_NS: u64 = u64::MAX;

/// A token bucket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_ms: u64,
    /// `refill_ms * 10^6`: at most `2^64 * 10^6 < 2^84`.
    refill_ns: u128,
    /// The one-time burst as configured.
    initial_burst: u64,
    /// What is left of the one-time burst.
    burst: u64,
    /// Whole tokens; negative after a request larger than what was there (debt). Always in
    /// `[-(2^64 - 1), size]`.
    level: i128,
    /// Fraction of a token, in units of `1 / refill_ns` token; below `refill_ns`, and 0 when
    /// the bucket is full.
    frac: u128,
    /// When the bucket was last refilled (ns, the caller's clock).
    last: u64,
}

/// What the bucket needs before a request of `tokens` can go, and what it takes then.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Need {
    /// Taken from the one-time burst.
    from_burst: u64,
    /// Taken from the bucket (may exceed its level, up to `tokens`).
    rest: u64,
    /// The level the bucket must have: `min(rest, size)`.
    threshold: u64,
}

/// The saved state of a bucket (snapshots). The refill is brought up to the moment of the
/// save, so restoring at any later time credits nothing for the time in between.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BucketState {
    /// Bucket size.
    pub size: u64,
    /// Refill time in milliseconds.
    pub refill_time: u64,
    /// The one-time burst as configured.
    pub one_time_burst: u64,
    /// What is left of the one-time burst.
    pub burst_left: u64,
    /// Whole tokens in the bucket (0 when in debt).
    pub tokens: u64,
    /// Tokens owed (0 unless a request larger than the level went through).
    pub debt: u64,
    /// Fraction of a token in units of `1 / (refill_time * 10^6)`.
    pub fraction: u128,
}

impl TokenBucket {
    /// A full bucket with its burst, or `None` when `size` or `refill_ms` is 0 (no limit, as
    /// in Firecracker).
    pub fn new(size: u64, one_time_burst: u64, refill_ms: u64, now: u64) -> Option<TokenBucket> {
        if size == 0 || refill_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_ms,
            refill_ns: u128::from(refill_ms) * NANOS_PER_MILLI,
            initial_burst: one_time_burst,
            burst: one_time_burst,
            level: i128::from(size),
            frac: 0,
            last: now,
        })
    }

    /// Bucket size.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Refill time (ms).
    pub fn refill_time_ms(&self) -> u64 {
        self.refill_ms
    }

    /// What is left of the one-time burst.
    pub fn burst_left(&self) -> u64 {
        self.burst
    }

    /// Whole tokens in the bucket; negative when in debt.
    pub fn level(&self) -> i128 {
        self.level
    }

    /// Adds the tokens earned since the last refill. A clock that went backwards adds
    /// nothing (and the earlier time is kept).
    pub fn refill(&mut self, now: u64) {
        let Some(dt) = now.checked_sub(self.last) else {
            return;
        };
        self.last = now;
        let size = i128::from(self.size);
        if self.level >= size {
            return;
        }
        // dt, size < 2^64: the product is below 2^128.
        let units = u128::from(dt) * u128::from(self.size);
        let r = self.refill_ns;
        // Fast path, no division: enough for a full bucket (the usual case of a limit that
        // does not bind). missing <= 2^65 and r < 2^84: the product may not fit, then it is
        // not reached (units < 2^128).
        let missing = u128::try_from(size - self.level).unwrap_or(u128::MAX);
        if let Some(needed) = missing.checked_mul(r)
            && units.saturating_add(self.frac) >= needed
        {
            self.level = size;
            self.frac = 0;
            return;
        }
        // p % r and frac are both below r < 2^84: their sum cannot overflow.
        let carry = units % r + self.frac;
        let whole = units / r + carry / r;
        self.frac = carry % r;
        // whole < 2^128 / 10^6 < 2^108 and level >= -2^64: the sum fits an i128.
        let whole = i128::try_from(whole).unwrap_or(i128::MAX - size);
        self.level = self.level.saturating_add(whole);
        if self.level >= size {
            self.level = size;
            self.frac = 0;
        }
    }

    fn need(&self, tokens: u64) -> Need {
        let from_burst = tokens.min(self.burst);
        let rest = tokens - from_burst;
        Need {
            from_burst,
            rest,
            threshold: rest.min(self.size),
        }
    }

    /// Nanoseconds from the last refill until a request of `tokens` can go (0: now).
    /// Call [`TokenBucket::refill`] first.
    pub fn wait_ns(&self, tokens: u64) -> u64 {
        let need = self.need(tokens);
        let threshold = i128::from(need.threshold);
        if need.rest == 0 || self.level >= threshold {
            return 0;
        }
        // 1 <= missing <= 2^65.
        let missing = u128::try_from(threshold - self.level).unwrap_or(u128::MAX);
        // The smallest t with floor((t * size + frac) / refill_ns) >= missing.
        let Some(units) = missing.checked_mul(self.refill_ns) else {
            // Over 2^128 units at under 2^64 per ns: longer than MAX_WAIT_NS anyway.
            return MAX_WAIT_NS;
        };
        // frac < refill_ns <= units.
        let units = units - self.frac;
        let size = u128::from(self.size);
        let t = units / size + u128::from(!units.is_multiple_of(size));
        u64::try_from(t).unwrap_or(MAX_WAIT_NS)
    }

    /// Whether a request of `tokens` can go now. Call [`TokenBucket::refill`] first.
    pub fn can_take(&self, tokens: u64) -> bool {
        self.wait_ns(tokens) == 0
    }

    /// Takes `tokens` (the caller checked [`TokenBucket::can_take`]): from the burst first,
    /// the rest from the bucket, into debt if the request is larger than the level.
    pub fn take(&mut self, tokens: u64) {
        let need = self.need(tokens);
        self.burst -= need.from_burst;
        // level >= -2^64 before (it is >= threshold >= 0 when the caller checked): fits.
        self.level -= i128::from(need.rest);
    }

    /// Returns `tokens` taken for something that did not happen, up to a full bucket.
    pub fn give_back(&mut self, tokens: u64) {
        let size = i128::from(self.size);
        self.level = self.level.saturating_add(i128::from(tokens)).min(size);
        if self.level == size {
            self.frac = 0;
        }
    }

    /// Refills, and takes `tokens` if they can go now; else returns the nanoseconds until
    /// they can.
    pub fn reduce(&mut self, tokens: u64, now: u64) -> Result<(), u64> {
        self.refill(now);
        match self.wait_ns(tokens) {
            0 => {
                self.take(tokens);
                Ok(())
            }
            wait => Err(wait),
        }
    }

    /// The state to save, refilled up to `now` first.
    pub fn save(&mut self, now: u64) -> BucketState {
        self.refill(now);
        BucketState {
            size: self.size,
            refill_time: self.refill_ms,
            one_time_burst: self.initial_burst,
            burst_left: self.burst,
            tokens: u64::try_from(self.level.max(0)).unwrap_or(self.size),
            debt: u64::try_from((-self.level).max(0)).unwrap_or(u64::MAX),
            fraction: self.frac,
        }
    }

    /// A bucket restored from `state` at `now`: it refills from `now` on. `None` if the state
    /// describes no bucket (size or refill time 0).
    pub fn restore(state: &BucketState, now: u64) -> Option<TokenBucket> {
        let mut b = TokenBucket::new(state.size, state.one_time_burst, state.refill_time, now)?;
        b.burst = state.burst_left;
        b.level = (i128::from(state.tokens) - i128::from(state.debt)).min(i128::from(b.size));
        b.frac = if b.level >= i128::from(b.size) {
            0
        } else {
            state.fraction % b.refill_ns
        };
        Some(b)
    }
}

#[cfg(test)]
mod tests;
