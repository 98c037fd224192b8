//! The tokio driver: moves frames between a TCP socket and a [`Connection`].
//!
//! [`connect`] and [`accept`] run the handshake (bounded by the handshake timeout) and then
//! spawn a task that drives the connection. Its owner talks to it through a [`Link`]
//! (commands in) and a shared channel of `(LinkId, LinkEvent)` (events out). Each link's
//! life on that channel is ordered: [`LinkEvent::Opened`] (sent before the driver starts, so
//! it precedes every other event of the link), its events, and a final
//! [`LinkEvent::Closed`] when the goodbye exchange finished or the connection failed; a
//! failure closes this connection only. [`Link::on_closed`] tells anyone else (a dialer)
//! when and how the link closed.
//!
//! With a cluster key in [`Settings::key`], the connection first runs the secure handshake
//! of [`crate::secure`] (within the same handshake timeout as `Hello`), and every frame
//! after it is encrypted; without one, frames go as they are. With a key, the node id in the
//! peer's `Hello`/`Welcome` must be the one its identity proved in the secure handshake
//! ([`HandshakeError::IdMismatch`] otherwise), and the local `Hello` must carry the id of
//! [`Settings::identity`].

use std::net::SocketAddr;
use std::time::Duration;

use futures::{FutureExt, SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use crate::codec::{FrameBudget, FrameCodec, DEFAULT_MAX_FRAME};
use crate::conn::{self, Connection, Event, Role};
use crate::gate::{self, LogLimit};
use crate::identity::Identity;
use crate::key::ClusterKey;
use crate::message::{
    Assign, Completed, Hello, Message, Reject, RejectReason, StatusReport, Transfer,
};
use crate::secure::{self, WireCodec, PREAMBLE};
use crate::{ConnectionError, Error, HandshakeError, NodeId, Stage};

/// Network settings shared by all connections of a node.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Protocol timing (handshake, heartbeats).
    pub conn: conn::Config,
    /// Maximum frame payload in bytes. Default 16 MiB (also the ceiling).
    pub max_frame: usize,
    /// Bound on establishing a TCP connection. Default 3 s.
    pub connect_timeout: Duration,
    /// The cluster key. With one, every connection (dialled or accepted) runs the secure
    /// handshake and is encrypted, and peers without this key are dropped. This node dials
    /// with it. Default none.
    pub key: Option<ClusterKey>,
    /// More cluster keys accepted from peers that dial in (with [`Settings::key`] only):
    /// during a key rotation a node dials with one key and accepts the old and the new one.
    /// Default none.
    pub accept_keys: Vec<ClusterKey>,
    /// The bytes this node may hold in large frames still being received, shared by all
    /// the connections given these settings (clones share it). Default
    /// [`crate::codec::DEFAULT_FRAME_BUDGET`] (256 MiB).
    pub frame_budget: FrameBudget,
    /// This node's identity: with a cluster key, its private key is the Noise static key
    /// and the local `Hello`'s node id must be [`Identity::node_id`]. Required with a key
    /// (a connection without it fails with [`Error::InvalidState`]). Default none.
    pub identity: Option<Identity>,
    /// What this node answers a peer's status request with (`p2p-node status`). Default
    /// none: such a request closes the connection.
    pub status: Option<StatusSource>,
}

/// Makes this node's [`StatusReport`] when a peer asks (see [`Settings::status`]).
#[derive(Clone)]
pub struct StatusSource(pub std::sync::Arc<dyn Fn() -> StatusReport + Send + Sync>);

impl std::fmt::Debug for StatusSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StatusSource")
    }
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            conn: conn::Config::default(),
            max_frame: DEFAULT_MAX_FRAME,
            connect_timeout: Duration::from_secs(3),
            key: None,
            accept_keys: Vec::new(),
            identity: None,
            frame_budget: FrameBudget::default(),
            status: None,
        }
    }
}

/// The largest window of tasks in flight a link's command queue is sized for.
const MAX_WINDOW: u32 = 65_536;

/// Most frames decoded, or commands taken, in one go before the driver writes what they
/// produced and lets other tasks run.
const BATCH: usize = 512;

/// The owner's number for a connection, echoed in its events.
pub type LinkId = u64;

/// What the owner asks of a connection.
#[derive(Debug, Clone)]
pub enum Command {
    /// Assign a task to the peer.
    Assign(Assign),
    /// Tell the peer a task it assigned to us started running.
    Started(u64),
    /// Report the result of a task the peer assigned to us.
    Complete(Completed),
    /// Cancel a task we assigned to the peer.
    Cancel(u64),
    /// Say goodbye: no new work; close once in-flight work is done.
    Goodbye,
    /// Close now, without goodbye.
    Abort,
    /// Send a file-transfer message (protocol v3); a chunk goes behind every control frame.
    Transfer(Box<Transfer>),
}

