//! Runs of regions: converting between region sizes, coarsening, merging.

use std::ops::Range;

/// How to map another server's regions onto ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cover {
    /// Our regions wholly inside theirs (to clear bits: never too many).
    Inside,
    /// Our regions touching theirs (to copy: never too few).
    Touching,
}

/// Runs of regions of `theirs` bytes as merged runs of our regions of
/// `ours` bytes, within `limit`. Saturating: the runs come from the network;
/// the result has at most as many runs as the input, whatever their length.
pub(super) fn convert_runs(
    runs: &[(u64, u64)],
    theirs: u32,
    ours: u64,
    limit: &Range<u64>,
    cover: Cover,
) -> Vec<Range<u64>> {
    let theirs = u64::from(theirs.max(1));
    let ours = ours.max(1);
    let mut out = Vec::new();
    for (first, end) in runs {
        let (start, stop) = (first.saturating_mul(theirs), end.saturating_mul(theirs));
        let (from, to) = match cover {
            Cover::Inside => (start.div_ceil(ours), stop / ours),
            Cover::Touching => (start / ours, stop.div_ceil(ours)),
        };
        let (from, to) = (from.max(limit.start), to.min(limit.end));
        if from < to {
            out.push(from..to);
        }
    }
    merge_runs(out)
}

/// The most runs a `DirtyRegions` answer carries (well inside a frame).
pub(super) const MAX_REGION_RUNS: usize = 100_000;

/// At most `max` runs covering `runs`: neighbours are joined across ever
/// larger gaps. Covering more is safe where it is used (what to copy).
pub(super) fn coarsen(mut runs: Vec<(u64, u64)>, max: usize) -> Vec<(u64, u64)> {
    let mut gap = 1u64;
    while runs.len() > max.max(1) {
        let mut joined: Vec<(u64, u64)> = Vec::with_capacity(runs.len() / 2 + 1);
        for (first, end) in runs {
            match joined.last_mut() {
                Some(last) if first.saturating_sub(last.1) <= gap => last.1 = last.1.max(end),
                _ => joined.push((first, end)),
            }
        }
        runs = joined;
        gap = gap.saturating_mul(2);
    }
    runs
}

/// Sort and merge overlapping or touching runs.
pub(super) fn merge_runs(mut runs: Vec<Range<u64>>) -> Vec<Range<u64>> {
    runs.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(runs.len());
    for run in runs {
        match merged.last_mut() {
            Some(last) if run.start <= last.end => last.end = last.end.max(run.end),
            _ => merged.push(run),
        }
    }
    merged
}

/// Sorted regions as runs.
pub(super) fn runs_of(regions: impl IntoIterator<Item = u64>) -> Vec<Range<u64>> {
    merge_runs(regions.into_iter().map(|r| r..r + 1).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_convert_between_region_sizes_conservatively() {
        let all = 0..u64::MAX;
        // Their 128 KiB region 1 is our 64 KiB regions 2 and 3.
        let inside = convert_runs(&[(1, 2)], 128 << 10, 64 << 10, &all, Cover::Inside);
        assert_eq!(inside, vec![2..4]);
        // Their 64 KiB region 3 is half of our 128 KiB region 1: copy it, never clear it.
        let touching = convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Touching);
        assert_eq!(touching, vec![1..2]);
        assert!(convert_runs(&[(3, 4)], 64 << 10, 128 << 10, &all, Cover::Inside).is_empty());
        // Hostile numbers neither overflow nor reach past the limit.
        let hostile = [(0, u64::MAX), (u64::MAX - 1, u64::MAX)];
        let limited = convert_runs(&hostile, u32::MAX, 64 << 10, &(5..9), Cover::Touching);
        assert_eq!(limited, vec![5..9]);
        assert_eq!(
            convert_runs(&hostile, 0, 64 << 10, &(0..3), Cover::Inside),
            vec![0..3]
        );
        // A run of 2^44 regions stays one run.
        let huge = convert_runs(&[(0, 1 << 44)], 65536, 65536, &all, Cover::Inside);
        assert_eq!(huge, vec![0..1 << 44]);
    }

    #[test]
    fn coarsened_runs_cover_what_they_replace() {
        let runs: Vec<(u64, u64)> = (0..1000).map(|i| (i * 3, i * 3 + 1)).collect();
        let coarse = coarsen(runs.clone(), 10);
        assert!(coarse.len() <= 10, "{}", coarse.len());
        for (first, end) in runs {
            assert!(coarse.iter().any(|(a, b)| *a <= first && end <= *b));
        }
        assert_eq!(coarsen(vec![(1, 2)], 10), vec![(1, 2)]);
    }

    #[test]
    fn runs_merge() {
        assert_eq!(merge_runs(vec![5..7, 1..2, 2..3, 6..9]), vec![1..3, 5..9]);
        assert_eq!(runs_of([1, 2, 3, 7]), vec![1..4, 7..8]);
    }
}
