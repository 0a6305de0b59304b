//! `opsbox model status | charms | deploy | add-relation | remove-relation | expose |
//! unexpose | config | constraints | add-unit | remove-unit | destroy | resolved |
//! watch | jenv`: the model, in the words of the Juju command line.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Subcommand;
use futures::StreamExt;
use opsbox_api::model::{ConfigChange, DeployRequest, ModelStatus};
use serde_json::Value;

use super::scripts::parse_param;
use super::{output, Ctx};

#[derive(Subcommand, Debug)]
pub enum ModelCommand {
    /// Applications, units (status, machine, node, ports) and relations.
    Status,
    /// The charms the server can deploy.
    Charms,
    /// Deploy a charm (`cs:precise/wordpress`, `local:trusty/mysql`, `haproxy`) as an
    /// application named NAME (default: the charm's name).
    Deploy {
        charm: String,
        name: Option<String>,
        /// Units to start with.
        #[arg(short = 'n', long = "num-units", default_value_t = 1)]
        num_units: u32,
        /// Config option, repeatable.
        #[arg(long = "config", value_name = "KEY=VALUE", value_parser = parse_param)]
        config: Vec<(String, String)>,
        /// Constraint (`cpu-cores=4`, `tags=web`: nodes with that label), repeatable.
        #[arg(long = "constraints", value_name = "KEY=VALUE", value_parser = parse_param)]
        constraints: Vec<(String, String)>,
        /// Put the units on this machine (`0` is the server) instead of new ones.
        #[arg(long)]
        to: Option<String>,
    },
    /// Relate two applications (`app` or `app:relation`).
    AddRelation {
        a: String,
        b: String,
    },
    /// Remove the relation between two applications.
    RemoveRelation {
        a: String,
        b: String,
    },
    /// Mark an application as reachable from outside.
    Expose {
        app: String,
    },
    Unexpose {
        app: String,
    },
    /// Show an application's config, or set options (KEY=VALUE) and reset others.
    Config {
        app: String,
        #[arg(value_parser = parse_param)]
        set: Vec<(String, String)>,
        /// Back to the charm's default, repeatable.
        #[arg(long = "reset", value_name = "KEY")]
        reset: Vec<String>,
    },
    /// Show an application's constraints, or replace them (KEY=VALUE...).
    Constraints {
        app: String,
        #[arg(value_parser = parse_param)]
        set: Vec<(String, String)>,
    },
    /// Add units to an application.
    AddUnit {
        app: String,
        #[arg(short = 'n', long = "num-units", default_value_t = 1)]
        num_units: u32,
        #[arg(long)]
        to: Option<String>,
    },
    /// Destroy units (`blog/1`...): they leave their relations, run stop, and go.
    RemoveUnit {
        #[arg(required = true)]
        units: Vec<String>,
    },
    /// Destroy an application with its units and relations.
    Destroy {
        app: String,
    },
    /// Take a unit out of error (`--retry` runs the failed hook again).
    Resolved {
        unit: String,
        #[arg(long)]
        retry: bool,
    },
    /// Model changes, live, one per line (`--since REV` resumes; `model status` shows
    /// the revision it is as of).
    Watch {
        #[arg(long, value_name = "REV")]
        since: Option<u64>,
    },
    /// Write `$JUJU_HOME/environments/NAME.jenv` (JUJU_HOME defaults to ~/.juju) so that
    /// jujuclient's `Environment.connect('NAME')` reaches this server's https:// listener
    /// with the current credentials.
    Jenv {
        name: String,
        /// Directory to write into instead of $JUJU_HOME.
        #[arg(long = "juju-home", value_name = "DIR")]
        juju_home: Option<PathBuf>,
    },
}

