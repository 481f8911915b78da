//! Retried writes are taken once. A driver names each request by its
//! session and a sequence number that its retries keep; per client and
//! session this server keeps a bounded window of the sequence numbers it has
//! seen. A copy of a write still running waits for it and shares its
//! answer, a copy of one that was taken gets its answer and is not run
//! again, and one at or below the newest sequence the window has let go of
//! is refused (it may have been taken). So a write sent, delayed
//! in the network, retried and acknowledged cannot land after a later write
//! to the same block when the delayed copy finally arrives.

use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;
use std::time::Instant;

use tessera_net::proto::{Epoch, FLAG_REPLICA, Opcode, Request};
use tessera_net::quic::PeerIdentity;
use tokio::sync::Notify;

use crate::store::{Refusal, Refused};

/// Writes taken that are kept per session, beside those still running
/// (which are never let go): as many as a connection has streams.
const WINDOW: usize = 4096;
/// Sessions kept; the one used longest ago goes first.
const MAX_SESSIONS: usize = 128;

/// How a write ended, as its copies are answered.
type Outcome = Result<Epoch, Refusal>;

/// One request of a session: running (no outcome yet) or taken.
#[derive(Debug, Default)]
pub(super) struct Slot {
    outcome: RefCell<Option<Outcome>>,
    settled: Notify,
}

impl Slot {
    /// The outcome, once the request it stands for has one.
    pub(super) async fn outcome(&self) -> Outcome {
        loop {
            let settled = self.settled.notified();
            if let Some(outcome) = self.outcome.borrow().clone() {
                return outcome;
            }
            settled.await;
        }
    }
}

#[derive(Debug)]
struct Window {
    slots: BTreeMap<u64, Rc<Slot>>,
    /// The newest sequence let go of: a copy at or below it is not known.
    floor: Option<u64>,
    used: Instant,
}

impl Window {
    /// Let go of the oldest writes taken beyond `WINDOW`.
    fn trim(&mut self) {
        let over = self.slots.len().saturating_sub(WINDOW);
        let taken: Vec<u64> = self
            .slots
            .iter()
            .filter(|(_, slot)| slot.outcome.borrow().is_some())
            .map(|(seq, _)| *seq)
            .take(over)
            .collect();
        for seq in taken {
            self.slots.remove(&seq);
            self.floor = self.floor.max(Some(seq));
        }
    }
}

/// The windows of every client session, by the client's certificate name
/// (a client can only ever touch its own), then session; looked up by name
/// without building a key.
#[derive(Debug, Default)]
pub(super) struct Sessions {
    windows: RefCell<HashMap<String, HashMap<u64, Window>>>,
}

/// What the window says of a request.
pub(super) enum Seen<'a> {
    /// Not tracked: no session, not a write, or forwarded by a primary.
    Untracked,
    /// The first copy: run it, then settle the claim.
    New(Claim<'a>),
    /// A copy of one running or taken: answer with its outcome.
    Copy(Rc<Slot>),
    /// At or below the newest sequence let go of: it may have been taken.
    Behind { floor: u64 },
}

impl Sessions {
    pub(super) fn see<'a>(&'a self, peer: &'a PeerIdentity, request: &Request) -> Seen<'a> {
        let tracked = matches!(
            request.opcode,
            Opcode::Write | Opcode::Trim | Opcode::WriteZeroes
        ) && request.session != 0
            && request.flags & FLAG_REPLICA == 0;
        if !tracked {
            return Seen::Untracked;
        }
        let mut windows = self.windows.borrow_mut();
        let known = windows
            .get(peer.name.as_str())
            .is_some_and(|by_session| by_session.contains_key(&request.session));
        if !known && windows.values().map(HashMap::len).sum::<usize>() >= MAX_SESSIONS {
            let oldest = windows
                .iter()
                .flat_map(|(name, by_session)| {
                    by_session.iter().map(move |(s, w)| (name, *s, w.used))
                })
                .min_by_key(|(_, _, used)| *used)
                .map(|(name, session, _)| (name.clone(), session));
            if let Some((name, session)) = oldest
                && let Some(by_session) = windows.get_mut(&name)
            {
                by_session.remove(&session);
                if by_session.is_empty() {
                    windows.remove(&name);
                }
            }
        }
        if !windows.contains_key(peer.name.as_str()) {
            windows.insert(peer.name.clone(), HashMap::new());
        }
        let Some(by_session) = windows.get_mut(peer.name.as_str()) else {
            return Seen::Untracked;
        };
        let window = by_session.entry(request.session).or_insert_with(|| Window {
            slots: BTreeMap::new(),
            floor: None,
            used: Instant::now(),
        });
        window.used = Instant::now();
        let seq = request.sequence;
        if let Some(slot) = window.slots.get(&seq) {
            return Seen::Copy(slot.clone());
        }
        if let Some(floor) = window.floor.filter(|floor| seq <= *floor) {
            return Seen::Behind { floor };
        }
        let slot = Rc::new(Slot::default());
        window.slots.insert(seq, slot.clone());
        window.trim();
        Seen::New(Claim {
            sessions: self,
            peer: &peer.name,
            session: request.session,
            sequence: seq,
            slot,
            settled: false,
        })
    }

    fn forget(&self, peer: &str, session: u64, sequence: u64) {
        if let Some(window) = self
            .windows
            .borrow_mut()
            .get_mut(peer)
            .and_then(|by_session| by_session.get_mut(&session))
        {
            window.slots.remove(&sequence);
        }
    }
}

