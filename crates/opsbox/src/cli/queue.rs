//! `opsbox queue …`: the message queues through the native API. `--node` (or
//! `OPSBOX_NODE`) names the node you act as: the sender of a push, the queue a pull,
//! ack, list or purge works on.

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context as _;
use base64::Engine;
use chrono::{DateTime, Utc};
use clap::{Args, Subcommand};
use opsbox_api::{Message, NewMessage, PayloadKind, PullRequest, QueueStats};
use serde_json::Value;

use super::{output, Ctx};

#[derive(Args, Debug)]
pub struct QueueArgs {
    /// The node you act as
    #[arg(long, global = true, env = "OPSBOX_NODE", value_name = "ID")]
    node: Option<String>,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(Subcommand, Debug)]
enum QueueCommand {
    /// Push a message into DEST's queue. The payload is PAYLOAD, or standard input
    /// with --stdin, or a file's bytes with --file; JSON objects and arrays are sent as
    /// JSON, anything else as text, unless --text, --json or --binary says otherwise.
    Push {
        /// The destination node.
        dest: String,
        /// The payload.
        payload: Option<String>,
        /// Read the payload from standard input.
        #[arg(long, conflicts_with_all = ["payload", "file"])]
        stdin: bool,
        /// Send this file's bytes (binary).
        #[arg(long, conflicts_with = "payload", value_name = "FILE")]
        file: Option<PathBuf>,
        /// Send the payload as JSON.
        #[arg(long, conflicts_with_all = ["text", "binary"])]
        json: bool,
        /// Send the payload as text.
        #[arg(long, conflicts_with = "binary")]
        text: bool,
        /// Send the payload as bytes.
        #[arg(long)]
        binary: bool,
        /// The payload type (a MIME type, `.bin`...).
        #[arg(long = "type", value_name = "TYPE")]
        payload_type: Option<String>,
        /// Deliver not before this time (RFC 3339, e.g. 2026-11-23T19:00:00Z).
        #[arg(long, value_name = "TIME")]
        at: Option<DateTime<Utc>>,
        /// Dead-letter after this many pulls without an ack (pull with --lease).
        #[arg(long, value_name = "N")]
        max_tries: Option<u32>,
    },
    /// Pull (claim) your node's oldest deliverable messages.
    Pull {
        /// Most messages to take.
        #[arg(long, default_value_t = 1)]
        max: u32,
        /// Seconds to wait for a message when none is waiting.
        #[arg(long, value_name = "SECS")]
        wait: Option<f64>,
        /// Deliver again after this many seconds unless acked.
        #[arg(long, value_name = "SECS")]
        lease: Option<f64>,
        /// Ack what was pulled at once.
        #[arg(long)]
        ack: bool,
    },
    /// Ack messages your node pulled: they are never delivered again.
    Ack {
        /// Message ids.
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Show one message.
    Get {
        /// Message id.
        id: String,
    },
    /// List the messages your node sent or received, oldest first.
    List {
        /// Only these statuses (comma-separated: pending, scheduled, processing,
        /// processed, dead).
        #[arg(long)]
        status: Option<String>,
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Delete a message you sent that is not yet delivered, or with --all every
    /// message of your node's queue (--status narrows).
    Delete {
        /// Message id.
        #[arg(required_unless_present = "all")]
        id: Option<String>,
        #[arg(long, conflicts_with = "id")]
        all: bool,
        #[arg(long, requires = "all")]
        status: Option<String>,
    },
    /// Counts per queue (only your node's with --node).
    Stats,
}

fn node(args_node: &Option<String>) -> anyhow::Result<String> {
    args_node
        .clone()
        .context("say which node you act as: --node ID (or OPSBOX_NODE)")
}

/// The payload of a message as one line of text: JSON, text, or base64.
fn payload_text(message: &Message) -> String {
    match &message.payload {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    }
}

fn print_messages(ctx: &Ctx, messages: &[Message]) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(&messages);
    }
    let rows: Vec<Vec<String>> = messages
        .iter()
        .map(|m| {
            vec![
                m.id.clone(),
                m.status.to_string(),
                m.source.clone(),
                m.destination.clone(),
                m.tries.to_string(),
                m.payload_type.clone(),
                payload_text(m),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &["ID", "STATUS", "FROM", "TO", "TRIES", "TYPE", "PAYLOAD"],
            &rows
        )
    );
    Ok(())
}

fn print_message(ctx: &Ctx, m: &Message) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(m);
    }
    let mut pairs = vec![
        ("id", m.id.clone()),
        ("status", m.status.to_string()),
        ("from", m.source.clone()),
        ("to", m.destination.clone()),
        ("tries", m.tries.to_string()),
        ("kind", m.kind.as_str().to_owned()),
        ("type", m.payload_type.clone()),
        ("created", output::time(m.created_at)),
    ];
    for (key, at) in [
        ("scheduled", m.scheduled_at),
        ("processing", m.processing_at),
        ("processed", m.processed_at),
        ("lease until", m.lease_until),
    ] {
        if let Some(at) = at {
            pairs.push((key, output::time(at)));
        }
    }
    pairs.push(("payload", payload_text(m)));
    print!("{}", output::fields(&pairs));
    Ok(())
}

