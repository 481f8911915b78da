//! The NBD frontend through real clients from Debian: nbdinfo, nbdcopy,
//! fio's nbd engine and qemu-img (installed by .ci/run). Where a client is
//! missing the test says so and skips.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Child, Command};

use common::*;
use tessera_net::proto::{MgmtReply, Role};

const VOLUME_MIB: u64 = 96;

struct NbdCluster {
    cluster: TestCluster,
    _mgmt: MgmtProc,
    _servers: Vec<StorageProc>,
    nbd: Child,
    uri: String,
}

impl Drop for NbdCluster {
    fn drop(&mut self) {
        let _ = self.nbd.kill();
        let _ = self.nbd.wait();
    }
}

/// Whether `tool` is installed; without it the test skips, except under
/// CI=true, where .ci/run has installed it and its absence is a failure.
fn have(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        let hint = "apt-get install libnbd-bin fio qemu-utils; .ci/run does";
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{tool} is not installed under CI=true ({hint})"
        );
        println!("SKIPPED: {tool} is not installed ({hint})");
    }
    found
}

async fn nbd_cluster() -> NbdCluster {
    nbd_cluster_on("unix:{dir}/nbd.sock", &[]).await
}

/// A three-server cluster with volume `db` (one replica) exported by
/// `tessera nbd --listen LISTEN EXTRA...`; `{dir}` in LISTEN is the
/// cluster's directory.
async fn nbd_cluster_on(listen: &str, extra: &[&str]) -> NbdCluster {
    let (cluster, mgmt, servers) = three_servers(5_000, "128M").await;
    let addr = mgmt.addr.to_string();
    let create = create("db", VOLUME_MIB, 1, None);
    assert!(matches!(
        admin(&mgmt, &cluster, create).await,
        MgmtReply::Applied { .. }
    ));
    cluster.issue(Role::Client, "app");
    let listen = listen.replace("{dir}", &cluster.dir.path().display().to_string());
    let mut args: Vec<std::ffi::OsString> = vec![
        "nbd".into(),
        "--volume".into(),
        "db".into(),
        "--listen".into(),
        listen.into(),
        "--mgmt".into(),
        addr.into(),
        "--cluster-dir".into(),
        cluster.dir.path().into(),
        "--name".into(),
        "app".into(),
    ];
    args.extend(extra.iter().map(Into::into));
    let (nbd, uri) =
        spawn_server(&args, &cluster.path("nbd.log")).unwrap_or_else(|e| panic!("nbd {e}"));
    NbdCluster {
        cluster,
        _mgmt: mgmt,
        _servers: servers,
        nbd,
        uri,
    }
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn crc_of(path: &Path, len: usize) -> u32 {
    crc32c::crc32c(&std::fs::read(path).unwrap()[..len])
}

#[tokio::test]
async fn nbdinfo_shows_the_size() {
    if !have("nbdinfo") {
        return;
    }
    let c = nbd_cluster().await;
    let size = run(Command::new("nbdinfo").args(["--size", &c.uri]));
    assert_eq!(size.trim(), (VOLUME_MIB * MIB).to_string());
    let info = run(Command::new("nbdinfo").arg(&c.uri));
    assert!(info.contains("block_size_minimum: 4096"), "{info}");
    assert!(info.contains("can_fua: true"), "{info}");
}

#[tokio::test]
async fn nbdcopy_round_trips_64_mib() {
    if !have("nbdcopy") {
        return;
    }
    let c = nbd_cluster().await;
    let len = 64 << 20;
    let source = c.cluster.path("source.bin");
    std::fs::write(&source, pattern(42, len)).unwrap();
    run(Command::new("nbdcopy").arg(&source).arg(&c.uri));
    let back = c.cluster.path("back.bin");
    run(Command::new("nbdcopy").arg(&c.uri).arg(&back));
    assert_eq!(crc_of(&back, len), crc_of(&source, len));
    // The rest of the volume was never written: zeroes.
    let tail = &std::fs::read(&back).unwrap()[len..];
    assert_eq!(tail.len() as u64, (VOLUME_MIB << 20) - len as u64);
    assert!(tail.iter().all(|b| *b == 0));
}

#[tokio::test]
async fn fio_random_writes_verify_crc32c() {
    if !have("fio") {
        return;
    }
    let c = nbd_cluster().await;
    let json = c.cluster.path("fio.json");
    // fio saves a verify-state file in its working directory: the test's, not the repository.
    run(Command::new("fio").current_dir(c.cluster.dir.path()).args([
        "--name=verify",
        "--ioengine=nbd",
        &format!("--uri={}", c.uri),
        "--rw=randwrite",
        "--bs=4k",
        "--size=32M",
        "--iodepth=16",
        "--verify=crc32c",
        "--do_verify=1",
        "--randrepeat=1",
        "--output-format=json",
        &format!("--output={}", json.display()),
    ]));
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let job = &report["jobs"][0];
    assert_eq!(job["error"], 0, "{job}");
    assert_eq!(job["write"]["io_bytes"], 32 << 20);
    assert_eq!(
        job["read"]["io_bytes"],
        32 << 20,
        "every block was read back and verified"
    );
}

#[tokio::test]
async fn qemu_img_convert_into_the_export_and_back() {
    if !have("qemu-img") {
        return;
    }
    let c = nbd_cluster().await;
    let len = 16 << 20;
    let image = c.cluster.path("disk.raw");
    std::fs::write(&image, pattern(7, len)).unwrap();
    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw"])
        .arg(&image)
        .arg(&c.uri));
    let back = c.cluster.path("back.raw");
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw"])
        .arg(&c.uri)
        .arg(&back));
    assert_eq!(crc_of(&back, len), crc_of(&image, len));
    let info = run(Command::new("qemu-img")
        .args(["info", "--output=json"])
        .arg(&c.uri));
    assert!(
        info.contains(&format!("\"virtual-size\": {}", VOLUME_MIB << 20)),
        "{info}"
    );
}

