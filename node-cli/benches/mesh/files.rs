//! The `files` section of the mesh bench (#18): files that travel with tasks, each figure
//! against a baseline measured in the same run.
//!
//! - One large input (`--file-mib N`, default 256; `--large` for 1 GiB) shipped to a node
//!   over loopback, against a raw TCP copy of the same bytes from the file into a file: the
//!   transfer's time as the node logs it (from the offer to the file checked and kept), and
//!   as a cold run (the node does not have the file) minus a warm one (it answers `Have`,
//!   nothing moves); with and without a cluster key; peak RSS of `run` and of `serve`.
//!   `--file-rounds N` rounds (default 5), each a raw copy followed by the two transfers,
//!   so that each transfer has a raw copy taken just before it: the ratio is taken within
//!   each round, and the median and range of the rounds' ratios are reported (the raw
//!   copy's own speed moved by 1.8x between runs on the development machine).
//! - 1,000 tasks sharing one 100 MB input over 3 nodes: how many times the input was
//!   received (from the nodes' logs), and the run's time, with inputs placed as copies and
//!   with `serve --link-inputs` (when the build under test has it).
//! - A 3-stage pipeline of 300 tasks passing 1 MB artifacts (`> o.bin`, `< @s1/o.bin`)
//!   against the same pipeline over a shared directory.

use super::*;

/// Fills `path` with `len` pseudo-random bytes (xorshift), in 1 MiB writes.
fn random_file(path: &Path, len: u64, seed: u64) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut x = seed | 1;
    let mut block = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        for w in block.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes());
        }
        let n = usize::try_from(left.min(block.len() as u64))?;
        f.write_all(&block[..n])?;
        left -= n as u64;
    }
    f.flush()?;
    Ok(())
}

/// A raw TCP copy of `src` into `dst` over loopback (a thread reads the socket into the
/// file): seconds from connecting to the last byte written.
fn raw_copy(src: &Path, dst: &Path) -> Result<f64> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let dst = dst.to_path_buf();
    let receiver = std::thread::spawn(move || -> Result<u64> {
        let (mut s, _) = listener.accept()?;
        s.set_read_timeout(Some(RUN_DEADLINE))?;
        let mut f = std::fs::File::create(&dst)?;
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            f.write_all(&buf[..n])?;
            total += n as u64;
        }
    });
    let started = Instant::now();
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_nodelay(true)?;
    let mut f = std::fs::File::open(src)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        s.write_all(&buf[..n])?;
    }
    drop(s);
    let got = receiver
        .join()
        .map_err(|_| anyhow!("the raw receiver panicked"))??;
    let took = started.elapsed().as_secs_f64();
    if got != std::fs::metadata(src)?.len() {
        bail!("raw copy: {got} bytes arrived");
    }
    Ok(took)
}

fn node(data: &Path, types: &str, handlers: &[&str], extra: &[&str]) -> Result<Server> {
    let data = data.display().to_string();
    let mut args = vec![
        "--types",
        types,
        "--listen",
        "127.0.0.1:0",
        "--discovery",
        "none",
        "--data-dir",
        data.as_str(),
    ];
    for h in handlers {
        args.extend(["--handler", h]);
    }
    args.extend_from_slice(extra);
    Ok(Server::start_env(&args, &[]))
}

fn run_on(
    o: &Opts,
    file: &Path,
    servers: &[Server],
    key: Option<&Path>,
    extra: &[&str],
    d: &Path,
) -> Result<RunResult> {
    let mut args: Vec<String> = vec!["run".into(), file.display().to_string()];
    for s in servers {
        args.push("--peer".into());
        args.push(s.peer());
    }
    args.extend(extra.iter().map(|a| a.to_string()));
    run_args(&o.bin, args, key, Output::Quiet, d)
}

/// With `--drop-caches`: writes dirty pages out and frees the page cache, then reads `big`
/// back in, so each timed copy allocates its pages from free memory. Without it, a copy's
/// page-cache allocation waits on reclaim when the cache fills the machine's memory, which
/// on the development machine moved one thread's cost of writing a GiB from 0.45 to 3.25 s
/// of CPU between runs, more than any difference between the builds.
fn level(o: &Opts, big: &Path) -> Result<()> {
    if !o.drop_caches {
        return Ok(());
    }
    let status = Command::new("sync").status().context("sync")?;
    if !status.success() {
        bail!("sync failed: {status}");
    }
    std::fs::write("/proc/sys/vm/drop_caches", "1")
        .context("--drop-caches: write /proc/sys/vm/drop_caches (needs root)")?;
    std::io::copy(&mut std::fs::File::open(big)?, &mut std::io::sink())?;
    Ok(())
}

fn mb_s(bytes: u64, secs: f64) -> String {
    format!("{:.0} MB/s", bytes as f64 / 1e6 / secs.max(1e-9))
}

fn mib(kb: u64) -> String {
    format!("{:.1} MiB", kb as f64 / 1024.0)
}