pub async fn run(ctx: &Ctx, command: ModelCommand) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    match command {
        ModelCommand::Status => {
            let status = client.model().await?;
            if ctx.json {
                output::json(&status)?;
            } else {
                print!("{}", render_status(&status));
            }
        }
        ModelCommand::Charms => {
            let charms = client.charms().await?;
            if ctx.json {
                output::json(&charms)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = charms
                .iter()
                .map(|c| {
                    let relations = |m: &BTreeMap<String, opsbox_api::model::CharmRelation>| {
                        m.iter()
                            .map(|(n, r)| format!("{n}:{}", r.interface))
                            .collect::<Vec<_>>()
                            .join(",")
                    };
                    vec![
                        c.name.clone(),
                        c.revision.to_string(),
                        relations(&c.provides),
                        relations(&c.requires),
                        c.summary.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["CHARM", "REV", "PROVIDES", "REQUIRES", "SUMMARY"], &rows)
            );
        }
        ModelCommand::Deploy {
            charm,
            name,
            num_units,
            config,
            constraints,
            to,
        } => {
            let name = match name {
                Some(name) => name,
                None => opsbox_core::charms::CharmUrl::parse(&charm)
                    .map(|u| u.name)
                    .map_err(|e| anyhow::anyhow!("{e}"))?,
            };
            let request = DeployRequest {
                name,
                charm,
                num_units,
                config: config.into_iter().collect(),
                constraints: constraint_values(constraints),
                to,
            };
            let app = client.deploy(&request).await?;
            if ctx.json {
                output::json(&app)?;
            } else {
                println!(
                    "deployed {} ({}) with {num_units} unit(s)",
                    app.name, app.charm_url
                );
            }
        }
        ModelCommand::AddRelation { a, b } => {
            let relation = client.relate(&a, &b).await?;
            if ctx.json {
                output::json(&relation)?;
            } else {
                println!("related {} over {}", relation.key, relation.interface);
            }
        }
        ModelCommand::RemoveRelation { a, b } => {
            client.unrelate(&a, &b).await?;
            println!("removing the relation between {a} and {b}");
        }
        ModelCommand::Expose { app } => {
            client.expose(&app, true).await?;
            println!("{app} is exposed");
        }
        ModelCommand::Unexpose { app } => {
            client.expose(&app, false).await?;
            println!("{app} is no longer exposed");
        }
        ModelCommand::Config { app, set, reset } => {
            let config = if set.is_empty() && reset.is_empty() {
                client.app_config(&app).await?
            } else {
                let change = ConfigChange {
                    set: set.into_iter().collect(),
                    unset: reset,
                };
                client.set_app_config(&app, &change).await?
            };
            if ctx.json {
                output::json(&config)?;
                return Ok(0);
            }
            let rows: Vec<Vec<String>> = config
                .config
                .iter()
                .map(|(key, option)| {
                    vec![
                        key.clone(),
                        option
                            .value
                            .as_ref()
                            .map(|v| match v {
                                Value::String(s) => s.clone(),
                                other => other.to_string(),
                            })
                            .unwrap_or_default(),
                        if option.default { "default" } else { "set" }.into(),
                        option.kind.clone(),
                        option.description.clone(),
                    ]
                })
                .collect();
            print!(
                "{}",
                output::table(&["OPTION", "VALUE", "SOURCE", "TYPE", "DESCRIPTION"], &rows)
            );
        }
        ModelCommand::Constraints { app, set } => {
            let constraints = if set.is_empty() {
                client.app_config(&app).await?.constraints
            } else {
                client
                    .set_constraints(&app, &constraint_values(set))
                    .await?
            };
            if ctx.json {
                output::json(&constraints)?;
            } else {
                let text: Vec<String> = constraints
                    .iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => format!("{k}={s}"),
                        other => format!("{k}={other}"),
                    })
                    .collect();
                println!("{}", text.join(" "));
            }
        }
        ModelCommand::AddUnit { app, num_units, to } => {
            let units = client.add_units(&app, num_units, to).await?;
            if ctx.json {
                output::json(&units)?;
            } else {
                println!("added {}", units.join(", "));
            }
        }
        ModelCommand::RemoveUnit { units } => {
            for unit in &units {
                client.remove_unit(unit).await?;
                println!("removing {unit}");
            }
        }
        ModelCommand::Destroy { app } => {
            client.destroy_application(&app).await?;
            println!("destroying {app}: its units stop, then it goes");
        }
        ModelCommand::Resolved { unit, retry } => {
            client.resolved(&unit, retry).await?;
            println!(
                "{unit} resolved{}",
                if retry {
                    "; the failed hook runs again"
                } else {
                    ""
                }
            );
        }
        ModelCommand::Watch { since } => {
            let mut events = client.watch(since);
            while let Some(event) = events.next().await {
                let event = event?;
                let Some(rest) = event.kind.strip_prefix("model.") else {
                    continue;
                };
                if ctx.json {
                    output::json_line(&event)?;
                    continue;
                }
                let status = event
                    .data
                    .get("status")
                    .and_then(Value::as_str)
                    .map(|s| format!("  {s}"))
                    .unwrap_or_default();
                let mut out = std::io::stdout().lock();
                writeln!(
                    out,
                    "{:>6}  {:<20}  {}{status}",
                    event.rev, rest, event.subject
                )?;
                out.flush()?;
            }
        }
        ModelCommand::Jenv { name, juju_home } => {
            let info = client.jenv().await?;
            let servers: Vec<String> = info["state_servers"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|s| s.as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            if servers.is_empty() {
                anyhow::bail!(
                    "the server has no https:// listener, and Juju clients speak only TLS: start it with --listen https://HOST:PORT"
                );
            }
            let config = ctx.client_config();
            let user = config.user.clone().unwrap_or_else(|| "admin".into());
            let password = config
                .password
                .clone()
                .or_else(|| config.token.clone())
                .unwrap_or_default();
            let mut jenv = serde_json::Map::new();
            jenv.insert("user".into(), user.into());
            jenv.insert("password".into(), password.into());
            jenv.insert("state-servers".into(), servers.clone().into());
            if let Some(ca) = info["ca_cert"].as_str() {
                jenv.insert("ca-cert".into(), ca.into());
            }
            jenv.insert("environ-uuid".into(), info["uuid"].clone());
            let home = juju_home
                .or_else(|| std::env::var_os("JUJU_HOME").map(PathBuf::from))
                .or_else(|| dirs::home_dir().map(|h| h.join(".juju")))
                .context("no JUJU_HOME and no home directory: give --juju-home")?;
            let dir = home.join("environments");
            std::fs::create_dir_all(&dir)
                .with_context(|| format!("cannot create {}", dir.display()))?;
            let path = dir.join(format!("{name}.jenv"));
            let text = serde_yaml::to_string(&Value::Object(jenv))?;
            // The file holds a password: readable by its owner only.
            opsbox_server::tls::write_private(&path, text.as_bytes())
                .with_context(|| format!("cannot write {}", path.display()))?;
            println!(
                "wrote {} (Environment.connect('{name}') now reaches {})",
                path.display(),
                servers[0]
            );
        }
    }
    Ok(0)
}

