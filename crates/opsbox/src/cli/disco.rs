//! `opsbox disco MASTER METHOD [ARG]`: the discoapi command line (wire reference §10)
//! over the Disco face of any opsbox (or Disco master): prints the JSON answer; `wait`
//! exits non-zero when the job ends dead or unknown, or `--timeout` passes.

use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Args;
use serde_json::{json, Value};

use super::{output, Ctx, EXIT_ERROR, EXIT_TIMEOUT};

#[derive(Args, Debug)]
pub struct DiscoArgs {
    /// The master: `disco://HOST:PORT` (as `http://HOST:PORT`), `disco://HOST` (port
    /// 8989) or `http(s)://HOST:PORT`.
    master: String,
    /// nodeinfo, joblist, jobinfo, results, jobspec, wait, kill, clean, purge, events,
    /// blacklist, whitelist, blacklisted, config, version.
    method: String,
    /// The job name (or host for blacklist/whitelist).
    arg: Option<String>,
    /// `wait`: give up after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    timeout: Option<u64>,
}

/// `disco://H:P` → `http://H:P`, `disco://H` → `http://H:8989`, `http(s)://` as is.
pub fn master_url(master: &str) -> anyhow::Result<String> {
    let master = master.trim_end_matches('/');
    if let Some(rest) = master.strip_prefix("disco://") {
        return Ok(if rest.contains(':') {
            format!("http://{rest}")
        } else {
            format!("http://{rest}:8989")
        });
    }
    if master.starts_with("http://") || master.starts_with("https://") {
        return Ok(master.to_owned());
    }
    bail!("'{master}' is not a master address: use disco://HOST:PORT or http://HOST:PORT")
}

pub async fn run(ctx: &Ctx, args: DiscoArgs) -> anyhow::Result<u8> {
    let base = master_url(&args.master)?;
    let client = ctx.client()?;
    let client = &client;
    let need = |what: &str| {
        args.arg
            .clone()
            .with_context(|| format!("`{}` needs {what}", args.method))
    };
    let ctrl = |op: &str| format!("{base}/disco/ctrl/{op}");
    let get = |url: String| async move {
        let r = client
            .request_url(reqwest::Method::GET, &url)
            .send()
            .await?;
        let status = r.status();
        let body = r.text().await?;
        if !status.is_success() {
            bail!("{url}: {status}: {body}");
        }
        Ok::<_, anyhow::Error>(body)
    };
    let post = |url: String, body: Value| async move {
        let r = client
            .request_url(reqwest::Method::POST, &url)
            .body(body.to_string())
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            bail!("{url}: {status}: {text}");
        }
        Ok::<_, anyhow::Error>(text)
    };
    let print = |text: &str| -> anyhow::Result<u8> {
        let value: Value = serde_json::from_str(text).unwrap_or(Value::String(text.to_owned()));
        output::json(&value)?;
        Ok(0)
    };
    match args.method.as_str() {
        "nodeinfo" => print(&get(ctrl("nodeinfo")).await?),
        "joblist" => print(&get(ctrl("joblist")).await?),
        "jobinfo" => print(&get(format!("{}?name={}", ctrl("jobinfo"), need("a job name")?)).await?),
        "results" => {
            let answer = post(ctrl("get_results"), json!([0, [need("a job name")?]])).await?;
            let value: Value = serde_json::from_str(&answer)?;
            output::json(&value[0][1])?;
            Ok(0)
        }
        "jobspec" => {
            let url = format!("{}?name={}", ctrl("parameters"), need("a job name")?);
            let pack = client
                .request_url(reqwest::Method::GET, &url)
                .send()
                .await?
                .error_for_status()?
                .bytes()
                .await?;
            output::json(&job_dict(&pack)?)?;
            Ok(0)
        }
        "wait" => {
            let name = need("a job name")?;
            let started = Instant::now();
            loop {
                let answer = post(ctrl("get_results"), json!([2000, [name]])).await?;
                let value: Value = serde_json::from_str(&answer)?;
                let state = &value[0][1];
                match state[0].as_str() {
                    Some("ready") => {
                        output::json(&state[1])?;
                        return Ok(0);
                    }
                    Some("active") => {}
                    other => {
                        eprintln!("error: job {name} failed: status {}", other.unwrap_or("?"));
                        return Ok(EXIT_ERROR);
                    }
                }
                if args.timeout.is_some_and(|t| started.elapsed() > Duration::from_secs(t)) {
                    eprintln!("error: timed out waiting for {name}");
                    return Ok(EXIT_TIMEOUT);
                }
            }
        }
        "kill" => print(&post(ctrl("kill_job"), json!(need("a job name")?)).await?),
        "clean" => print(&post(ctrl("clean_job"), json!(need("a job name")?)).await?),
        "purge" => print(&post(ctrl("purge_job"), json!(need("a job name")?)).await?),
        "events" => {
            let body = get(format!("{}?name={}", ctrl("rawevents"), need("a job name")?)).await?;
            print!("{body}");
            Ok(0)
        }
        "blacklist" => print(&post(ctrl("blacklist"), json!(need("a host")?)).await?),
        "whitelist" => print(&post(ctrl("whitelist"), json!(need("a host")?)).await?),
        "blacklisted" => print(&get(ctrl("get_blacklist")).await?),
        "config" => print(&get(ctrl("load_config_table")).await?),
        "version" => print(&get(format!("{base}/disco/version")).await?),
        other => bail!(
            "unknown method '{other}': nodeinfo, joblist, jobinfo, results, jobspec, wait, kill, clean, purge, events, blacklist, whitelist, blacklisted, config, version"
        ),
    }
}

/// The JSON job dict of a version 1 or 2 job pack.
fn job_dict(pack: &[u8]) -> anyhow::Result<Value> {
    let word = |i: usize| -> anyhow::Result<usize> {
        let bytes: [u8; 4] = pack
            .get(i..i + 4)
            .context("the job pack is too short")?
            .try_into()?;
        Ok(u32::from_be_bytes(bytes) as usize)
    };
    if word(0)? >> 16 != 0xd5c0 {
        bail!("not a Disco job pack");
    }
    let (from, to) = (word(4)?, word(8)?);
    let dict = pack
        .get(from..to)
        .context("the job pack's offsets are wrong")?;
    Ok(serde_json::from_slice(dict)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn master_addresses() {
        assert_eq!(master_url("disco://h:3000").unwrap(), "http://h:3000");
        assert_eq!(master_url("disco://h").unwrap(), "http://h:8989");
        assert_eq!(master_url("https://h:1/").unwrap(), "https://h:1");
        assert!(master_url("h:1").is_err());
    }
}
