//! The storage server as real processes: data I/O, the epoch comparator,
//! refusals of bad input, persistence, and refusal of foreign data files.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tessera_net::proto::{
    self, BLOCK_SIZE, Epoch, MgmtReply, MgmtRequest, Opcode, Refusal, Request, Role, Status,
    VolumeId,
};
use tessera_net::quic::{Alpn, read_reply};

const SIZE: u64 = 48 * MIB;
const EPOCH: u64 = 5;

/// One server holding volume 1 at epoch 5; returns (cluster, server, client connection endpoint, mgmt endpoint).
async fn one_server() -> (
    TestCluster,
    StorageProc,
    tessera_net::quic::Endpoint,
    tessera_net::quic::Endpoint,
) {
    let cluster = TestCluster::new();
    let server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    let reply = push(&mgmt, &server, &whole_volume(1, EPOCH, SIZE, &[&server])).await;
    assert_eq!(
        reply,
        MgmtReply::Applied {
            epoch: Epoch(EPOCH)
        }
    );
    let client = cluster.endpoint(Role::Client, "app");
    (cluster, server, client, mgmt)
}

#[tokio::test]
async fn write_read_trim_and_zeroes() {
    let (_cluster, server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;

    // Unwritten space reads as zeroes.
    let (reply, data) = read(&conn, 1, EPOCH, 0, 64 << 10).await;
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(reply.epoch, Epoch(EPOCH));
    assert!(data.iter().all(|b| *b == 0));

    // A write that crosses a slot (1 MiB chunk) boundary.
    let at = MIB - 8192;
    let payload = pattern(1, 64 << 10);
    assert_eq!(
        write(&conn, 1, EPOCH, at, &payload).await.status,
        Status::Ok
    );
    let (reply, data) = read(&conn, 1, EPOCH, at, 64 << 10).await;
    assert_eq!(reply.status, Status::Ok);
    assert_eq!(data, payload);
    // The rest of a newly allocated chunk reads as zeroes.
    let (_, data) = read(&conn, 1, EPOCH, MIB + (64 << 10), 4096).await;
    assert!(data.iter().all(|b| *b == 0));

    // A write with FUA, then FLUSH.
    let mut fua = Request::write(VolumeId(1), Epoch(EPOCH), 4 * MIB, &payload, 77).unwrap();
    fua.flags = proto::FLAG_FUA;
    assert_eq!(
        conn.data(&fua, &payload).await.unwrap().0.status,
        Status::Ok
    );
    assert_eq!(
        op(&conn, Opcode::Flush, 1, EPOCH, 0, 0).await.status,
        Status::Ok
    );

    // WRITE_ZEROES inside a chunk, TRIM of a whole chunk.
    assert_eq!(
        op(&conn, Opcode::WriteZeroes, 1, EPOCH, at, 4096)
            .await
            .status,
        Status::Ok
    );
    let (_, data) = read(&conn, 1, EPOCH, at, 8192).await;
    assert!(data[..4096].iter().all(|b| *b == 0));
    assert_eq!(&data[4096..], &payload[4096..8192]);
    assert_eq!(
        op(&conn, Opcode::Trim, 1, EPOCH, MIB, MIB as u32)
            .await
            .status,
        Status::Ok
    );
    let (_, data) = read(&conn, 1, EPOCH, MIB, 64 << 10).await;
    assert!(data.iter().all(|b| *b == 0));
    // Writing the trimmed chunk again allocates a fresh, zeroed slot.
    assert_eq!(
        write(&conn, 1, EPOCH, MIB + 4096, &payload[..4096])
            .await
            .status,
        Status::Ok
    );
    let (_, data) = read(&conn, 1, EPOCH, MIB, 8192).await;
    assert!(data[..4096].iter().all(|b| *b == 0));
    assert_eq!(&data[4096..], &payload[..4096]);

    assert_eq!(
        op(&conn, Opcode::Ping, 1, EPOCH, 0, 0).await.status,
        Status::Ok
    );
    assert_eq!(op(&conn, Opcode::Ping, 0, 0, 0, 0).await.status, Status::Ok);
}

#[tokio::test]
async fn stale_epoch_changes_no_byte_on_disk() {
    let (_cluster, mut server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    let payload = pattern(2, 128 << 10);
    assert_eq!(write(&conn, 1, EPOCH, 0, &payload).await.status, Status::Ok);
    assert_eq!(
        op(&conn, Opcode::Flush, 1, EPOCH, 0, 0).await.status,
        Status::Ok
    );
    let before = file_digest(&server.data);

    let other = pattern(3, 128 << 10);
    for epoch in [EPOCH - 1, EPOCH + 1, 0, u64::MAX] {
        for offset in [0, 8 * MIB] {
            let reply = write(&conn, 1, epoch, offset, &other).await;
            assert_eq!(
                (reply.status, reply.epoch),
                (Status::StaleEpoch, Epoch(EPOCH)),
                "write at {epoch}"
            );
            for opcode in [Opcode::Trim, Opcode::WriteZeroes] {
                let reply = op(&conn, opcode, 1, epoch, offset, 128 << 10).await;
                assert_eq!(
                    (reply.status, reply.epoch),
                    (Status::StaleEpoch, Epoch(EPOCH)),
                    "{opcode:?} at {epoch}"
                );
            }
            let (reply, data) = read(&conn, 1, epoch, offset, 4096).await;
            assert_eq!(
                (reply.status, reply.epoch),
                (Status::StaleEpoch, Epoch(EPOCH))
            );
            assert!(data.len() < 1024, "a refusal carries no data");
        }
    }
    assert_eq!(
        file_digest(&server.data),
        before,
        "a stale request changed the data file"
    );
    let (_, data) = read(&conn, 1, EPOCH, 0, 128 << 10).await;
    assert_eq!(data, payload);
    assert!(server.is_running());
}

#[tokio::test]
async fn many_requests_in_flight_on_one_connection() {
    const IN_FLIGHT: u64 = 64;
    let (_cluster, server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    let writes: Vec<_> = (0..IN_FLIGHT)
        .map(|i| {
            let conn = conn.clone();
            tokio::spawn(async move {
                let data = pattern(100 + i, 16 << 10);
                // Spread over chunks so that many allocate at once, some sharing a chunk.
                let offset = i * (384 << 10);
                (write(&conn, 1, EPOCH, offset, &data).await, offset, data)
            })
        })
        .collect();
    let mut written = Vec::new();
    for w in writes {
        let (reply, offset, data) = w.await.unwrap();
        assert_eq!(reply.status, Status::Ok);
        written.push((offset, data));
    }
    let reads: Vec<_> = written
        .into_iter()
        .map(|(offset, data)| {
            let conn = conn.clone();
            tokio::spawn(async move { (read(&conn, 1, EPOCH, offset, 16 << 10).await, data) })
        })
        .collect();
    for r in reads {
        let ((reply, got), expected) = r.await.unwrap();
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(got, expected);
    }
}

#[tokio::test]
async fn bad_requests_get_typed_replies_and_the_server_keeps_serving() {
    let (cluster, mut server, client, mgmt) = one_server().await;
    let conn = server.connect(&client).await;

    // Bad magic: a raw stream with garbage where the header should be.
    let (mut send, mut recv) = conn.open_stream().await.unwrap();
    let mut garbage = Request::new(Opcode::Read, VolumeId(1), Epoch(EPOCH), 0, 4096, 4242).encode();
    garbage[0] = b'X';
    send.write_all(&garbage).await.unwrap();
    send.finish().unwrap();
    let (reply, message) = read_reply(&mut recv).await.unwrap();
    assert_eq!((reply.status, reply.request_id), (Status::BadRequest, 4242));
    assert!(String::from_utf8_lossy(&message).contains("bad magic"));

    // Misaligned offset (bypassing the client-side encoder's validation).
    let (mut send, mut recv) = conn.open_stream().await.unwrap();
    let mut misaligned = Request::new(Opcode::Read, VolumeId(1), Epoch(EPOCH), 0, 4096, 1).encode();
    misaligned[24] = 1;
    send.write_all(&misaligned).await.unwrap();
    send.finish().unwrap();
    let (reply, message) = read_reply(&mut recv).await.unwrap();
    assert_eq!(reply.status, Status::BadRequest);
    assert!(String::from_utf8_lossy(&message).contains("multiple of"));

    // Checksum mismatch: the header promises another checksum than the payload has.
    let payload = pattern(5, 8192);
    let mut req = Request::write(VolumeId(1), Epoch(EPOCH), 0, &payload, 9).unwrap();
    req.checksum ^= 1;
    let (reply, _) = conn.data(&req, &payload).await.unwrap();
    assert_eq!(reply.status, Status::ChecksumMismatch);
    let (_, data) = read(&conn, 1, EPOCH, 0, 8192).await;
    assert!(
        data.iter().all(|b| *b == 0),
        "a corrupt payload was written"
    );

    // Past the end of the volume; a volume the server does not hold.
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH, SIZE, 4096).await.status,
        Status::OutOfRange
    );
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH, SIZE - 4096, 8192)
            .await
            .status,
        Status::OutOfRange
    );
    let reply = op(&conn, Opcode::Read, 99, EPOCH, 0, 4096).await;
    assert_eq!((reply.status, reply.epoch), (Status::NotOwner, Epoch(0)));

    // Pages another server holds.
    let mut map = whole_volume(2, 1, SIZE, &[&server]);
    map.partitions[0].end_page = 8;
    assert!(matches!(
        push(&mgmt, &server, &map).await,
        MgmtReply::Applied { .. }
    ));
    assert_eq!(
        op(&conn, Opcode::Read, 2, 1, 7 * MIB, 4096).await.status,
        Status::Ok
    );
    assert_eq!(
        op(&conn, Opcode::Read, 2, 1, 8 * MIB, 4096).await.status,
        Status::NotOwner
    );
    assert_eq!(
        op(&conn, Opcode::Read, 2, 1, 8 * MIB - 4096, 8192)
            .await
            .status,
        Status::NotOwner
    );

    // An admin certificate may not send data requests; a client may not push maps.
    let admin = cluster.endpoint(Role::Admin, "ops");
    let admin_conn = admin
        .connect(server.addr, "store-1", Alpn::Data, Role::Storage)
        .await
        .unwrap();
    assert_eq!(
        op(&admin_conn, Opcode::Read, 1, EPOCH, 0, 4096)
            .await
            .status,
        Status::Forbidden
    );
    let reply = push(
        &client,
        &server,
        &whole_volume(1, EPOCH + 1, SIZE, &[&server]),
    )
    .await;
    assert!(
        matches!(
            reply,
            MgmtReply::Refused(Refusal::Forbidden {
                role: Role::Client,
                ..
            })
        ),
        "{reply:?}"
    );

    // Epochs never go back.
    let reply = push(
        &mgmt,
        &server,
        &whole_volume(1, EPOCH - 1, SIZE, &[&server]),
    )
    .await;
    assert!(
        matches!(reply, MgmtReply::Refused(Refusal::Invalid { .. })),
        "{reply:?}"
    );

    // Still serving, on this connection and on a new one.
    assert_eq!(write(&conn, 1, EPOCH, 0, &payload).await.status, Status::Ok);
    let fresh = server
        .connect(&cluster.endpoint(Role::Client, "app-2"))
        .await;
    assert_eq!(read(&fresh, 1, EPOCH, 0, 8192).await.1, payload);
    assert!(server.is_running(), "{}", server.log());
    assert!(!server.log().contains("panicked"));
    assert!(server.stop().success());
}

