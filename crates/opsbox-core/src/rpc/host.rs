//! Host introspection functions, with the fields of py-jrpc's example server (its wire
//! reference §5, decision D6): read with sysinfo and procfs, no shell spawned, no root
//! needed. Every function but `ping` answers the envelope `{"output": X, "error": E}`:
//! `E` is `""` on success, otherwise the reason, with `X` the empty value of its type.
//!
//! `check_process` matches a case-insensitive **literal** substring (never a pattern,
//! never a shell) against the line `user pid %cpu %mem start args`, as the old
//! `ps … | grep -i` did. `get_env` is admin-only and redacts secret-looking variables
//! unless asked to reveal them.

use std::collections::HashMap;
use std::sync::Mutex;

use chrono::{Local, TimeZone};
use opsbox_api::{Role, RpcSource, RpcType};
use procfs::{Current, CurrentSI};
use serde_json::{json, Value};

use super::{Function, Rpc};

fn envelope(result: Result<Value, String>, empty: Value) -> Value {
    match result {
        Ok(output) => json!({"output": output, "error": ""}),
        Err(error) => json!({"output": empty, "error": error}),
    }
}

fn host(f: fn() -> Result<Value, String>, empty: fn() -> Value, doc: &str) -> Function {
    Function::blocking(move |()| Ok(envelope(f(), empty())))
        .doc(doc)
        .role(Role::Reader)
        .source(RpcSource::Host)
}

pub(super) fn register(rpc: &Rpc) {
    let text = || json!("");
    let list = || json!([]);
    let object = || json!({});
    rpc.register(
        "uptime",
        host(
            uptime,
            text,
            ":return: {'output': the uptime line, 'error': ''}",
        ),
    );
    rpc.register(
        "mount",
        host(
            mount,
            list,
            ":return: {'output': [{device, mountpoint, fstype, opts}], 'error': ''}",
        ),
    );
    rpc.register(
        "disk_usage",
        host(
            disk_usage,
            list,
            ":return: {'output': [{mountpoint: {total, used, free, percent}}], 'error': ''}",
        ),
    );
    rpc.register(
        "iostat",
        host(
            iostat,
            list,
            ":return: {'output': [{disk: {read_count, write_count, read_bytes, write_bytes, read_time, write_time}}], 'error': ''}",
        ),
    );
    rpc.register(
        "ifconfig",
        host(
            ifconfig,
            list,
            ":return: {'output': [{nic: {bytes_sent, bytes_recv, packets_sent, packets_recv, errin, errout, dropin, dropout}}], 'error': ''}",
        ),
    );
    rpc.register(
        "cpuinfo",
        host(
            cpuinfo,
            object,
            ":return: {'output': {no_of_cpu, cpu_percent, percent_per_cpu, cputimes}, 'error': ''}",
        ),
    );
    rpc.register(
        "meminfo",
        host(
            meminfo,
            object,
            ":return: {'output': {memory: {...}, swap: {...}}, 'error': ''}",
        ),
    );
    rpc.register(
        "running_process",
        host(
            running_process,
            list,
            ":return: {'output': ['COMMAND', one command line per process], 'error': ''}",
        ),
    );
    rpc.register(
        "check_process",
        Function::blocking(|(process,): (String,)| {
            Ok(envelope(check_process(&process), json!([])))
        })
        .doc(
            ":param process: text to look for (case-insensitive, literal)\n\
             :return: {'output': [{user, pid, pcpu, pmem, starttime, args, threadcount}], 'error': ''}",
        )
        .param("process", RpcType::String)
        .role(Role::Reader)
        .source(RpcSource::Host),
    );
    rpc.register(
        "get_env",
        Function::blocking(|(reveal,): (bool,)| {
            Ok(envelope(Ok(json!(get_env(reveal))), json!("")))
        })
        .doc(
            ":param reveal: show the values of secret-looking variables (default false)\n\
                 :return: {'output': the server's environment as a Python dict repr, 'error': ''}",
        )
        .param_default("reveal", RpcType::Boolean, false)
        .role(Role::Admin)
        .source(RpcSource::Host),
    );
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn round1(x: f64) -> f64 {
    (x * 10.0).round() / 10.0
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        round1(part as f64 * 100.0 / whole as f64)
    }
}