/// The protocol by hand: fixed-newstyle handshake, then refusals that keep
/// the connection usable, and an unaligned write served by read-modify-write.
#[tokio::test]
async fn raw_protocol_refusals_and_unaligned_io() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = nbd_cluster().await;
    let socket = c.cluster.path("nbd.sock");
    let mut s = tokio::net::UnixStream::connect(&socket).await.unwrap();
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello[..8], b"NBDMAGIC");
    assert_eq!(&hello[8..16], b"IHAVEOPT");
    s.write_all(&3u32.to_be_bytes()).await.unwrap(); // fixed newstyle, no zeroes
    // NBD_OPT_EXPORT_NAME "db": size and flags follow, no padding.
    s.write_all(b"IHAVEOPT").await.unwrap();
    s.write_all(&1u32.to_be_bytes()).await.unwrap();
    s.write_all(&2u32.to_be_bytes()).await.unwrap();
    s.write_all(b"db").await.unwrap();
    let size = s.read_u64().await.unwrap();
    let _flags = s.read_u16().await.unwrap();
    assert_eq!(size, VOLUME_MIB * MIB);

    async fn request(
        s: &mut tokio::net::UnixStream,
        kind: u16,
        cookie: u64,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> (u32, Vec<u8>) {
        let mut h = Vec::new();
        h.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        h.extend_from_slice(&0u16.to_be_bytes());
        h.extend_from_slice(&kind.to_be_bytes());
        h.extend_from_slice(&cookie.to_be_bytes());
        h.extend_from_slice(&offset.to_be_bytes());
        h.extend_from_slice(&len.to_be_bytes());
        h.extend_from_slice(payload);
        s.write_all(&h).await.unwrap();
        let mut reply = [0u8; 16];
        s.read_exact(&mut reply).await.unwrap();
        assert_eq!(&reply[..4], &0x6744_6698u32.to_be_bytes());
        assert_eq!(u64::from_be_bytes(reply[8..].try_into().unwrap()), cookie);
        let error = u32::from_be_bytes(reply[4..8].try_into().unwrap());
        let mut data = vec![
            0u8;
            if kind == 0 && error == 0 {
                len as usize
            } else {
                0
            }
        ];
        s.read_exact(&mut data).await.unwrap();
        (error, data)
    }
    assert_eq!(
        request(&mut s, 99, 1, 0, 0, &[]).await.0,
        95,
        "unknown command: ENOTSUP"
    );
    assert_eq!(
        request(&mut s, 0, 2, 0, u32::MAX, &[]).await.0,
        22,
        "oversized read: EINVAL"
    );
    assert_eq!(
        request(&mut s, 0, 3, VOLUME_MIB * MIB, 4096, &[]).await.0,
        22,
        "past the end: EINVAL"
    );
    // 700 bytes at offset 1000: read-modify-write of one block.
    let data = pattern(5, 700);
    assert_eq!(request(&mut s, 1, 4, 1000, 700, &data).await.0, 0);
    let (error, back) = request(&mut s, 0, 5, 0, 4096, &[]).await;
    assert_eq!(error, 0);
    assert!(back[..1000].iter().all(|b| *b == 0));
    assert_eq!(&back[1000..1700], &data[..]);
    assert!(back[1700..].iter().all(|b| *b == 0));
    // NBD_CMD_DISC: the server closes after in-flight requests.
    let mut disc = Vec::new();
    disc.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    disc.extend_from_slice(&[0, 0, 0, 2]);
    disc.extend_from_slice(&[0u8; 20]);
    s.write_all(&disc).await.unwrap();
    let mut rest = Vec::new();
    assert_eq!(s.read_to_end(&mut rest).await.unwrap(), 0);
}

