//! `opsbox jobs list | info | spec | log | wait | kill | clean | results`.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::time::Duration;

use clap::Subcommand;
use opsbox_api::{Job, JobState};
use opsbox_client::{Client, JobFilter};

use super::scripts::parse_param;
use super::{output, scripts, Ctx, EXIT_TIMEOUT};

#[derive(Subcommand, Debug)]
pub enum JobsCommand {
    /// List jobs, newest first.
    List {
        /// Only jobs in this state: queued, running, succeeded, failed, killed, lost.
        #[arg(long, value_parser = parse_state)]
        state: Option<JobState>,
        /// Only runs of this script.
        #[arg(long)]
        script: Option<String>,
        /// At most this many jobs.
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Show a job: state, times, exit code, return values, result files.
    Info {
        /// Job name (as printed by `scripts run --async` or `jobs list`).
        name: String,
    },
    /// Show what was asked for: script, file, parameters, limits.
    Spec {
        /// Job name (as printed by `scripts run --async` or `jobs list`).
        name: String,
    },
    /// Print a job's output (stdout to stdout, stderr to stderr).
    Log {
        /// Job name.
        name: String,
        /// Stream the output live until the job ends, then exit with its exit code.
        #[arg(long, short = 'f')]
        follow: bool,
    },
    /// Wait for a job to end; exits with its exit code, or 124 when --timeout passes.
    Wait {
        /// Job name.
        name: String,
        /// Give up after this many seconds (default: wait as long as it takes).
        #[arg(long, value_name = "SECONDS", value_parser = parse_seconds)]
        timeout: Option<Duration>,
    },
    /// Kill a queued or running job (its whole process group).
    Kill {
        /// Job name (as printed by `scripts run --async` or `jobs list`).
        name: String,
    },
    /// Delete a finished job with its output and result files.
    Clean {
        /// Job name (as printed by `scripts run --async` or `jobs list`).
        name: String,
    },
    /// Queue a fan-out job: the map script once per input (in $INPUT), on nodes with
    /// free slots, then the reduce script over their outputs ($OPSBOX_INPUTS_DIR).
    Submit {
        /// Script run once per input.
        #[arg(long, value_name = "SCRIPT")]
        map: String,
        /// An input (repeatable).
        #[arg(long = "input", value_name = "INPUT")]
        inputs: Vec<String>,
        /// A file with one input per line (`-`: standard input).
        #[arg(long, value_name = "FILE")]
        inputs_file: Option<PathBuf>,
        /// Script run once over the map outputs.
        #[arg(long, value_name = "SCRIPT")]
        reduce: Option<String>,
        /// A parameter of the scripts, as key=value (repeatable).
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Only nodes with all these labels (comma-separated).
        #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
        labels: Vec<String>,
        /// Only this node.
        #[arg(long)]
        node: Option<String>,
        /// Failed or lost task attempts the job survives (default: the server's, 3).
        #[arg(long, value_name = "N")]
        max_failures: Option<u32>,
        /// Wait for the end (with progress), exiting non-zero when it fails.
        #[arg(long)]
        wait: bool,
    },
    /// The tasks of a fan-out job: input, state, node, attempts.
    Tasks {
        /// Job name.
        name: String,
    },
    /// List a job's result files, or download one.
    Results {
        /// Job name.
        name: String,
        /// Download this result file (a path as listed).
        #[arg(long, value_name = "PATH")]
        download: Option<String>,
        /// Write the download to FILE instead of standard output.
        #[arg(long, short = 'o', value_name = "FILE", requires = "download")]
        output: Option<PathBuf>,
    },
}

/// `map 7/10 done, 2 running, 1 failed; reduce 0/1`, or "" for a plain run.
pub fn progress_text(job: &Job) -> String {
    job.progress
        .iter()
        .map(|p| {
            let mut text = format!("{} {}/{} done", p.phase, p.done, p.total);
            if p.running > 0 {
                text.push_str(&format!(", {} running", p.running));
            }
            if p.failed > 0 {
                text.push_str(&format!(", {} failed", p.failed));
            }
            text
        })
        .collect::<Vec<_>>()
        .join("; ")
}

fn parse_state(word: &str) -> Result<JobState, String> {
    JobState::parse(word).ok_or_else(|| {
        format!("'{word}' is not one of queued, running, succeeded, failed, killed, lost")
    })
}

fn parse_seconds(text: &str) -> Result<Duration, String> {
    let seconds: f64 = text
        .parse()
        .map_err(|_| format!("'{text}' is not a number of seconds"))?;
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("'{text}' is not a duration"))
}

