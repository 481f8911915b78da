//! Serving a volume over NBD: handshake (option haggling), then the
//! transmission phase with many requests in flight. Requests that are not
//! 4 KiB-aligned (from clients that ignore the advertised block size) are
//! served by read-modify-write.

use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use tessera_net::log_limit::LogLimit;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use super::proto::*;
use crate::{DriverError, Volume};

/// Requests one connection may have in flight; more wait to be read.
const MAX_IN_FLIGHT: usize = 128;
const BLOCK: u64 = 4096;
/// Socket buffering each way: a client keeping 32 requests in flight sends
/// their headers back to back, and replies queued together leave in one
/// write, instead of a syscall per header and two per reply.
const SOCKET_BUFFER: usize = 256 << 10;

/// What is exported: one volume, under its name (the empty name works too).
#[derive(Debug)]
pub struct Export {
    pub name: String,
    pub volume: Volume,
    /// Unaligned writes read, merge and write whole blocks: they hold this
    /// exclusively, aligned writes hold it shared, so that no merge can
    /// overwrite a neighbour's acknowledged bytes. Shared by every connection.
    merge: tokio::sync::RwLock<()>,
    /// Payload bytes in memory across all connections, in blocks: taken
    /// before a WRITE's payload is read or a READ's buffer allocated.
    budget: Arc<Semaphore>,
}

/// Payload memory all NBD requests together may hold.
const IO_BUDGET: usize = 256 << 20;
/// Payload memory one connection's requests and queued replies may hold:
/// two requests of the largest size with their unaligned edges, a quarter
/// of [`IO_BUDGET`], so that a few clients that stop reading cannot take
/// all of it before [`Limits::reply_timeout`] cuts them off.
pub const CONNECTION_BUDGET: usize = 2 * (MAX_REQUEST_LEN as usize + 2 * BLOCK as usize);
const _: () = assert!(CONNECTION_BUDGET <= IO_BUDGET / 4 + 4 * BLOCK as usize);

impl Export {
    pub fn new(name: String, volume: Volume) -> Self {
        Export {
            name,
            volume,
            merge: tokio::sync::RwLock::new(()),
            budget: Arc::new(Semaphore::new(IO_BUDGET / BLOCK as usize)),
        }
    }
}

/// Why a connection ended other than by a clean disconnect.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(#[from] NbdError),
    #[error("no export chosen within {after:?}")]
    HandshakeTimeout { after: Duration },
}

fn transmission_flags() -> u16 {
    TX_HAS_FLAGS
        | TX_SEND_FLUSH
        | TX_SEND_FUA
        | TX_SEND_TRIM
        | TX_SEND_WRITE_ZEROES
        | TX_CAN_MULTI_CONN
}

/// How much of the frontend one client, or a crowd of them, may hold.
/// NBD has no authentication: anyone who can connect is a client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// The longest a client may take from connecting to choosing an export.
    pub handshake_timeout: Duration,
    /// Connections served at once; more are closed as soon as they are accepted.
    pub max_connections: usize,
    /// The longest a reply may wait for a client that has stopped reading;
    /// then the connection is closed and its memory freed.
    pub reply_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(10),
            max_connections: 256,
            reply_timeout: Duration::from_secs(30),
        }
    }
}

/// Serve one client connection until it disconnects.
pub async fn serve<S>(stream: S, export: Arc<Export>, limits: Limits) -> Result<(), ServeError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (reader, writer) = tokio::io::split(stream);
    let mut reader = BufReader::with_capacity(SOCKET_BUFFER, reader);
    let mut writer = BufWriter::with_capacity(SOCKET_BUFFER, writer);
    let chosen = tokio::time::timeout(
        limits.handshake_timeout,
        handshake(&mut reader, &mut writer, &export),
    )
    .await
    .map_err(|_| ServeError::HandshakeTimeout {
        after: limits.handshake_timeout,
    })?;
    if !chosen? {
        return Ok(());
    }
    transmission(reader, writer, export, limits.reply_timeout).await
}

