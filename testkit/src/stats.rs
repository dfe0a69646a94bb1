//! The statistics benchmarks print: median, minimum and maximum, as "median [min-max]".

use std::time::Duration;

/// The median, minimum and maximum of a set of samples.
#[derive(Clone, Copy, Debug)]
pub struct Stats {
    pub median: f64,
    pub min: f64,
    pub max: f64,
}

/// The statistics of `values` (NaN when there are none); the median of an even count is the
/// mean of the middle two.
pub fn stats(values: &[f64]) -> Stats {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    };
    Stats {
        median,
        min: v.first().copied().unwrap_or(f64::NAN),
        max: v.last().copied().unwrap_or(f64::NAN),
    }
}

/// The statistics of `f` over `samples`.
pub fn col<T>(samples: &[T], f: impl Fn(&T) -> f64) -> Stats {
    stats(&samples.iter().map(f).collect::<Vec<_>>())
}

/// The `p`-th percentile (0 to 100, nearest rank below) of `sorted`, which is sorted.
pub fn percentile<T: Copy>(sorted: &[T], p: usize) -> Option<T> {
    let last = sorted.len().checked_sub(1)?;
    sorted.get(last * p.min(100) / 100).copied()
}

/// The median of the durations that are there (`None` when none is).
pub fn median_duration(values: &[Option<Duration>]) -> Option<Duration> {
    let secs: Vec<f64> = values.iter().flatten().map(Duration::as_secs_f64).collect();
    (!secs.is_empty()).then(|| Duration::from_secs_f64(stats(&secs).median))
}

/// "median [min-max]" with `prec` decimals.
pub fn cell(s: Stats, prec: usize) -> String {
    format!(
        "{:.prec$} [{:.prec$}-{:.prec$}]",
        s.median,
        s.min,
        s.max,
        prec = prec
    )
}

/// "a/b" as "1.23x", or "n/a" unless `b` is positive.
pub fn ratio(a: f64, b: f64) -> String {
    if b > 0.0 {
        format!("{:.2}x", a / b)
    } else {
        "n/a".to_string()
    }
}

/// Milliseconds.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_min_max() {
        let s = stats(&[3.0, 1.0, 2.0, 10.0]);
        assert_eq!((s.median, s.min, s.max), (2.5, 1.0, 10.0));
        assert!(stats(&[]).median.is_nan());
        assert_eq!(cell(stats(&[1.0, 2.0, 3.0]), 1), "2.0 [1.0-3.0]");
        assert_eq!(percentile(&[1, 2, 3, 4, 5], 50), Some(3));
        assert_eq!(percentile::<u64>(&[], 50), None);
        let d = |s| Some(Duration::from_secs(s));
        assert_eq!(median_duration(&[d(3), None, d(1), d(2)]), d(2));
        assert_eq!(ratio(1.0, 0.0), "n/a");
    }
}