pub async fn run(ctx: &Ctx, command: JobsCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        JobsCommand::List {
            state,
            script,
            limit,
        } => {
            let filter = JobFilter {
                state,
                script,
                limit,
            };
            list(ctx, &client, &filter).await
        }
        JobsCommand::Info { name } => {
            let job = client.job(&name).await?;
            if ctx.json {
                output::json(&job)?;
            } else {
                print!("{}", describe(&job));
            }
            Ok(0)
        }
        JobsCommand::Spec { name } => {
            let spec = client.spec(&name).await?;
            if ctx.json {
                output::json(&spec)?;
            } else {
                print!(
                    "{}",
                    output::fields(&[
                        ("name", spec.name.clone()),
                        ("script", spec.script.clone()),
                        ("file", spec.filename.clone()),
                        ("params", output::map(&spec.params)),
                        ("output", output::output_mode(spec.output).to_string()),
                        ("lock", if spec.lock { "yes" } else { "no" }.into()),
                        (
                            "timeout",
                            spec.timeout_secs
                                .map(|s| format!("{s}s"))
                                .unwrap_or_else(|| "none".into())
                        ),
                        (
                            "submitted by",
                            spec.submitted_by.clone().unwrap_or_else(|| "-".into())
                        ),
                        ("created", output::time(spec.created_at)),
                    ])
                );
            }
            Ok(0)
        }
        JobsCommand::Log { name, follow } => {
            if follow {
                return scripts::follow_job(ctx, &client, &name).await;
            }
            let log = client.log(&name).await?;
            if ctx.json {
                output::json(&log)?;
                return Ok(0);
            }
            {
                let mut out = std::io::stdout().lock();
                for line in &log.stdout {
                    writeln!(out, "{line}")?;
                }
                out.flush()?;
            }
            for line in &log.stderr {
                eprintln!("{line}");
            }
            Ok(0)
        }
        JobsCommand::Wait { name, timeout } => wait(ctx, &client, &name, timeout).await,
        JobsCommand::Submit {
            map,
            mut inputs,
            inputs_file,
            reduce,
            params,
            labels,
            node,
            max_failures,
            wait: and_wait,
        } => {
            if let Some(file) = inputs_file {
                let text = if file.as_os_str() == "-" {
                    std::io::read_to_string(std::io::stdin())?
                } else {
                    std::fs::read_to_string(&file)
                        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?
                };
                inputs.extend(text.lines().filter(|l| !l.is_empty()).map(str::to_owned));
            }
            if inputs.is_empty() {
                anyhow::bail!("give at least one --input (or --inputs-file)");
            }
            let request = opsbox_api::FanoutRequest {
                map,
                inputs,
                reduce,
                params: params.into_iter().collect(),
                labels,
                node,
                max_failures,
            };
            let job = client.submit(&request).await?;
            if and_wait {
                return wait(ctx, &client, &job.name, None).await;
            }
            if ctx.json {
                output::json(&job)?;
            } else {
                println!("{}", job.name);
            }
            Ok(0)
        }
        JobsCommand::Tasks { name } => {
            let tasks = client.tasks(&name).await?;
            if ctx.json {
                output::json(&tasks)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = tasks
                .iter()
                .map(|t| {
                    vec![
                        t.id.clone(),
                        t.state.as_str().into(),
                        t.node.clone().unwrap_or_default(),
                        t.attempts.to_string(),
                        t.input.clone().unwrap_or_default(),
                        t.reason.clone().unwrap_or_default(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(
                    &["TASK", "STATE", "NODE", "ATTEMPTS", "INPUT", "REASON"],
                    &rows
                )
            );
            Ok(0)
        }
        JobsCommand::Kill { name } => {
            let job = client.kill(&name).await?;
            if ctx.json {
                output::json(&job)?;
            } else {
                println!("{}: {}", job.name, job.state);
            }
            Ok(0)
        }
        JobsCommand::Clean { name } => {
            client.clean(&name).await?;
            if ctx.json {
                output::json(&serde_json::json!({ "cleaned": name }))?;
            } else {
                println!("cleaned {name}");
            }
            Ok(0)
        }
        JobsCommand::Results {
            name,
            download: Some(path),
            output: target,
        } => {
            let bytes = client.download_result(&name, &path).await?;
            match target {
                Some(file) if file.as_os_str() != "-" => {
                    std::fs::write(&file, &bytes)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", file.display()))?;
                    if !ctx.json {
                        eprintln!(
                            "wrote {} ({})",
                            file.display(),
                            output::size(bytes.len() as u64)
                        );
                    }
                }
                _ => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(&bytes)?;
                    out.flush()?;
                }
            }
            Ok(0)
        }
        JobsCommand::Results {
            name,
            download: None,
            ..
        } => {
            let results = client.results(&name).await?;
            if ctx.json {
                output::json(&results)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = results
                .files
                .iter()
                .map(|f| vec![f.path.clone(), f.size.to_string(), output::size(f.size)])
                .collect();
            print!("{}", output::table(&["PATH", "BYTES", "SIZE"], &rows));
            Ok(0)
        }
    }
}

async fn list(ctx: &Ctx, client: &Client, filter: &JobFilter) -> anyhow::Result<u8> {
    let jobs = client.jobs(filter).await?;
    if ctx.json {
        output::json(&jobs)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = jobs
        .iter()
        .map(|job| {
            vec![
                job.name.clone(),
                job.state.to_string(),
                job.exit_code
                    .map(|c| c.to_string())
                    .unwrap_or_else(|| "-".into()),
                output::time(job.created_at),
                output::run_time(job),
                job.node.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["NAME", "STATE", "EXIT", "CREATED", "RAN", "NODE"], &rows)
    );
    Ok(0)
}

fn describe(job: &Job) -> String {
    let mut pairs = vec![
        ("name", job.name.clone()),
        ("script", job.script.clone()),
        ("state", job.state.to_string()),
    ];
    if job.state.is_terminal() && job.state != JobState::Succeeded {
        pairs.push(("reason", output::failure_reason(job)));
    }
    if !job.progress.is_empty() {
        pairs.push(("progress", progress_text(job)));
        pairs.push(("inputs", job.inputs.len().to_string()));
        if let Some(reduce) = &job.reduce {
            pairs.push(("reduce", reduce.clone()));
        }
    }
    pairs.extend([
        (
            "exit code",
            job.exit_code
                .map(|c| c.to_string())
                .unwrap_or_else(|| "-".into()),
        ),
        ("params", output::map(&job.params)),
        ("node", job.node.clone().unwrap_or_else(|| "-".into())),
        (
            "submitted by",
            job.submitted_by.clone().unwrap_or_else(|| "-".into()),
        ),
        ("created", output::time(job.created_at)),
        ("started", output::opt_time(job.started_at)),
        ("finished", output::opt_time(job.finished_at)),
        ("ran", output::run_time(job)),
        ("return values", output::map(&job.return_values)),
        (
            "results",
            output::list(
                &job.results
                    .iter()
                    .map(|r| format!("{} ({})", r.path, output::size(r.size)))
                    .collect::<Vec<_>>(),
            ),
        ),
    ]);
    if let Some(signal) = job.signal {
        pairs.push(("signal", signal.to_string()));
    }
    output::fields(&pairs)
}

/// Waits for the job, with a spinner on a terminal. Exit status: the job's, or
/// [`EXIT_TIMEOUT`] when the timeout passed first.
async fn wait(
    ctx: &Ctx,
    client: &Client,
    name: &str,
    timeout: Option<Duration>,
) -> anyhow::Result<u8> {
    let spinner = (!ctx.json && std::io::stderr().is_terminal()).then(|| {
        let spinner = indicatif::ProgressBar::new_spinner();
        spinner.set_style(
            indicatif::ProgressStyle::with_template("{spinner} waiting for {msg} ({elapsed})")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
        );
        spinner.set_message(name.to_string());
        spinner.enable_steady_tick(Duration::from_millis(120));
        spinner
    });
    let answer = match &spinner {
        // On a terminal: wait a second at a time and show the tasks' progress.
        Some(spinner) => {
            let deadline = timeout.map(|t| std::time::Instant::now() + t);
            loop {
                let left = deadline.map(|d| d.saturating_duration_since(std::time::Instant::now()));
                let step = left.map_or(Duration::from_secs(1), |l| l.min(Duration::from_secs(1)));
                match client.wait_once(name, step).await {
                    Ok(r) if r.done || left.is_some_and(|l| l <= step) => break Ok(r),
                    Ok(r) => {
                        let progress = progress_text(&r.job);
                        spinner.set_message(if progress.is_empty() {
                            name.to_string()
                        } else {
                            format!("{name}: {progress}")
                        });
                    }
                    Err(e) => break Err(e),
                }
            }
        }
        None => client.wait(name, timeout).await,
    };
    if let Some(spinner) = spinner {
        spinner.finish_and_clear();
    }
    let response = answer?;
    let job = &response.job;
    if ctx.json {
        output::json(&response)?;
    }
    if !response.done {
        if !ctx.json {
            let waited = timeout
                .map(|t| format!(" after {}s", t.as_secs_f64()))
                .unwrap_or_default();
            eprintln!(
                "error: timed out{waited}: {} is still {}",
                job.name, job.state
            );
        }
        return Ok(EXIT_TIMEOUT);
    }
    if !ctx.json {
        eprintln!("{}", output::summary(job));
    }
    Ok(output::job_exit_status(job))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeouts_take_fractions_of_a_second() {
        assert_eq!(parse_seconds("1.5").unwrap(), Duration::from_millis(1500));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("soon").is_err());
    }
}
