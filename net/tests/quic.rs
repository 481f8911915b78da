//! Real QUIC over loopback with certificates made per test.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tessera_net::proto::{
    AdminCommand, Epoch, MgmtReply, MgmtRequest, Opcode, Refusal, Reply, Request, Role, Status,
    VolumeId,
};
use tessera_net::quic::certs::ClusterCa;
use tessera_net::quic::{
    Alpn, Connector, Endpoint, PeerConnection, PeerIdentity, QuicError, TlsIdentity,
    TransportTuning, read_request, serve_mgmt_stream, write_reply,
};
use tokio::sync::{Barrier, mpsc};

const LOOPBACK: &str = "127.0.0.1:0";
const DAYS: u32 = 1;

fn identity(ca: &ClusterCa, role: Role, name: &str) -> TlsIdentity {
    let issued = ca.issue(role, name, DAYS).unwrap();
    TlsIdentity::from_pem(
        ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        Path::new(name),
    )
    .unwrap()
}

fn client(id: &TlsIdentity) -> Endpoint {
    Endpoint::bind(
        LOOPBACK.parse().unwrap(),
        id,
        &TransportTuning::default(),
        &[],
    )
    .unwrap()
}

/// A server that answers management requests through `serve_mgmt_stream`
/// and data requests by echoing the payload; each data request waits at
/// `barrier` so a test can prove how many were in flight at once.
struct TestServer {
    addr: SocketAddr,
    /// Identities of peers whose handshake completed, or the handshake error.
    seen: mpsc::UnboundedReceiver<Result<PeerIdentity, String>>,
}

fn start_server(ca: &ClusterCa, barrier: Option<Arc<Barrier>>) -> TestServer {
    let id = identity(ca, Role::Mgmt, "mgmt-1");
    let endpoint = Endpoint::bind(
        LOOPBACK.parse().unwrap(),
        &id,
        &TransportTuning::default(),
        &Alpn::ALL,
    )
    .unwrap();
    let addr = endpoint.local_addr().unwrap();
    let (tx, seen) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Some(handshake) = endpoint.accept().await {
            let tx = tx.clone();
            let barrier = barrier.clone();
            tokio::spawn(async move {
                match handshake.finish().await {
                    Ok(conn) => {
                        let _ = tx.send(Ok(conn.peer().clone()));
                        serve_connection(conn, barrier).await;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e.to_string()));
                    }
                }
            });
        }
    });
    TestServer { addr, seen }
}

async fn serve_connection(conn: PeerConnection, barrier: Option<Arc<Barrier>>) {
    while let Some((mut send, mut recv)) = conn.accept_stream().await {
        let peer = conn.peer().clone();
        let alpn = conn.alpn();
        let barrier = barrier.clone();
        tokio::spawn(async move {
            match alpn {
                Alpn::Mgmt => {
                    serve_mgmt_stream(&peer, send, recv, |request| async move {
                        match request {
                            MgmtRequest::Admin(_) => MgmtReply::Applied { epoch: Epoch(2) },
                            _ => MgmtReply::Pong { epoch: Epoch(1) },
                        }
                    })
                    .await
                    .unwrap();
                }
                Alpn::Data => {
                    let request = read_request(&mut recv).await.unwrap();
                    let mut payload = vec![0u8; request.payload_len()];
                    recv.read_exact(&mut payload).await.unwrap();
                    request.verify_payload(&payload).unwrap();
                    if let Some(barrier) = barrier {
                        barrier.wait().await;
                    }
                    let reply = Reply::new(Status::Ok, request.epoch, request.request_id, &payload);
                    write_reply(&mut send, &reply, &payload).await.unwrap();
                }
            }
        });
    }
}

#[tokio::test]
async fn cluster_client_is_served_and_identified() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let mut server = start_server(&ca, None);
    let id = identity(&ca, Role::Client, "app-1");
    let conn = client(&id)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap();
    assert_eq!(
        conn.peer(),
        &PeerIdentity {
            role: Role::Mgmt,
            name: "mgmt-1".into()
        }
    );
    assert_eq!(
        conn.mgmt(&MgmtRequest::Ping).await.unwrap(),
        MgmtReply::Pong { epoch: Epoch(1) }
    );
    let seen = server.seen.recv().await.unwrap().unwrap();
    assert_eq!(
        seen,
        PeerIdentity {
            role: Role::Client,
            name: "app-1".into()
        }
    );
}

#[tokio::test]
async fn foreign_ca_client_is_refused_at_handshake() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let foreign = ClusterCa::generate("other", DAYS).unwrap();
    let mut server = start_server(&ca, None);
    // Trusts the cluster CA but presents a certificate from another CA.
    let issued = foreign.issue(Role::Admin, "intruder", DAYS).unwrap();
    let id = TlsIdentity::from_pem(
        ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        Path::new("x"),
    )
    .unwrap();
    // With TLS 1.3 the client may finish its side before the server rejects
    // its certificate, so the refusal must show on the first request at the latest.
    let outcome = match client(&id)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
    {
        Ok(conn) => conn.mgmt(&MgmtRequest::Ping).await.map(|_| ()),
        Err(e) => Err(e),
    };
    let err = outcome.unwrap_err();
    assert!(
        matches!(
            err,
            QuicError::Connection(_) | QuicError::Read(_) | QuicError::Write(_)
        ),
        "{err}"
    );
    let reason = server.seen.recv().await.unwrap().unwrap_err();
    assert!(reason.contains("UnknownIssuer"), "{reason}");
}

