//! The data protocol: reading a request, admitting it, executing it, answering.

use std::rc::Rc;

use bytes::Bytes;
use tessera_net::log_limit::LogLimit;
use tessera_net::proto::{
    self, BLOCK_SIZE, Epoch, FLAG_REPLICA, Opcode, REQUEST_HEADER_LEN, Reply, Request, Role,
    Status, VolumeId,
};
use tessera_net::quic::{PeerIdentity, ReadExactError, RecvStream, SendStream, VarInt};
use tracing::{debug, warn};

use super::Service;
use super::sessions::Seen;
use crate::disk::aligned::AlignedBuf;
use crate::repl::{self};
use crate::store::{ReadPiece, Refusal, Refused};

/// Warnings any peer can cause at will are limited (`suppressed` counts
/// the lines held back since the last one).
static MALFORMED: LogLimit = LogLimit::new(10, std::time::Duration::from_secs(10));

/// How long a peer may take to deliver a payload or accept a reply.
const STREAM_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Bytes of zeroes to send for unwritten ranges without allocating them.
static ZEROES: [u8; 64 << 10] = [0; 64 << 10];

pub(super) async fn serve_data_stream(
    service: Rc<Service>,
    peer: PeerIdentity,
    mut send: SendStream,
    mut recv: RecvStream,
) {
    let mut raw = [0u8; REQUEST_HEADER_LEN];
    match recv.read_exact(&mut raw).await {
        Ok(()) => {}
        // The peer finished its side early, but can still read a refusal.
        Err(ReadExactError::FinishedEarly(available)) => {
            let error = proto::ProtoError::Truncated {
                needed: REQUEST_HEADER_LEN,
                available,
            };
            refuse_malformed(&service, &peer, &mut send, &mut recv, 0, error).await;
            return;
        }
        Err(e) => {
            debug!(%peer, error = %e, "request stream ended before its header");
            return;
        }
    }
    let started = std::time::Instant::now();
    let request = match proto::parse_request(&raw) {
        Ok((request, _)) => request,
        Err(e) => {
            let request_id = u64::from_le_bytes(raw[40..48].try_into().unwrap_or_default());
            refuse_malformed(&service, &peer, &mut send, &mut recv, request_id, e).await;
            return;
        }
    };
    // A request without payload must end at its header; checked before it
    // takes any budget, so a stream that never ends holds none.
    if !request.opcode.carries_payload()
        && let Err(reason) = stream_ends(&mut recv, &request).await
    {
        let refusal = Refusal::new(Epoch(0), reason);
        service.metrics.refused(refusal.status());
        refuse(&mut send, &mut recv, request.request_id, &refusal).await;
        return;
    }
    // Reads and writes hold their payload's share of the budget until the reply is sent.
    let blocks = if matches!(request.opcode, Opcode::Read | Opcode::Write) {
        request.length / BLOCK_SIZE
    } else {
        0
    };
    let Ok(_budget) = service.budget.acquire_many(blocks).await else {
        return;
    };
    let outcome = if matches!(peer.role, Role::Client | Role::Storage) {
        match service.sessions.see(&peer, &request) {
            Seen::Untracked => execute(&service, &peer, &request, &mut recv).await,
            Seen::New(claim) => {
                let outcome = execute(&service, &peer, &request, &mut recv).await;
                claim.settle(
                    outcome
                        .as_ref()
                        .map(|(epoch, _)| *epoch)
                        .map_err(Clone::clone),
                );
                outcome
            }
            // Written already, or being written: the answer, not a second write.
            Seen::Copy(first) => first.outcome().await.map(|epoch| (epoch, Vec::new())),
            Seen::Behind { floor } => Err(Refusal::new(
                Epoch(0),
                Refused::SequenceBehind {
                    sequence: request.sequence,
                    floor,
                },
            )),
        }
    } else {
        Err(Refusal::new(
            Epoch(0),
            Refused::RoleMayNotSendData { role: peer.role },
        ))
    };
    let result = match outcome {
        Ok((epoch, pieces)) => {
            let sent = tokio::time::timeout(
                STREAM_TIMEOUT,
                send_pieces(&mut send, &request, epoch, pieces),
            )
            .await;
            match sent {
                Ok(Ok(())) => {
                    service.metrics.served(
                        request.opcode,
                        u64::from(request.length),
                        started.elapsed(),
                    );
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => {
                    let _ = send.reset(VarInt::from_u32(0));
                    Ok(())
                }
            }
        }
        Err(refusal) => {
            service.metrics.refused(refusal.status());
            debug!(%peer, id = request.request_id, status = ?refusal.status(), reason = %refusal.reason, "refused");
            refuse(&mut send, &mut recv, request.request_id, &refusal).await;
            Ok(())
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "reply not delivered");
    }
}

async fn execute(
    service: &Service,
    peer: &PeerIdentity,
    request: &Request,
    recv: &mut RecvStream,
) -> Result<(Epoch, Vec<ReadPiece>), Refusal> {
    let store = &service.store;
    if request.opcode == Opcode::Ping && request.volume == VolumeId(0) {
        let mut boot = AlignedBuf::zeroed(8);
        boot.copy_from_slice(&service.boot.to_le_bytes());
        return Ok((Epoch(0), vec![ReadPiece::Data(boot)]));
    }
    let volume = store
        .lookup(request)
        .inspect_err(|_| service.refresh.notify_one())?;
    // Refuse before reading a payload or touching the disk...
    store.check(&volume, request, peer).inspect_err(|refusal| {
        if let Refused::Epoch(verdict) = refusal.reason
            && verdict.is_newer()
        {
            // The client has seen a newer map than ours: fetch it now.
            service.refresh.notify_one();
        }
    })?;
    let refusal = |reason: Refused| Refusal::new(volume.epoch(), reason);
    let payload = if request.opcode == Opcode::Write {
        let mut buf = AlignedBuf::with_capacity(request.payload_len());
        let received = tokio::time::timeout(STREAM_TIMEOUT, receive(recv, &mut buf)).await;
        match received {
            Ok(Ok(())) => {}
            Ok(Err(error)) => {
                return Err(refusal(Refused::PayloadNotReceived { error }));
            }
            Err(_) => {
                return Err(refusal(Refused::PayloadTimeout {
                    after: STREAM_TIMEOUT,
                }));
            }
        }
        request
            .verify_payload(&buf)
            .map_err(|e| refusal(Refused::Malformed(e)))?;
        // Exactly the payload: the stream must end here.
        stream_ends(recv, request).await.map_err(refusal)?;
        Some(buf)
    } else {
        None
    };
    // ...and check again holding the epoch gate, which stays held until the I/O is done.
    let forwarded = request.flags & FLAG_REPLICA != 0;
    let admission = if forwarded {
        // A primary waits on this with its own gate held: queueing behind a
        // map push here could close a cycle of servers waiting on each other.
        store.try_admit(&volume, request, peer)?
    } else {
        store.admit(&volume, request, peer).await?
    };
    let epoch = admission.epoch;
    let pieces = match (request.opcode, payload) {
        (Opcode::Read, _) => {
            let pieces = store.read(&volume, request.offset, request.length).await?;
            // The lease may have run out while the disk read: data read
            // before is no answer a replaced server may still give.
            store
                .lease()
                .check(std::time::Instant::now())
                .map_err(|e| Refusal::new(epoch, Refused::NoLease(e)))?;
            pieces
        }
        (Opcode::Write | Opcode::Trim | Opcode::WriteZeroes, payload) => {
            if forwarded {
                repl::mirror_write(
                    &service.store,
                    &service.replication,
                    &volume,
                    &admission,
                    request,
                    payload,
                )
                .await?;
            } else {
                repl::primary_write(
                    &service.store,
                    &service.replication,
                    &volume,
                    admission,
                    request,
                    payload,
                )
                .await?;
            }
            Vec::new()
        }
        (Opcode::Flush, _) if !forwarded => {
            repl::primary_flush(&service.store, &service.replication, &volume, admission).await?;
            Vec::new()
        }
        (Opcode::Flush, _) => {
            store.flush().await.map_err(|e| {
                Refusal::new(
                    epoch,
                    Refused::Io {
                        error: e.to_string(),
                    },
                )
            })?;
            Vec::new()
        }
        (Opcode::Ping, _) => Vec::new(),
    };
    Ok((epoch, pieces))
}

/// Fill `buf` from `recv`, chunk by chunk (no chunk is longer than the room left).
async fn receive(recv: &mut RecvStream, buf: &mut AlignedBuf) -> Result<(), String> {
    while !buf.is_full() {
        let chunk = match recv.read_chunk(buf.remaining(), true).await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => {
                let (got, of) = (buf.len(), buf.capacity());
                return Err(format!("stream finished early ({got} of {of} bytes)"));
            }
            Err(e) => return Err(e.to_string()),
        };
        buf.extend_from_slice(&chunk.bytes)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// A request's stream holds exactly `payload_len` bytes after the header
/// and then ends; `Err` says how it did not.
async fn stream_ends(recv: &mut RecvStream, request: &Request) -> Result<(), Refused> {
    match tokio::time::timeout(STREAM_TIMEOUT, recv.read_chunk(1, true)).await {
        Ok(Ok(None)) => Ok(()),
        Ok(Ok(Some(_))) => Err(Refused::Malformed(proto::ProtoError::TrailingPayload {
            declared: request.payload_len(),
        })),
        Ok(Err(e)) => Err(Refused::PayloadNotReceived {
            error: e.to_string(),
        }),
        Err(_) => Err(Refused::StreamNotFinished {
            after: STREAM_TIMEOUT,
        }),
    }
}

pub(super) fn piece_bytes(piece: &ReadPiece) -> impl Iterator<Item = &[u8]> {
    let (data, zeroes): (&[u8], usize) = match piece {
        ReadPiece::Data(buf) => (buf, 0),
        ReadPiece::Zeroes(n) => (&[], *n),
    };
    std::iter::once(data)
        .filter(|d| !d.is_empty())
        .chain(zero_chunks(zeroes))
}

/// `n` zero bytes as slices of [`ZEROES`].
fn zero_chunks<'a>(n: usize) -> impl Iterator<Item = &'a [u8]> {
    (0..n.div_ceil(ZEROES.len())).map(move |i| &ZEROES[..(n - i * ZEROES.len()).min(ZEROES.len())])
}

/// Send the reply header and the read data in one call. The data goes to
/// QUIC without a copy: each buffer becomes a `Bytes` that owns it.
async fn send_pieces(
    send: &mut SendStream,
    request: &Request,
    epoch: Epoch,
    pieces: Vec<ReadPiece>,
) -> Result<(), tessera_net::quic::QuicError> {
    let mut checksum = 0u32;
    let mut length = 0usize;
    for bytes in pieces.iter().flat_map(piece_bytes) {
        checksum = crc32c::crc32c_append(checksum, bytes);
        length += bytes.len();
    }
    let reply = Reply {
        status: Status::Ok,
        epoch,
        request_id: request.request_id,
        length: u32::try_from(length).unwrap_or(u32::MAX),
        checksum,
    };
    let mut chunks = vec![Bytes::copy_from_slice(&reply.encode())];
    for piece in pieces {
        match piece {
            ReadPiece::Data(buf) => chunks.push(Bytes::from_owner(buf)),
            ReadPiece::Zeroes(n) => chunks.extend(zero_chunks(n).map(Bytes::from_static)),
        }
    }
    send.write_all_chunks(&mut chunks).await?;
    send.finish()?;
    Ok(())
}

/// Refuse a header that does not parse: counted, logged (rate-limited) and answered.
async fn refuse_malformed(
    service: &Service,
    peer: &PeerIdentity,
    send: &mut SendStream,
    recv: &mut RecvStream,
    request_id: u64,
    error: proto::ProtoError,
) {
    if let Some(suppressed) = MALFORMED.allow() {
        warn!(%peer, error = %error, suppressed, "malformed request");
    }
    service.metrics.refused(error.status());
    let refusal = Refusal::new(Epoch(0), Refused::Malformed(error));
    refuse(send, recv, request_id, &refusal).await;
}

/// Answer with a refusal and stop reading whatever the peer still sends.
async fn refuse(send: &mut SendStream, recv: &mut RecvStream, request_id: u64, refusal: &Refusal) {
    // The reason's text is rendered here, at the edge, and cut to fit.
    let text = refusal.reason.to_string();
    let mut cut = text.len().min(proto::MAX_ERROR_MESSAGE as usize);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let message = &text.as_bytes()[..cut];
    let reply = Reply::new(refusal.status(), refusal.epoch, request_id, message);
    let _ = recv.stop(VarInt::from_u32(0));
    let delivered = async {
        send.write_all(&reply.encode()).await?;
        send.write_all(message).await?;
        send.finish()?;
        Ok::<(), tessera_net::quic::QuicError>(())
    };
    if let Err(e) = delivered.await {
        debug!(error = %e, "refusal not delivered");
    }
}
