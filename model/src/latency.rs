//! log2 histograms of exit-handling time, as the eBPF side fills them
//! ([`tracer_common::hist_bucket`]): bucket `b` holds durations in `[2^b, 2^(b+1))` ns,
//! bucket 0 also holds 0 ns, and the last bucket is open-ended.

use serde::{Deserialize, Serialize};
use tracer_common::limits::HIST_BUCKETS;

/// One non-empty bucket of a histogram.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bucket {
    /// Lowest duration in the bucket, ns (inclusive).
    pub from_ns: u64,
    /// End of the bucket, ns (exclusive); `null` for the open-ended last bucket.
    pub to_ns: Option<u64>,
    pub count: u64,
}

/// The `[from, to)` bounds of bucket `b`; `to` is `None` for the last bucket.
pub fn bounds(b: u32) -> (u64, Option<u64>) {
    let from = if b == 0 { 0 } else { 1u64 << b };
    let to = (b + 1 < HIST_BUCKETS).then(|| 1u64 << (b + 1));
    (from, to)
}

/// The non-empty buckets of `counts` (indexed by bucket number).
pub fn buckets(counts: &[u64]) -> Vec<Bucket> {
    counts
        .iter()
        .enumerate()
        .filter(|&(_, &c)| c > 0)
        .map(|(b, &count)| {
            let (from_ns, to_ns) = bounds(b as u32);
            Bucket {
                from_ns,
                to_ns,
                count,
            }
        })
        .collect()
}

/// An upper bound of the `q` quantile (0.0..=1.0): the end of the bucket where the
/// cumulative count reaches `q` of the total. `None` for an empty histogram.
pub fn quantile_upper_bound(buckets: &[Bucket], q: f64) -> Option<u64> {
    let total: u64 = buckets.iter().map(|b| b.count).sum();
    if total == 0 {
        return None;
    }
    let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
    let mut seen = 0u64;
    for b in buckets {
        seen += b.count;
        if seen >= rank {
            return Some(b.to_ns.unwrap_or(u64::MAX));
        }
    }
    None
}

/// `total / n`, rounded down; `None` when `n` is 0.
pub fn mean(total: u64, n: u64) -> Option<u64> {
    total.checked_div(n)
}

#[cfg(test)]
mod tests {
    use tracer_common::hist_bucket;

    use super::*;

    #[test]
    fn bucket_of_matches_bounds() {
        for ns in [
            0u64,
            1,
            2,
            3,
            4,
            7,
            8,
            1000,
            1023,
            1024,
            1_000_000,
            123_456_789,
        ] {
            let b = hist_bucket(ns);
            let (from, to) = bounds(b);
            assert!(from <= ns, "{ns} below bucket {b} [{from}, {to:?})");
            assert!(to.is_none_or(|t| ns < t), "{ns} above bucket {b}");
        }
        assert_eq!(hist_bucket(0), 0);
        assert_eq!(hist_bucket(1), 0);
        assert_eq!(hist_bucket(2), 1);
        assert_eq!(hist_bucket(1023), 9);
        assert_eq!(hist_bucket(1024), 10);
        assert_eq!(hist_bucket(u64::MAX), HIST_BUCKETS - 1);
        assert_eq!(bounds(HIST_BUCKETS - 1).1, None);
    }

    #[test]
    fn buckets_skip_empty_and_keep_counts() {
        let mut counts = vec![0u64; HIST_BUCKETS as usize];
        counts[10] = 3;
        counts[12] = 1;
        let b = buckets(&counts);
        assert_eq!(b.len(), 2);
        assert_eq!(
            b[0],
            Bucket {
                from_ns: 1024,
                to_ns: Some(2048),
                count: 3
            }
        );
        assert_eq!(quantile_upper_bound(&b, 0.5), Some(2048));
        assert_eq!(quantile_upper_bound(&b, 0.75), Some(2048));
        assert_eq!(quantile_upper_bound(&b, 0.99), Some(8192));
        assert_eq!(quantile_upper_bound(&[], 0.5), None);
    }

    #[test]
    fn mean_handles_zero() {
        assert_eq!(mean(10, 4), Some(2));
        assert_eq!(mean(10, 0), None);
    }
}