/// The first copy of a tracked request, being run.
pub(super) struct Claim<'a> {
    sessions: &'a Sessions,
    peer: &'a str,
    session: u64,
    sequence: u64,
    slot: Rc<Slot>,
    settled: bool,
}

impl Claim<'_> {
    /// The request ran to `outcome`. A write taken stays in the window, so
    /// its copies are not run again; a refused one leaves it, so a retry
    /// (under a new map, say) runs. Copies waiting share the outcome.
    pub(super) fn settle(mut self, outcome: Outcome) {
        if outcome.is_err() {
            self.sessions.forget(self.peer, self.session, self.sequence);
        }
        *self.slot.outcome.borrow_mut() = Some(outcome);
        self.slot.settled.notify_waiters();
        self.settled = true;
    }
}

impl Drop for Claim<'_> {
    /// A request dropped before it settled (its stream went away) took
    /// effect or not: its waiting copies are told it did not answer, and the
    /// next copy runs it again, as a retry after a lost reply would have.
    fn drop(&mut self) {
        if !self.settled {
            self.sessions.forget(self.peer, self.session, self.sequence);
            *self.slot.outcome.borrow_mut() =
                Some(Err(Refusal::new(Epoch(0), Refused::CopyAbandoned)));
            self.slot.settled.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use tessera_net::proto::{FLAG_REPLICA, VolumeId};

    use super::*;

    fn write(session: u64, sequence: u64) -> Request {
        let mut request =
            Request::write(VolumeId(1), Epoch(3), 0, &[7; 4096], sequence).expect("a valid write");
        request.session = session;
        request.sequence = sequence;
        request
    }

    fn peer(name: &str) -> PeerIdentity {
        PeerIdentity {
            role: tessera_net::proto::Role::Client,
            name: name.into(),
        }
    }

    #[test]
    fn a_write_is_run_once_however_many_copies_arrive() {
        tokio_uring::start(async {
            let sessions = Sessions::default();
            let app = peer("app");
            let Seen::New(claim) = sessions.see(&app, &write(9, 5)) else {
                panic!("the first copy runs");
            };
            // A copy while it runs waits for it and shares its answer.
            let Seen::Copy(waiting) = sessions.see(&app, &write(9, 5)) else {
                panic!("a copy of a running write is not run");
            };
            claim.settle(Ok(Epoch(3)));
            assert_eq!(waiting.outcome().await, Ok(Epoch(3)));
            // A late copy of the taken write: its answer, not a second run.
            let Seen::Copy(late) = sessions.see(&app, &write(9, 5)) else {
                panic!("a late copy is not run");
            };
            assert_eq!(late.outcome().await, Ok(Epoch(3)));
            // Another client, or no session, or a forward: not this window.
            assert!(matches!(
                sessions.see(&peer("other"), &write(9, 5)),
                Seen::New(_)
            ));
            assert!(matches!(sessions.see(&app, &write(0, 5)), Seen::Untracked));
            let mut forwarded = write(9, 5);
            forwarded.flags |= FLAG_REPLICA;
            assert!(matches!(sessions.see(&app, &forwarded), Seen::Untracked));
        });
    }

    #[test]
    fn a_refused_write_runs_again_and_the_window_is_bounded() {
        tokio_uring::start(async {
            let sessions = Sessions::default();
            let app = peer("app");
            let Seen::New(claim) = sessions.see(&app, &write(1, 10)) else {
                panic!()
            };
            claim.settle(Err(Refusal::new(Epoch(4), Refused::EpochChanging)));
            assert!(
                matches!(sessions.see(&app, &write(1, 10)), Seen::New(_)),
                "a refused write is retried for real"
            );
            // A claim dropped unsettled leaves too, and tells its copies.
            let Seen::New(claim) = sessions.see(&app, &write(1, 11)) else {
                panic!()
            };
            let Seen::Copy(waiting) = sessions.see(&app, &write(1, 11)) else {
                panic!()
            };
            drop(claim);
            assert!(waiting.outcome().await.is_err());
            assert!(matches!(sessions.see(&app, &write(1, 11)), Seen::New(_)));
            // Past the window the oldest writes taken go, and a copy of one
            // of them is refused; one still running is kept.
            let Seen::New(running) = sessions.see(&app, &write(1, 12)) else {
                panic!()
            };
            for seq in 100..100 + WINDOW as u64 + 5 {
                let Seen::New(claim) = sessions.see(&app, &write(1, seq)) else {
                    panic!()
                };
                claim.settle(Ok(Epoch(3)));
            }
            // 4 102 came in (the running one and 4 101 taken): past 4 096
            // the six oldest taken went.
            assert!(matches!(
                sessions.see(&app, &write(1, 100)),
                Seen::Behind { floor: 105 }
            ));
            assert!(matches!(sessions.see(&app, &write(1, 106)), Seen::Copy(_)));
            assert!(matches!(sessions.see(&app, &write(1, 12)), Seen::Copy(_)));
            running.settle(Ok(Epoch(3)));
            let windows = sessions.windows.borrow();
            assert!(
                windows
                    .values()
                    .flat_map(HashMap::values)
                    .all(|w| w.slots.len() <= WINDOW + 1)
            );
        });
    }

    #[test]
    fn sessions_are_bounded_and_the_oldest_goes() {
        let sessions = Sessions::default();
        let app = peer("app");
        for session in 1..=(MAX_SESSIONS as u64 + 10) {
            drop(sessions.see(&app, &write(session, 1)));
        }
        let windows = sessions.windows.borrow();
        assert_eq!(windows["app"].len(), MAX_SESSIONS);
        assert!(!windows["app"].contains_key(&1), "the oldest session went");
    }
}
