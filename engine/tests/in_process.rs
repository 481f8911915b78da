//! A whole storage server in this process (`tessera_engine::run`), driven
//! over real QUIC from another thread: a map push, a write, a read back,
//! and a clean shutdown that flushes.
#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::path::Path;

use tessera_engine::config::StorageConfig;
use tessera_net::proto::{
    Epoch, MgmtReply, MgmtRequest, MirrorState, Partition, Replica, Request, Role, Status,
    VolumeId, VolumeMap,
};
use tessera_net::quic::certs::ClusterCa;
use tessera_net::quic::{Alpn, Endpoint, TlsIdentity, TransportTuning};
use tessera_net::units::ByteSize;

fn identity(ca: &ClusterCa, role: Role, name: &str) -> TlsIdentity {
    let issued = ca.issue(role, name, 1).unwrap();
    TlsIdentity::from_pem(
        ca.cert_pem(),
        &issued.cert_pem,
        &issued.key_pem,
        Path::new(name),
    )
    .unwrap()
}

/// A UDP port nobody holds right now.
fn free_port() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn a_storage_server_runs_in_process_and_stops_cleanly() {
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let ca = ClusterCa::generate("test", 1).unwrap();
    let addr = free_port();
    let config = StorageConfig {
        data: dir.path().join("store-1.img"),
        size: ByteSize(64 << 20),
        listen: addr,
        ..StorageConfig::default()
    };
    let server_identity = identity(&ca, Role::Storage, "store-1");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::spawn(move || {
        tokio_uring::start(async {
            tessera_engine::run(&config, &server_identity, async {
                let _ = stopped.await;
            })
            .await
        })
    });

    let mgmt = identity(&ca, Role::Mgmt, "mgmt");
    let client = identity(&ca, Role::Client, "app");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let tuning = TransportTuning::default();
        let map = VolumeMap {
            id: VolumeId(1),
            name: "v".into(),
            epoch: Epoch(3),
            size: 8 << 20,
            page_size: 1 << 20,
            partitions: vec![Partition {
                first_page: 0,
                end_page: 8,
                replicas: vec![Replica {
                    server: "store-1".into(),
                    addr,
                    state: MirrorState::InSync,
                }],
            }],
        };
        let mgmt = Endpoint::client(addr, &mgmt, &tuning).unwrap();
        // The server binds, formats and starts serving: retry until it answers.
        let mut pushed = None;
        for _ in 0..100 {
            if let Ok(conn) = mgmt
                .connect(addr, "store-1", Alpn::Mgmt, Role::Storage)
                .await
                && let Ok(reply) = conn.mgmt(&MgmtRequest::PushMap { map: map.clone() }).await
            {
                pushed = Some(reply);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        assert_eq!(pushed, Some(MgmtReply::Applied { epoch: Epoch(3) }));

        let client = Endpoint::client(addr, &client, &tuning).unwrap();
        let conn = client
            .connect(addr, "store-1", Alpn::Data, Role::Storage)
            .await
            .unwrap();
        let data = vec![0x5a; 8192];
        let write = Request::write(VolumeId(1), Epoch(3), 4096, &data, 1).unwrap();
        assert_eq!(conn.data(&write, &data).await.unwrap().0.status, Status::Ok);
        let read = Request::new(
            tessera_net::proto::Opcode::Read,
            VolumeId(1),
            Epoch(3),
            4096,
            8192,
            2,
        );
        let (reply, back) = conn.data(&read, &[]).await.unwrap();
        assert_eq!((reply.status, back), (Status::Ok, data));
    });
    stop.send(()).unwrap();
    server.join().unwrap().unwrap();
}
