//! `opsbox scripts list | show NAME | run NAME -p key=value …`.

use std::io::Write;

use anyhow::Context as _;
use clap::Subcommand;
use futures::StreamExt;
use opsbox_api::{Job, LogEvent, Script, Stream};
use opsbox_client::Client;

use super::{output, Ctx};

#[derive(Subcommand, Debug)]
pub enum ScriptsCommand {
    /// List the scripts, and the files that failed to load.
    List,
    /// Show one script: description, parameters, tags, method, lock, timeout.
    Show {
        /// Script name.
        name: String,
    },
    /// Run a script; exits with the script's exit code.
    Run {
        /// Script name.
        name: String,
        /// A parameter, as key=value (repeatable). It reaches the script as the
        /// environment variable KEY.
        #[arg(short = 'p', long = "param", value_name = "KEY=VALUE", value_parser = parse_param)]
        params: Vec<(String, String)>,
        /// Submit the run and print the job name at once, without waiting.
        #[arg(long = "async", conflicts_with = "follow")]
        run_async: bool,
        /// Submit the run, then stream its output live until it ends.
        #[arg(long)]
        follow: bool,
        /// Run it on this node (see `opsbox nodes list`).
        #[arg(long, value_name = "NODE")]
        node: Option<String>,
        /// Run it on a node with all these labels (comma-separated).
        #[arg(long, value_name = "LABEL,...", value_delimiter = ',')]
        labels: Vec<String>,
        /// Run it once on every connected node that matches --labels/--node.
        #[arg(long, conflicts_with = "follow")]
        all: bool,
    },
}

pub fn parse_param(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_string(), value.to_string()))
        }
        _ => Err(format!("expected KEY=VALUE, got '{text}'")),
    }
}

pub async fn run(ctx: &Ctx, command: ScriptsCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        ScriptsCommand::List => list(ctx, &client).await,
        ScriptsCommand::Show { name } => show(ctx, &client, &name).await,
        ScriptsCommand::Run {
            name,
            params,
            run_async,
            follow,
            node,
            labels,
            all,
        } => {
            let placement = opsbox_api::Placement { node, labels, all };
            if !placement.is_local() {
                return run_placed(ctx, &client, &name, params, placement, run_async, follow).await;
            }
            if run_async {
                submit(ctx, &client, &name, params).await
            } else if follow {
                let job = client.run_async(&name, params).await?;
                follow_job(ctx, &client, &job.name).await
            } else {
                run_and_wait(ctx, &client, &name, params).await
            }
        }
    }
}

async fn list(ctx: &Ctx, client: &Client) -> anyhow::Result<u8> {
    let list = client.scripts().await?;
    if ctx.json {
        output::json(&list)?;
        return Ok(0);
    }
    let rows: Vec<Vec<String>> = list
        .scripts
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.http_method.as_str().to_string(),
                output::list(&s.params.iter().map(param_label).collect::<Vec<_>>()),
                output::list(&s.tags),
                s.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["NAME", "METHOD", "PARAMS", "TAGS", "DESCRIPTION"], &rows)
    );
    print_problems(&list.problems);
    Ok(0)
}

/// `name` for an optional parameter, `name*` for a required one.
fn param_label(param: &opsbox_api::Param) -> String {
    if param.required {
        format!("{}*", param.name)
    } else {
        param.name.clone()
    }
}

pub fn print_problems(problems: &[opsbox_api::ScriptProblem]) {
    for problem in problems {
        eprintln!("problem: {}: {}", problem.file, problem.message);
    }
}

async fn show(ctx: &Ctx, client: &Client, name: &str) -> anyhow::Result<u8> {
    let script = client
        .get_script(name, false)
        .await?
        .with_context(|| format!("no script named '{name}'"))?;
    if ctx.json {
        output::json(&script)?;
        return Ok(0);
    }
    print!("{}", describe(&script));
    Ok(0)
}