#[tokio::test]
async fn server_from_foreign_ca_is_refused_by_client() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let foreign = ClusterCa::generate("other", DAYS).unwrap();
    let server = start_server(&foreign, None);
    let id = identity(&ca, Role::Client, "app-1");
    let err = client(&id)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap_err();
    assert!(matches!(err, QuicError::Connection(_)), "{err}");
}

#[tokio::test]
async fn roles_are_enforced_on_first_request() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let server = start_server(&ca, None);
    let create = MgmtRequest::Admin(AdminCommand::CreateVolume {
        name: "db".into(),
        size: 1 << 30,
        page_size: 1 << 20,
        replicas: 1,
        servers: None,
    });
    let register = MgmtRequest::Register {
        data_addr: server.addr,
        capacity: 1 << 30,
        incarnation: 1,
        boot: 1,
    };

    let app = identity(&ca, Role::Client, "app-1");
    let conn = client(&app)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap();
    assert_eq!(
        conn.mgmt(&create).await.unwrap(),
        MgmtReply::Refused(Refusal::Forbidden {
            role: Role::Client,
            operation: "admin".into()
        })
    );
    assert_eq!(
        conn.mgmt(&register).await.unwrap(),
        MgmtReply::Refused(Refusal::Forbidden {
            role: Role::Client,
            operation: "register".into()
        })
    );
    // The connection keeps serving after a refusal.
    assert!(matches!(
        conn.mgmt(&MgmtRequest::Ping).await.unwrap(),
        MgmtReply::Pong { .. }
    ));

    let admin = identity(&ca, Role::Admin, "ops");
    let conn = client(&admin)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap();
    assert_eq!(
        conn.mgmt(&create).await.unwrap(),
        MgmtReply::Applied { epoch: Epoch(2) }
    );

    let storage = identity(&ca, Role::Storage, "store-1");
    let conn = client(&storage)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap();
    assert!(matches!(
        conn.mgmt(&register).await.unwrap(),
        MgmtReply::Pong { .. }
    ));
    assert!(matches!(
        conn.mgmt(&create).await.unwrap(),
        MgmtReply::Refused(Refusal::Forbidden {
            role: Role::Storage,
            ..
        })
    ));
}

#[tokio::test]
async fn malformed_mgmt_frame_gets_a_typed_refusal() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let server = start_server(&ca, None);
    let admin = identity(&ca, Role::Admin, "ops");
    let conn = client(&admin)
        .connect(server.addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
        .await
        .unwrap();
    let (mut send, mut recv) = conn.open_stream().await.unwrap();
    send.write_all(&[3, 0, 0, 0, 1, 0, 250]).await.unwrap();
    send.finish().unwrap();
    let reply: MgmtReply = tessera_net::quic::read_frame(&mut recv).await.unwrap();
    assert!(
        matches!(reply, MgmtReply::Refused(Refusal::BadRequest { .. })),
        "{reply:?}"
    );
}

#[tokio::test]
async fn server_of_unexpected_role_is_refused() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let server = start_server(&ca, None);
    let app = identity(&ca, Role::Client, "app-1");
    let err = client(&app)
        .connect(server.addr, "mgmt-1", Alpn::Data, Role::Storage)
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            QuicError::WrongPeerRole {
                found: Role::Mgmt,
                expected: Role::Storage,
                ..
            }
        ),
        "{err}"
    );
}

#[tokio::test]
async fn many_requests_in_flight_on_one_reused_connection() {
    const IN_FLIGHT: usize = 32;
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    // The server holds every reply until IN_FLIGHT requests have arrived: this
    // completes only if they are all in flight at once on one connection.
    let server = start_server(&ca, Some(Arc::new(Barrier::new(IN_FLIGHT))));
    let app = identity(&ca, Role::Client, "app-1");
    let connector = Connector::new(client(&app), Alpn::Data, Role::Mgmt);
    let first = connector.get(server.addr, "mgmt-1").await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..IN_FLIGHT {
        let connector = connector.clone();
        let addr = server.addr;
        tasks.push(tokio::spawn(async move {
            let conn = connector.get(addr, "mgmt-1").await.unwrap();
            let payload = vec![u8::try_from(i).unwrap(); 4096];
            let offset = u64::try_from(i).unwrap() * 4096;
            let request =
                Request::write(VolumeId(1), Epoch(3), offset, &payload, 1000 + i as u64).unwrap();
            let (reply, data) = conn.data(&request, &payload).await.unwrap();
            (conn.id(), reply, data, payload)
        }));
    }
    let all = tokio::time::timeout(Duration::from_secs(30), async {
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.unwrap());
        }
        out
    })
    .await
    .expect("requests were not all in flight at once");
    for (i, (conn_id, reply, data, payload)) in all.into_iter().enumerate() {
        assert_eq!(conn_id, first.id(), "connection reused");
        assert_eq!(reply.status, Status::Ok);
        assert_eq!(reply.request_id, 1000 + i as u64);
        assert_eq!(data, payload);
    }
    // A PING through the same connection.
    let ping = Request::new(Opcode::Ping, VolumeId(1), Epoch(3), 0, 0, 7);
    let conn = connector.get(server.addr, "mgmt-1").await.unwrap();
    assert_eq!(conn.id(), first.id());
    // The barrier is sized for 32: send 32 pings to pass it.
    let pings: Vec<_> = (0..IN_FLIGHT)
        .map(|_| {
            let conn = conn.clone();
            tokio::spawn(async move { conn.data(&ping, &[]).await.unwrap() })
        })
        .collect();
    for p in pings {
        let (reply, data) = p.await.unwrap();
        assert_eq!(
            (reply.status, reply.request_id, data.len()),
            (Status::Ok, 7, 0)
        );
    }
}

