use super::*;

fn tb(size: u64, burst: Option<u64>, refill_time: u64) -> TokenBucketConfig {
    TokenBucketConfig {
        size,
        one_time_burst: burst,
        refill_time,
    }
}

fn limiter(bandwidth: Option<TokenBucketConfig>, ops: Option<TokenBucketConfig>) -> RateLimiter {
    RateLimiter::new(Some(&RateLimiterConfig { bandwidth, ops })).expect("limiter")
}

fn timer_fires_within(l: &RateLimiter, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: l.timer_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) == 1 }
}

#[test]
fn no_config_never_limits() {
    let mut l = RateLimiter::new(None).expect("limiter");
    assert!(!l.is_limiting());
    for _ in 0..1000 {
        assert_eq!(l.check(u64::MAX, now_ns()), Ok(()));
        l.commit(u64::MAX);
    }
}

#[test]
fn both_buckets_must_allow_and_the_wait_is_the_longer() {
    let mut l = limiter(Some(tb(1000, None, 1000)), Some(tb(2, None, 1000)));
    let now = now_ns();
    assert_eq!(l.check(600, now), Ok(()));
    l.commit(600);
    // Bandwidth short by 200 bytes (200 ms), ops fine.
    assert_eq!(l.check(600, now), Err(now + 200_000_000));
    assert_eq!(l.check(400, now), Ok(()));
    l.commit(400);
    // Ops empty (500 ms per op), bandwidth empty for 1 byte (1 ms).
    assert_eq!(l.check(1, now), Err(now + 500_000_000));
}

#[test]
fn throttle_arms_the_timer_exactly() {
    let mut l = limiter(None, Some(tb(1, None, 20)));
    let now = now_ns();
    l.commit(0);
    let at = l.check(0, now).unwrap_err();
    assert!(at <= now + 20_000_000);
    l.throttle(at).expect("arm");
    assert!(l.is_throttled());
    // It fires at `at`, never before (a loaded machine may deliver it late).
    if timer_fires_within(&l, 5) {
        assert!(now_ns() >= at, "fired early");
    }
    assert!(timer_fires_within(&l, 200));
    assert!(now_ns() >= at);
    l.timer_fired();
    assert!(!l.is_throttled());
    assert_eq!(l.check(0, now_ns()), Ok(()));
    l.commit(0);
    // That op was accounted at its due time: the next is due exactly 20 ms after it.
    assert_eq!(l.check(0, now_ns()), Err(at + 20_000_000));
}

#[test]
fn update_replaces_disables_or_keeps_and_wakes_a_throttled_device() {
    let mut l = limiter(Some(tb(100, None, 1000)), Some(tb(1, None, 1000)));
    let now = now_ns();
    l.commit(100);
    let at = l.check(1, now).unwrap_err();
    l.throttle(at).expect("arm");
    // Only ops disabled; bandwidth kept (still empty).
    let u = LimiterUpdate {
        bandwidth: BucketUpdate::Keep,
        ops: BucketUpdate::Disable,
    };
    l.update(&u).expect("update");
    assert!(timer_fires_within(&l, 1000), "re-evaluated at once");
    l.timer_fired();
    assert!(l.buckets().1.is_none());
    assert!(l.check(1, now_ns()).is_err());
    // A new bandwidth bucket is full, its burst granted.
    let c = RateLimiterConfig {
        bandwidth: Some(tb(10, Some(5), 1000)),
        ops: None,
    };
    l.update(&LimiterUpdate::from_config(Some(&c)))
        .expect("update");
    let (b, o) = l.buckets();
    assert_eq!(b.map(|b| (b.level(), b.burst_left())), Some((10, 5)));
    assert!(o.is_none());
    assert_eq!(l.check(15, now_ns()), Ok(()));
    // size 0 or refill_time 0 disables; absent keeps.
    let c = RateLimiterConfig {
        bandwidth: Some(tb(0, None, 5)),
        ops: None,
    };
    assert_eq!(
        LimiterUpdate::from_config(Some(&c)),
        LimiterUpdate {
            bandwidth: BucketUpdate::Disable,
            ops: BucketUpdate::Keep
        }
    );
    assert!(LimiterUpdate::from_config(None).is_keep());
    l.update(&LimiterUpdate::from_config(Some(&c)))
        .expect("update");
    assert!(!l.is_limiting());
}

#[test]
fn save_and_restore() {
    let mut l = limiter(Some(tb(100, Some(7), 1000)), None);
    l.commit(50);
    let s = l.save();
    let b = s.bandwidth.as_ref().expect("bucket");
    assert_eq!((b.burst_left, b.tokens), (0, 57));
    let mut r = RateLimiter::new(None).expect("limiter");
    r.restore(&s).expect("restore");
    assert!(r.is_throttled());
    assert!(timer_fires_within(&r, 1000));
    r.timer_fired();
    assert_eq!(r.buckets().0.map(TokenBucket::level), Some(57));
}

#[test]
fn a_late_device_catches_up_but_never_exceeds_the_rate() {
    // One op per ms, the device 5 ms late: the held-back op and the four that became due
    // meanwhile go (accounted when each was due), the sixth waits; after idle(), a request
    // coming later gets only what the bucket holds.
    let mut l = limiter(None, Some(tb(1, None, 1)));
    let t = now_ns();
    l.commit(0);
    let at = l.check(0, t).unwrap_err();
    l.throttle(at).expect("arm");
    l.timer_fired();
    let late = at + 5_000_000;
    let mut admitted = 0;
    while l.check(0, late).is_ok() {
        l.commit(0);
        admitted += 1;
    }
    assert_eq!(admitted, 6);
    assert_eq!(l.check(0, late), Err(at + 6_000_000));
    l.idle();
    let much_later = late + 1_000_000_000;
    assert_eq!(l.check(0, much_later), Ok(()));
    l.commit(0);
    assert!(l.check(0, much_later).is_err(), "the cap holds once idle");
}