/// What a connection reports to its owner.
#[derive(Debug, Clone)]
pub enum LinkEvent {
    /// The connection is established; this is the first event of the link, before any
    /// other (the same [`Link`] that [`connect`] or [`accept`] returns).
    Opened(Box<Link>),
    /// The peer asks us to run a task.
    Assigned(Assign),
    /// A task we assigned started running at the peer.
    Started {
        /// The assignment's seq.
        seq: u64,
    },
    /// A task we assigned has a result.
    Completed(Completed),
    /// The peer cancels a task it assigned to us.
    Cancelled {
        /// The assignment's seq.
        seq: u64,
    },
    /// The peer said goodbye: assign nothing more to it.
    PeerGoodbye,
    /// An assignment could not be sent (connection closing, peer at capacity).
    AssignFailed {
        /// The assignment, for re-queueing.
        assign: Assign,
        /// Why.
        reason: String,
    },
    /// A file-transfer message from the peer (protocol v3).
    Transfer(Box<Transfer>),
    /// The connection is closed; this is the last event of the link.
    Closed {
        /// `None` after a complete goodbye, else what went wrong.
        error: Option<String>,
    },
}

/// The owner's handle on one established connection.
#[derive(Debug, Clone)]
pub struct Link {
    id: LinkId,
    peer: Hello,
    addr: SocketAddr,
    tx: mpsc::Sender<Command>,
    closed: LinkClosed,
    /// Status requests to the driver, each with where its answer goes.
    status: mpsc::Sender<oneshot::Sender<Box<StatusReport>>>,
}

/// Tells when a link closed, and how (see [`Link::on_closed`]). Holding one does not keep
/// the connection open.
#[derive(Debug, Clone)]
pub struct LinkClosed {
    /// `None` while open; then `Some(None)` after a complete goodbye, or `Some(Some(why))`.
    rx: watch::Receiver<Option<Option<String>>>,
}

impl LinkClosed {
    /// Waits until the link closed: `None` after a complete goodbye, else what went wrong.
    pub async fn wait(mut self) -> Option<String> {
        loop {
            if let Some(end) = self.rx.borrow().clone() {
                return end;
            }
            if self.rx.changed().await.is_err() {
                // The driver is gone without saying how (it panicked).
                return Some("the connection driver ended".into());
            }
        }
    }
}

impl Link {
    /// The owner's number for this link.
    pub fn id(&self) -> LinkId {
        self.id
    }

    /// The peer's handshake.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// The peer's socket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// A handle that says when this link closed (without keeping it open).
    pub fn on_closed(&self) -> LinkClosed {
        self.closed.clone()
    }

    /// Asks the peer how it is (`p2p-node status`) and waits, at most `limit`, for its
    /// answer. A peer that closes the connection instead (a node older than the status
    /// request) gives [`Error::NoStatus`].
    pub async fn request_status(&self, limit: Duration) -> Result<StatusReport, Error> {
        let (tx, rx) = oneshot::channel();
        self.status.try_send(tx).map_err(|_| Error::InvalidState {
            action: "request status",
            why: "the connection is closed, or a status request is unanswered",
        })?;
        match tokio::time::timeout(limit, rx).await {
            Ok(Ok(report)) => Ok(*report),
            Ok(Err(_)) => Err(Error::NoStatus),
            Err(_) => Err(Error::StatusTimeout(limit)),
        }
    }

    /// Queues a command. The queue holds the peer's capacity plus a margin, so a sender that
    /// respects capacity never finds it full; a closed link gives an error.
    pub fn send(&self, cmd: Command) -> Result<(), Error> {
        self.tx.try_send(cmd).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => Error::InvalidState {
                action: "send",
                why: "the link's command queue is full",
            },
            mpsc::error::TrySendError::Closed(_) => Error::InvalidState {
                action: "send",
                why: "the connection is closed",
            },
        })
    }
}

/// The sender of a link's events.
pub type EventSender = mpsc::Sender<(LinkId, LinkEvent)>;

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
        Box::new(stream),
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
        Box::new(stream),
        addr,
        Role::Acceptor,
        local,
        settings,
        id,
        events,
    )
    .await
}

/// A connected byte stream: a TCP socket, or another transport's.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> Io for S {}

