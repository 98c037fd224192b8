//! A raw client of the real wire protocol, for tests that play a misbehaving peer.

use std::io::Read;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What reading from a raw connection gave.
#[derive(Debug)]
pub enum Received {
    /// A whole protocol message.
    Msg(p2p_core::Message),
    /// The peer closed the connection (read returned 0).
    Eof,
    /// The connection failed (reset, or a frame the codec refused).
    Error(String),
    /// Nothing arrived before the deadline.
    Timeout,
}

/// A raw TCP client speaking the real wire protocol (`p2p_core::codec::FrameCodec`), for
/// tests that play a misbehaving or hand-driven peer.
#[derive(Debug)]
pub struct WireClient {
    /// The socket.
    pub stream: std::net::TcpStream,
    codec: p2p_core::codec::FrameCodec,
    buf: bytes::BytesMut,
}

impl WireClient {
    /// Connects to `addr` (loopback only).
    pub fn connect(addr: SocketAddr) -> WireClient {
        assert!(
            addr.ip().is_loopback(),
            "test safety: {addr} is not loopback"
        );
        let stream = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connect to the node");
        stream
            .set_write_timeout(Some(Duration::from_secs(10)))
            .expect("set_write_timeout");
        WireClient {
            stream,
            codec: p2p_core::codec::FrameCodec::default(),
            buf: bytes::BytesMut::new(),
        }
    }

    /// Writes raw bytes.
    pub fn send_raw(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// Encodes and writes one message.
    pub fn send(&mut self, msg: &p2p_core::Message) -> std::io::Result<()> {
        use tokio_util::codec::Encoder;
        let mut out = bytes::BytesMut::new();
        self.codec.encode(msg, &mut out).expect("encode a message");
        self.send_raw(&out)
    }

    /// Reads until one message, EOF or an error arrives, at most `limit`.
    pub fn recv(&mut self, limit: Duration) -> Received {
        use tokio_util::codec::Decoder;
        let deadline = Instant::now() + limit;
        loop {
            match self.codec.decode(&mut self.buf) {
                Ok(Some(m)) => return Received::Msg(m),
                Ok(None) => {}
                Err(e) => return Received::Error(format!("undecodable frame: {e}")),
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Received::Timeout;
            }
            self.stream
                .set_read_timeout(Some(left.min(Duration::from_millis(250))))
                .expect("set_read_timeout");
            let mut chunk = [0u8; 4096];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Received::Eof,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Received::Error(e.to_string()),
            }
        }
    }

    /// Reads messages (answering `Ping`s) until one that `want` accepts, at most `limit`;
    /// returns it, or panics with what arrived instead.
    pub fn expect_msg(
        &mut self,
        limit: Duration,
        what: &str,
        want: impl Fn(&p2p_core::Message) -> bool,
    ) -> p2p_core::Message {
        let deadline = Instant::now() + limit;
        let mut seen = Vec::new();
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Received::Msg(m) if want(&m) => return m,
                Received::Msg(p2p_core::Message::Ping { nonce }) => {
                    seen.push(format!("Ping {nonce}"));
                    let _ = self.send(&p2p_core::Message::Pong { nonce });
                }
                Received::Msg(m) => seen.push(format!("{m:?}")),
                other => panic!("expected {what}; got {other:?} after {seen:?}"),
            }
        }
    }

    /// Reads (and discards messages) until the node closes the connection, at most `limit`.
    /// Returns how it ended (`Eof` or `Error`), or `Timeout` if the connection stayed open;
    /// `seen` collects the messages that arrived first.
    pub fn wait_closed(&mut self, limit: Duration, seen: &mut Vec<p2p_core::Message>) -> Received {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.recv(left) {
                Received::Msg(m) => seen.push(m),
                other => return other,
            }
        }
    }
}

/// A `Hello` as a coordinator (serving no type) would send it, in `cluster`.
pub fn hello(cluster: &str) -> p2p_core::Hello {
    p2p_core::testing::hello(cluster, &[], 1)
}

/// Encodes `m` and writes it to `stream` (a fake peer's send; a failed write is the test's
/// to notice by what follows).
pub fn send_frame(
    stream: &mut std::net::TcpStream,
    codec: &mut p2p_core::codec::FrameCodec,
    m: p2p_core::Message,
) {
    use tokio_util::codec::Encoder;
    let mut out = bytes::BytesMut::new();
    if codec.encode(&m, &mut out).is_ok() {
        let _ = std::io::Write::write_all(stream, &out);
    }
}

/// What a fake node did with a message ([`fake_node_answer`]).
#[derive(Debug)]
pub enum FakeNode {
    /// A `Hello` (answered with a `Welcome` serving `a`) or a `Ping` (answered).
    Answered,
    /// A `Goodbye`, answered: the connection is over.
    Goodbye,
    /// Any other message: the caller's.
    Other(p2p_core::Message),
}

/// A fake node serving `a`: answers the connection's own messages on `stream` (`Hello`,
/// `Ping`, `Goodbye`) and hands every other message back.
pub fn fake_node_answer(
    stream: &mut std::net::TcpStream,
    codec: &mut p2p_core::codec::FrameCodec,
    m: p2p_core::Message,
) -> FakeNode {
    use p2p_core::Message;
    match m {
        Message::Hello(_) => {
            let mut me = p2p_core::testing::hello("default", &["a"], 1);
            me.node_id = p2p_core::NodeId::random();
            send_frame(stream, codec, Message::Welcome(me));
            FakeNode::Answered
        }
        Message::Ping { nonce } => {
            send_frame(stream, codec, Message::Pong { nonce });
            FakeNode::Answered
        }
        Message::Goodbye => {
            send_frame(stream, codec, Message::GoodbyeAck);
            FakeNode::Goodbye
        }
        other => FakeNode::Other(other),
    }
}