/// Option haggling; `Ok(true)` when the client moves on to transmission.
async fn handshake<R, W>(
    reader: &mut R,
    writer: &mut W,
    export: &Export,
) -> Result<bool, ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    writer.write_all(&NBD_MAGIC.to_be_bytes()).await?;
    writer.write_all(&IHAVEOPT.to_be_bytes()).await?;
    writer
        .write_all(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes())
        .await?;
    writer.flush().await?;
    let no_zeroes = parse_client_flags(reader.read_u32().await?)?;
    loop {
        let mut header = [0u8; 16];
        reader.read_exact(&mut header).await?;
        let header = parse_option_header(&header)?;
        let mut data = vec![0u8; header.length as usize];
        reader.read_exact(&mut data).await?;
        let size = export.volume.size();
        match header.option {
            OPT_EXPORT_NAME => {
                // No error reply is possible here: an unknown name just closes.
                let name = String::from_utf8_lossy(&data);
                if !name.is_empty() && name != export.name {
                    if let Some(suppressed) = CLIENT_FAULT.allow() {
                        warn!(%name, suppressed, "unknown export");
                    }
                    return Ok(false);
                }
                writer.write_all(&size.to_be_bytes()).await?;
                writer
                    .write_all(&transmission_flags().to_be_bytes())
                    .await?;
                if !no_zeroes {
                    writer.write_all(&[0u8; 124]).await?;
                }
                writer.flush().await?;
                return Ok(true);
            }
            OPT_ABORT => {
                writer
                    .write_all(&option_reply(header.option, REP_ACK, &[]))
                    .await?;
                writer.flush().await?;
                return Ok(false);
            }
            OPT_LIST if !data.is_empty() => {
                writer
                    .write_all(&option_reply(
                        OPT_LIST,
                        REP_ERR_INVALID,
                        b"NBD_OPT_LIST takes no data",
                    ))
                    .await?;
            }
            OPT_LIST => {
                let mut entry = (export.name.len() as u32).to_be_bytes().to_vec();
                entry.extend_from_slice(export.name.as_bytes());
                writer
                    .write_all(&option_reply(OPT_LIST, REP_SERVER, &entry))
                    .await?;
                writer
                    .write_all(&option_reply(OPT_LIST, REP_ACK, &[]))
                    .await?;
            }
            OPT_INFO | OPT_GO => {
                let request = match parse_info_request(&data) {
                    Ok(r) => r,
                    Err(e) => {
                        let msg = e.to_string();
                        writer
                            .write_all(&option_reply(
                                header.option,
                                REP_ERR_INVALID,
                                msg.as_bytes(),
                            ))
                            .await?;
                        writer.flush().await?;
                        continue;
                    }
                };
                if !request.name.is_empty() && request.name != export.name {
                    let msg = format!("no export named {:?}", request.name);
                    writer
                        .write_all(&option_reply(
                            header.option,
                            REP_ERR_UNKNOWN,
                            msg.as_bytes(),
                        ))
                        .await?;
                    writer.flush().await?;
                    continue;
                }
                let info = info_export(size, transmission_flags());
                writer
                    .write_all(&option_reply(header.option, REP_INFO, &info))
                    .await?;
                if request.infos.contains(&INFO_BLOCK_SIZE) {
                    let sizes = info_block_size(BLOCK as u32, BLOCK as u32, MAX_REQUEST_LEN);
                    writer
                        .write_all(&option_reply(header.option, REP_INFO, &sizes))
                        .await?;
                }
                writer
                    .write_all(&option_reply(header.option, REP_ACK, &[]))
                    .await?;
                writer.flush().await?;
                if header.option == OPT_GO {
                    return Ok(true);
                }
            }
            other => {
                debug!(option = other, "unsupported option");
                writer
                    .write_all(&option_reply(other, REP_ERR_UNSUP, &[]))
                    .await?;
            }
        }
        writer.flush().await?;
    }
}