type Transport = Framed<Box<dyn Io>, WireCodec>;

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
            (WireCodec::Secure(Box::new(codec)), Some(proven))
        }
    };
    let mut codec = codec;
    // Until the handshake is done, frames are at most a few KiB (a Hello is bounded).
    codec.frames_mut().begin_handshake();
    codec.frames_mut().set_budget(settings.frame_budget.clone());
    let mut io = Framed::new(stream, codec);
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
    // Enough room for a full window of assignments plus control commands.
    // Room for a full window of assignments to the peer, a result for each task the peer
    // may have assigned to us (our own capacity), and control commands: an owner that
    // respects both capacities never finds the queue full.
    let window = peer.capacity.max(local_capacity).clamp(1, MAX_WINDOW) as usize;
    // Twice the window: each task the peer assigned to us may have a `Started` and a result
    // queued.
    let (tx, rx) = mpsc::channel(2 * window + 64);
    let (closed_tx, closed_rx) = watch::channel(None);
    let (status_tx, status_rx) = mpsc::channel(1);
    let link = Link {
        id,
        peer,
        addr,
        tx,
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
    let status = (status_rx, settings.status.clone());
    let driver = tokio::spawn(drive(
        io,
        conn,
        rx,
        id,
        events.clone(),
        idle,
        closed_tx,
        status,
    ));
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            let error = Some(format!("connection driver failed: {e}"));
            let _ = events.send((id, LinkEvent::Closed { error })).await;
        }
    });
    Ok(link)
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

fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// Sends what the connection has queued. Cancel-safe: a message leaves the connection only
/// when the sink takes it at once, and bytes the sink still holds are flushed by the next call.
async fn flush(io: &mut Transport, conn: &mut Connection) -> Result<(), Error> {
    loop {
        futures::future::poll_fn(|cx| SinkExt::<Message>::poll_ready_unpin(io, cx)).await?;
        let Some(msg) = conn.poll_transmit_with(io.write_buffer().len()) else {
            if conn.has_transmit() && !io.write_buffer().is_empty() {
                // A chunk waits for the writer to empty: write what it holds, then go on.
                SinkExt::<Message>::flush(io).await?;
                continue;
            }
            break;
        };
        // Every message that can be taken without waiting joins one batch: with a key, a
        // burst of small frames is encrypted as one transport message.
        io.codec_mut().begin_batch();
        let fed = feed_batch(io, conn, msg);
        let sealed = io.codec_mut().end_batch();
        io.write_buffer_mut().extend_from_slice(&sealed?);
        fed?;
    }
    if !io.write_buffer().is_empty() {
        SinkExt::<Message>::flush(io).await?;
    }
    Ok(())
}

/// Feeds `first`, then every message the connection has queued, for as long as the sink
/// takes them without waiting. Synchronous, so a batch is never left half-done by a
/// cancelled [`flush`].
fn feed_batch(io: &mut Transport, conn: &mut Connection, first: Message) -> Result<(), Error> {
    // A file chunk ends its batch: at most one chunk goes out between control frames, with
    // a key too (where a batch is sealed as one, so the writer's buffer does not grow while
    // it is fed).
    let chunk = crate::transfer::is_chunk(&first);
    SinkExt::<Message>::start_send_unpin(io, first)?;
    if chunk {
        return Ok(());
    }
    loop {
        match futures::future::poll_fn(|cx| SinkExt::<Message>::poll_ready_unpin(io, cx))
            .now_or_never()
        {
            Some(Ok(())) => {}
            Some(Err(e)) => return Err(e),
            None => return Ok(()),
        }
        let Some(msg) = conn.poll_transmit_with(io.write_buffer().len()) else {
            return Ok(());
        };
        let chunk = crate::transfer::is_chunk(&msg);
        SinkExt::<Message>::start_send_unpin(io, msg)?;
        if chunk {
            return Ok(());
        }
    }
}

/// [`flush`], bounded: a peer that takes none of our bytes for `idle` (it stopped reading,
/// or the network drops everything, so the socket's send buffer stays full) is declared
/// dead, as the idle timeout would do were the driver not stuck writing. A slow peer that
/// keeps taking bytes is waited for.
async fn flush_live(
    io: &mut Transport,
    conn: &mut Connection,
    idle: Duration,
) -> Result<(), Error> {
    loop {
        let before = io.write_buffer().len();
        match tokio::time::timeout(idle, flush(io, conn)).await {
            Ok(r) => return r,
            Err(_) if io.write_buffer().len() != before => {}
            Err(_) => return Err(Error::Connection(ConnectionError::PeerTimeout(idle))),
        }
    }
}

/// The `Hello`/`Welcome` exchange. `proven`: with a key, the node id the peer's identity
/// proved; a `Hello` or `Welcome` claiming another id is refused.
async fn handshake(
    io: &mut Transport,
    conn: &mut Connection,
    proven: Option<NodeId>,
) -> Result<Hello, Error> {
    handshake_inner(io, conn, proven)
        .await
        .map_err(|e| explain_handshake_error(e, proven.is_some()))
}

async fn handshake_inner(
    io: &mut Transport,
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
async fn check_claimed_id(io: &mut Transport, msg: &Message, proven: NodeId) -> Result<(), Error> {
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

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => futures::future::pending().await,
    }
}