/// The line of the `uptime` command (procps format), trailing newline included.
pub fn uptime() -> Result<Value, String> {
    let up = procfs::Uptime::current().map_err(err)?.uptime as u64;
    let load = procfs::LoadAverage::current().map_err(err)?;
    let users = logged_in_users();
    let (days, hours, minutes) = (up / 86_400, (up % 86_400) / 3600, (up % 3600) / 60);
    let mut line = format!(" {} up ", Local::now().format("%H:%M:%S"));
    if days > 0 {
        line.push_str(&format!("{days} day{}, ", if days == 1 { "" } else { "s" }));
    }
    if hours > 0 {
        line.push_str(&format!("{hours:2}:{minutes:02}, "));
    } else {
        line.push_str(&format!("{minutes} min, "));
    }
    line.push_str(&format!(
        "{users:2} user{},  load average: {:.2}, {:.2}, {:.2}\n",
        if users == 1 { "" } else { "s" },
        load.one,
        load.five,
        load.fifteen
    ));
    Ok(json!(line))
}

/// Distinct login sessions owning a terminal, as a stand-in for utmp's user count.
fn logged_in_users() -> usize {
    let mut ttys = std::collections::HashSet::new();
    if let Ok(all) = procfs::process::all_processes() {
        for p in all.flatten() {
            if let Ok(stat) = p.stat() {
                if stat.tty_nr != 0 && stat.session == stat.pid {
                    ttys.insert(stat.tty_nr);
                }
            }
        }
    }
    ttys.len()
}

/// Physical file systems, as psutil's `disk_partitions()` lists them.
fn partitions() -> Vec<(String, String, String)> {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    disks
        .list()
        .iter()
        .map(|d| {
            (
                d.name().to_string_lossy().into_owned(),
                d.mount_point().display().to_string(),
                d.file_system().to_string_lossy().into_owned(),
            )
        })
        .collect()
}

pub fn mount() -> Result<Value, String> {
    let options: HashMap<String, String> = procfs::mounts()
        .map_err(err)?
        .into_iter()
        .map(|m| {
            let mut opts: Vec<String> = m
                .fs_mntops
                .iter()
                .map(|(k, v)| match v {
                    Some(v) => format!("{k}={v}"),
                    None => k.clone(),
                })
                .collect();
            // rw/ro first, as the kernel writes them; the rest in a stable order.
            opts.sort_by_key(|o| (o != "rw" && o != "ro", o.clone()));
            (m.fs_file, opts.join(","))
        })
        .collect();
    Ok(Value::Array(
        partitions()
            .into_iter()
            .map(|(device, mountpoint, fstype)| {
                let opts = options.get(&mountpoint).cloned().unwrap_or_default();
                json!({"device": device, "mountpoint": mountpoint, "fstype": fstype, "opts": opts})
            })
            .collect(),
    ))
}

pub fn disk_usage() -> Result<Value, String> {
    let disks = sysinfo::Disks::new_with_refreshed_list();
    Ok(Value::Array(
        disks
            .list()
            .iter()
            .map(|d| {
                let total = d.total_space();
                let free = d.available_space();
                let used = total.saturating_sub(free);
                json!({ d.mount_point().display().to_string(): {
                    "total": total, "used": used, "free": free, "percent": percent(used, total),
                }})
            })
            .collect(),
    ))
}