#[tokio::test]
async fn a_reply_lands_in_the_callers_buffer_only_when_it_fits_exactly() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let server = start_server(&ca, None);
    let app = identity(&ca, Role::Client, "app-1");
    let conn = client(&app)
        .connect(server.addr, "mgmt-1", Alpn::Data, Role::Mgmt)
        .await
        .unwrap();
    // The test server echoes a write's payload back as the reply payload.
    let payload = vec![0x5a; 8192];
    let request = Request::write(VolumeId(1), Epoch(3), 0, &payload, 7).unwrap();
    let mut out = vec![0u8; 8192];
    let (reply, rest) = conn.data_into(&request, &payload, &mut out).await.unwrap();
    assert_eq!(reply.status, Status::Ok);
    assert!(rest.is_empty(), "payload went to the caller's buffer");
    assert_eq!(out, payload);
    // A reply of another length is handed back whole and `out` is left alone.
    let mut short = vec![0u8; 4096];
    let (reply, rest) = conn
        .data_into(&request, &payload, &mut short)
        .await
        .unwrap();
    assert_eq!(reply.length, 8192);
    assert_eq!(rest, payload);
    assert!(short.iter().all(|b| *b == 0));
}

#[test]
fn certificates_are_saved_with_private_keys_0600_and_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    ca.save(dir.path()).unwrap();
    assert!(matches!(
        ca.save(dir.path()),
        Err(QuicError::AlreadyExists { .. })
    ));
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir.path().join("ca.key")), 0o600);

    let loaded = ClusterCa::load(dir.path()).unwrap();
    let issued = loaded.issue(Role::Storage, "store-7", DAYS).unwrap();
    let (_, key) = issued.save(dir.path(), "store-7").unwrap();
    assert_eq!(mode(&key), 0o600);
    assert!(matches!(
        issued.save(dir.path(), "store-7"),
        Err(QuicError::AlreadyExists { .. })
    ));
    let id = TlsIdentity::load_dir(dir.path(), "store-7").unwrap();
    assert_eq!(
        id.me(),
        &PeerIdentity {
            role: Role::Storage,
            name: "store-7".into()
        }
    );
}

#[test]
fn invalid_names_are_refused() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    for name in [
        "",
        "UPPER",
        "has space",
        "-lead",
        "trail-",
        "a/b",
        &"x".repeat(64),
    ] {
        assert!(
            matches!(
                ca.issue(Role::Client, name, DAYS),
                Err(QuicError::InvalidName { .. })
            ),
            "{name:?}"
        );
    }
}

/// A server keeps at most `max_connections` open: a peer knocking beyond
/// that is refused before its handshake, and a place that frees up is
/// taken again.
#[tokio::test]
async fn connections_over_the_maximum_are_refused() {
    let ca = ClusterCa::generate("test", DAYS).unwrap();
    let tuning = TransportTuning {
        max_connections: 2,
        ..TransportTuning::default()
    };
    let server_id = identity(&ca, Role::Mgmt, "mgmt-1");
    let endpoint =
        Endpoint::bind(LOOPBACK.parse().unwrap(), &server_id, &tuning, &Alpn::ALL).unwrap();
    let addr = endpoint.local_addr().unwrap();
    tokio::spawn(async move {
        while let Some(handshake) = endpoint.accept().await {
            tokio::spawn(async move {
                if let Ok(conn) = handshake.finish().await {
                    serve_connection(conn, None).await;
                }
            });
        }
    });
    let id = identity(&ca, Role::Admin, "ops");
    let dial = || async {
        let conn = client(&id)
            .connect(addr, "mgmt-1", Alpn::Mgmt, Role::Mgmt)
            .await?;
        conn.mgmt(&MgmtRequest::Ping).await?;
        Ok::<_, QuicError>(conn)
    };
    let first = dial().await.unwrap();
    let _second = dial().await.unwrap();
    let refused = dial().await.unwrap_err();
    assert!(matches!(refused, QuicError::Connection(_)), "{refused}");
    first.close();
    // The server notices the close, then has room again.
    let mut again = dial().await;
    for _ in 0..50 {
        if again.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        again = dial().await;
    }
    again.unwrap();
}