// Each argument is one of the driver's channels or settings; a struct would only rename them.
#[allow(clippy::too_many_arguments)]
async fn drive(
    mut io: Transport,
    mut conn: Connection,
    mut rx: mpsc::Receiver<Command>,
    id: LinkId,
    events: EventSender,
    idle: Duration,
    closed: watch::Sender<Option<Option<String>>>,
    status: StatusSide,
) {
    let result = drive_inner(&mut io, &mut conn, &mut rx, id, &events, idle, status).await;
    let error = match result {
        Ok(()) => None,
        Err(e) => {
            // Whatever is queued (e.g. results) goes out if the socket still takes it.
            let _ =
                tokio::time::timeout(Duration::from_millis(200), flush(&mut io, &mut conn)).await;
            Some(e.to_string())
        }
    };
    match &error {
        None => debug!(link = id, "connection closed after goodbye"),
        Some(e) => {
            // A flood of connections that fail after their handshake (anyone can complete
            // one without a key) writes a few lines and a count, not one line each.
            static CLOSED: std::sync::Mutex<LogLimit> =
                std::sync::Mutex::new(LogLimit::new(gate::LOG_INTERVAL, gate::LOG_BURST));
            let let_through = CLOSED
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .hit(std::time::Instant::now());
            match let_through {
                Some(0) => warn!(link = id, error = %e, "connection closed"),
                Some(n) => warn!(
                    link = id,
                    error = %e,
                    "connection closed ({n} more connections closed with an error since the \
                     last such line, not logged one by one)"
                ),
                None => debug!(link = id, error = %e, "connection closed"),
            }
        }
    }
    // Close our write side so the peer sees EOF promptly.
    let _ = tokio::time::timeout(Duration::from_millis(200), io.get_mut().shutdown()).await;
    closed.send_replace(Some(error.clone()));
    let _ = events.send((id, LinkEvent::Closed { error })).await;
}

/// A driver's part in status requests: the owner's requests, and what answers the peer's.
type StatusSide = (
    mpsc::Receiver<oneshot::Sender<Box<StatusReport>>>,
    Option<StatusSource>,
);

async fn drive_inner(
    io: &mut Transport,
    conn: &mut Connection,
    rx: &mut mpsc::Receiver<Command>,
    id: LinkId,
    events: &EventSender,
    idle: Duration,
    (mut status_rx, source): StatusSide,
) -> Result<(), Error> {
    // Where the answer to our status request goes (dropped unanswered if the link closes).
    let mut asked: Option<oneshot::Sender<Box<StatusReport>>> = None;
    let mut status_open = true;
    let mut owner_gone = false;
    // Once every `Link` is dropped the command channel stays closed: stop polling it (it
    // would return `None` at once, forever) and let the goodbye run its course.
    let mut commands_open = true;
    // One timer for the connection's deadlines, moved only when the deadline changes.
    let sleep = tokio::time::sleep_until(far_future());
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        // Everything the last batch produced goes out in one write.
        flush_live(io, conn, idle).await?;
        let mut answered = false;
        while let Some(ev) = conn.poll_event() {
            let ev = match ev {
                Event::Established(_) | Event::Finished => continue,
                Event::Assigned(a) => LinkEvent::Assigned(a),
                Event::Started { seq } => LinkEvent::Started { seq },
                Event::Completed(c) => LinkEvent::Completed(c),
                Event::Cancelled { seq } => LinkEvent::Cancelled { seq },
                Event::PeerGoodbye => LinkEvent::PeerGoodbye,
                Event::Transfer(t) => LinkEvent::Transfer(t),
                Event::StatusRequested => {
                    let Some(source) = &source else {
                        return Err(crate::Violation::StatusNotServed.into());
                    };
                    conn.answer_status((source.0)())?;
                    answered = true;
                    continue;
                }
                Event::Status(report) => {
                    if let Some(reply) = asked.take() {
                        let _ = reply.send(report);
                    }
                    continue;
                }
            };
            if !owner_gone && deliver(events, id, ev).await.is_err() {
                owner_gone = true;
            }
        }
        if answered {
            // The answer was queued after this round's flush: send it now.
            continue;
        }
        if conn.is_finished() {
            return Ok(());
        }
        if owner_gone {
            // Nobody listens for results any more: leave without goodbye.
            return Err(Error::OwnerGone);
        }
        let deadline = conn.poll_timeout().map(Instant::from_std);
        if deadline != armed {
            sleep.as_mut().reset(deadline.unwrap_or_else(far_future));
            armed = deadline;
        }
        tokio::select! {
            frame = io.next() => {
                let t = now();
                match frame {
                    Some(Ok(msg)) => conn.handle_message(msg, t)?,
                    Some(Err(e)) => return Err(e),
                    None => conn.handle_eof()?,
                }
                // Take every frame already read before writing anything back.
                let mut n = 1;
                while n < BATCH && !io.read_buffer().is_empty() && conn.is_open() {
                    match io.next().now_or_never() {
                        Some(Some(Ok(msg))) => conn.handle_message(msg, t)?,
                        Some(Some(Err(e))) => return Err(e),
                        Some(None) => conn.handle_eof()?,
                        None => break,
                    }
                    n += 1;
                }
            }
            cmd = rx.recv(), if commands_open => {
                let mut cmd = cmd;
                let mut n = 0;
                loop {
                    if cmd.is_none() {
                        commands_open = false;
                    }
                    if let Some(failed) = command(conn, cmd)? {
                        if deliver(events, id, failed).await.is_err() {
                            owner_gone = true;
                        }
                    }
                    n += 1;
                    if n >= BATCH || !commands_open {
                        break;
                    }
                    // Every command already queued joins this batch.
                    match rx.try_recv() {
                        Ok(c) => cmd = Some(c),
                        Err(_) => break,
                    }
                }
            }
            req = status_rx.recv(), if status_open => match req {
                Some(reply) if conn.request_status().is_ok() => asked = Some(reply),
                // Not open, or a request unanswered: the caller gets no answer.
                Some(_) => {}
                None => status_open = false,
            },
            () = &mut sleep, if armed.is_some() => {
                armed = None;
                conn.handle_timeout(now())?;
            }
        }
    }
}