pub fn iostat() -> Result<Value, String> {
    Ok(Value::Array(
        procfs::diskstats()
            .map_err(err)?
            .into_iter()
            .map(|d| {
                json!({ d.name: {
                    "read_count": d.reads, "write_count": d.writes,
                    "read_bytes": d.sectors_read * 512, "write_bytes": d.sectors_written * 512,
                    "read_time": d.time_reading, "write_time": d.time_writing,
                }})
            })
            .collect(),
    ))
}

pub fn ifconfig() -> Result<Value, String> {
    let mut nics: Vec<_> = procfs::net::dev_status()
        .map_err(err)?
        .into_values()
        .collect();
    nics.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(Value::Array(
        nics.into_iter()
            .map(|n| {
                json!({ n.name: {
                    "bytes_sent": n.sent_bytes, "bytes_recv": n.recv_bytes,
                    "packets_sent": n.sent_packets, "packets_recv": n.recv_packets,
                    "errin": n.recv_errs, "errout": n.sent_errs,
                    "dropin": n.recv_drop, "dropout": n.sent_drop,
                }})
            })
            .collect(),
    ))
}

/// The sampler whose previous refresh the CPU percentages are measured from (psutil's
/// interval-less mode: usage since the previous call).
static CPU: Mutex<Option<sysinfo::System>> = Mutex::new(None);

pub fn cpuinfo() -> Result<Value, String> {
    let mut guard = CPU.lock().unwrap_or_else(|e| e.into_inner());
    let system = guard.get_or_insert_with(|| {
        let mut s = sysinfo::System::new();
        s.refresh_cpu_usage();
        std::thread::sleep(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL);
        s
    });
    system.refresh_cpu_usage();
    let per_cpu: Vec<f64> = system
        .cpus()
        .iter()
        .map(|c| round1(c.cpu_usage() as f64))
        .collect();
    let total = round1(system.global_cpu_usage() as f64);
    let times = procfs::KernelStats::current().map_err(err)?.total;
    let tick = procfs::ticks_per_second() as f64;
    let secs = |t: u64| (t as f64 / tick * 100.0).round() / 100.0;
    Ok(json!({
        "no_of_cpu": per_cpu.len(),
        "cpu_percent": total,
        "percent_per_cpu": per_cpu,
        "cputimes": {
            "user": secs(times.user), "nice": secs(times.nice), "system": secs(times.system),
            "idle": secs(times.idle), "iowait": secs(times.iowait.unwrap_or(0)),
            "irq": secs(times.irq.unwrap_or(0)), "softirq": secs(times.softirq.unwrap_or(0)),
        },
    }))
}

pub fn meminfo() -> Result<Value, String> {
    let m = procfs::Meminfo::current().map_err(err)?;
    let available = m.mem_available.unwrap_or(m.mem_free + m.buffers + m.cached);
    let used = m
        .mem_total
        .saturating_sub(m.mem_free + m.buffers + m.cached);
    let vm = procfs::vmstat().map_err(err)?;
    let page = procfs::page_size();
    let pages = |k: &str| vm.get(k).copied().unwrap_or(0).max(0) as u64 * page;
    let swap_used = m.swap_total.saturating_sub(m.swap_free);
    Ok(json!({
        "memory": {
            "total": m.mem_total, "available": available,
            "percent": percent(m.mem_total.saturating_sub(available), m.mem_total),
            "used": used, "free": m.mem_free, "active": m.active, "inactive": m.inactive,
            "buffers": m.buffers, "cached": m.cached,
        },
        "swap": {
            "total": m.swap_total, "used": swap_used, "free": m.swap_free,
            "percent": percent(swap_used, m.swap_total),
            "sin": pages("pswpin"), "sout": pages("pswpout"),
        },
    }))
}

/// A process's command line as ps shows it: arguments joined by spaces, `[comm]` for
/// kernel threads, with secrets redacted (see [`redact_args`]).
fn command_line(p: &procfs::process::Process, comm: &str) -> String {
    let args = p.cmdline().unwrap_or_default();
    if args.is_empty() {
        format!("[{comm}]")
    } else {
        redact_args(args).join(" ")
    }
}