async fn transmission<R, W>(
    mut reader: R,
    mut writer: W,
    export: Arc<Export>,
    reply_timeout: Duration,
) -> Result<(), ServeError>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin + Send + 'static,
{
    // One task writes replies in the order they complete.
    // A reply is its 16-byte header and, for a READ, the data: sent as two
    // parts so the data is never copied behind the header.
    // A reply keeps its request's memory permits until it is written, so a
    // client that sends reads but never reads the replies stalls its own
    // connection at CONNECTION_BUDGET instead of filling memory.
    let (replies, mut outgoing) = mpsc::channel::<Outgoing>(MAX_IN_FLIGHT);
    // A client that stops reading for `reply_timeout` is cut off, which
    // frees its permits for everyone else.
    let writer_task = tokio::spawn(async move {
        while let Some(Outgoing { header, data, .. }) = outgoing.recv().await {
            let sent = async {
                writer.write_all(&header).await?;
                writer.write_all(&data).await?;
                if outgoing.is_empty() {
                    writer.flush().await?;
                }
                Ok(())
            };
            unless_stalled(reply_timeout, sent).await?;
        }
        unless_stalled(reply_timeout, writer.flush()).await
    });
    let connection_budget = Arc::new(Semaphore::new(CONNECTION_BUDGET / BLOCK as usize));
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let result = loop {
        let mut header = [0u8; REQUEST_LEN];
        let read = tokio::select! {
            biased;
            read = reader.read_exact(&mut header) => read,
            // The reply writer gave up on the client: nothing more to serve.
            () = replies.closed() => break Ok(()),
        };
        if let Err(e) = read {
            break if e.kind() == std::io::ErrorKind::UnexpectedEof {
                Ok(())
            } else {
                Err(e.into())
            };
        }
        let request = match parse_request(&header) {
            Ok(r) => r,
            // A command we do not know, or a READ over the limit, carries no
            // payload: refuse it and go on.
            Err(e @ (NbdError::UnknownCommand { .. } | NbdError::RequestTooLarge { .. }))
                if u16::from_be_bytes([header[6], header[7]]) != 1 =>
            {
                let cookie = u64::from_be_bytes(header[8..16].try_into().unwrap_or_default());
                let error = if matches!(e, NbdError::UnknownCommand { .. }) {
                    ENOTSUP
                } else {
                    EINVAL
                };
                let reply = Outgoing {
                    header: simple_reply(error, cookie),
                    data: Vec::new(),
                    _memory: None,
                };
                if replies.send(reply).await.is_err() {
                    break Ok(());
                }
                continue;
            }
            // Out of sync with the client: nothing sensible can follow.
            Err(e) => break Err(e.into()),
        };
        if request.command == Command::Disconnect {
            break Ok(());
        }
        // Memory this request holds until its reply is sent (plus merge edges).
        let blocks = if matches!(request.command, Command::Read | Command::Write) {
            request.length.div_ceil(BLOCK as u32) + 2
        } else {
            0
        };
        // This connection's share first, so that a stalled connection
        // waits without holding any of the shared budget.
        let memory = tokio::select! {
            biased;
            permits = async {
                let own = connection_budget.clone().acquire_many_owned(blocks).await?;
                let shared = export.budget.clone().acquire_many_owned(blocks).await?;
                Ok::<_, tokio::sync::AcquireError>(Some((own, shared)))
            } => permits,
            () = replies.closed() => break Ok(()),
        };
        let Ok(memory) = memory else {
            break Ok(());
        };
        let payload = if request.command == Command::Write {
            let mut data = vec![0u8; request.length as usize];
            let read = tokio::select! {
                biased;
                read = reader.read_exact(&mut data) => read,
                () = replies.closed() => break Ok(()),
            };
            if let Err(e) = read {
                break Err(e.into());
            }
            data
        } else {
            Vec::new()
        };
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            break Ok(());
        };
        let (export, replies) = (export.clone(), replies.clone());
        tokio::spawn(async move {
            let (header, data) = execute(&export, request, payload).await;
            let reply = Outgoing {
                header,
                data,
                _memory: memory,
            };
            let _ = replies.send(reply).await;
            drop(permit);
        });
    };
    // Let requests in flight finish and their replies go out.
    let _ = in_flight.acquire_many(MAX_IN_FLIGHT as u32).await;
    drop(replies);
    match writer_task.await {
        // A reply that could not be delivered (a client that stopped
        // reading) is why the connection ended, unless reading failed first.
        Ok(written) => result.and(written.map_err(ServeError::from)),
        Err(e) => {
            debug!(error = %e, "reply writer failed");
            result
        }
    }
}

/// Run a reply write, failing it once it has been blocked for `limit`. A
/// write that completes on its first poll (most do) sets no timer.
async fn unless_stalled(
    limit: Duration,
    write: impl Future<Output = std::io::Result<()>>,
) -> std::io::Result<()> {
    let mut write = std::pin::pin!(write);
    if let Poll::Ready(done) = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await
    {
        return done;
    }
    tokio::time::timeout(limit, write).await.map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the client read no reply for {limit:?}"),
        )
    })?
}

/// A reply on its way to the client, with the memory permits of its request.
struct Outgoing {
    header: [u8; 16],
    data: Vec<u8>,
    _memory: Option<(
        tokio::sync::OwnedSemaphorePermit,
        tokio::sync::OwnedSemaphorePermit,
    )>,
}