/// A deadline that never comes, for a timer with nothing to wait for.
fn far_future() -> Instant {
    Instant::now() + Duration::from_secs(365 * 24 * 3600)
}

/// Sends an event to the owner: without waiting when the queue has room (the usual case),
/// else waiting for room. An error means the owner is gone.
async fn deliver(events: &EventSender, id: LinkId, ev: LinkEvent) -> Result<(), ()> {
    match events.try_send((id, ev)) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(item)) => events.send(item).await.map_err(|_| ()),
        Err(mpsc::error::TrySendError::Closed(_)) => Err(()),
    }
}

/// Applies one command of the owner (`None`: every `Link` is gone, which says goodbye).
/// Returns the event to report when an assignment could not be sent; an error closes the
/// connection.
fn command(conn: &mut Connection, cmd: Option<Command>) -> Result<Option<LinkEvent>, Error> {
    match cmd {
        Some(Command::Assign(a)) => {
            if let Err((assign, why)) = conn.try_assign(a) {
                return Ok(Some(LinkEvent::AssignFailed {
                    assign,
                    reason: format!("cannot assign: {why}"),
                }));
            }
        }
        Some(Command::Started(seq)) => conn.started(seq),
        Some(Command::Complete(c)) => {
            if let Err(e) = conn.complete(c) {
                debug!(error = %e, "result not sent");
            }
        }
        Some(Command::Cancel(seq)) => {
            let _ = conn.cancel(seq);
        }
        Some(Command::Goodbye) | None => conn.goodbye(),
        Some(Command::Abort) => {
            return Err(Error::Aborted);
        }
        Some(Command::Transfer(t)) => {
            if let Err(e) = conn.transfer(*t) {
                debug!(error = %e, "transfer message not sent");
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use crate::secure::SecureCodec;
    use crate::PROTOCOL_VERSION;
    use bytes::BytesMut;
    use tokio::io::AsyncReadExt;
    use tokio::net::TcpListener;
    use tokio_util::codec::{Decoder, Encoder};

    fn hello_as(types: &[&str], node_id: NodeId) -> Hello {
        Hello {
            version: PROTOCOL_VERSION,
            cluster: "default".into(),
            node_id,
            types: types.iter().map(|t| t.to_string()).collect(),
            capacity: 2,
        }
    }

    /// A node's `Hello` and settings: a fresh identity, and `key` if given.
    fn node(types: &[&str], key: Option<&ClusterKey>) -> (Hello, Settings) {
        let identity = Identity::generate();
        let settings = Settings {
            key: key.cloned(),
            identity: Some(identity.clone()),
            conn: conn::Config {
                handshake_timeout: Duration::from_secs(10),
                ..Default::default()
            },
            ..Settings::default()
        };
        (hello_as(types, identity.node_id()), settings)
    }

    /// The next event that is not a link's `Opened`.
    async fn recv(rx: &mut mpsc::Receiver<(LinkId, LinkEvent)>) -> Option<(LinkId, LinkEvent)> {
        loop {
            match rx.recv().await {
                Some((_, LinkEvent::Opened(_))) => continue,
                other => return other,
            }
        }
    }

    /// A status request is answered at once (not with the next heartbeat: here there is
    /// none for an hour), twice on one link, with or without a key; a node that does not
    /// answer status requests closes the link, which the asker gets as `NoStatus`.
    #[tokio::test]
    async fn status_requests_are_answered_at_once() {
        let key = ClusterKey::generate();
        for (key, answers) in [(None, true), (Some(&key), true), (None, false)] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let quiet = conn::Config {
                heartbeat_interval: Duration::from_secs(3600),
                idle_timeout: Duration::from_secs(7200),
                ..Default::default()
            };
            let (ah, mut s) = node(&["a"], key);
            s.conn = quiet.clone();
            if answers {
                s.status = Some(StatusSource(std::sync::Arc::new(|| StatusReport {
                    version: "9.9".into(),
                    completed: 7,
                    ..StatusReport::default()
                })));
            }
            let (atx, _arx) = mpsc::channel(16);
            let acceptor = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                accept(stream, ah, &s, 1, atx).await
            });
            let (dh, mut s) = node(&[], key);
            s.conn = quiet;
            let (dtx, _drx) = mpsc::channel(16);
            let dialled = connect(addr, dh, &s, 2, dtx).await.unwrap();
            let _accepted = acceptor.await.unwrap().unwrap();
            let limit = Duration::from_secs(30);
            if answers {
                for _ in 0..2 {
                    let r = dialled.request_status(limit).await.unwrap();
                    assert_eq!((r.version.as_str(), r.completed), ("9.9", 7));
                }
            } else {
                let err = dialled.request_status(limit).await.unwrap_err();
                assert!(matches!(err, Error::NoStatus), "{err}");
            }
        }
    }

    /// A link's first event is `Opened`, its last `Closed`, and `on_closed` says how it
    /// ended.
    #[tokio::test]
    async fn a_link_opens_first_and_says_how_it_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ah, s) = node(&["a"], None);
        let (atx, mut arx) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, atx).await
        });
        let (dh, s) = node(&[], None);
        let (dtx, mut drx) = mpsc::channel(16);
        let dialled = connect(addr, dh, &s, 2, dtx).await.unwrap();
        let accepted = acceptor.await.unwrap().unwrap();
        let first = drx.recv().await;
        assert!(
            matches!(&first, Some((2, LinkEvent::Opened(l))) if l.peer().types == vec!["a".to_string()]),
            "{first:?}"
        );
        assert!(matches!(arx.recv().await, Some((1, LinkEvent::Opened(_)))));
        let closed = dialled.on_closed();
        dialled.send(Command::Goodbye).unwrap();
        let bound = Duration::from_secs(20);
        assert_eq!(
            tokio::time::timeout(bound, closed.wait()).await.unwrap(),
            None
        );
        let last = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
        assert!(
            matches!(last, Some((2, LinkEvent::Closed { error: None }))),
            "{last:?}"
        );
        drop(accepted);
    }

    /// Connects a dialler with `dial_key` to an acceptor with `accept_key` on loopback and
    /// returns both results.
    async fn connect_pair(
        dial_key: Option<&ClusterKey>,
        accept_key: Option<&ClusterKey>,
    ) -> (Result<Link, Error>, Result<Link, Error>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (accept_hello, accept_settings) = node(&["a"], accept_key);
        let (tx, _rx_a) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, accept_hello, &accept_settings, 1, tx).await
        });
        let (tx, _rx_d) = mpsc::channel(16);
        let (dial_hello, dial_settings) = node(&[], dial_key);
        let dialled = connect(addr, dial_hello, &dial_settings, 1, tx).await;
        let accepted = tokio::time::timeout(Duration::from_secs(20), acceptor)
            .await
            .expect("acceptor finishes")
            .unwrap();
        (dialled, accepted)
    }

    /// A worker with a deep window answers every task it holds at once: its link queue is
    /// sized for its own capacity too (it was sized for the peer's only, so results past the
    /// 65th were dropped and their tasks hung).
    #[tokio::test]
    async fn a_deep_window_of_tasks_is_assigned_and_answered_in_bursts() {
        const N: u64 = 300;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (mut ah, s) = node(&["a"], None);
        ah.capacity = N as u32;
        let (atx, mut arx) = mpsc::channel(1024);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, atx).await
        });
        let (dh, ds) = node(&[], None);
        let (dtx, mut drx) = mpsc::channel(1024);
        let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
        let a = acceptor.await.unwrap().unwrap();
        assert_eq!(d.peer().capacity, N as u32);
        for seq in 1..=N {
            d.send(Command::Assign(Assign {
                seq,
                task: format!("a{seq}"),
                kind: "a".into(),
                args: String::new(),
                attempt: 1,
                timeout_ms: 0,
            }))
            .unwrap();
        }
        let bound = Duration::from_secs(20);
        for _ in 0..N {
            let got = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
            assert!(matches!(got, Some((1, LinkEvent::Assigned(_)))), "{got:?}");
        }
        // Every result is queued in one go, with no chance for the driver to run between.
        for seq in 1..=N {
            a.send(Command::Complete(Completed {
                seq,
                ok: true,
                exit_code: Some(0),
                output: format!("Executing task: a{seq}"),
                error: None,
                duration_us: 1,
            }))
            .unwrap_or_else(|e| panic!("result {seq} refused: {e}"));
        }
        let mut seen = std::collections::HashSet::new();
        for _ in 0..N {
            match tokio::time::timeout(bound, recv(&mut drx)).await.unwrap() {
                Some((2, LinkEvent::Completed(c))) => assert!(seen.insert(c.seq)),
                other => panic!("expected a result, got {other:?}"),
            }
        }
        assert_eq!(seen.len(), N as usize);
    }

    #[tokio::test]
    async fn keyed_peers_connect_and_run_a_task_with_a_large_result() {
        let key = ClusterKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ah, s) = node(&["a"], Some(&key));
        let (dh, ds) = node(&[], Some(&key));
        let (a_id, d_id) = (ah.node_id, dh.node_id);
        let (atx, mut arx) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, atx).await
        });
        let (dtx, mut drx) = mpsc::channel(16);
        let d = connect(addr, dh, &ds, 2, dtx).await.unwrap();
        let a = acceptor.await.unwrap().unwrap();
        // Each side's id is the one its identity proved.
        assert_eq!(d.peer().node_id, a_id);
        assert_eq!(a.peer().node_id, d_id);
        assert_eq!(d.peer().types, vec!["a".to_string()]);
        assert!(a.peer().types.is_empty());
        let assign = Assign {
            seq: 1,
            task: "a1".into(),
            kind: "a".into(),
            args: String::new(),
            attempt: 1,
            timeout_ms: 0,
        };
        d.send(Command::Assign(assign.clone())).unwrap();
        let bound = Duration::from_secs(20);
        let got = tokio::time::timeout(bound, recv(&mut arx)).await.unwrap();
        assert!(matches!(got, Some((1, LinkEvent::Assigned(ref x))) if *x == assign));
        let output = "y".repeat(300_000);
        a.send(Command::Complete(Completed {
            seq: 1,
            ok: true,
            exit_code: Some(0),
            output: output.clone(),
            error: None,
            duration_us: 1,
        }))
        .unwrap();
        let got = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
        match got {
            Some((2, LinkEvent::Completed(c))) => assert_eq!(c.output, output),
            other => panic!("expected the result, got {other:?}"),
        }
        d.send(Command::Goodbye).unwrap();
        let closed = tokio::time::timeout(bound, recv(&mut drx)).await.unwrap();
        assert!(
            matches!(closed, Some((2, LinkEvent::Closed { error: None }))),
            "{closed:?}"
        );
    }

    #[tokio::test]
    async fn another_key_is_refused_on_both_sides() {
        let (d, a) =
            connect_pair(Some(&ClusterKey::generate()), Some(&ClusterKey::generate())).await;
        let d = d.unwrap_err();
        assert!(
            matches!(
                d.handshake(),
                Some(HandshakeError::PeerClosed {
                    stage: Stage::Secure {
                        dialled_with: Some(_)
                    }
                })
            ),
            "{d:?}"
        );
        assert!(d.is_permanent(), "{d:?}");
        let a = a.unwrap_err();
        assert!(
            matches!(a.handshake(), Some(HandshakeError::UnknownKey { .. })),
            "{a:?}"
        );
        assert!(a.is_permanent(), "{a:?}");
    }

    #[tokio::test]
    async fn a_dialler_without_a_key_is_dropped_and_told_it_has_none() {
        let (d, a) = connect_pair(None, Some(&ClusterKey::generate())).await;
        // The dialler learns where the peer closed and that it has no key (a CLI turns
        // that into its hint); closing during `Hello` is not permanent.
        let d = d.unwrap_err();
        assert!(
            matches!(
                d.handshake(),
                Some(HandshakeError::PeerClosed {
                    stage: Stage::Hello { keyed: false }
                })
            ),
            "{d:?}"
        );
        assert!(!d.is_permanent());
        let a = a.unwrap_err();
        assert!(
            matches!(a.handshake(), Some(HandshakeError::Plaintext)),
            "{a:?}"
        );
    }

    #[tokio::test]
    async fn a_keyed_dialler_to_a_node_without_a_key_fails_at_once() {
        let (d, a) = connect_pair(Some(&ClusterKey::generate()), None).await;
        let d = d.unwrap_err();
        assert!(d.is_permanent(), "{d:?}");
        let a = a.unwrap_err();
        assert!(
            matches!(a.handshake(), Some(HandshakeError::PeerHasKey)),
            "{a:?}"
        );
    }

    /// Runs the secure handshake by hand as `role` with `identity`, then sends `first` (a
    /// `Hello` or `Welcome`) and returns what the other side answers (or `None` at EOF).
    async fn forge(
        stream: &mut TcpStream,
        role: Role,
        key: &ClusterKey,
        identity: &Identity,
        first: Option<Message>,
    ) -> (SecureCodec, Option<Message>) {
        let mut codec =
            secure::handshake(stream, role, std::slice::from_ref(key), identity, 1 << 20)
                .await
                .unwrap();
        let mut buf = BytesMut::new();
        if let Some(m) = first {
            codec.encode(&m, &mut buf).unwrap();
            stream.write_all(&buf).await.unwrap();
        }
        let mut src = BytesMut::new();
        let got = tokio::time::timeout(Duration::from_secs(10), async {
            loop {
                if let Some(m) = codec.decode(&mut src).unwrap() {
                    return Some(m);
                }
                if stream.read_buf(&mut src).await.unwrap_or(0) == 0 {
                    return None;
                }
            }
        })
        .await
        .expect("an answer or EOF in time");
        (codec, got)
    }

    #[tokio::test]
    async fn a_forged_hello_id_is_refused_by_the_acceptor() {
        let key = ClusterKey::generate();
        let (mallory, victim) = (Identity::generate(), Identity::generate());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ah, s) = node(&["a"], Some(&key));
        let (tx, _rx) = mpsc::channel(16);
        let acceptor = tokio::spawn(async move {
            let (stream, _) = listener.accept().await.unwrap();
            accept(stream, ah, &s, 1, tx).await
        });
        // Mallory holds the cluster key and her own identity, and claims the victim's id.
        let mut stream = TcpStream::connect(addr).await.unwrap();
        let forged = Message::Hello(hello_as(&[], victim.node_id()));
        let (_codec, answer) =
            forge(&mut stream, Role::Initiator, &key, &mallory, Some(forged)).await;
        match answer {
            Some(Message::Reject(r)) => {
                assert_eq!(r.reason, RejectReason::Key);
                assert!(r.message.contains(&victim.node_id().to_string()), "{r:?}");
            }
            other => panic!("expected a Reject, got {other:?}"),
        }
        let err = acceptor.await.unwrap().unwrap_err();
        match &err {
            Error::Handshake(HandshakeError::IdMismatch { claimed, proven }) => {
                assert_eq!(*claimed, victim.node_id());
                assert_eq!(*proven, mallory.node_id());
            }
            other => panic!("expected IdMismatch, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn a_forged_welcome_id_is_refused_by_the_dialler() {
        let key = ClusterKey::generate();
        let mallory = Identity::generate();
        let victim = Identity::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let k = key.clone();
        let victim_id = victim.node_id();
        let fake = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            // Reads the dialler's Hello, answers a Welcome claiming the victim's id.
            let (mut codec, hello) = forge(&mut stream, Role::Acceptor, &k, &mallory, None).await;
            assert!(matches!(hello, Some(Message::Hello(_))), "{hello:?}");
            let mut buf = BytesMut::new();
            codec
                .encode(&Message::Welcome(hello_as(&["a"], victim_id)), &mut buf)
                .unwrap();
            let _ = stream.write_all(&buf).await;
            // Hold the connection until the dialler gives up.
            let mut sink = [0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut sink)).await;
        });
        let (dh, ds) = node(&[], Some(&key));
        let (tx, _rx) = mpsc::channel(16);
        let err = connect(addr, dh, &ds, 1, tx).await.unwrap_err();
        assert!(
            matches!(err, Error::Handshake(HandshakeError::IdMismatch { claimed, .. }) if claimed == victim_id),
            "{err:?}"
        );
        fake.await.unwrap();
    }

    #[tokio::test]
    async fn a_keyed_connection_needs_a_matching_identity() {
        let key = ClusterKey::generate();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (h, mut s) = node(&[], Some(&key));
        s.identity = None;
        let (tx, _rx) = mpsc::channel(16);
        let err = connect(addr, h.clone(), &s, 1, tx.clone())
            .await
            .unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidState {
                    action: "start a keyed connection",
                    ..
                }
            ),
            "{err:?}"
        );
        s.identity = Some(Identity::generate());
        let err = connect(addr, h, &s, 1, tx).await.unwrap_err();
        assert!(
            matches!(
                err,
                Error::InvalidState {
                    action: "start a keyed connection",
                    ..
                }
            ),
            "{err:?}"
        );
        drop(listener);
    }

    #[tokio::test]
    async fn accept_keys_let_a_rotating_node_accept_old_and_new() {
        let (old, new) = (ClusterKey::generate(), ClusterKey::generate());
        for dial in [&old, &new] {
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (ah, mut s) = node(&["a"], Some(&new));
            s.accept_keys = vec![old.clone()];
            let (tx, _rx_a) = mpsc::channel(16);
            let acceptor = tokio::spawn(async move {
                let (stream, _) = listener.accept().await.unwrap();
                accept(stream, ah, &s, 1, tx).await
            });
            let (dh, ds) = node(&[], Some(dial));
            let (tx, _rx_d) = mpsc::channel(16);
            let d = connect(addr, dh, &ds, 1, tx).await;
            assert!(d.is_ok(), "{d:?}");
            assert!(acceptor.await.unwrap().is_ok());
        }
    }
}