fn print_stats(ctx: &Ctx, stats: &[QueueStats]) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(&stats);
    }
    let rows: Vec<Vec<String>> = stats
        .iter()
        .map(|s| {
            vec![
                s.node.clone(),
                s.pending.to_string(),
                s.scheduled.to_string(),
                s.processing.to_string(),
                s.processed.to_string(),
                s.dead.to_string(),
                output::opt_time(s.oldest_pending),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(
            &[
                "NODE",
                "PENDING",
                "SCHEDULED",
                "PROCESSING",
                "PROCESSED",
                "DEAD",
                "OLDEST PENDING"
            ],
            &rows
        )
    );
    Ok(())
}

pub async fn run(ctx: &Ctx, args: QueueArgs) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match args.command {
        QueueCommand::Push {
            dest,
            payload,
            stdin,
            file,
            json,
            text,
            binary,
            payload_type,
            at,
            max_tries,
        } => {
            let from = node(&args.node)?;
            let bytes = if let Some(file) = &file {
                std::fs::read(file).with_context(|| format!("cannot read {}", file.display()))?
            } else if stdin {
                let mut bytes = Vec::new();
                std::io::stdin().read_to_end(&mut bytes)?;
                bytes
            } else {
                payload
                    .context("give the payload, or --stdin, or --file FILE")?
                    .into_bytes()
            };
            let kind = if binary || (file.is_some() && !json && !text) {
                PayloadKind::Binary
            } else if json {
                PayloadKind::Json
            } else if text {
                PayloadKind::Text
            } else {
                match serde_json::from_slice::<Value>(&bytes) {
                    Ok(Value::Object(_) | Value::Array(_)) => PayloadKind::Json,
                    _ => PayloadKind::Text,
                }
            };
            let payload = match kind {
                PayloadKind::Json => {
                    serde_json::from_slice(&bytes).context("the payload is not valid JSON")?
                }
                PayloadKind::Text => Value::String(
                    String::from_utf8(bytes)
                        .context("a text payload must be UTF-8 (or --binary)")?,
                ),
                PayloadKind::Binary => {
                    Value::String(base64::engine::general_purpose::STANDARD.encode(&bytes))
                }
            };
            let message = NewMessage {
                kind: Some(kind),
                payload,
                payload_type,
                scheduled_at: at,
                max_tries,
            };
            let pushed = client.push(&dest, &from, vec![message]).await?;
            if ctx.json {
                output::json(&pushed[0])?;
            } else {
                println!(
                    "{} {} → {} ({})",
                    pushed[0].id, from, dest, pushed[0].status
                );
            }
        }
        QueueCommand::Pull {
            max,
            wait,
            lease,
            ack,
        } => {
            let me = node(&args.node)?;
            let request = PullRequest {
                max: Some(max),
                wait,
                lease,
            };
            let pulled = client.pull(&me, request).await?;
            if ack && !pulled.is_empty() {
                client
                    .ack(&me, pulled.iter().map(|m| m.id.clone()).collect())
                    .await?;
            }
            if pulled.is_empty() && !ctx.json {
                eprintln!("no message for {me}");
                return Ok(0);
            }
            print_messages(ctx, &pulled)?;
        }
        QueueCommand::Ack { ids } => {
            let me = node(&args.node)?;
            let answer = client.ack(&me, ids).await?;
            if ctx.json {
                output::json(&answer)?;
            } else {
                for m in &answer.acked {
                    println!("acked {}", m.id);
                }
                for id in &answer.missing {
                    eprintln!("not acked {id}: not a message {me} is processing");
                }
            }
            if !answer.missing.is_empty() {
                return Ok(super::EXIT_ERROR);
            }
        }
        QueueCommand::Get { id } => print_message(ctx, &client.message(&id).await?)?,
        QueueCommand::List { status, limit } => {
            let me = node(&args.node)?;
            let listed = client.queue_messages(&me, status.as_deref(), limit).await?;
            print_messages(ctx, &listed)?;
        }
        QueueCommand::Delete { id, all, status } => {
            let deleted = if all {
                let me = node(&args.node)?;
                client.purge_queue(&me, status.as_deref()).await?
            } else {
                let id = id.context("give a message id, or --all")?;
                client.delete_message(&id, args.node.as_deref()).await?
            };
            if ctx.json {
                output::json(&serde_json::json!({ "deleted": deleted }))?;
            } else {
                println!(
                    "deleted {deleted} message{}",
                    if deleted == 1 { "" } else { "s" }
                );
            }
        }
        QueueCommand::Stats => {
            let stats = match &args.node {
                Some(node) => vec![client.queue_stats(node).await?],
                None => client.queues().await?,
            };
            print_stats(ctx, &stats)?;
        }
    }
    Ok(0)
}