/// The seconds a node's log gives its only input transfer, from the offer to the file
/// checked and kept (`took_ms=` of its `input received` line, logged with `-v`).
fn node_took_s(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("input received"))?;
    let (_, rest) = line.split_once("took_ms=")?;
    let ms: f64 = rest.split_whitespace().next()?.parse().ok()?;
    Some(ms / 1e3)
}

/// The `files` section.
pub(super) fn files(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    let d = d.join("files");
    std::fs::create_dir_all(&d)?;
    large(o, &d, rep)?;
    shared(o, &d, rep)?;
    pipeline(o, &d, rep)?;
    Ok(())
}

/// The median of `v` (not empty), and its least and greatest value.
fn spread(v: &[f64]) -> (f64, f64, f64) {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    (median, v[0], v[n - 1])
}

/// A ratio's median with its range, `0.81x (0.62-0.97x over 5 rounds)`.
fn ratios(v: &[f64]) -> String {
    let (m, lo, hi) = spread(v);
    format!(
        "{m:.2}x raw copy ({lo:.2}-{hi:.2}x over {} rounds)",
        v.len()
    )
}

/// What one key mode of [`large`] measured, a value a round.
#[derive(Default)]
struct Transfers {
    /// The node's time, offer to file kept (s).
    kept: Vec<f64>,
    /// The raw copy's time over the node's, the same round.
    kept_ratio: Vec<f64>,
    /// The cold run's time minus the warm run's (s).
    moved: Vec<f64>,
    /// The raw copy's time over `moved`, the same round.
    moved_ratio: Vec<f64>,
    run_rss: u64,
    serve_rss: u64,
}

fn large(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    let len = o.file_mib * 1024 * 1024;
    let big = d.join("big.bin");
    random_file(&big, len, 0x9e37_79b9_7f4a_7c15)?;
    let key = d.join("cluster.key");
    let status = Command::new(&o.bin)
        .arg("keygen")
        .arg(&key)
        .stdout(Stdio::null())
        .status()
        .context("p2p-node keygen")?;
    if !status.success() {
        bail!("p2p-node keygen failed: {status}");
    }
    let tasks = d.join("large.txt");
    std::fs::write(&tasks, "a1 < big.bin\n")?;
    let modes = [(None, "without a key"), (Some(key.as_path()), "with a key")];
    let mut raw = Vec::new();
    let mut got: [Transfers; 2] = Default::default();
    for round in 0..o.file_rounds {
        level(o, &big)?;
        let r = raw_copy(&big, &d.join("raw.out"))?;
        std::fs::remove_file(d.join("raw.out"))?;
        raw.push(r);
        for (m, &(k, _)) in modes.iter().enumerate() {
            // Each on a node that does not have the file yet.
            let data = d.join(format!("node-{m}-{round}"));
            // `-v`: the node logs the time from the offer to the file checked and kept.
            let mut extra = vec!["--cache-size", "4GiB", "-v"];
            let kf = key.display().to_string();
            if k.is_some() {
                extra.extend(["--key-file", kf.as_str()]);
            }
            let s = node(&data, "a", &["a=true"], &extra)?;
            let results = d.join("large-results").display().to_string();
            let extra = ["--results", results.as_str()];
            level(o, &big)?;
            let cold = run_on(o, &tasks, std::slice::from_ref(&s), k, &extra, d)?;
            // Not levelled: the node's cached copy stays in the page cache, as after any
            // transfer, and the warm run places it from there.
            let warm = run_on(o, &tasks, std::slice::from_ref(&s), k, &extra, d)?;
            let _ = std::fs::remove_dir_all(&results);
            let t = &mut got[m];
            t.serve_rss = t.serve_rss.max(peak_rss_kb(s.pid()).unwrap_or(0));
            let took = node_took_s(&s.stderr.text())
                .ok_or_else(|| anyhow!("the node logged no `input received` line"))?;
            t.kept.push(took);
            t.kept_ratio.push(r / took);
            t.run_rss = t.run_rss.max(cold.peak_rss_kb);
            drop(s);
            let _ = std::fs::remove_dir_all(&data);
            let moved = (cold.wall.as_secs_f64() - warm.wall.as_secs_f64()).max(1e-6);
            t.moved.push(moved);
            t.moved_ratio.push(r / moved);
        }
    }
    let label = format!("{} MiB", o.file_mib);
    let (raw_median, raw_lo, raw_hi) = spread(&raw);
    rep.add(
        format!("files: raw TCP copy of {label}, file to file (median)"),
        mb_s(len, raw_median),
        format!(
            "{} to {} over the rounds",
            mb_s(len, raw_hi),
            mb_s(len, raw_lo)
        ),
    );
    for (t, &(_, what)) in got.iter().zip(&modes) {
        rep.add(
            format!("files: {label} input to a node, {what} (node: offer to file kept)"),
            mb_s(len, spread(&t.kept).0),
            ratios(&t.kept_ratio),
        );
        rep.add(
            format!("files: {label} input to a node, {what} (cold - warm run)"),
            mb_s(len, spread(&t.moved).0),
            ratios(&t.moved_ratio),
        );
        rep.add(
            format!("files: {label} input, {what}: peak RSS run / serve"),
            format!("{} / {}", mib(t.run_rss), mib(t.serve_rss)),
            "",
        );
    }
    std::fs::remove_file(&big)?;
    Ok(())
}

