//! Forwarding a request to a mirror, and reporting a mirror that did not take it.

use std::collections::HashMap;
use std::rc::Rc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tessera_net::proto::{
    Epoch, EpochVerdict, Forward, MgmtReply, MgmtRequest, Refusal as MgmtRefusal, Replica, Request,
    Status, VolumeId,
};
use tokio::sync::OnceCell;
use tracing::{debug, warn};

use super::Replication;
use super::state::ReplState;
use crate::store::{Refusal, Refused};

/// A mirror this server failed to forward to, and the outcome of reporting it.
#[derive(Debug, Default)]
struct Failure {
    reported: OnceCell<Result<(), MgmtRefusal>>,
    /// Wakes forwards still waiting on the mirror: they give up at once.
    signal: tokio::sync::Notify,
}

/// Why a forward did not succeed. Every variant but `Behind` means the
/// mirror did not take the request (and may be reported out of sync).
#[derive(Debug, thiserror::Error)]
pub(super) enum ForwardError {
    /// The mirror holds a newer epoch (this server's map is behind: a push
    /// to it is on the way), or is applying one right now. Not the mirror's
    /// fault: the request is retried under the new map.
    #[error("the mirror is at the newer epoch {0}")]
    Behind(Epoch),
    /// Connecting, sending or reading the reply failed.
    #[error("transport: {0}")]
    Transport(tessera_net::quic::QuicError),
    /// The mirror refused the request.
    #[error("refused with {status:?}: {message}")]
    Refused { status: Status, message: String },
    /// No answer within the forward timeout.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// The mirror was written off while this forward waited.
    #[error("the mirror was written off")]
    WrittenOff,
    /// This server no longer leads the partition, or the mirror is out of sync.
    #[error("no longer the primary, or the mirror is out of sync")]
    NotLeading,
    /// This server could not read its own copy of the region.
    #[error("reading the region to copy failed: {0}")]
    LocalRead(String),
    /// The region's copy does not make a valid request.
    #[error("the copy is not a valid request: {0}")]
    InvalidCopy(tessera_net::proto::ProtoError),
}

impl ForwardError {
    /// Whether the mirror itself failed (not this server's map being behind).
    pub(super) fn mirror_failed(&self) -> bool {
        !matches!(self, ForwardError::Behind(_))
    }
}

/// Failed forwards by partition (volume, first page), then by mirror: looked
/// up on every forward by the mirror's name without building a key.
#[derive(Debug, Default)]
pub(super) struct Failures(HashMap<(VolumeId, u64), HashMap<String, Rc<Failure>>>);

impl Failures {
    fn get(&self, volume: VolumeId, first_page: u64, server: &str) -> Option<&Rc<Failure>> {
        self.0.get(&(volume, first_page))?.get(server)
    }

    fn get_or_insert(&mut self, volume: VolumeId, first_page: u64, server: &str) -> Rc<Failure> {
        let by_mirror = self.0.entry((volume, first_page)).or_default();
        match by_mirror.get(server) {
            Some(failure) => failure.clone(),
            None => by_mirror.entry(server.to_string()).or_default().clone(),
        }
    }

    fn remove(&mut self, volume: VolumeId, first_page: u64, server: &str) {
        if let Some(by_mirror) = self.0.get_mut(&(volume, first_page)) {
            by_mirror.remove(server);
        }
    }

    pub(super) fn forget_volume(&mut self, volume: VolumeId) {
        self.0.retain(|(v, _), _| *v != volume);
    }
}

impl Replication {
    /// Whether forwarding to `server` failed and its loss is on record.
    pub(super) fn written_off(&self, volume: VolumeId, server: &str, first_page: u64) -> bool {
        self.failures
            .borrow()
            .get(volume, first_page, server)
            .is_some_and(|f| matches!(f.reported.get(), Some(Ok(()))))
    }

    fn next_request_id(&self) -> u64 {
        self.state(ReplState::next_request_id)
    }

