//! Rate limiters: a bandwidth bucket and an ops bucket per device direction, and the timer
//! that wakes a throttled device exactly when enough tokens exist.
//!
//! - `bucket.rs`: one token bucket in exact integer arithmetic (no clock of its own);
//! - `timer.rs`: a CLOCK_MONOTONIC timerfd armed at an absolute time;
//! - this file: the pair of buckets a device consults, its timer and its counters.
//!
//! A device asks [`RateLimiter::check`] before doing a request, does it, then
//! [`RateLimiter::commit`]s what it did (at the same instant, so the check still holds);
//! work not done is simply not committed. A request that cannot go yet is left where it
//! was (on the ring, or the one frame read from the TAP) and [`RateLimiter::throttle`] arms
//! the timer for the exact moment it can. Firecracker instead re-checks every 100 ms, which
//! caps the rate of any bucket refilling faster than that.

mod bucket;
mod timer;

use std::os::fd::{AsRawFd, RawFd};

pub use bucket::{BucketState, MAX_WAIT_NS, NANOS_PER_MILLI, TokenBucket};
pub use timer::{Timer, now_ns};

use crate::config::{RateLimiterConfig, TokenBucketConfig};

/// A change to one bucket (`PATCH`): Firecracker's rules.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// The bucket is absent from the request: unchanged.
    Keep,
    /// `size` or `refill_time` 0: no limit.
    Disable,
    /// A new bucket, full, with its burst granted again.
    Set(TokenBucketConfig),
}

impl BucketUpdate {
    /// The update a `PATCH` body's bucket asks for.
    pub fn from_config(b: Option<&TokenBucketConfig>) -> BucketUpdate {
        match b {
            None => BucketUpdate::Keep,
            Some(b) if b.size == 0 || b.refill_time == 0 => BucketUpdate::Disable,
            Some(b) => BucketUpdate::Set(b.clone()),
        }
    }
}

/// Changes to both buckets of a limiter.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LimiterUpdate {
    /// Bytes.
    pub bandwidth: BucketUpdate,
    /// Operations.
    pub ops: BucketUpdate,
}

impl LimiterUpdate {
    /// The update a `PATCH` body's `rate_limiter` asks for (`None`: nothing changes).
    pub fn from_config(c: Option<&RateLimiterConfig>) -> LimiterUpdate {
        LimiterUpdate {
            bandwidth: BucketUpdate::from_config(c.and_then(|c| c.bandwidth.as_ref())),
            ops: BucketUpdate::from_config(c.and_then(|c| c.ops.as_ref())),
        }
    }

    /// Whether nothing changes.
    pub fn is_keep(&self) -> bool {
        self.bandwidth == BucketUpdate::Keep && self.ops == BucketUpdate::Keep
    }
}

/// The configuration after a `PATCH` of `old` with `patch` (what `GET /vm/config` shows):
/// absent buckets kept, disabled ones removed, others replaced.
pub fn patched_config(
    old: Option<&RateLimiterConfig>,
    patch: &RateLimiterConfig,
) -> Option<RateLimiterConfig> {
    let one = |old: Option<&TokenBucketConfig>, new: Option<&TokenBucketConfig>| match new {
        None => old.cloned(),
        Some(b) if b.size == 0 || b.refill_time == 0 => None,
        Some(b) => Some(b.clone()),
    };
    let c = RateLimiterConfig {
        bandwidth: one(
            old.and_then(|o| o.bandwidth.as_ref()),
            patch.bandwidth.as_ref(),
        ),
        ops: one(old.and_then(|o| o.ops.as_ref()), patch.ops.as_ref()),
    };
    (c.bandwidth.is_some() || c.ops.is_some()).then_some(c)
}

/// The saved state of a limiter (snapshots).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RateLimiterState {
    /// The bandwidth bucket.
    pub bandwidth: Option<BucketState>,
    /// The ops bucket.
    pub ops: Option<BucketState>,
}

fn bucket(c: Option<&TokenBucketConfig>, now: u64) -> Option<TokenBucket> {
    c.and_then(|c| TokenBucket::new(c.size, c.one_time_burst.unwrap_or(0), c.refill_time, now))
}

/// The buckets of one device direction and the timer that wakes it.
#[derive(Debug)]
pub struct RateLimiter {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: Timer,
    /// The timer is armed: a request waits for it.
    throttled: bool,
    /// When the held-back request became due (the timer's expiry). The first check after
    /// the timer fired is made as of then: the time between expiry and the device getting
    /// to run (timer latency, a busy loop) would otherwise be lost to the bucket's cap —
    /// with a bucket of one request, every cycle would last refill_time plus that latency.
    due: Option<u64>,
}

impl RateLimiter {
    /// A limiter as configured (`None`: no limit, but the timer exists so a later `PATCH`
    /// can add one without creating file descriptors after the seccomp filter is in place).
    pub fn new(config: Option<&RateLimiterConfig>) -> std::io::Result<RateLimiter> {
        let now = now_ns();
        Ok(RateLimiter {
            bandwidth: bucket(config.and_then(|c| c.bandwidth.as_ref()), now),
            ops: bucket(config.and_then(|c| c.ops.as_ref()), now),
            timer: Timer::new()?,
            throttled: false,
            due: None,
        })
    }

    /// Whether any bucket limits.
    pub fn is_limiting(&self) -> bool {
        self.bandwidth.is_some() || self.ops.is_some()
    }

    /// Whether a request waits for the timer.
    pub fn is_throttled(&self) -> bool {
        self.throttled
    }

