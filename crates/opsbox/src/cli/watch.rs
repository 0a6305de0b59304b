//! `opsbox watch [--since REV]`: the event log, live, one event per line.

use std::io::Write;

use clap::Args;
use futures::StreamExt;
use opsbox_api::Event;

use super::{output, Ctx};

#[derive(Args, Debug)]
pub struct WatchArgs {
    /// Start after this revision (default: from now on). A revision compacted away is
    /// an error that names the revision to re-list from.
    #[arg(long, value_name = "REV")]
    since: Option<u64>,
}

pub async fn run(ctx: &Ctx, args: WatchArgs) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    let mut events = client.watch(args.since);
    while let Some(event) = events.next().await {
        let event = event?;
        if ctx.json {
            output::json_line(&event)?;
        } else {
            let mut out = std::io::stdout().lock();
            writeln!(out, "{}", line(&event))?;
            out.flush()?;
        }
    }
    Ok(0)
}

/// `REV  TIME  KIND  SUBJECT  DETAIL`. A job's record shrinks to its state (and exit
/// code); other data shows as compact JSON, cut at a screen's width.
fn line(event: &Event) -> String {
    let mut text = format!(
        "{:>6}  {}  {:<16}  {}",
        event.rev,
        output::time(event.at),
        event.kind,
        event.subject
    );
    let detail = detail(&event.data);
    if !detail.is_empty() {
        text.push_str("  ");
        text.push_str(&detail);
    }
    text
}

fn detail(data: &serde_json::Value) -> String {
    const MAX: usize = 100;
    match data {
        serde_json::Value::Null => String::new(),
        serde_json::Value::Object(map) if map.is_empty() => String::new(),
        serde_json::Value::Object(map) if map.contains_key("state") => {
            let mut text = format!("state={}", plain(&map["state"]));
            if let Some(code) = map.get("exit_code").filter(|c| !c.is_null()) {
                text.push_str(&format!(" exit_code={code}"));
            }
            text
        }
        other => {
            let text = other.to_string();
            if text.chars().count() > MAX {
                let cut: String = text.chars().take(MAX - 1).collect();
                format!("{cut}…")
            } else {
                text
            }
        }
    }
}

/// A JSON value without quotes when it is a string.
fn plain(value: &serde_json::Value) -> String {
    match value {
        serde_json::Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_event_is_one_line_with_its_revision_first() {
        let event = Event {
            rev: 42,
            at: chrono::Utc::now(),
            kind: "job.finished".into(),
            subject: "echo@1:2:3".into(),
            data: serde_json::json!({"state": "succeeded", "exit_code": 0, "params": {}}),
        };
        let text = line(&event);
        assert!(text.starts_with("    42  "), "{text}");
        assert!(
            text.ends_with("echo@1:2:3  state=succeeded exit_code=0"),
            "{text}"
        );
    }

    #[test]
    fn other_data_is_compact_and_cut() {
        assert_eq!(detail(&serde_json::json!({})), "");
        assert_eq!(
            detail(&serde_json::json!({"scripts": 3})),
            r#"{"scripts":3}"#
        );
        let long = detail(&serde_json::json!({ "text": "x".repeat(500) }));
        assert_eq!(long.chars().count(), 100);
        assert!(long.ends_with('…'));
    }
}