/// The host:port of an `nbd://HOST:PORT/EXPORT` URI.
fn tcp_addr(uri: &str) -> String {
    let rest = uri.strip_prefix("nbd://").unwrap();
    rest.split('/').next().unwrap().to_string()
}

/// Read the server's greeting and answer it with `client_flags`.
fn greet(stream: &mut std::net::TcpStream, client_flags: u32) {
    use std::io::{Read, Write};
    let mut greeting = [0u8; 18];
    stream.read_exact(&mut greeting).unwrap();
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    stream.write_all(&client_flags.to_be_bytes()).unwrap();
}

/// Whether the server closes `stream` within `secs` (reads hit the end).
fn closed_within(stream: &mut std::net::TcpStream, secs: u64) -> bool {
    use std::io::Read;
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(secs)))
        .unwrap();
    let mut buf = [0u8; 64];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

#[tokio::test]
async fn unknown_client_handshake_flags_close_the_connection() {
    let c = nbd_cluster_on("tcp:127.0.0.1:0", &[]).await;
    let addr = tcp_addr(&c.uri);
    let mut stream = std::net::TcpStream::connect(&addr).unwrap();
    // FIXED_NEWSTYLE, NO_ZEROES and a bit the protocol does not define.
    greet(&mut stream, 1 | 2 | 1 << 5);
    assert!(closed_within(&mut stream, 5), "the connection stayed open");
    // The frontend goes on serving others.
    let mut ok = std::net::TcpStream::connect(&addr).unwrap();
    greet(&mut ok, 1 | 2);
    assert!(!closed_within(&mut ok, 1), "a valid handshake was closed");
}

/// NBD has no authentication, so anyone who can connect may try to use up
/// the frontend's file descriptors with idle connections. Under a limit of
/// 128 descriptors, 200 idle connections neither end the listener (a failed
/// accept backs off) nor keep a real client out for long (connections over
/// --max-connections are closed at once, and idle ones after the
/// handshake timeout).
#[tokio::test]
async fn idle_connections_leave_the_frontend_serving() {
    if !have("nbdinfo") || !have("prlimit") {
        return;
    }
    // Under the descriptor limit, the cap turns extras away; over it, accept fails.
    for (max_connections, expect) in [
        ("64", "the frontend serves its maximum"),
        ("1000", "NBD accept failed"),
    ] {
        let mut c = nbd_cluster_on(
            "tcp:127.0.0.1:0",
            &[
                "--max-connections",
                max_connections,
                "--handshake-timeout-ms",
                "1000",
            ],
        )
        .await;
        let limited = Command::new("prlimit")
            .args(["--pid", &c.nbd.id().to_string(), "--nofile=128:128"])
            .status()
            .unwrap();
        assert!(limited.success());
        let addr = tcp_addr(&c.uri);
        let started = std::time::Instant::now();
        let mut idle: Vec<std::net::TcpStream> = (0..200)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        // Held connections are closed once the handshake timeout passes.
        assert!(
            closed_within(&mut idle[0], 10),
            "an idle connection stayed open"
        );
        std::thread::sleep(std::time::Duration::from_millis(1500));
        let size = run(Command::new("timeout").args(["60", "nbdinfo", "--size", &c.uri]));
        assert_eq!(size.trim(), (VOLUME_MIB * MIB).to_string());
        assert!(c.nbd.try_wait().unwrap().is_none(), "the frontend exited");
        let log = std::fs::read_to_string(c.cluster.path("nbd.log")).unwrap();
        let warned = log.lines().filter(|l| l.contains(expect)).count() as u64;
        // Rate-limited: at most 5 lines per 10 s window, not one per connection.
        let windows = started.elapsed().as_secs() / 10 + 1;
        assert!(
            (1..=5 * windows).contains(&warned),
            "{warned} lines of {expect:?}:\n{log}"
        );
        drop(idle);
    }
}

/// The resident memory of process `pid`, in bytes.
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    let kib: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kib << 10
}