    /// The buckets (bandwidth, ops).
    pub fn buckets(&self) -> (Option<&TokenBucket>, Option<&TokenBucket>) {
        (self.bandwidth.as_ref(), self.ops.as_ref())
    }

    /// Whether one operation of `bytes` can go at `now`; else the time (ns, the clock of
    /// [`now_ns`]) at which it can.
    ///
    /// While the device works through a backlog, requests are accounted on a virtual clock:
    /// the one held back counts as taken when it became due (the timer's expiry), and each
    /// next one when its tokens existed, as long as that is not later than `now`. The time
    /// between expiry and the device getting to run (timer latency, a busy host) is then
    /// not lost to the bucket's cap, which with a bucket of one request would make every
    /// cycle last refill_time plus that latency. The virtual clock never runs ahead of
    /// `now`, and [`RateLimiter::idle`] drops it when the backlog is gone, so no more than
    /// the configured rate is ever admitted.
    pub fn check(&mut self, bytes: u64, now: u64) -> Result<(), u64> {
        let mut at = match self.due {
            Some(due) if due < now => due,
            _ => now,
        };
        // The second round finds the tokens there: the wait is exact.
        for _ in 0..2 {
            let mut wait = 0;
            if let Some(b) = &mut self.bandwidth {
                b.refill(at);
                wait = wait.max(b.wait_ns(bytes));
            }
            if let Some(o) = &mut self.ops {
                o.refill(at);
                wait = wait.max(o.wait_ns(1));
            }
            if wait == 0 {
                self.due = (at < now).then_some(at);
                return Ok(());
            }
            let next = at.saturating_add(wait);
            if next > now {
                self.due = None;
                return Err(next);
            }
            at = next;
        }
        self.due = None;
        Err(now.saturating_add(1))
    }

    /// Whether one operation of `bytes` could go now, without taking anything (the buckets
    /// are refilled up to the same instant [`RateLimiter::check`] would use).
    pub fn would_allow(&mut self, bytes: u64, now: u64) -> bool {
        let at = match self.due {
            Some(due) if due < now => due,
            _ => now,
        };
        let mut ok = true;
        if let Some(b) = &mut self.bandwidth {
            b.refill(at);
            ok &= b.can_take(bytes);
        }
        if let Some(o) = &mut self.ops {
            o.refill(at);
            ok &= o.can_take(1);
        }
        ok
    }

    /// The device has nothing more waiting: the next request is accounted at the time it
    /// comes.
    pub fn idle(&mut self) {
        if !self.throttled {
            self.due = None;
        }
    }

    /// Takes one operation of `bytes`, which [`RateLimiter::check`] allowed at the same
    /// instant.
    pub fn commit(&mut self, bytes: u64) {
        if !self.is_limiting() {
            return;
        }
        if let Some(b) = &mut self.bandwidth {
            b.take(bytes);
        }
        if let Some(o) = &mut self.ops {
            o.take(1);
        }
    }

    /// Gives back `bytes` taken by [`RateLimiter::commit`] for a transfer that then failed
    /// (an async one is charged when submitted). The bucket never holds more than its size;
    /// a spent one-time burst stays spent.
    pub fn refund(&mut self, bytes: u64) {
        if let Some(b) = &mut self.bandwidth {
            b.give_back(bytes);
        }
    }

    /// A request could not go: arms the timer for `at` (from [`RateLimiter::check`]).
    /// Errors arming it are returned; the caller then lets the request go rather than
    /// leave it waiting forever.
    pub fn throttle(&mut self, at: u64) -> std::io::Result<()> {
        self.timer.arm_at(at.max(1))?;
        self.throttled = true;
        self.due = Some(at);
        Ok(())
    }

    /// The timer's file descriptor, for the event loop.
    pub fn timer_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }

    /// The timer fired: the throttled request may go now.
    pub fn timer_fired(&mut self) {
        self.timer.clear();
        self.throttled = false;
    }

    /// Applies a `PATCH`. The throttled request (if any) is re-evaluated at once: the timer
    /// is set to fire now, which brings the device back through its event loop.
    pub fn update(&mut self, update: &LimiterUpdate) -> std::io::Result<()> {
        let now = now_ns();
        let apply = |slot: &mut Option<TokenBucket>, u: &BucketUpdate| match u {
            BucketUpdate::Keep => {}
            BucketUpdate::Disable => *slot = None,
            BucketUpdate::Set(c) => *slot = bucket(Some(c), now),
        };
        apply(&mut self.bandwidth, &update.bandwidth);
        apply(&mut self.ops, &update.ops);
        self.due = None;
        if self.throttled {
            self.timer.arm_at(1)?;
        }
        Ok(())
    }

    /// The state to save.
    pub fn save(&mut self) -> RateLimiterState {
        let now = now_ns();
        RateLimiterState {
            bandwidth: self.bandwidth.as_mut().map(|b| b.save(now)),
            ops: self.ops.as_mut().map(|b| b.save(now)),
        }
    }

    /// Restores the buckets from `state`; they refill from now on (the time the VM spent
    /// saved is not credited). A device restored while throttled re-checks at once.
    pub fn restore(&mut self, state: &RateLimiterState) -> std::io::Result<()> {
        let now = now_ns();
        self.bandwidth = state
            .bandwidth
            .as_ref()
            .and_then(|s| TokenBucket::restore(s, now));
        self.ops = state
            .ops
            .as_ref()
            .and_then(|s| TokenBucket::restore(s, now));
        self.timer.arm_at(1)?;
        self.throttled = true;
        Ok(())
    }
}

#[cfg(test)]
mod tests;
