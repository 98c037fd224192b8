//! A loopback TCP proxy that can hold a connection still at an exact byte count.
//!
//! [`StallProxy`] forwards each connection on `127.0.0.1` to its upstream, both ways. The
//! proxies of one [`StallGate`] share one stall: the first client-to-upstream stream to pass
//! the gate's byte count claims it, stops there (forwarding no further byte of that stream)
//! and reports which proxy it was; every other stream of every proxy then passes untouched.
//! A test thereby knows for certain that the upstream it kills was in the middle of a large
//! transfer, however fast or slow the machine is. Every thread ends when its sockets close,
//! when the proxy is dropped, or after 120 s.

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Longest any proxy thread lives.
const LIFETIME: Duration = Duration::from_secs(120);

/// The one stall shared by a set of [`StallProxy`]s.
#[derive(Debug)]
pub struct StallGate {
    after: u64,
    stalled: Mutex<Option<usize>>,
    changed: Condvar,
}

impl StallGate {
    /// A gate that stops the first client-to-upstream stream to reach `after` bytes.
    pub fn new(after: u64) -> Arc<StallGate> {
        Arc::new(StallGate {
            after,
            stalled: Mutex::new(None),
            changed: Condvar::new(),
        })
    }

    /// Waits up to `wait` for a stream to stall; the number of its proxy.
    pub fn stalled_within(&self, wait: Duration) -> Option<usize> {
        let deadline = Instant::now() + wait;
        let mut g = self.stalled.lock().unwrap();
        while g.is_none() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return None;
            }
            g = self.changed.wait_timeout(g, left).unwrap().0;
        }
        *g
    }

    /// Claims the stall for proxy `id`: true if this call took it.
    fn claim(&self, id: usize) -> bool {
        let mut g = self.stalled.lock().unwrap();
        if g.is_some() {
            return false;
        }
        *g = Some(id);
        self.changed.notify_all();
        true
    }
}

/// Forwards loopback connections to one upstream (see the module docs).
pub struct StallProxy {
    /// The address to dial instead of the upstream.
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl StallProxy {
    /// Listens on a free loopback port; `id` is what the gate reports if this proxy stalls.
    pub fn start(upstream: SocketAddr, id: usize, gate: Arc<StallGate>) -> StallProxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let st = stop.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + LIFETIME;
            let mut conns = 0;
            while !st.load(Ordering::Relaxed) && Instant::now() < deadline && conns < 64 {
                let Ok((client, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(5));
                    continue;
                };
                conns += 1;
                client.set_nonblocking(false).unwrap();
                let Ok(server) = TcpStream::connect(upstream) else {
                    continue;
                };
                for s in [&client, &server] {
                    s.set_read_timeout(Some(Duration::from_millis(200)))
                        .unwrap();
                    s.set_nodelay(true).unwrap();
                }
                let (c2, s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
                let (gate, st1, st2) = (gate.clone(), st.clone(), st.clone());
                std::thread::spawn(move || pump(client, server, Some((id, &gate)), &st1));
                std::thread::spawn(move || pump(s2, c2, None, &st2));
            }
        });
        StallProxy { addr, stop }
    }
}

impl Drop for StallProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Copies `from` to `to` until either closes or 120 s have passed, then shuts `to` for
/// writing: one direction of a plain proxy.
pub fn forward(from: TcpStream, to: TcpStream) {
    pump(from, to, None, &AtomicBool::new(false));
}

/// Copies `from` to `to` until either closes, `stop` is set or the lifetime ends; with a
/// gate, it stalls at the gate's count if it is the first stream there.
fn pump(
    mut from: TcpStream,
    mut to: TcpStream,
    gate: Option<(usize, &StallGate)>,
    stop: &AtomicBool,
) {
    let deadline = Instant::now() + LIFETIME;
    let mut buf = [0u8; 64 * 1024];
    let mut passed = 0u64;
    let mut open = gate.is_none();
    while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
        let n = match from.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(_) => break,
        };
        let mut take = n;
        let mut stall = false;
        if let (false, Some((id, gate))) = (open, gate) {
            let room = gate.after.saturating_sub(passed);
            if (n as u64) >= room {
                if gate.claim(id) {
                    take = room as usize;
                    stall = true;
                } else {
                    open = true;
                }
            }
        }
        if to.write_all(&buf[..take]).is_err() {
            break;
        }
        passed += take as u64;
        if stall {
            // Hold the stream still (reading nothing more) until the test ends it.
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            return;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
