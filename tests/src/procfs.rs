//! What `/proc` says about processes and sockets.

/// Whether process `pid` is gone or a zombie (it has stopped running), from `/proc/PID/stat`.
pub fn process_ended(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state follows the command name in parentheses: `PID (comm) S ...`.
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state == "Z" || state == "X"),
    }
}

/// A TCP socket from `/proc/net/tcp` or `/proc/net/tcp6`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpEntry {
    /// Local port.
    pub local_port: u16,
    /// Remote port.
    pub remote_port: u16,
    /// Kernel state, as the two hex digits of the file (`01` ESTABLISHED, `08` CLOSE_WAIT...).
    pub state: String,
    /// The raw line.
    pub line: String,
}

/// Every TCP socket of this network namespace (IPv4 and IPv6).
pub fn tcp_table() -> Vec<TcpEntry> {
    let mut out = Vec::new();
    for f in ["/proc/net/tcp", "/proc/net/tcp6"] {
        let Ok(text) = std::fs::read_to_string(f) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let cols: Vec<&str> = line.split_whitespace().collect();
            if cols.len() < 4 {
                continue;
            }
            let port = |addr: &str| {
                addr.rsplit(':')
                    .next()
                    .and_then(|p| u16::from_str_radix(p, 16).ok())
            };
            let (Some(local_port), Some(remote_port)) = (port(cols[1]), port(cols[2])) else {
                continue;
            };
            out.push(TcpEntry {
                local_port,
                remote_port,
                state: cols[3].to_string(),
                line: line.trim().to_string(),
            });
        }
    }
    out
}

/// Sockets whose local or remote port is `port` and that are still open: ESTABLISHED (`01`)
/// or CLOSE_WAIT (`08`, the peer closed but this side did not).
pub fn open_tcp_on_port(port: u16) -> Vec<TcpEntry> {
    tcp_table()
        .into_iter()
        .filter(|e| e.local_port == port || e.remote_port == port)
        .filter(|e| e.state == "01" || e.state == "08")
        .collect()
}

/// The peak resident set of process `pid` in KiB (`VmHWM` of `/proc/PID/status`), if it
/// still runs.
pub fn peak_rss_kb(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
