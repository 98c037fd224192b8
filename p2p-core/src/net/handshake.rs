//! Opening a connection: TCP, the secure handshake (with a key), the `Hello`/`Welcome`
//! exchange, then the driver is spawned and the [`Link`] handed out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::SinkExt;
use futures::StreamExt;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::driver::{drive, flush, now, sleep_until, Io, Transport, Wire};
use super::{EventSender, Link, LinkClosed, LinkEvent, LinkId, Settings, MAX_WINDOW};
use crate::codec::FrameCodec;
use crate::conn::{Connection, Event, Role};
use crate::identity::Identity;
use crate::message::{Hello, Message, Reject, RejectReason};
use crate::secure::{self, WireCodec, PREAMBLE};
use crate::{ConnectionError, Error, HandshakeError, NodeId, Stage};

/// Dials `addr`, runs the handshake as initiator and spawns the connection's driver.
pub async fn connect(
    addr: SocketAddr,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    let stream = tokio::time::timeout(settings.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| Error::ConnectTimeout {
            addr: addr.to_string(),
            after: settings.connect_timeout,
        })??;
    stream.set_nodelay(true)?;
    connect_stream(stream, addr, local, settings, id, events).await
}

/// Runs the handshake as acceptor on an accepted stream and spawns the connection's driver.
pub async fn accept(
    stream: TcpStream,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    let addr = stream.peer_addr()?;
    stream.set_nodelay(true)?;
    accept_stream(stream, addr, local, settings, id, events).await
}

/// Like [`connect`], on a stream the caller already connected to `addr` (another transport,
/// e.g. a simulated network): runs the handshake as initiator and spawns the driver.
pub async fn connect_stream<S>(
    stream: S,
    addr: SocketAddr,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    start(
        boxed(stream),
        addr,
        Role::Initiator,
        local,
        settings,
        id,
        events,
    )
    .await
}

/// Like [`accept`], on a stream accepted from `addr` by another transport (e.g. a simulated
/// network): runs the handshake as acceptor and spawns the driver.
pub async fn accept_stream<S>(
    stream: S,
    addr: SocketAddr,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    start(
        boxed(stream),
        addr,
        Role::Acceptor,
        local,
        settings,
        id,
        events,
    )
    .await
}

/// The stream as the driver takes it: a TCP socket to another machine as a
/// [`super::filesock::FileSocket`], whose file chunks go by `sendfile(2)`; any other
/// stream as it is.
///
/// Not over loopback: there the receiver is a process of this machine, and it pays more
/// for the file's pages `sendfile` hands it (read from memory, not from the cache the
/// sender's copy left them in, and each page's reference given back) than the sender
/// saves: measured on a 2-core machine, a 1 GiB file cost the receiving node 15 % more
/// CPU and moved slower (docs/PERFORMANCE.md, "Files: chunks by file range").
fn boxed<S>(stream: S) -> Box<dyn Io>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut slot = Some(stream);
    if let Some(tcp) = (&mut slot as &mut dyn std::any::Any)
        .downcast_mut::<Option<tokio::net::TcpStream>>()
        .and_then(|s| s.take_if(|t| t.peer_addr().is_ok_and(|a| !is_local(a.ip()))))
    {
        return Box::new(super::filesock::FileSocket::new(tcp));
    }
    match slot {
        Some(stream) => Box::new(stream),
        // Taken only when `S` is a `TcpStream`, which returned above.
        None => unreachable!("the stream was taken"),
    }
}

/// Whether `ip` is this machine's loopback (IPv4, IPv6, or IPv4 mapped into IPv6).
fn is_local(ip: std::net::IpAddr) -> bool {
    ip.to_canonical().is_loopback()
}