fn describe(script: &Script) -> String {
    let mut text = output::fields(&[
        ("name", script.name.clone()),
        (
            "description",
            script.description.clone().unwrap_or_else(|| "-".into()),
        ),
        ("file", script.filename.clone()),
        ("http method", script.http_method.as_str().to_uppercase()),
        ("output", output::output_mode(script.output).to_string()),
        (
            "lock",
            if script.lock {
                "yes (one run at a time)".into()
            } else {
                "no".into()
            },
        ),
        (
            "timeout",
            script
                .timeout_secs
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "none".into()),
        ),
        ("tags", output::list(&script.tags)),
        (
            "params",
            if script.params.is_empty() { "none" } else { "" }.to_string(),
        ),
    ]);
    if script.params.is_empty() {
        return text;
    }
    let rows: Vec<Vec<String>> = script
        .params
        .iter()
        .map(|p| {
            let mut kind = if p.required { "required" } else { "optional" }.to_string();
            if p.filtered || script.filtered_params.contains(&p.name) {
                kind.push_str(", filtered");
            }
            vec![
                format!("  {}", p.name),
                kind,
                p.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    for line in output::table(&["  NAME", "KIND", "DESCRIPTION"], &rows).lines() {
        text.push_str(line);
        text.push('\n');
    }
    text
}

async fn submit(
    ctx: &Ctx,
    client: &Client,
    name: &str,
    params: Vec<(String, String)>,
) -> anyhow::Result<u8> {
    let job = client.run_async(name, params).await?;
    if ctx.json {
        output::json(&job)?;
    } else {
        println!("{}", job.name);
    }
    Ok(0)
}

/// A run on chosen nodes: like a local one, and with `--all` each node's output in
/// turn, headed by the node's name; the exit status is the first failure's.
async fn run_placed(
    ctx: &Ctx,
    client: &Client,
    name: &str,
    params: Vec<(String, String)>,
    placement: opsbox_api::Placement,
    run_async: bool,
    follow: bool,
) -> anyhow::Result<u8> {
    let params = params.into_iter().collect();
    let wait = !(run_async || follow);
    let response = client.run_placed(name, params, placement, wait).await?;
    if run_async {
        let jobs: Vec<&opsbox_api::Job> = std::iter::once(&response.job)
            .chain(&response.others)
            .collect();
        if ctx.json {
            output::json(&jobs)?;
        } else {
            for job in jobs {
                println!("{}", job.name);
            }
        }
        return Ok(0);
    }
    if follow {
        return follow_job(ctx, client, &response.job.name).await;
    }
    if ctx.json {
        output::json(&response)?;
        return Ok(output::job_exit_status(&response.job));
    }
    let several = !response.others.is_empty();
    let mut status = 0;
    for job in std::iter::once(&response.job).chain(&response.others) {
        if several {
            println!("== {} ({})", job.node.as_deref().unwrap_or("?"), job.name);
        }
        let log = client.log(&job.name).await?;
        for line in &log.stdout {
            println!("{line}");
        }
        for line in &log.stderr {
            eprintln!("{line}");
        }
        finish(job);
        if status == 0 {
            status = output::job_exit_status(job);
        }
    }
    Ok(status)
}

async fn run_and_wait(
    ctx: &Ctx,
    client: &Client,
    name: &str,
    params: Vec<(String, String)>,
) -> anyhow::Result<u8> {
    let response = client.run(name, params).await?;
    let job = &response.job;
    if ctx.json {
        output::json(&response)?;
        return Ok(output::job_exit_status(job));
    }
    let run_output = response.output.clone().unwrap_or_default();
    {
        let mut out = std::io::stdout().lock();
        for line in &run_output.stdout {
            writeln!(out, "{line}")?;
        }
        out.flush()?;
    }
    for line in &run_output.stderr {
        eprintln!("{line}");
    }
    finish(job);
    Ok(output::job_exit_status(job))
}

/// Streams a job's output live (stdout to stdout, stderr to stderr) until it ends;
/// the exit status is the job's. Used by `scripts run --follow` and `jobs log --follow`.
pub async fn follow_job(ctx: &Ctx, client: &Client, name: &str) -> anyhow::Result<u8> {
    let mut events = client.follow_log(name);
    while let Some(event) = events.next().await {
        let event = event?;
        if ctx.json {
            output::json_line(&event)?;
            if let LogEvent::End(job) = &event {
                return Ok(output::job_exit_status(job));
            }
            continue;
        }
        match event {
            LogEvent::Output(chunk) => match chunk.stream {
                Stream::Stdout => {
                    let mut out = std::io::stdout().lock();
                    out.write_all(chunk.data.as_bytes())?;
                    out.flush()?;
                }
                Stream::Stderr => {
                    let mut err = std::io::stderr().lock();
                    err.write_all(chunk.data.as_bytes())?;
                    err.flush()?;
                }
            },
            LogEvent::End(job) => {
                finish(&job);
                return Ok(output::job_exit_status(&job));
            }
        }
    }
    anyhow::bail!("the log of {name} ended before the job did")
}

/// Tells, on stderr, how the job ended and what it returned.
fn finish(job: &Job) {
    if !job.return_values.is_empty() {
        eprintln!("return values: {}", output::map(&job.return_values));
    }
    if !job.results.is_empty() {
        let files: Vec<String> = job.results.iter().map(|r| r.path.clone()).collect();
        eprintln!("result files: {}", files.join(", "));
    }
    eprintln!("{}", output::summary(job));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_split_at_the_first_equals_sign() {
        assert_eq!(
            parse_param("query=a=b").unwrap(),
            ("query".to_string(), "a=b".to_string())
        );
        assert_eq!(parse_param("empty=").unwrap().1, "");
        assert!(parse_param("novalue").is_err());
        assert!(parse_param("=x").is_err());
    }
}
