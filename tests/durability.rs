//! SIGKILL the storage server at random, seeded moments while writers run;
//! after every restart each block must hold its last acknowledged content or
//! the content of the operation that was in flight on it, never anything else.
//!
//! CI runs 3 kills. The stress version runs 20:
//! `cargo test --release --test durability -- --ignored --nocapture`
//! (set TESSERA_SEED to replay a run; the seed is printed).
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tessera_net::proto::{Epoch, MgmtReply, Opcode, Request, Role, Status, VolumeId};
use tessera_net::quic::PeerConnection;

const BLOCK: usize = 4096;
const WRITERS: usize = 12;
/// Each writer owns a region of whole chunks, so no two operations in flight overlap.
const REGION: u64 = 4 * MIB;
const VOLUME: u64 = WRITERS as u64 * REGION;
const EPOCH: u64 = 1;

#[derive(Debug, Clone, Copy, Default)]
struct BlockState {
    /// Write id of the last acknowledged operation (0 = zeroes).
    acked: u64,
    /// An operation sent but not (known to be) acknowledged.
    in_flight: Option<u64>,
}

/// Content of `block` as written by operation `id`: a header naming both, then a fill.
fn block_content(id: u64, block: u64) -> [u8; BLOCK] {
    let mut out = [0u8; BLOCK];
    if id == 0 {
        return out;
    }
    let word = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ block;
    out[..8].copy_from_slice(&id.to_le_bytes());
    out[8..16].copy_from_slice(&block.to_le_bytes());
    for chunk in out[16..].chunks_exact_mut(8) {
        chunk.copy_from_slice(&word.to_le_bytes());
    }
    out
}

/// Which operation wrote this block; panics on content no operation wrote (torn or misplaced).
fn decode_block(data: &[u8], block: u64) -> u64 {
    if data.iter().all(|b| *b == 0) {
        return 0;
    }
    let id = u64::from_le_bytes(data[..8].try_into().unwrap());
    assert_eq!(
        data,
        &block_content(id, block)[..],
        "block {block} holds content no operation wrote"
    );
    id
}

async fn writer(
    conn: PeerConnection,
    index: usize,
    state: Arc<Mutex<Vec<BlockState>>>,
    seed: u64,
    round: u64,
) {
    let mut rng = StdRng::seed_from_u64(seed ^ (index as u64) << 20 ^ round << 40);
    let blocks_per_region = REGION / BLOCK as u64;
    let base_block = index as u64 * blocks_per_region;
    for seq in 1u64.. {
        let id = round << 40 | (index as u64) << 32 | seq;
        let roll = rng.random_range(0..10);
        let (first, count, opcode) = if roll == 0 {
            // TRIM a whole chunk: its slot goes back to the free list.
            let chunk = rng.random_range(0..REGION / MIB);
            (chunk * MIB / BLOCK as u64, MIB / BLOCK as u64, Opcode::Trim)
        } else {
            let count = rng.random_range(1..=16u64);
            let first = rng.random_range(0..=blocks_per_region - count);
            (
                first,
                count,
                if roll == 1 {
                    Opcode::WriteZeroes
                } else {
                    Opcode::Write
                },
            )
        };
        let value = if opcode == Opcode::Write { id } else { 0 };
        {
            let mut s = state.lock().unwrap();
            for b in first..first + count {
                s[b as usize].in_flight = Some(value);
            }
        }
        let offset = (base_block + first) * BLOCK as u64;
        let length = (count as usize * BLOCK) as u32;
        let outcome = if opcode == Opcode::Write {
            let mut payload = Vec::with_capacity(count as usize * BLOCK);
            for b in first..first + count {
                payload.extend_from_slice(&block_content(id, base_block + b));
            }
            let req = Request::write(VolumeId(1), Epoch(EPOCH), offset, &payload, id).unwrap();
            conn.data(&req, &payload).await
        } else {
            let req = Request::new(opcode, VolumeId(1), Epoch(EPOCH), offset, length, id);
            conn.data(&req, &[]).await
        };
        match outcome {
            Ok((reply, _)) => {
                assert_eq!(reply.status, Status::Ok, "{opcode:?} refused");
                let mut s = state.lock().unwrap();
                for b in first..first + count {
                    s[b as usize] = BlockState {
                        acked: value,
                        in_flight: None,
                    };
                }
            }
            // The server was killed: the operation may or may not have happened.
            Err(_) => return,
        }
    }
}