async fn start(
    mut stream: Box<dyn Io>,
    addr: SocketAddr,
    role: Role,
    local: Hello,
    settings: &Settings,
    id: LinkId,
    events: EventSender,
) -> Result<Link, Error> {
    let started = now();
    let (codec, proven) = match &settings.key {
        None => (WireCodec::Plain(FrameCodec::new(settings.max_frame)), None),
        Some(key) => {
            let identity = local_identity(settings, &local)?;
            let mut keys = vec![key.clone()];
            keys.extend(settings.accept_keys.iter().filter(|k| *k != key).cloned());
            let limit = settings.conn.handshake_timeout;
            let secured = secure::handshake(&mut stream, role, &keys, identity, settings.max_frame);
            let codec = tokio::time::timeout(limit, secured)
                .await
                .map_err(|_| Error::Handshake(HandshakeError::Timeout(limit)))??;
            let proven = codec.peer_id();
            tracing::debug!(%addr, peer = %proven, cipher = %codec.cipher(), "secure channel up");
            (WireCodec::Secure(Box::new(codec)), Some(proven))
        }
    };
    let mut codec = codec;
    // Until the handshake is done, frames are at most a few KiB (a Hello is bounded).
    codec.frames_mut().begin_handshake();
    codec.frames_mut().set_budget(settings.frame_budget.clone());
    let mut io = Framed::new(stream, codec);
    // The write buffer starts empty and grows (doubling) with what is written, so an idle
    // link does not hold 8 KiB for nothing: a coordinator with a thousand links held 8 MiB
    // in them. The read buffer keeps its 8 KiB (each read fills what room it has).
    *io.write_buffer_mut() = bytes::BytesMut::new();
    // The handshake timeout counts from the start, secure handshake included.
    let local_capacity = local.capacity;
    let mut conn = Connection::new(role, local, settings.conn.clone(), started);
    let peer = match handshake(&mut io, &mut conn, proven).await {
        Ok(peer) => {
            io.codec_mut().frames_mut().open();
            peer
        }
        Err(e) => {
            // Best effort: tell the peer why (a Reject), without waiting long.
            let _ =
                tokio::time::timeout(Duration::from_millis(200), flush(&mut io, &mut conn)).await;
            return Err(e);
        }
    };
    Ok(launch(io, conn, peer, local_capacity, addr, id, settings, events).await)
}

/// The places of a link's chunk queue ([`Link::send_chunk`]): one transfer's full default
/// credit ([`crate::transfer::DEFAULT_WINDOW`] in [`crate::transfer::SEND_CHUNK`]s, a
/// short last one included), so a sender queues a receiver's first credit at once. A
/// chunk in the queue names a range of its file or holds at most one chunk's bytes: at
/// most about 4 MiB a link.
pub(super) const CHUNK_QUEUE: usize =
    (crate::transfer::DEFAULT_WINDOW as usize).div_ceil(crate::transfer::SEND_CHUNK) + 1;

/// The rest of a connection once its `Hello`/`Welcome` exchange is done, over any [`Wire`]
/// (a socket, or an in-memory pipe): the [`Link`] with its bounded command queue, its
/// registration on `events`, and the driver, spawned.
#[allow(clippy::too_many_arguments)]
pub(super) async fn launch<W: Wire>(
    io: W,
    conn: Connection,
    peer: Hello,
    local_capacity: u32,
    addr: SocketAddr,
    id: LinkId,
    settings: &Settings,
    events: EventSender,
) -> Link {
    // Room for a full window of assignments to the peer, a result for each task the peer
    // may have assigned to us (our own capacity), and control commands: an owner that
    // respects both capacities never finds the queue full.
    let window = peer.capacity.max(local_capacity).clamp(1, MAX_WINDOW) as usize;
    // Twice the window: each task the peer assigned to us may have a `Started` and a result
    // queued; and 64 control commands. File chunks have a queue of their own, so however
    // many a sender has, they never take a control command's place.
    let (tx, rx) = mpsc::channel(2 * window + 64);
    let (chunks_tx, chunks_rx) = mpsc::channel(CHUNK_QUEUE);
    let (closed_tx, closed_rx) = watch::channel(None);
    let (status_tx, status_rx) = mpsc::channel(1);
    let link = Link {
        id,
        peer,
        addr,
        tx,
        chunks: chunks_tx,
        closed: LinkClosed { rx: closed_rx },
        status: status_tx,
    };
    // Registration comes first on the events channel, before anything the driver reports.
    let _ = events
        .send((id, LinkEvent::Opened(Box::new(link.clone()))))
        .await;
    // If the driver ever dies without its final `Closed` (a panic), say so anyway, so the
    // owner re-queues that connection's work instead of waiting for it.
    let idle = settings.conn.idle_timeout;
    let status = (
        status_rx,
        settings.status.clone(),
        settings.hosted.clone(),
        settings.replica.clone(),
        settings.instant.clone(),
    );
    let driver = tokio::spawn(drive(
        io,
        conn,
        (rx, chunks_rx),
        id,
        events.clone(),
        idle,
        closed_tx,
        status,
    ));
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            let error = Some(Arc::new(Error::DriverFailed(e.to_string())));
            let _ = events.send((id, LinkEvent::Closed { error })).await;
        }
    });
    link
}