/// Hides what command lines carry that a reader must not see (an agent's `--token`, a
/// `postgres://user:password@` URL, `PASSWORD=...`): the value after a flag with a
/// secret's name, in `--flag=value`, in `NAME=value`, opsbox tokens anywhere, and the
/// password of URLs. Before matching too, so `check_process` cannot probe a secret.
pub fn redact_args(args: Vec<String>) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for arg in args {
        if std::mem::take(&mut hide_next) {
            out.push(REDACTED.to_owned());
            continue;
        }
        if let Some((name, _)) = arg.split_once('=') {
            if is_secret(name.trim_start_matches('-')) {
                out.push(format!("{name}={REDACTED}"));
                continue;
            }
        }
        if arg.starts_with('-') && !arg.contains('=') && is_secret(arg.trim_start_matches('-')) {
            hide_next = true;
            out.push(arg);
            continue;
        }
        if arg.contains(crate::identities::TOKEN_PREFIX) {
            out.push(REDACTED.to_owned());
            continue;
        }
        out.push(redact_url_password(&arg));
    }
    out
}

/// `scheme://user:password@host...` with the password hidden.
fn redact_url_password(arg: &str) -> String {
    let Some(scheme_end) = arg.find("://") else {
        return arg.to_owned();
    };
    let rest = &arg[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let authority = &rest[..authority_end];
    match (authority.rfind('@'), authority.find(':')) {
        (Some(at), Some(colon)) if colon < at => format!(
            "{}{}:{REDACTED}{}",
            &arg[..scheme_end + 3],
            &authority[..colon],
            &rest[at..]
        ),
        _ => arg.to_owned(),
    }
}

fn processes() -> Result<Vec<(procfs::process::Process, procfs::process::Stat)>, String> {
    let mut out: Vec<_> = procfs::process::all_processes()
        .map_err(err)?
        .flatten()
        .filter_map(|p| p.stat().ok().map(|s| (p, s)))
        .collect();
    out.sort_by_key(|(_, s)| s.pid);
    Ok(out)
}

pub fn running_process() -> Result<Value, String> {
    let mut lines = vec![Value::from("COMMAND")];
    for (p, stat) in processes()? {
        lines.push(command_line(&p, &stat.comm).into());
    }
    Ok(Value::Array(lines))
}

/// uid → user name, from /etc/passwd (the number when there is no entry).
fn user_names() -> HashMap<u32, String> {
    std::fs::read_to_string("/etc/passwd")
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut fields = l.split(':');
            let name = fields.next()?;
            let uid = fields.nth(1)?.parse().ok()?;
            Some((uid, name.to_owned()))
        })
        .collect()
}

pub fn check_process(needle: &str) -> Result<Value, String> {
    let needle = needle.to_lowercase();
    let users = user_names();
    let tick = procfs::ticks_per_second() as f64;
    let boot = procfs::boot_time_secs().map_err(err)?;
    let up = procfs::Uptime::current().map_err(err)?.uptime;
    let total_mem = procfs::Meminfo::current().map_err(err)?.mem_total.max(1);
    let page = procfs::page_size();
    let mut found = Vec::new();
    for (p, stat) in processes()? {
        let uid = p.uid().unwrap_or(0);
        let user = users.get(&uid).cloned().unwrap_or_else(|| uid.to_string());
        let started = stat.starttime as f64 / tick;
        let elapsed = (up - started).max(0.0);
        let cpu = if elapsed > 0.0 {
            (stat.utime + stat.stime) as f64 / tick / elapsed * 100.0
        } else {
            0.0
        };
        let mem = (stat.rss * page) as f64 * 100.0 / total_mem as f64;
        let start = Local
            .timestamp_opt(boot as i64 + started as i64, 0)
            .single()
            .map(|t| t.format("%a %b %-d %H:%M:%S %Y").to_string())
            .unwrap_or_default();
        let args = command_line(&p, &stat.comm)
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        let (pid, pcpu, pmem) = (
            stat.pid.to_string(),
            format!("{cpu:.1}"),
            format!("{mem:.1}"),
        );
        let line = format!("{user} {pid} {pcpu} {pmem} {start} {args}");
        if !line.to_lowercase().contains(&needle) {
            continue;
        }
        found.push(json!({
            "user": user, "pid": pid, "pcpu": pcpu, "pmem": pmem,
            "starttime": start, "args": args, "threadcount": stat.num_threads.to_string(),
        }));
    }
    Ok(Value::Array(found))
}