    /// Send a replica request to `target`, waiting at most the forward
    /// timeout, or less if the mirror is written off meanwhile.
    pub(super) async fn forward(
        &self,
        key: (VolumeId, u64),
        target: &Replica,
        request: &Request,
        kind: Forward,
        payload: Bytes,
    ) -> Result<(), ForwardError> {
        let (volume, first_page) = key;
        let failure = self
            .failures
            .borrow_mut()
            .get_or_insert(volume, first_page, &target.server);
        let abandoned = failure.signal.notified();
        let deadline = Instant::now() + self.settings.forward_timeout;
        let attempt = async {
            loop {
                let forwarded = request.forwarded(kind, self.next_request_id());
                let failed = ForwardError::Transport;
                let conn = self
                    .data
                    .get(target.addr, &target.server)
                    .await
                    .map_err(failed)?;
                let (reply, message) = conn
                    .data_shared(&forwarded, payload.clone())
                    .await
                    .map_err(failed)?;
                // The mirror's verdict on our epoch, judged against what it holds.
                let verdict = EpochVerdict::judge(reply.epoch, request.epoch);
                match reply.status {
                    Status::Ok => return Ok(()),
                    // The mirror has not applied the new map yet: it is being pushed.
                    Status::StaleEpoch if verdict.is_newer() && Instant::now() < deadline => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    // Stale: our map is behind. Current: the mirror is applying
                    // a new epoch right now. Either way the sender's map moves on.
                    Status::StaleEpoch if !verdict.is_newer() => {
                        return Err(ForwardError::Behind(reply.epoch));
                    }
                    status => {
                        return Err(ForwardError::Refused {
                            status,
                            message: String::from_utf8_lossy(&message).into_owned(),
                        });
                    }
                }
            }
        };
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(deadline.into(), attempt) => {
                r.unwrap_or(Err(ForwardError::Timeout(self.settings.forward_timeout)))
            }
            () = abandoned => Err(ForwardError::WrittenOff),
        };
        if outcome.as_ref().is_err_and(ForwardError::mirror_failed) {
            // A dead connection would stall the next attempt too.
            self.data.forget(target.addr);
        }
        outcome
    }

    /// Have `server` marked out of sync for the partition at `first_page`;
    /// concurrent failures of the same mirror share one report.
    pub(super) async fn mirror_failed(
        &self,
        volume: VolumeId,
        epoch: Epoch,
        first_page: u64,
        server: &str,
    ) -> Result<(), Refusal> {
        let failure = {
            let mut failures = self.failures.borrow_mut();
            // A report that failed earlier is tried again.
            if failures
                .get(volume, first_page, server)
                .is_some_and(|f| matches!(f.reported.get(), Some(Err(_))))
            {
                failures.remove(volume, first_page, server);
            }
            failures.get_or_insert(volume, first_page, server)
        };
        failure.signal.notify_waiters();
        let result = failure
            .reported
            .get_or_init(|| async {
                warn!(volume = %volume, mirror = server, %epoch, "mirror did not take a write: reporting it out of sync");
                let request = MgmtRequest::MirrorFailed {
                    volume,
                    epoch,
                    first_page,
                    server: server.to_string(),
                };
                match self.call_mgmt(&request).await {
                    Ok(MgmtReply::Applied { .. }) => Ok(()),
                    Ok(MgmtReply::Refused(r)) => Err(r),
                    Ok(other) => Err(MgmtRefusal::Invalid {
                        reason: format!("unexpected reply {other:?}"),
                    }),
                    Err(e) => Err(MgmtRefusal::Unavailable {
                        reason: e.to_string(),
                    }),
                }
            })
            .await
            .clone();
        result.map_err(|refusal| match refusal {
            MgmtRefusal::StaleEpoch { current, .. } => Refusal::new(
                current,
                Refused::MirrorLostMapChanged {
                    mirror: server.to_string(),
                },
            ),
            refusal => Refusal::new(
                epoch,
                Refused::MirrorLossUnrecorded {
                    mirror: server.to_string(),
                    refusal,
                },
            ),
        })
    }
}

/// After forwarding: a mirror changing epoch sends the client to retry
/// under the new map; a mirror that failed is reported out of sync for each
/// of its partitions `pages`, and the request waits until that is recorded.
pub(super) async fn settle<'a>(
    repl: &Replication,
    volume: VolumeId,
    epoch: Epoch,
    outcomes: impl Iterator<Item = (&'a Replica, &'a [u64], Result<(), ForwardError>)>,
) -> Result<(), Refusal> {
    for (target, pages, outcome) in outcomes {
        match outcome {
            Ok(()) => {}
            Err(ForwardError::Behind(current)) => {
                return Err(Refusal::new(
                    current,
                    Refused::MirrorChangingEpoch {
                        mirror: target.server.clone(),
                    },
                ));
            }
            Err(reason) => {
                debug!(volume = %volume, mirror = %target.server, %reason, "forward failed");
                for first_page in pages {
                    repl.mirror_failed(volume, epoch, *first_page, &target.server)
                        .await?;
                }
            }
        }
    }
    Ok(())
}