/// The identity a keyed connection proves, checked against the local `Hello`.
fn local_identity<'s>(settings: &'s Settings, local: &Hello) -> Result<&'s Identity, Error> {
    let identity = settings.identity.as_ref().ok_or(Error::InvalidState {
        action: "start a keyed connection",
        why: "net::Settings::identity is not set (with a cluster key the node id is proven by \
              the identity key)",
    })?;
    if identity.node_id() != local.node_id {
        return Err(Error::InvalidState {
            action: "start a keyed connection",
            why: "the local Hello's node id is not the id of net::Settings::identity",
        });
    }
    Ok(identity)
}

/// The `Hello`/`Welcome` exchange. `proven`: with a key, the node id the peer's identity
/// proved; a `Hello` or `Welcome` claiming another id is refused.
async fn handshake(
    io: &mut Transport,
    conn: &mut Connection,
    proven: Option<NodeId>,
) -> Result<Hello, Error> {
    hello_exchange(io, conn, proven)
        .await
        .map_err(|e| explain_handshake_error(e, proven.is_some()))
}

/// The `Hello`/`Welcome` exchange over any [`Wire`], bounded by the handshake timeout (the
/// connection's own deadline); with `proven`, a claim of another id is refused.
pub(super) async fn hello_exchange<W: Wire>(
    io: &mut W,
    conn: &mut Connection,
    proven: Option<NodeId>,
) -> Result<Hello, Error> {
    loop {
        flush(io, conn).await?;
        while let Some(ev) = conn.poll_event() {
            if let Event::Established(peer) = ev {
                return Ok(peer);
            }
        }
        let deadline = conn.poll_timeout().map(Instant::from_std);
        tokio::select! {
            frame = io.next() => match frame {
                Some(Ok(msg)) => {
                    if let Some(proven) = proven {
                        check_claimed_id(io, &msg, proven).await?;
                    }
                    conn.handle_message(msg, now())?
                }
                Some(Err(e)) => return Err(conn.handle_invalid(e)),
                None => return Err(closed_in_hello(proven.is_some())),
            },
            _ = sleep_until(deadline) => conn.handle_timeout(now())?,
        }
    }
}

/// Refuses a `Hello` or `Welcome` whose node id is not `proven` (the id derived from the
/// peer's authenticated identity key). An acceptor tells the dialler why with a `Reject`
/// (best effort) before closing; nothing else is sent to such a peer.
async fn check_claimed_id<W: Wire>(io: &mut W, msg: &Message, proven: NodeId) -> Result<(), Error> {
    let claimed = match msg {
        Message::Hello(h) | Message::Welcome(h) => h.node_id,
        _ => return Ok(()),
    };
    if claimed == proven {
        return Ok(());
    }
    let err = Error::Handshake(HandshakeError::IdMismatch { claimed, proven });
    if matches!(msg, Message::Hello(_)) {
        let reject = Message::Reject(Reject {
            reason: RejectReason::Key,
            message: format!(
                "your Hello claims node id {claimed}, but your identity key is that of node \
                 {proven}"
            ),
        });
        let _ = tokio::time::timeout(Duration::from_millis(200), io.send(reject)).await;
    }
    Err(err)
}

/// The peer closed during `Hello`/`Welcome`; `keyed`: this node uses a cluster key.
fn closed_in_hello(keyed: bool) -> Error {
    HandshakeError::PeerClosed {
        stage: Stage::Hello { keyed },
    }
    .into()
}

/// Makes a key mismatch visible on a node without a key: a keyed initiator's preamble
/// reads as an impossible frame length ([`HandshakeError::PeerHasKey`]), and a keyed
/// acceptor closes on a plaintext `Hello` ([`Stage::Hello`] with `keyed: false`).
fn explain_handshake_error(e: Error, keyed: bool) -> Error {
    let closed = |kind: std::io::ErrorKind| {
        use std::io::ErrorKind::*;
        matches!(
            kind,
            ConnectionReset | ConnectionAborted | BrokenPipe | UnexpectedEof
        )
    };
    match e {
        Error::Io(io) if closed(io.kind()) => closed_in_hello(keyed),
        Error::Connection(ConnectionError::FrameTooLarge { len, .. })
            if !keyed && u32::try_from(len).ok() == Some(u32::from_be_bytes(PREAMBLE)) =>
        {
            HandshakeError::PeerHasKey.into()
        }
        other => other,
    }
}