/// A request's stream holds its header and exactly `length` payload bytes
/// (none but for WRITE); anything else is refused, and a header cut short
/// still gets a typed refusal.
#[tokio::test]
async fn streams_carry_exactly_the_declared_payload() {
    let (_cluster, mut server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    let raw = |bytes: Vec<u8>| {
        let conn = conn.clone();
        async move {
            let (mut send, mut recv) = conn.open_stream().await.unwrap();
            // The server may stop reading once it refuses.
            let _ = send.write_all(&bytes).await;
            let _ = send.finish();
            read_reply(&mut recv).await.unwrap()
        }
    };

    // A WRITE whose stream goes on past `length`.
    let data = pattern(3, 8192);
    let request = Request::write(VolumeId(1), Epoch(EPOCH), 0, &data[..4096], 11).unwrap();
    let mut bytes = request.encode().to_vec();
    bytes.extend_from_slice(&data);
    let (reply, message) = raw(bytes).await;
    assert_eq!((reply.status, reply.request_id), (Status::BadRequest, 11));
    assert!(
        String::from_utf8_lossy(&message).contains("more than the 4096 payload bytes"),
        "{}",
        String::from_utf8_lossy(&message)
    );

    // A READ that carries a payload.
    let request = Request::new(Opcode::Read, VolumeId(1), Epoch(EPOCH), 0, 4096, 12);
    let mut bytes = request.encode().to_vec();
    bytes.extend_from_slice(&data[..4096]);
    let (reply, message) = raw(bytes).await;
    assert_eq!((reply.status, reply.request_id), (Status::BadRequest, 12));
    assert!(String::from_utf8_lossy(&message).contains("more than the 0 payload bytes"));

    // Neither was written.
    let (_, held) = read(&conn, 1, EPOCH, 0, 8192).await;
    assert!(held.iter().all(|b| *b == 0), "a refused write landed");

    // A header shorter than 64 bytes.
    let (reply, message) = raw(request.encode()[..20].to_vec()).await;
    assert_eq!(reply.status, Status::BadRequest);
    assert!(
        String::from_utf8_lossy(&message).contains("need 64 bytes, have 20"),
        "{}",
        String::from_utf8_lossy(&message)
    );

    // Exactly the declared payload is still served.
    assert_eq!(write(&conn, 1, EPOCH, 0, &data).await.status, Status::Ok);
    assert_eq!(read(&conn, 1, EPOCH, 0, 8192).await.1, data);
    assert!(server.stop().success());
}

#[tokio::test]
async fn layout_change_fences_old_epoch_and_survives_restart() {
    let (cluster, mut server, client, mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    let payload = pattern(7, 4096 * 3);
    assert_eq!(
        write(&conn, 1, EPOCH, 12 * MIB, &payload).await.status,
        Status::Ok
    );

    // New epoch: this server keeps pages 0..16 only.
    let mut map = whole_volume(1, EPOCH + 1, SIZE, &[&server]);
    map.partitions[0].end_page = 16;
    assert_eq!(
        push(&mgmt, &server, &map).await,
        MgmtReply::Applied {
            epoch: Epoch(EPOCH + 1)
        }
    );
    let reply = op(&conn, Opcode::Read, 1, EPOCH, 12 * MIB, 4096).await;
    assert_eq!(
        (reply.status, reply.epoch),
        (Status::StaleEpoch, Epoch(EPOCH + 1))
    );
    assert_eq!(
        read(&conn, 1, EPOCH + 1, 12 * MIB, 4096 * 3).await.1,
        payload
    );
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH + 1, 16 * MIB, 4096)
            .await
            .status,
        Status::NotOwner
    );

    // A clean restart keeps data, epoch and layout.
    assert!(server.stop().success());
    let server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    let conn = server.connect(&client).await;
    // Until a management server gives it the map again, it serves nothing.
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH + 1, 12 * MIB, 4096)
            .await
            .status,
        Status::Unavailable
    );
    assert_eq!(
        push(&mgmt, &server, &map).await,
        MgmtReply::Applied {
            epoch: Epoch(EPOCH + 1)
        }
    );
    assert_eq!(
        read(&conn, 1, EPOCH + 1, 12 * MIB, 4096 * 3).await.1,
        payload
    );
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH, 0, 4096).await.status,
        Status::StaleEpoch
    );
    assert_eq!(
        op(&conn, Opcode::Read, 1, EPOCH + 1, 16 * MIB, 4096)
            .await
            .status,
        Status::NotOwner
    );
}

