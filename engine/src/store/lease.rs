//! The lease: a storage server that reports to a management server admits
//! requests only while its last acknowledged heartbeat is recent. The
//! management server marks a silent server down only after twice the lease,
//! so a server cut off from it (but not from its clients) has stopped
//! serving before a mirror is promoted in its place. Monotonic time only.

use std::cell::Cell;
use std::time::{Duration, Instant};

/// Whether requests may be admitted, and until when.
#[derive(Debug, Default)]
pub struct Lease {
    /// Set once the server reports to a management server; a server without
    /// one (pushed maps by hand, in tests) needs no lease.
    required: Cell<bool>,
    /// Until when the last acknowledged heartbeat lets the server serve.
    until: Cell<Option<Instant>>,
}

/// Why the lease does not hold now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoLease {
    /// No heartbeat has been acknowledged since this process started.
    NeverGranted,
    /// The last one is older than the lease; it ran out this long ago.
    Expired { ago: Duration },
}

impl Lease {
    /// From now on requests need a lease; none is held until the first
    /// heartbeat is acknowledged, so a restarted server serves nothing
    /// before it has heard from the management server.
    pub fn require(&self) {
        self.required.set(true);
    }

    /// A heartbeat sent at `sent` was acknowledged, granting `lease`.
    pub fn renew(&self, sent: Instant, lease: Duration) {
        let until = sent + lease;
        // A late answer to an older heartbeat never shortens the lease.
        if self.until.get().is_none_or(|held| until > held) {
            self.until.set(Some(until));
        }
    }

    /// Whether the lease holds at `now`.
    pub fn check(&self, now: Instant) -> Result<(), NoLease> {
        if !self.required.get() {
            return Ok(());
        }
        match self.until.get() {
            None => Err(NoLease::NeverGranted),
            Some(until) if now < until => Ok(()),
            Some(until) => Err(NoLease::Expired {
                ago: now.duration_since(until),
            }),
        }
    }
}

impl std::fmt::Display for NoLease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NoLease::NeverGranted => {
                write!(f, "no heartbeat acknowledged by the management server yet")
            }
            NoLease::Expired { ago } => write!(
                f,
                "the management server has not acknowledged a heartbeat in time (the lease ran out {ago:?} ago)"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_is_needed_only_once_required_and_holds_until_it_runs_out() {
        let lease = Lease::default();
        let t0 = Instant::now();
        assert_eq!(lease.check(t0), Ok(()), "standalone: no lease needed");
        lease.require();
        assert_eq!(lease.check(t0), Err(NoLease::NeverGranted));
        lease.renew(t0, Duration::from_secs(2));
        assert_eq!(lease.check(t0 + Duration::from_millis(1999)), Ok(()));
        assert_eq!(
            lease.check(t0 + Duration::from_secs(3)),
            Err(NoLease::Expired {
                ago: Duration::from_secs(1)
            })
        );
        // An answer to an older heartbeat arriving late does not shorten it.
        lease.renew(t0 + Duration::from_secs(1), Duration::from_secs(2));
        lease.renew(t0, Duration::from_secs(2));
        assert_eq!(lease.check(t0 + Duration::from_millis(2500)), Ok(()));
    }
}
