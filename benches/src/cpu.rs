//! CPU time of processes and of the machine, from `/proc` (Linux). The kernel counts in
//! USER_HZ ticks, which Linux fixes at 100 per second for these files. Shared by the
//! bench binaries (`#[path]`-included, as the crate has no library target).
#![allow(dead_code)]

/// CPU seconds of one process: its own threads, and the children it has reaped.
#[derive(Debug, Default, Clone, Copy)]
pub struct CpuTimes {
    pub own: f64,
    pub children: f64,
}

impl CpuTimes {
    /// utime+stime and cutime+cstime of `pid`.
    pub fn read(pid: u32) -> Option<CpuTimes> {
        let (_, fields) = stat(pid)?;
        Some(CpuTimes {
            own: (fields.first()? + fields.get(1)?) / 100.0,
            children: (fields.get(2)? + fields.get(3)?) / 100.0,
        })
    }

    pub fn since(self, before: CpuTimes) -> CpuTimes {
        CpuTimes {
            own: self.own - before.own,
            children: self.children - before.children,
        }
    }
}

/// The command name of `pid` and its utime, stime, cutime, cstime in ticks.
fn stat(pid: u32) -> Option<(String, Vec<f64>)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) state ppid …": the name may hold spaces and parentheses, so the
    // fields start after the last ')'; utime is the 12th after it.
    let (head, rest) = stat.rsplit_once(')')?;
    let comm = head.split_once('(')?.1.to_owned();
    let fields = rest
        .split_whitespace()
        .skip(11)
        .take(4)
        .map(|f| f.parse().ok())
        .collect::<Option<Vec<f64>>>()?;
    (fields.len() == 4).then_some((comm, fields))
}

/// Own CPU seconds of the processes named `name` (all of them, as `postgres` backends
/// come and go).
pub fn named(name: &str) -> f64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0.0;
    };
    dir.flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(stat)
        .filter(|(comm, _)| comm == name)
        .map(|(_, f)| (f[0] + f[1]) / 100.0)
        .sum()
}

/// Own CPU seconds of the processes in `pids`.
pub fn of(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|&pid| CpuTimes::read(pid))
        .map(|t| t.own)
        .sum()
}

/// CPU seconds the whole machine has been busy (all CPUs, `/proc/stat`).
pub fn machine_busy() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let ticks: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: all but idle and iowait.
    let idle = ticks.get(3).copied().unwrap_or(0.0) + ticks.get(4).copied().unwrap_or(0.0);
    (ticks.iter().take(8).sum::<f64>() - idle) / 100.0
}