#[tokio::test]
async fn data_file_of_another_cluster_or_format_is_refused_untouched() {
    let (cluster, mut server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    assert_eq!(
        write(&conn, 1, EPOCH, 0, &pattern(8, 4096)).await.status,
        Status::Ok
    );
    assert!(server.stop().success());
    let data = server.data.clone();
    let digest = file_digest(&data);

    // Another cluster, same server name, same file.
    let other = TestCluster::new();
    other.issue(Role::Storage, "store-1");
    let path = data.to_str().unwrap();
    let out = tessera()
        .args([
            "storage",
            "--listen",
            "127.0.0.1:0",
            "--data",
            path,
            "--cluster-dir",
        ])
        .arg(other.dir.path())
        .args(["--name", "store-1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to cluster"), "{err}");
    assert_eq!(file_digest(&data), digest);

    // Another on-disk format version (a valid superblock otherwise: the crc
    // over its first 200 bytes sits at 200..204).
    let original = std::fs::read(&data).unwrap();
    let mut bytes = original.clone();
    for copy in [0, 4096] {
        bytes[copy + 8..copy + 12].copy_from_slice(&3u32.to_le_bytes());
        let crc = crc32c::crc32c(&bytes[copy..copy + 200]);
        bytes[copy + 200..copy + 204].copy_from_slice(&crc.to_le_bytes());
    }
    std::fs::write(&data, &bytes).unwrap();
    let err = StorageProc::try_start(&cluster, "store-1", "64M", &[])
        .err()
        .unwrap();
    assert!(err.contains("on-disk format version 3"), "{err}");
    assert_eq!(
        std::fs::read(&data).unwrap(),
        bytes,
        "refused file was modified"
    );

    // Both superblock copies damaged.
    let mut bytes = original;
    bytes[100] ^= 0xff;
    bytes[4096 + 100] ^= 0xff;
    std::fs::write(&data, &bytes).unwrap();
    let err = StorageProc::try_start(&cluster, "store-1", "64M", &[])
        .err()
        .unwrap();
    assert!(err.contains("both superblock copies are damaged"), "{err}");
    assert_eq!(
        std::fs::read(&data).unwrap(),
        bytes,
        "refused file was modified"
    );

    // Bytes that are not Tessera's at all.
    let foreign = pattern(9, 1 << 20);
    std::fs::write(&data, &foreign).unwrap();
    let err = StorageProc::try_start(&cluster, "store-1", "64M", &[])
        .err()
        .unwrap();
    assert!(err.contains("not a Tessera data file"), "{err}");
    assert_eq!(
        std::fs::read(&data).unwrap(),
        foreign,
        "foreign file was modified"
    );
}

#[tokio::test]
async fn concurrent_pushes_of_a_new_volume_make_one_record() {
    let cluster = TestCluster::new();
    let mut server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    let pushes: Vec<_> = (1..=6u64)
        .map(|epoch| {
            let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
            let map = whole_volume(7, epoch, SIZE, &[&server]);
            let (addr, name) = (server.addr, server.name.clone());
            tokio::spawn(async move {
                let conn = mgmt
                    .connect(addr, &name, Alpn::Mgmt, Role::Storage)
                    .await
                    .unwrap();
                conn.mgmt(&MgmtRequest::PushMap { map }).await.unwrap()
            })
        })
        .collect();
    for p in pushes {
        // Applied, or refused because a newer epoch got there first.
        let reply = p.await.unwrap();
        assert!(
            matches!(
                reply,
                MgmtReply::Applied { .. } | MgmtReply::Refused(Refusal::Invalid { .. })
            ),
            "{reply:?}"
        );
    }
    let client = cluster.endpoint(Role::Client, "app");
    let conn = server.connect(&client).await;
    let held = op(&conn, Opcode::Ping, 7, 0, 0, 0).await.epoch;
    assert!(held.0 >= 1);
    assert!(server.stop().success());
    // One record per volume on disk: the server restarts with the same epoch.
    let server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    let conn = server.connect(&client).await;
    assert_eq!(
        op(&conn, Opcode::Ping, 7, held.0, 0, 0).await.status,
        Status::Ok
    );
}

#[tokio::test]
async fn std_io_engine_serves_too() {
    let cluster = TestCluster::new();
    let server = StorageProc::start(&cluster, "store-1", "32M", &["--io-engine", "std"]);
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    push(&mgmt, &server, &whole_volume(1, 1, 16 * MIB, &[&server])).await;
    let conn = server.connect(&cluster.endpoint(Role::Client, "app")).await;
    let payload = pattern(10, 3 * BLOCK_SIZE as usize);
    assert_eq!(write(&conn, 1, 1, 4096, &payload).await.status, Status::Ok);
    assert_eq!(read(&conn, 1, 1, 4096, 3 * BLOCK_SIZE).await.1, payload);
}

/// Fetch `path` from the metrics listener with a bare HTTP/1.1 request.
fn http_get(addr: &str, path: &str) -> String {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    response
}

/// The value of one sample line, e.g. `tessera_requests_total{op="write"}`.
fn sample(body: &str, series: &str) -> f64 {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no sample {series} in:\n{body}"))
}

#[tokio::test]
async fn metrics_count_requests_bytes_and_refusals() {
    let cluster = TestCluster::new();
    let server = StorageProc::start(&cluster, "store-1", "64M", &["--metrics", "127.0.0.1:0"]);
    let addr = server
        .printed("metrics on")
        .rsplit_once("metrics on ")
        .unwrap()
        .1
        .to_string();
    let mgmt = cluster.endpoint(Role::Mgmt, "mgmt-1");
    push(&mgmt, &server, &whole_volume(1, EPOCH, SIZE, &[&server])).await;
    let client = cluster.endpoint(Role::Client, "app");
    let conn = server.connect(&client).await;
    for i in 0..3 {
        let reply = write(&conn, 1, EPOCH, i * MIB, &pattern(i, 64 << 10)).await;
        assert_eq!(reply.status, Status::Ok);
    }
    let (reply, _) = read(&conn, 1, EPOCH, 0, 8192).await;
    assert_eq!(reply.status, Status::Ok);
    let stale = write(&conn, 1, EPOCH - 1, 0, &pattern(9, 4096)).await;
    assert_eq!(stale.status, Status::StaleEpoch);

    let scrape = addr.clone();
    let response = tokio::task::spawn_blocking(move || http_get(&scrape, "/metrics"))
        .await
        .unwrap();
    let (head, body) = response.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200 OK"), "{head}");
    assert!(head.contains("text/plain; version=0.0.4"), "{head}");
    assert_eq!(sample(body, "tessera_requests_total{op=\"write\"}"), 3.0);
    assert_eq!(sample(body, "tessera_requests_total{op=\"read\"}"), 1.0);
    assert_eq!(sample(body, "tessera_written_bytes_total"), 3.0 * 65536.0);
    assert_eq!(sample(body, "tessera_read_bytes_total"), 8192.0);
    assert_eq!(
        sample(body, "tessera_refusals_total{status=\"stale_epoch\"}"),
        1.0
    );
    assert_eq!(
        sample(body, "tessera_request_seconds_count{op=\"write\"}"),
        3.0
    );
    assert_eq!(
        sample(
            body,
            "tessera_request_seconds_bucket{op=\"write\",le=\"+Inf\"}"
        ),
        3.0
    );
    assert_eq!(sample(body, "tessera_volumes"), 1.0);
    assert!(sample(body, "tessera_bitmask_blocks{state=\"total\"}") >= 64.0);

    // Anything but GET /metrics gets a clear status, and the server goes on.
    let other = addr.clone();
    let response = tokio::task::spawn_blocking(move || http_get(&other, "/other"))
        .await
        .unwrap();
    assert!(response.starts_with("HTTP/1.1 404 Not Found"), "{response}");
    let garbage = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(&addr).unwrap();
        stream.write_all(b"\x00\xff not http\r\n\r\n").unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        response
    })
    .await
    .unwrap();
    assert!(garbage.starts_with("HTTP/1.1 400 Bad Request"), "{garbage}");
    let (reply, _) = read(&conn, 1, EPOCH, 0, 4096).await;
    assert_eq!(reply.status, Status::Ok);
}