fn shared(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    let n = if o.tasks < 1_000_000 { 300 } else { 1000 };
    let input = d.join("shared.bin");
    random_file(&input, 100_000_000, 7)?;
    let mut text = String::new();
    for i in 1..=n {
        text.push_str(&format!("a{i} < shared.bin\n"));
    }
    let tasks = d.join("shared.txt");
    std::fs::write(&tasks, text)?;
    // An older build under test may not have `serve --link-inputs`.
    let help = Command::new(&o.bin).args(["serve", "--help"]).output()?;
    let links = String::from_utf8_lossy(&help.stdout).contains("--link-inputs");
    for link in [false, true] {
        if link && !links {
            continue;
        }
        let extra: &[&str] = if link {
            &["-v", "--link-inputs"]
        } else {
            &["-v"]
        };
        let servers: Vec<Server> = (0..3)
            .map(|i| node(&d.join(format!("shared-node{i}")), "a", &["a=true"], extra))
            .collect::<Result<_>>()?;
        // Results under the bench's directory, not ./results where the bench was started.
        let results = d.join("shared-results").display().to_string();
        let r = run_on(
            o,
            &tasks,
            &servers,
            None,
            &["--order", "none", "--results", &results],
            d,
        )?;
        let count = |what: &str| -> usize {
            servers
                .iter()
                .map(|s| s.stderr.text().matches(what).count())
                .sum()
        };
        let received = count("input offered: receiving it");
        let had = count("input offered: already here");
        let how = if link { ", --link-inputs" } else { "" };
        rep.add(
            format!("files: {n} tasks share a 100 MB input over 3 nodes{how}: received"),
            format!("{received} times"),
            format!("{had} offers answered Have; {:.1} s", r.wall.as_secs_f64()),
        );
        drop(servers);
        for i in 0..3 {
            let _ = std::fs::remove_dir_all(d.join(format!("shared-node{i}")));
        }
        let _ = std::fs::remove_dir_all(&results);
    }
    std::fs::remove_file(&input)?;
    Ok(())
}

fn pipeline(o: &Opts, d: &Path, rep: &mut Report) -> Result<()> {
    let chains = 100;
    // Over files that travel with the tasks.
    let mut text = String::new();
    for i in 1..=chains {
        text.push_str(&format!(
            "s{i} > o.bin\nt{i} < @s{i}/o.bin > p.bin\nu{i} < @t{i}/p.bin\n"
        ));
    }
    let moved = d.join("pipe-files.txt");
    std::fs::write(&moved, text)?;
    let handlers = [
        "s=head -c 1000000 /dev/urandom > o.bin",
        "t=cp o.bin p.bin",
        "u=wc -c < p.bin",
    ];
    let servers: Vec<Server> = (0..3)
        .map(|i| node(&d.join(format!("pipe-node{i}")), "s,t,u", &handlers, &[]))
        .collect::<Result<_>>()?;
    let results = d.join("pipe-results").display().to_string();
    let with_files = run_on(
        o,
        &moved,
        &servers,
        None,
        &["--order", "none", "--results", &results],
        d,
    )?;
    drop(servers);
    // Over a shared directory.
    let shared = d.join("pipe-shared");
    std::fs::create_dir_all(&shared)?;
    let sh = shared.display();
    let handlers = [
        format!("s=head -c 1000000 /dev/urandom > {sh}/s{{args}}.o"),
        format!("t=cp {sh}/s{{args}}.o {sh}/t{{args}}.p"),
        format!("u=wc -c < {sh}/t{{args}}.p"),
    ];
    let handlers: Vec<&str> = handlers.iter().map(String::as_str).collect();
    let mut text = String::new();
    for i in 1..=chains {
        text.push_str(&format!(
            "s{i} -- {i}\nt{i} after s{i} -- {i}\nu{i} after t{i} -- {i}\n"
        ));
    }
    let plain = d.join("pipe-shared.txt");
    std::fs::write(&plain, text)?;
    let servers: Vec<Server> = (0..3)
        .map(|i| {
            node(
                &d.join(format!("pipe-shared-node{i}")),
                "s,t,u",
                &handlers,
                &[],
            )
        })
        .collect::<Result<_>>()?;
    let over_dir = run_on(o, &plain, &servers, None, &["--order", "none"], d)?;
    drop(servers);
    let (a, b) = (with_files.wall.as_secs_f64(), over_dir.wall.as_secs_f64());
    rep.add(
        format!(
            "files: 3-stage pipeline, {} tasks, 1 MB artifacts shipped",
            chains * 3
        ),
        format!("{a:.2} s"),
        format!("{:.2}x the shared directory ({b:.2} s)", a / b),
    );
    Ok(())
}