/// Numbers as numbers (`cpu-cores=4`), the rest as text.
fn constraint_values(pairs: Vec<(String, String)>) -> BTreeMap<String, Value> {
    pairs
        .into_iter()
        .map(|(k, v)| {
            let value = v
                .parse::<u64>()
                .map(Value::from)
                .unwrap_or(Value::String(v));
            (k, value)
        })
        .collect()
}

fn render_status(status: &ModelStatus) -> String {
    let mut text = format!(
        "model {} ({}) at revision {}\n\n",
        status.name, status.uuid, status.revision
    );
    let apps: Vec<Vec<String>> = status
        .applications
        .iter()
        .map(|a| {
            let units = status
                .units
                .iter()
                .filter(|u| u.application == a.name)
                .count();
            vec![
                a.name.clone(),
                a.charm_url.clone(),
                units.to_string(),
                if a.exposed { "yes" } else { "no" }.into(),
                format!("{:?}", a.life).to_lowercase(),
            ]
        })
        .collect();
    text.push_str(&output::table(
        &["APPLICATION", "CHARM", "UNITS", "EXPOSED", "LIFE"],
        &apps,
    ));
    let units: Vec<Vec<String>> = status
        .units
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.status.as_str().into(),
                u.machine.clone(),
                u.node.clone(),
                u.ports.join(","),
                u.status_info.clone(),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&output::table(
        &["UNIT", "STATUS", "MACHINE", "NODE", "PORTS", "INFO"],
        &units,
    ));
    let machines: Vec<Vec<String>> = status
        .machines
        .iter()
        .map(|m| {
            let units: Vec<&str> = status
                .units
                .iter()
                .filter(|u| u.machine == m.id)
                .map(|u| u.name.as_str())
                .collect();
            vec![
                m.id.clone(),
                m.node.clone(),
                m.status.clone(),
                m.series.clone(),
                units.join(","),
            ]
        })
        .collect();
    text.push('\n');
    text.push_str(&output::table(
        &["MACHINE", "NODE", "STATUS", "SERIES", "UNITS"],
        &machines,
    ));
    let relations: Vec<Vec<String>> = status
        .relations
        .iter()
        .map(|r| vec![r.id.to_string(), r.key.clone(), r.interface.clone()])
        .collect();
    text.push('\n');
    text.push_str(&output::table(&["ID", "RELATION", "INTERFACE"], &relations));
    text
}