/// Connect to the export `db` over the old-style NBD_OPT_EXPORT_NAME.
fn open_export(addr: &str) -> std::net::TcpStream {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr).unwrap();
    greet(&mut stream, 1 | 2);
    let mut option = Vec::new();
    option.extend_from_slice(b"IHAVEOPT");
    option.extend_from_slice(&1u32.to_be_bytes()); // NBD_OPT_EXPORT_NAME
    option.extend_from_slice(&2u32.to_be_bytes());
    option.extend_from_slice(b"db");
    stream.write_all(&option).unwrap();
    let mut export = [0u8; 10];
    stream.read_exact(&mut export).unwrap();
    assert_eq!(
        u64::from_be_bytes(export[..8].try_into().unwrap()),
        VOLUME_MIB * MIB
    );
    stream
}

/// Send an NBD_CMD_READ without waiting for its reply.
fn send_read(stream: &mut std::net::TcpStream, cookie: u64, offset: u64, len: u32) {
    use std::io::Write;
    let mut request = Vec::with_capacity(28);
    request.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes());
    request.extend_from_slice(&0u16.to_be_bytes()); // NBD_CMD_READ
    request.extend_from_slice(&cookie.to_be_bytes());
    request.extend_from_slice(&offset.to_be_bytes());
    request.extend_from_slice(&len.to_be_bytes());
    stream.write_all(&request).unwrap();
}

/// Reads of 32 MiB that a client sends and never reads the replies of.
const STALL_READ: u32 = 32 << 20;

fn stall(stream: &mut std::net::TcpStream) {
    for cookie in 0..48u64 {
        send_read(
            stream,
            cookie,
            (cookie % 3) * u64::from(STALL_READ),
            STALL_READ,
        );
    }
}

/// A client that sends 48 reads of 32 MiB and never reads a reply holds
/// at most the connection's budget of the frontend's memory
/// (`CONNECTION_BUDGET`, 64 MiB, plus buffers); before the bound it grew
/// by 1.5 GiB.
#[tokio::test]
async fn unread_replies_hold_bounded_memory() {
    use std::io::Read;
    let c = nbd_cluster_on("tcp:127.0.0.1:0", &[]).await;
    let mut stream = open_export(&tcp_addr(&c.uri));
    let pid = c.nbd.id();
    let before = rss(pid);
    stall(&mut stream);
    // Let the frontend take all it will, until its memory stops growing.
    let mut peak = 0;
    let mut still = 0;
    for _ in 0..75 {
        std::thread::sleep(std::time::Duration::from_millis(200));
        let now = rss(pid);
        still = if now > peak { 0 } else { still + 1 };
        peak = peak.max(now);
        if still == 15 {
            break;
        }
    }
    let grown = peak.saturating_sub(before);
    const BOUND: u64 = 64 * MIB + 64 * MIB;
    assert!(
        grown < BOUND,
        "resident memory grew by {} MiB (bound {} MiB)",
        grown >> 20,
        BOUND >> 20
    );
    // The replies are all there once the client reads them.
    let mut header = [0u8; 16];
    let mut data = vec![0u8; STALL_READ as usize];
    for _ in 0..48 {
        stream.read_exact(&mut header).unwrap();
        assert_eq!(&header[4..8], &[0; 4], "a read failed");
        stream.read_exact(&mut data).unwrap();
    }
}

/// Five clients that stop reading hold more than the frontend's whole
/// memory budget between them; they are cut off after --reply-timeout-ms,
/// and a client that reads is served meanwhile.
#[tokio::test]
async fn clients_that_stop_reading_are_cut_off_and_starve_no_one() {
    use std::io::Read;
    let c = nbd_cluster_on("tcp:127.0.0.1:0", &["--reply-timeout-ms", "2000"]).await;
    let addr = tcp_addr(&c.uri);
    let mut stalled: Vec<_> = (0..5).map(|_| open_export(&addr)).collect();
    for stream in &mut stalled {
        stall(stream);
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    let mut reader = open_export(&addr);
    reader
        .set_read_timeout(Some(std::time::Duration::from_secs(20)))
        .unwrap();
    send_read(&mut reader, 7, 0, 4096);
    let mut reply = [0u8; 16];
    reader.read_exact(&mut reply).unwrap();
    assert_eq!(&reply[4..8], &[0; 4], "the read failed");
    assert_eq!(u64::from_be_bytes(reply[8..16].try_into().unwrap()), 7);
    let mut data = vec![0u8; 4096];
    reader.read_exact(&mut data).unwrap();
    drop(stalled);
    let log = std::fs::read_to_string(c.cluster.path("nbd.log")).unwrap();
    assert!(log.contains("the client read no reply for 2s"), "{log}");
}