fn errno(e: &DriverError, write: bool) -> u32 {
    match e {
        DriverError::OutOfRange { .. } if write => ENOSPC,
        DriverError::OutOfRange { .. } | DriverError::Misaligned { .. } => EINVAL,
        DriverError::Fenced { .. } => EPERM,
        _ => EIO,
    }
}

async fn execute(export: &Export, request: Request, payload: Vec<u8>) -> ([u8; 16], Vec<u8>) {
    let volume = &export.volume;
    let fua = request.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (request.offset, u64::from(request.length));
    let outcome: Result<Vec<u8>, DriverError> = async {
        if offset
            .checked_add(len)
            .is_none_or(|end| end > volume.size())
        {
            return Err(DriverError::OutOfRange {
                offset,
                len,
                size: volume.size(),
            });
        }
        match request.command {
            Command::Read => read(volume, offset, len).await,
            Command::Write => {
                write(export, offset, &payload, fua).await?;
                Ok(Vec::new())
            }
            Command::Flush => {
                volume.flush().await?;
                Ok(Vec::new())
            }
            Command::Trim => {
                // Advisory: only whole blocks inside the range are discarded.
                let (start, end) = (
                    offset.next_multiple_of(BLOCK),
                    (offset + len) / BLOCK * BLOCK,
                );
                if start < end {
                    volume.trim(start, end - start).await?;
                }
                Ok(Vec::new())
            }
            Command::WriteZeroes => {
                let (start, end) = (
                    offset.next_multiple_of(BLOCK),
                    (offset + len) / BLOCK * BLOCK,
                );
                if start < end {
                    volume.write_zeroes(start, end - start).await?;
                    // Unaligned edges get explicit zeroes.
                    write(export, offset, &vec![0u8; (start - offset) as usize], false).await?;
                    write(
                        export,
                        end,
                        &vec![0u8; (offset + len - end) as usize],
                        false,
                    )
                    .await?;
                } else {
                    write(export, offset, &vec![0u8; len as usize], false).await?;
                }
                if fua {
                    volume.flush().await?;
                }
                Ok(Vec::new())
            }
            Command::Disconnect => Ok(Vec::new()),
        }
    }
    .await;
    match outcome {
        Ok(data) => (simple_reply(0, request.cookie), data),
        Err(e) => {
            if let Some(suppressed) = REQUEST_FAILED.allow() {
                warn!(command = ?request.command, offset, len, error = %e, suppressed, "request failed");
            }
            let error = errno(&e, request.command != Command::Read);
            (simple_reply(error, request.cookie), Vec::new())
        }
    }
}

async fn read(volume: &Volume, offset: u64, len: u64) -> Result<Vec<u8>, DriverError> {
    let (start, end) = (
        offset / BLOCK * BLOCK,
        (offset + len).next_multiple_of(BLOCK),
    );
    let mut buf = vec![0u8; (end - start) as usize];
    if len > 0 {
        volume.read_at(start, &mut buf).await?;
    }
    // Trim the block padding in place (nothing to move for aligned reads).
    let skip = (offset - start) as usize;
    buf.truncate(skip + len as usize);
    buf.drain(..skip);
    Ok(buf)
}

/// Write `data` at `offset`; unaligned edges are read, merged and written whole.
async fn write(export: &Export, offset: u64, data: &[u8], fua: bool) -> Result<(), DriverError> {
    let volume = &export.volume;
    if data.is_empty() {
        return Ok(());
    }
    let end = offset + data.len() as u64;
    let (start, aligned_end) = (offset / BLOCK * BLOCK, end.next_multiple_of(BLOCK));
    if start == offset && aligned_end == end {
        let _shared = export.merge.read().await;
        return if fua {
            volume.write_at_fua(offset, data).await
        } else {
            volume.write_at(offset, data).await
        };
    }
    let _exclusive = export.merge.write().await;
    let mut merged = read(volume, start, aligned_end - start).await?;
    merged[(offset - start) as usize..][..data.len()].copy_from_slice(data);
    if fua {
        volume.write_at_fua(start, &merged).await
    } else {
        volume.write_at(start, &merged).await
    }
}

/// Where to listen: a Unix socket path or a TCP address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    Unix(std::path::PathBuf),
    Tcp(std::net::SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(path) = s.strip_prefix("unix:") {
            Ok(Listen::Unix(path.into()))
        } else if let Some(addr) = s.strip_prefix("tcp:") {
            addr.parse()
                .map(Listen::Tcp)
                .map_err(|e| format!("bad address {addr:?}: {e}"))
        } else {
            Err(format!("{s:?}: expected unix:PATH or tcp:HOST:PORT"))
        }
    }
}

