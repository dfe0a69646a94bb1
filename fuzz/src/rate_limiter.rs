//! The token bucket's arithmetic (`kiln::rate_limiter::TokenBucket`): any size, burst,
//! refill time, request sizes and clock steps, edges (0, 1, u64::MAX, powers of two)
//! favoured.
//!
//! Invariants: nothing panics or overflows; the level stays in [-(2^64 - 1), size]; a
//! request refused with a wait goes through exactly then and not one nanosecond earlier
//! (unless the wait saturated); the tokens admitted never exceed the burst, the bucket, the
//! refill over the time credited and the largest request (the debt a request larger than
//! the bucket may leave); a save and restore changes nothing and credits no time between.

use kiln::rate_limiter::{MAX_WAIT_NS, NANOS_PER_MILLI, TokenBucket};

use crate::wire::{self, Enc, U, Wire};

const MAX_OPS: usize = 256;

/// A u64 drawn towards the edges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edge(pub u64);

impl Wire for Edge {
    fn decode(u: &mut U<'_>) -> Self {
        Edge(match wire::u8(u) % 5 {
            0 => wire::u64(u),
            1 => u64::from(wire::u8(u)),
            2 => u64::MAX - u64::from(wire::u8(u)),
            3 => 1u64 << (wire::u8(u) % 64),
            _ => u64::from(wire::u32(u)),
        })
    }
    fn encode(&self, e: &mut Enc) {
        e.u8(0).u64(self.0);
    }
}

/// One step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    /// The clock moves on by this many ns.
    Advance(Edge),
    /// A request of this many tokens.
    Reduce(Edge),
    /// Saved, and restored this many ns later (time not credited).
    SaveRestore(Edge),
}

impl Wire for Op {
    fn decode(u: &mut U<'_>) -> Self {
        match wire::u8(u) % 3 {
            0 => Op::Advance(Edge::decode(u)),
            1 => Op::Reduce(Edge::decode(u)),
            _ => Op::SaveRestore(Edge::decode(u)),
        }
    }
    fn encode(&self, e: &mut Enc) {
        match self {
            Op::Advance(v) => e.u8(0).raw(&v.to_bytes()),
            Op::Reduce(v) => e.u8(1).raw(&v.to_bytes()),
            Op::SaveRestore(v) => e.u8(2).raw(&v.to_bytes()),
        };
    }
}

/// A bucket and what happens to it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Input {
    /// Bucket size.
    pub size: Edge,
    /// One-time burst.
    pub burst: Edge,
    /// Refill time (ms).
    pub refill_ms: Edge,
    /// The steps.
    pub ops: Vec<Op>,
}

impl Wire for Input {
    fn decode(u: &mut U<'_>) -> Self {
        Input {
            size: Edge::decode(u),
            burst: Edge::decode(u),
            refill_ms: Edge::decode(u),
            ops: wire::many(u, MAX_OPS),
        }
    }
    fn encode(&self, e: &mut Enc) {
        self.size.encode(e);
        self.burst.encode(e);
        self.refill_ms.encode(e);
        e.many(&self.ops);
    }
}

crate::arbitrary_via_wire!(Input);

/// Runs the input; panics when an invariant breaks.
pub fn run(input: &Input) {
    let (size, burst, refill_ms) = (input.size.0, input.burst.0, input.refill_ms.0);
    let Some(mut b) = TokenBucket::new(size, burst, refill_ms, 0) else {
        assert!(size == 0 || refill_ms == 0);
        return;
    };
    let refill_ns = u128::from(refill_ms) * NANOS_PER_MILLI;
    let mut now = 0u64;
    // Time the bucket was credited for (saved time excluded), as a u128 sum.
    let mut credited = 0u128;
    let mut admitted = 0u128;
    let mut largest = 0u128;
    for op in &input.ops {
        match *op {
            Op::Advance(dt) => {
                let step = dt.0.min(u64::MAX - now);
                now += step;
                credited += u128::from(step);
            }
            Op::Reduce(tokens) => {
                let tokens = tokens.0;
                let before = b.clone();
                match b.reduce(tokens, now) {
                    Ok(()) => {
                        admitted += u128::from(tokens);
                        largest = largest.max(u128::from(tokens));
                    }
                    Err(wait) => {
                        assert!(wait > 0, "refused without a wait");
                        assert_eq!(b, {
                            let mut r = before.clone();
                            r.refill(now);
                            r
                        });
                        if let Some(then) = now.checked_add(wait) {
                            let mut later = b.clone();
                            assert!(
                                later.reduce(tokens, then).is_ok() || wait == MAX_WAIT_NS,
                                "still refused after the wait {wait}"
                            );
                            let mut early = b.clone();
                            assert!(
                                early.reduce(tokens, then - 1).is_err(),
                                "the wait {wait} was longer than needed"
                            );
                        }
                    }
                }
            }
            Op::SaveRestore(gap) => {
                let state = b.save(now);
                let json = serde_json::to_string(&state).expect("state to JSON");
                let back = serde_json::from_str(&json).expect("state from JSON");
                assert_eq!(state, back);
                let later = now.saturating_add(gap.0);
                let mut r = TokenBucket::restore(&state, later).expect("a bucket");
                assert_eq!(r.level(), b.level());
                assert_eq!(r.burst_left(), b.burst_left());
                assert_eq!(
                    r.save(later),
                    state,
                    "time between save and restore credited"
                );
                b = r;
                now = later;
            }
        }
        assert!(b.level() <= i128::from(size));
        assert!(b.level() >= -i128::from(u64::MAX));
        // credited <= 2^64 * 256 steps: the product may exceed u128 only in absurd
        // inputs; then the bound holds trivially.
        if let Some(units) = credited.checked_mul(u128::from(size)) {
            let bound = u128::from(burst) + u128::from(size) + units / refill_ns + largest;
            assert!(admitted <= bound, "admitted {admitted} > {bound}");
        }
    }
}
