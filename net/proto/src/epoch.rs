//! The configuration epoch and the one rule that judges it.
//!
//! Every place that compares an epoch it was sent with the epoch it holds
//! asks [`EpochVerdict::judge`]: storage admission, map pushes, mirror
//! forwards, `Clean`, the management server's reports, the driver's map
//! refreshes. Modelled on the generation checks of neon's pageserver and
//! Crucible's `GenerationNumberTooLow { requested, actual }`, in both
//! directions, because a sender ahead of the judge means the judge's map is
//! behind.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A configuration epoch: a logical timestamp that never decreases.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, Default,
)]
pub struct Epoch(pub u64);

impl fmt::Display for Epoch {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "e{}", self.0)
    }
}

impl Epoch {
    /// The epoch after this one (the management server's next change).
    pub fn next(self) -> Epoch {
        Epoch(self.0.saturating_add(1))
    }
}

/// How an epoch a peer sent stands against the epoch the judge holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EpochVerdict {
    /// The same epoch: the request is served, the map is the one held.
    Current,
    /// The sender is behind: refuse, and tell it the held epoch to refresh to.
    Stale { requested: Epoch, held: Epoch },
    /// The sender is ahead: the judge's own map is out of date; refuse and
    /// fetch the newer map.
    Newer { requested: Epoch, held: Epoch },
}

impl EpochVerdict {
    /// Judge `requested` (what a peer sent) against `held` (what the judge holds).
    pub fn judge(held: Epoch, requested: Epoch) -> Self {
        match requested.cmp(&held) {
            std::cmp::Ordering::Equal => EpochVerdict::Current,
            std::cmp::Ordering::Less => EpochVerdict::Stale { requested, held },
            std::cmp::Ordering::Greater => EpochVerdict::Newer { requested, held },
        }
    }

    pub fn is_current(self) -> bool {
        self == EpochVerdict::Current
    }

    /// The sender knows a newer epoch than the judge.
    pub fn is_newer(self) -> bool {
        matches!(self, EpochVerdict::Newer { .. })
    }

    /// The sender is behind the judge.
    pub fn is_stale(self) -> bool {
        matches!(self, EpochVerdict::Stale { .. })
    }
}

impl fmt::Display for EpochVerdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EpochVerdict::Current => f.write_str("the epoch is current"),
            EpochVerdict::Stale { requested, held } => {
                write!(f, "request epoch {requested} is older than the held {held}")
            }
            EpochVerdict::Newer { requested, held } => {
                write!(f, "request epoch {requested} is newer than the held {held}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn equal_epochs_are_current() {
        for e in [0, 1, 5, u64::MAX] {
            assert_eq!(
                EpochVerdict::judge(Epoch(e), Epoch(e)),
                EpochVerdict::Current
            );
        }
    }

    #[test]
    fn an_older_request_is_stale_and_carries_the_held_epoch() {
        let verdict = EpochVerdict::judge(Epoch(5), Epoch(4));
        assert_eq!(
            verdict,
            EpochVerdict::Stale {
                requested: Epoch(4),
                held: Epoch(5)
            }
        );
        assert!(verdict.is_stale() && !verdict.is_newer() && !verdict.is_current());
        assert_eq!(
            verdict.to_string(),
            "request epoch e4 is older than the held e5"
        );
        assert!(EpochVerdict::judge(Epoch(u64::MAX), Epoch(0)).is_stale());
    }

    #[test]
    fn a_newer_request_means_the_judge_is_behind() {
        let verdict = EpochVerdict::judge(Epoch(5), Epoch(6));
        assert_eq!(
            verdict,
            EpochVerdict::Newer {
                requested: Epoch(6),
                held: Epoch(5)
            }
        );
        assert!(verdict.is_newer() && !verdict.is_stale());
        assert_eq!(
            verdict.to_string(),
            "request epoch e6 is newer than the held e5"
        );
        // A server that holds nothing yet (epoch 0) is behind any real epoch.
        assert!(EpochVerdict::judge(Epoch(0), Epoch(u64::MAX)).is_newer());
    }

    #[test]
    fn next_never_wraps() {
        assert_eq!(Epoch(4).next(), Epoch(5));
        assert_eq!(Epoch(u64::MAX).next(), Epoch(u64::MAX));
    }
}