/// Settings fixed at format time that differ from an existing data file's
/// are not silently dropped: the file's values are used and the log says so.
#[tokio::test]
async fn settings_fixed_at_format_time_say_the_file_wins() {
    let cluster = TestCluster::new();
    let mut server = StorageProc::start(&cluster, "store-1", "64M", &[]);
    assert!(server.stop().success());
    let config = cluster.path("later.toml");
    std::fs::write(&config, "slot_size = \"2M\"\nregion_size = \"128K\"\n").unwrap();
    let mut server = StorageProc::start(
        &cluster,
        "store-1",
        "64M",
        &["--config", config.to_str().unwrap()],
    );
    assert!(server.stop().success());
    let log = server.log();
    for line in [
        "slot_size: the data file was formatted with 1 MiB, which is used; the setting (2 MiB) applies to new data files only",
        "region_size: the data file was formatted with 64 KiB, which is used; the setting (128 KiB) applies to new data files only",
    ] {
        assert!(log.contains(line), "no {line:?} in\n{log}");
    }
    assert!(!log.contains("max_volumes:"), "{log}");
}

/// Any certificate holder can send malformed headers at will; the log gets
/// a handful of lines for them, not one each, and service goes on.
#[tokio::test]
async fn a_flood_of_malformed_requests_is_logged_a_few_times() {
    let (_cluster, mut server, client, _mgmt) = one_server().await;
    let conn = server.connect(&client).await;
    let started = std::time::Instant::now();
    for id in 0..200u64 {
        let mut garbage =
            Request::new(Opcode::Read, VolumeId(1), Epoch(EPOCH), 0, 4096, id).encode();
        garbage[0] = b'X';
        let (mut send, mut recv) = conn.open_stream().await.unwrap();
        send.write_all(&garbage).await.unwrap();
        send.finish().unwrap();
        let (reply, _) = read_reply(&mut recv).await.unwrap();
        assert_eq!((reply.status, reply.request_id), (Status::BadRequest, id));
    }
    let data = pattern(4, 4096);
    assert_eq!(write(&conn, 1, EPOCH, 0, &data).await.status, Status::Ok);
    assert!(server.stop().success());
    // At most 10 lines per 10 s window the flood spanned.
    let windows = started.elapsed().as_secs() / 10 + 1;
    let logged = server.log().matches("malformed request").count() as u64;
    assert!(
        (1..=10 * windows).contains(&logged),
        "{logged} lines for 200 malformed requests"
    );
}
