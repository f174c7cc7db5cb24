//! The standard `process_*` metrics (as the Prometheus client libraries
//! name them), read from Linux's /proc at each scrape; elsewhere none.

use prometheus_client::encoding::DescriptorEncoder;

use super::{counter_f64, gauge};

/// Clock ticks per second in /proc/PID/stat: fixed at 100 by the kernel's
/// ABI (USER_HZ), as Prometheus's own procfs library assumes.
const USER_HZ: f64 = 100.0;

/// What /proc says about this process.
#[derive(Debug, Default, PartialEq)]
struct Process {
    cpu_seconds: f64,
    resident_bytes: i64,
    open_fds: i64,
    max_fds: i64,
    start_time_seconds: i64,
}

/// Writes the process metrics; nothing when /proc cannot be read.
pub(super) fn encode(e: &mut DescriptorEncoder) -> std::fmt::Result {
    let Some(p) = read() else { return Ok(()) };
    counter_f64(e, "process_cpu_seconds", "User and system CPU time spent, in seconds", p.cpu_seconds)?;
    gauge(e, "process_resident_memory_bytes", "Resident memory size, in bytes", &[("", "", p.resident_bytes)])?;
    gauge(e, "process_open_fds", "Open file descriptors", &[("", "", p.open_fds)])?;
    gauge(e, "process_max_fds", "The limit on open file descriptors", &[("", "", p.max_fds)])?;
    gauge(
        e,
        "process_start_time_seconds",
        "Start time of the process since the Unix epoch, in seconds",
        &[("", "", p.start_time_seconds)],
    )
}

fn read() -> Option<Process> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let boot = std::fs::read_to_string("/proc/stat").ok()?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as i64;
    parse(&stat, &status, &limits, &boot, open_fds)
}

fn parse(stat: &str, status: &str, limits: &str, boot: &str, open_fds: i64) -> Option<Process> {
    // Fields after the command name, which is in parentheses and may hold spaces.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // utime, stime and starttime are fields 14, 15 and 22 of proc(5); `fields` starts at field 3.
    let ticks = |i: usize| fields.get(i - 3).and_then(|f| f.parse::<f64>().ok());
    let kib = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?.trim().trim_end_matches("kB").trim();
    let max_fds = limits.lines().find_map(|l| l.strip_prefix("Max open files"))?.split_whitespace().next()?;
    let btime: i64 = boot.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    Some(Process {
        cpu_seconds: (ticks(14)? + ticks(15)?) / USER_HZ,
        resident_bytes: kib.parse::<i64>().ok()? * 1024,
        open_fds,
        max_fds: max_fds.parse().unwrap_or(i64::MAX),
        start_time_seconds: btime + (ticks(22)? / USER_HZ) as i64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_files_are_read_as_procfs_does() {
        let stat = "4242 (prov cache) S 1 4242 4242 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 9 0 12345 0 0";
        let status = "Name:\tprovcache\nVmRSS:\t   2048 kB\n";
        let limits = "Limit                     Soft Limit           Hard Limit           Units\n\
                      Max open files            1024                 4096                 files\n";
        let p = parse(stat, status, limits, "cpu  1 2 3\nbtime 1700000000\n", 7).unwrap();
        assert_eq!(
            p,
            Process {
                cpu_seconds: 3.0,
                resident_bytes: 2 << 20,
                open_fds: 7,
                max_fds: 1024,
                start_time_seconds: 1_700_000_123
            }
        );
        assert!(read().is_some(), "this process's own /proc");
    }
}