impl std::fmt::Display for Listen {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Listen::Unix(p) => write!(f, "unix:{}", p.display()),
            Listen::Tcp(a) => write!(f, "tcp:{a}"),
        }
    }
}

/// A bound listener; `local` is what clients dial (the real port for tcp port 0).
#[derive(Debug)]
pub enum Listener {
    Unix(tokio::net::UnixListener, std::path::PathBuf),
    Tcp(tokio::net::TcpListener),
}

impl Listener {
    pub async fn bind(listen: &Listen) -> std::io::Result<Self> {
        match listen {
            Listen::Unix(path) => {
                // A socket file left by a previous run would make bind fail.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    std::fs::remove_file(path)?;
                }
                Ok(Listener::Unix(
                    tokio::net::UnixListener::bind(path)?,
                    path.clone(),
                ))
            }
            Listen::Tcp(addr) => Ok(Listener::Tcp(tokio::net::TcpListener::bind(addr).await?)),
        }
    }

    pub fn local(&self) -> std::io::Result<Listen> {
        match self {
            Listener::Unix(_, path) => Ok(Listen::Unix(path.clone())),
            Listener::Tcp(l) => l.local_addr().map(Listen::Tcp),
        }
    }

    /// An NBD URI for clients such as nbdinfo, nbdcopy and qemu-img.
    pub fn uri(&self, export: &str) -> std::io::Result<String> {
        Ok(match self.local()? {
            Listen::Unix(path) => format!("nbd+unix:///{export}?socket={}", path.display()),
            Listen::Tcp(addr) => format!("nbd://{addr}/{export}"),
        })
    }

    /// Accept clients forever, each served on its own task, at most
    /// `limits.max_connections` at once. A failed accept (out of file
    /// descriptors, say) is logged and retried after a pause: it never ends
    /// the listener.
    pub async fn run(self, export: Arc<Export>, limits: Limits) {
        let slots = Arc::new(Semaphore::new(limits.max_connections));
        loop {
            let accepted = match &self {
                Listener::Unix(l, _) => l.accept().await.map(|(s, _)| Accepted::Unix(s)),
                Listener::Tcp(l) => l.accept().await.map(|(s, peer)| {
                    let _ = s.set_nodelay(true);
                    // A vanished client is noticed even while it has nothing in flight.
                    let keepalive = socket2::TcpKeepalive::new()
                        .with_time(Duration::from_secs(60))
                        .with_interval(Duration::from_secs(10));
                    let _ = socket2::SockRef::from(&s).set_tcp_keepalive(&keepalive);
                    debug!(%peer, "NBD client connected");
                    Accepted::Tcp(s)
                }),
            };
            let stream = match accepted {
                Ok(stream) => stream,
                Err(e) => {
                    if let Some(suppressed) = ACCEPT_FAILED.allow() {
                        warn!(error = %e, suppressed, "NBD accept failed; retrying in {ACCEPT_BACKOFF:?}");
                    }
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                    continue;
                }
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                if let Some(suppressed) = CONNECTION_REFUSED.allow() {
                    warn!(
                        max = limits.max_connections,
                        suppressed, "NBD connection closed: the frontend serves its maximum"
                    );
                }
                continue;
            };
            let export = export.clone();
            tokio::spawn(async move {
                let ended = match stream {
                    Accepted::Unix(s) => serve(s, export, limits).await,
                    Accepted::Tcp(s) => serve(s, export, limits).await,
                };
                drop(slot);
                match ended {
                    Ok(()) => debug!("NBD client disconnected"),
                    Err(e) => {
                        if let Some(suppressed) = CLIENT_FAULT.allow() {
                            warn!(error = %e, suppressed, "NBD connection ended");
                        }
                    }
                }
            });
        }
    }
}

enum Accepted {
    Unix(tokio::net::UnixStream),
    Tcp(tokio::net::TcpStream),
}

/// The pause after a failed accept.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// Warnings any client can cause at will, limited (`suppressed` counts the
/// lines held back since the last one).
static ACCEPT_FAILED: LogLimit = LogLimit::new(5, Duration::from_secs(10));
static CONNECTION_REFUSED: LogLimit = LogLimit::new(5, Duration::from_secs(10));
static CLIENT_FAULT: LogLimit = LogLimit::new(10, Duration::from_secs(10));
static REQUEST_FAILED: LogLimit = LogLimit::new(10, Duration::from_secs(10));
