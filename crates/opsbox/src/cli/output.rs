//! How the CLI prints: aligned tables and `key: value` blocks for people, JSON for
//! programs, times in local time as RFC 3339, and a job's end as an exit status.

use std::io::Write;

use chrono::{DateTime, Local, SecondsFormat, Utc};
use opsbox_api::{Job, JobState, OutputMode};
use serde::Serialize;

/// Prints a value as pretty JSON on stdout.
pub fn json<T: Serialize>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// Prints a value as one line of JSON on stdout and flushes, for live streams.
pub fn json_line<T: Serialize>(value: &T) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(value)?)?;
    out.flush()?;
    Ok(())
}

/// Columns padded to their widest cell, two spaces apart; the last one is not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(width) = widths.get_mut(i) {
                *width = (*width).max(cell.chars().count());
            }
        }
    }
    let headers: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let mut text = String::new();
    for row in std::iter::once(&headers).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count());
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            }
        }
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// `key: value` lines with the values aligned.
pub fn fields(pairs: &[(&str, String)]) -> String {
    let width = pairs.iter().map(|(k, _)| k.len() + 1).max().unwrap_or(0);
    let mut text = String::new();
    for (key, value) in pairs {
        let line = format!("{:width$}  {value}", format!("{key}:"));
        text.push_str(line.trim_end());
        text.push('\n');
    }
    text
}

/// A time in the local zone, to the second: `2024-05-01T14:03:12+02:00`.
pub fn time(at: DateTime<Utc>) -> String {
    at.with_timezone(&Local)
        .to_rfc3339_opts(SecondsFormat::Secs, false)
}

pub fn opt_time(at: Option<DateTime<Utc>>) -> String {
    at.map(time).unwrap_or_else(|| "-".into())
}

/// How long a job ran (so far, while it runs): `0.42s`, `12.0s`, `3m05s`, `2h01m`.
pub fn run_time(job: &Job) -> String {
    let Some(started) = job.started_at else {
        return "-".into();
    };
    let end = job.finished_at.unwrap_or_else(Utc::now);
    let millis = (end - started).num_milliseconds().max(0);
    duration_millis(millis)
}

fn duration_millis(millis: i64) -> String {
    let seconds = millis / 1000;
    if seconds < 10 {
        format!("{}.{:02}s", seconds, (millis % 1000) / 10)
    } else if seconds < 60 {
        format!("{}.{}s", seconds, (millis % 1000) / 100)
    } else if seconds < 3600 {
        format!("{}m{:02}s", seconds / 60, seconds % 60)
    } else {
        format!("{}h{:02}m", seconds / 3600, (seconds % 3600) / 60)
    }
}

/// The exit status the CLI gives for a finished job: the script's own exit code, or 1
/// when it failed without one (killed, timed out, lost) or with one that does not fit.
pub fn job_exit_status(job: &Job) -> u8 {
    if job.state == JobState::Succeeded {
        return 0;
    }
    match job.exit_code.and_then(|code| u8::try_from(code).ok()) {
        Some(code) if code != 0 => code,
        _ => 1,
    }
}

/// Why a job did not succeed, in words: the server's reason, or what the record says.
pub fn failure_reason(job: &Job) -> String {
    if let Some(reason) = &job.reason {
        return reason.clone();
    }
    match (job.exit_code, job.signal) {
        (_, Some(signal)) => format!("ended by signal {signal}"),
        (Some(code), None) => format!("exit code {code}"),
        (None, None) => "no exit code".into(),
    }
}

/// The closing line of a run, for stderr: `echo@…: succeeded, exit code 0, 0.05s`.
pub fn summary(job: &Job) -> String {
    let mut text = format!("{}: {}", job.name, job.state);
    match job.state {
        JobState::Succeeded => {
            if let Some(code) = job.exit_code {
                text.push_str(&format!(", exit code {code}"));
            }
        }
        JobState::Queued | JobState::Running => {}
        _ => text.push_str(&format!(": {}", failure_reason(job))),
    }
    if job.started_at.is_some() {
        text.push_str(&format!(", {}", run_time(job)));
    }
    text
}

/// How a script's output is captured, in words.
pub fn output_mode(mode: OutputMode) -> &'static str {
    match mode {
        OutputMode::Split => "split (stdout and stderr apart)",
        OutputMode::Combined => "combined (stderr merged into stdout)",
    }
}

/// Joins a list for one cell or field; `-` when empty.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(", ")
    }
}

/// `k=v, k=v`; `-` when empty.
pub fn map(map: &std::collections::BTreeMap<String, String>) -> String {
    if map.is_empty() {
        "-".into()
    } else {
        map.iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// A size in bytes for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn size(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_align_on_the_widest_cell() {
        let text = table(
            &["NAME", "STATE"],
            &[
                vec!["a".into(), "running".into()],
                vec!["longer-name".into(), "ok".into()],
            ],
        );
        assert_eq!(
            text,
            "NAME         STATE\na            running\nlonger-name  ok\n"
        );
    }

    #[test]
    fn durations_read_naturally() {
        assert_eq!(duration_millis(420), "0.42s");
        assert_eq!(duration_millis(12_345), "12.3s");
        assert_eq!(duration_millis(185_000), "3m05s");
        assert_eq!(duration_millis(7_260_000), "2h01m");
    }

    #[test]
    fn sizes_read_naturally() {
        assert_eq!(size(10), "10 B");
        assert_eq!(size(1536), "1.5 KiB");
        assert_eq!(size(5 * 1024 * 1024), "5.0 MiB");
    }
}
