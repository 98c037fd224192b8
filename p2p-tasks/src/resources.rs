//! What a node knows of its machine, for its load reports ([`p2p_core::LoadReport`]) and
//! `--capacity auto`: CPU cores, the load average (`/proc/loadavg`) and available memory
//! (`/proc/meminfo`). Where the system has no such files, the values are unknown (`None`),
//! and placement treats the machine as not saturated.

/// The machine's CPU cores (as the process may use them; 1 when unknown).
pub fn cores() -> u32 {
    std::thread::available_parallelism().map_or(1, |n| u32::try_from(n.get()).unwrap_or(u32::MAX))
}

/// The 1-minute load average in thousandths, from `/proc/loadavg`.
pub fn load_milli() -> Option<u32> {
    load_averages().map(|[one, _, _]| one)
}

/// The 1, 5 and 15 minute load averages in thousandths, from `/proc/loadavg` (`status`
/// shows all three).
pub fn load_averages() -> Option<[u32; 3]> {
    parse_loadavgs(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

/// The three load averages of `/proc/loadavg` (`0.52 0.58 0.59 1/467 12345`) in thousandths.
pub fn parse_loadavgs(text: &str) -> Option<[u32; 3]> {
    let mut it = text.split_whitespace().map(milli);
    Some([it.next()??, it.next()??, it.next()??])
}

fn milli(field: &str) -> Option<u32> {
    let v: f64 = field.parse().ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v * 1000.0).round().min(f64::from(u32::MAX)) as u32)
}

/// Memory available in KiB (`MemAvailable`), from `/proc/meminfo`.
pub fn mem_available_kib() -> Option<u64> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// The first field of `/proc/loadavg` (`0.52 0.58 0.59 1/467 12345`) in thousandths.
pub fn parse_loadavg(text: &str) -> Option<u32> {
    milli(text.split_whitespace().next()?)
}

/// `MemAvailable:  123456 kB` of `/proc/meminfo`, in KiB.
pub fn parse_meminfo(text: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
}

/// `--capacity auto`: the cores not busy with other work, at least 1. Other work is the
/// load average less the node's own `running` tasks (which count in the load); an unknown
/// load counts as none.
pub fn auto_capacity(cores: u32, load_milli: Option<u32>, running: u32) -> u32 {
    let cores = cores.max(1);
    let Some(load) = load_milli else {
        return cores;
    };
    let other = (f64::from(load) / 1000.0 - f64::from(running)).max(0.0);
    let free = (f64::from(cores) - other).round();
    (free.max(1.0) as u32).min(cores)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_parse() {
        assert_eq!(parse_loadavg("0.52 0.58 0.59 1/467 12345\n"), Some(520));
        assert_eq!(parse_loadavg("12.5 1 1 1/1 1"), Some(12_500));
        assert_eq!(parse_loadavg(""), None);
        assert_eq!(parse_loadavg("nan 1 1"), None);
        assert_eq!(parse_loadavg("-1 1 1"), None);
        let meminfo =
            "MemTotal:       16318024 kB\nMemFree:         1234 kB\nMemAvailable:    8123456 kB\n";
        assert_eq!(parse_meminfo(meminfo), Some(8_123_456));
        assert_eq!(parse_meminfo("MemTotal: 1 kB\n"), None);
    }

    #[test]
    fn auto_capacity_is_the_cores_other_work_leaves() {
        // An idle 4-core machine: 4.
        assert_eq!(auto_capacity(4, Some(100), 0), 4);
        // 2.0 of load from elsewhere: 2 left.
        assert_eq!(auto_capacity(4, Some(2000), 0), 2);
        // The node's own 3 running tasks are not other work.
        assert_eq!(auto_capacity(4, Some(3000), 3), 4);
        // Overloaded: still 1; unknown load: the cores.
        assert_eq!(auto_capacity(4, Some(9000), 0), 1);
        assert_eq!(auto_capacity(4, None, 0), 4);
        assert_eq!(auto_capacity(0, None, 0), 1);
    }

    #[test]
    fn this_machine_reports_something_sane() {
        assert!(cores() >= 1);
        if std::path::Path::new("/proc/loadavg").exists() {
            assert!(load_milli().is_some());
            assert!(mem_available_kib().is_some_and(|m| m > 0));
        }
    }
}