async fn kill_loop(rounds: u64) {
    let seed = std::env::var("TESSERA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_2026);
    println!("durability: seed {seed}, {rounds} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let cluster = TestCluster::new();
    let client = cluster.endpoint(Role::Client, "app");
    let states: Vec<_> = (0..WRITERS)
        .map(|_| {
            Arc::new(Mutex::new(vec![
                BlockState::default();
                (REGION / BLOCK as u64) as usize
            ]))
        })
        .collect();
    let mut server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    assert_eq!(
        push(&mgmt, &server, &whole_volume(1, EPOCH, VOLUME, &[&server])).await,
        MgmtReply::Applied {
            epoch: Epoch(EPOCH)
        }
    );
    for round in 0..rounds {
        let conn = server.connect(&client).await;
        let tasks: Vec<_> = states
            .iter()
            .enumerate()
            .map(|(i, s)| tokio::spawn(writer(conn.clone(), i, s.clone(), seed, round + 1)))
            .collect();
        let delay = rng.random_range(200..1200);
        tokio::time::sleep(Duration::from_millis(delay)).await;
        server.kill9();
        for t in &tasks {
            t.abort();
        }
        for t in tasks {
            let _ = t.await;
        }
        let acked: usize = states
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap()
                    .iter()
                    .filter(|b| b.acked != 0 && b.in_flight.is_none())
                    .count()
            })
            .sum();

        server = StorageProc::start(&cluster, "store-1", "64M", &[]);
        // A restarted server serves a volume once it has its map again (a
        // management server would send it with the first heartbeat reply).
        assert_eq!(
            push(&mgmt, &server, &whole_volume(1, EPOCH, VOLUME, &[&server])).await,
            MgmtReply::Applied {
                epoch: Epoch(EPOCH)
            }
        );
        let conn = server.connect(&client).await;
        let mut in_flight_seen = 0;
        for (w, state) in states.iter().enumerate() {
            let mut state = state.lock().unwrap().clone();
            for chunk in 0..REGION / MIB {
                let offset = w as u64 * REGION + chunk * MIB;
                let (reply, data) = read(&conn, 1, EPOCH, offset, MIB as u32).await;
                assert_eq!(reply.status, Status::Ok);
                for (i, bytes) in data.chunks_exact(BLOCK).enumerate() {
                    let local = (chunk * MIB / BLOCK as u64) as usize + i;
                    let block = w as u64 * (REGION / BLOCK as u64) + local as u64;
                    let found = decode_block(bytes, block);
                    let s = state[local];
                    assert!(
                        found == s.acked || Some(found) == s.in_flight,
                        "round {round}: block {block} holds write {found:#x}, acknowledged {:#x}, in flight {:?}",
                        s.acked,
                        s.in_flight
                    );
                    if s.in_flight.is_some() {
                        in_flight_seen += 1;
                    }
                    state[local] = BlockState {
                        acked: found,
                        in_flight: None,
                    };
                }
            }
            *states[w].lock().unwrap() = state;
        }
        println!(
            "round {round}: killed after {delay} ms; {acked} blocks held acknowledged data; {in_flight_seen} blocks were in flight"
        );
        assert!(
            acked > 0,
            "round {round}: no write was acknowledged before the kill"
        );
        assert!(!server.log().contains("damaged"), "{}", server.log());
    }
}

#[tokio::test]
async fn acknowledged_writes_survive_sigkill() {
    kill_loop(3).await;
}

#[tokio::test]
#[ignore = "stress: 20 kills; cargo test --release --test durability -- --ignored"]
async fn acknowledged_writes_survive_sigkill_stress() {
    kill_loop(20).await;
}