/// Names whose values are hidden unless revealed.
fn is_secret(name: &str) -> bool {
    let upper = name.to_ascii_uppercase();
    [
        "TOKEN",
        "SECRET",
        "PASSWORD",
        "PASSWD",
        "PASS",
        "KEY",
        "CREDENTIAL",
        "AUTH",
        "PRIVATE",
        "COOKIE",
        "SESSION",
        "DSN",
        "DATABASE_URL",
    ]
    .iter()
    .any(|s| upper.contains(s))
}

/// The text of a value redacted by `get_env`.
pub const REDACTED: &str = "<redacted>";

/// The environment as Python's `repr(os.environ)`-like dict text, sorted by name.
pub fn get_env(reveal: bool) -> String {
    let mut vars: Vec<(String, String)> = std::env::vars_os()
        .map(|(k, v)| {
            (
                k.to_string_lossy().into_owned(),
                v.to_string_lossy().into_owned(),
            )
        })
        .collect();
    vars.sort();
    let items: Vec<String> = vars
        .into_iter()
        .map(|(k, v)| {
            let v = if !reveal && is_secret(&k) {
                REDACTED.to_owned()
            } else {
                v
            };
            format!("{}: {}", py_repr(&k), py_repr(&v))
        })
        .collect();
    format!("{{{}}}", items.join(", "))
}

/// Python 3's `repr` of a str.
pub fn py_repr(s: &str) -> String {
    let quote = if s.contains('\'') && !s.contains('"') {
        '"'
    } else {
        '\''
    };
    let mut out = String::with_capacity(s.len() + 2);
    out.push(quote);
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if c == quote => {
                out.push('\\');
                out.push(c);
            }
            c if (c as u32) < 0x20 || c as u32 == 0x7f => {
                out.push_str(&format!("\\x{:02x}", c as u32))
            }
            c => out.push(c),
        }
    }
    out.push(quote);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repr_like_python() {
        assert_eq!(py_repr("a'b"), "\"a'b\"");
        assert_eq!(py_repr("a\"b'"), "'a\"b\\''");
        assert_eq!(py_repr("x\ny"), "'x\\ny'");
    }

    #[test]
    fn command_lines_lose_their_secrets() {
        let args = |s: &str| s.split(' ').map(str::to_owned).collect::<Vec<_>>();
        let shown = redact_args(args(
            "opsbox agent --token obx_ab12_cd34 --node-id web1 --password=hunter2 \
             DB_PASSWORD=x --store postgres://ops:s3cret@db:5432/ops http://host/a:b@c",
        ))
        .join(" ");
        assert_eq!(
            shown,
            "opsbox agent --token <redacted> --node-id web1 --password=<redacted> \
             DB_PASSWORD=<redacted> --store postgres://ops:<redacted>@db:5432/ops \
             http://host/a:b@c"
        );
        assert_eq!(redact_args(args("x obx_1_2")), args("x <redacted>"));
    }

    #[test]
    fn check_process_is_literal() {
        // A pattern or shell text matches nothing rather than everything.
        assert_eq!(check_process(".*; echo pwned").unwrap(), json!([]));
        let me = std::process::id().to_string();
        let found = check_process("").unwrap();
        assert!(found
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p["pid"] == me.as_str()));
    }
}
