//! `opsbox users …` and `opsbox tokens …`: through the server's API, or with `--data
//! DIR` directly on a data directory (to make the first admin before a server runs).

use std::io::Read;
use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Subcommand};
use opsbox_api::{CreatedToken, NewToken, NewUser, Role, Token, User};

use super::{output, Ctx};
use crate::admin;

#[derive(Args, Debug)]
pub struct UsersArgs {
    /// Act on this data directory directly instead of through a server.
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: UsersCommand,
}

#[derive(Subcommand, Debug)]
enum UsersCommand {
    /// Add a user; the password is read from standard input.
    Add {
        /// User name.
        name: String,
        /// Read the password from standard input (its first line).
        #[arg(long, required = true)]
        password_stdin: bool,
        /// reader, operator or admin.
        #[arg(long, default_value = "operator", value_parser = parse_role)]
        role: Role,
    },
    /// Import the users of an Apache htpasswd file (bcrypt, $apr1$, {SHA}, crypt,
    /// plaintext), keeping their hashes; needs --data.
    Import {
        /// The htpasswd file.
        file: PathBuf,
        /// Role given to every imported user.
        #[arg(long, default_value = "operator", value_parser = parse_role)]
        role: Role,
    },
    /// List users.
    List,
    /// Remove a user.
    Remove {
        /// User name.
        name: String,
    },
}

#[derive(Args, Debug)]
pub struct TokensArgs {
    /// Act on this data directory directly instead of through a server.
    #[arg(long, global = true, value_name = "DIR")]
    data: Option<PathBuf>,
    #[command(subcommand)]
    command: TokensCommand,
}

#[derive(Subcommand, Debug)]
enum TokensCommand {
    /// Create a token and print its secret (shown this once only).
    Create {
        /// reader, operator or admin.
        #[arg(long, value_parser = parse_role)]
        role: Role,
        /// A node id the token may act as (repeatable; for node tokens).
        #[arg(long = "node", value_name = "ID")]
        nodes: Vec<String>,
        /// What the token is for.
        #[arg(long)]
        description: Option<String>,
    },
    /// List tokens (without their secrets).
    List,
    /// Revoke a token by its id.
    Revoke {
        /// Token id (as listed; not the secret).
        id: String,
    },
}

fn parse_role(word: &str) -> Result<Role, String> {
    Role::parse(word).ok_or_else(|| format!("'{word}' is not one of reader, operator, admin"))
}

pub async fn users(ctx: &Ctx, args: UsersArgs) -> anyhow::Result<u8> {
    match args.command {
        UsersCommand::Add { name, role, .. } => {
            let password = read_password()?;
            let new = NewUser {
                name,
                password,
                role,
            };
            let user = match &args.data {
                Some(dir) => admin::add_user(dir, new).await?,
                None => ctx.client()?.add_user(new).await?,
            };
            if ctx.json {
                output::json(&user)?;
            } else {
                println!("added user {} ({})", user.name, user.role);
            }
        }
        UsersCommand::Import { file, role } => {
            let Some(dir) = &args.data else {
                anyhow::bail!(
                    "users import works on a data directory: give --data DIR \
                     (or start the server with --htpasswd FILE)"
                );
            };
            let text = std::fs::read_to_string(&file)
                .with_context(|| format!("cannot read {}", file.display()))?;
            let names = admin::import_htpasswd(dir, &text, role).await?;
            if ctx.json {
                output::json(&serde_json::json!({ "imported": names }))?;
            } else {
                println!(
                    "imported {} users ({role}): {}",
                    names.len(),
                    names.join(", ")
                );
            }
        }
        UsersCommand::List => {
            let users = match &args.data {
                Some(dir) => admin::list_users(dir).await?,
                None => ctx.client()?.users().await?,
            };
            print_users(ctx, &users)?;
        }
        UsersCommand::Remove { name } => {
            match &args.data {
                Some(dir) => admin::remove_user(dir, &name).await?,
                None => ctx.client()?.remove_user(&name).await?,
            }
            if ctx.json {
                output::json(&serde_json::json!({ "removed": name }))?;
            } else {
                println!("removed user {name}");
            }
        }
    }
    Ok(0)
}

pub async fn tokens(ctx: &Ctx, args: TokensArgs) -> anyhow::Result<u8> {
    match args.command {
        TokensCommand::Create {
            role,
            nodes,
            description,
        } => {
            let new = NewToken {
                role,
                nodes,
                description,
            };
            let created = match &args.data {
                Some(dir) => admin::create_token(dir, new).await?,
                None => ctx.client()?.create_token(new).await?,
            };
            print_created(ctx, &created)?;
        }
        TokensCommand::List => {
            let tokens = match &args.data {
                Some(dir) => admin::list_tokens(dir).await?,
                None => ctx.client()?.tokens().await?,
            };
            print_tokens(ctx, &tokens)?;
        }
        TokensCommand::Revoke { id } => {
            match &args.data {
                Some(dir) => admin::revoke_token(dir, &id).await?,
                None => ctx.client()?.revoke_token(&id).await?,
            }
            if ctx.json {
                output::json(&serde_json::json!({ "revoked": id }))?;
            } else {
                println!("revoked token {id}");
            }
        }
    }
    Ok(0)
}

/// The first line of standard input, without its line break.
fn read_password() -> anyhow::Result<String> {
    let mut text = String::new();
    std::io::stdin()
        .read_to_string(&mut text)
        .context("cannot read the password from standard input")?;
    let password = text.lines().next().unwrap_or("").to_string();
    anyhow::ensure!(
        !password.is_empty(),
        "no password on standard input (e.g. `echo \"$PASSWORD\" | opsbox users add NAME --password-stdin`)"
    );
    Ok(password)
}

fn print_users(ctx: &Ctx, users: &[User]) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(&users);
    }
    let rows: Vec<Vec<String>> = users
        .iter()
        .map(|u| {
            vec![
                u.name.clone(),
                u.role.to_string(),
                output::time(u.created_at),
            ]
        })
        .collect();
    print!("{}", output::table(&["NAME", "ROLE", "CREATED"], &rows));
    Ok(())
}

fn print_tokens(ctx: &Ctx, tokens: &[Token]) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(&tokens);
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            vec![
                t.id.clone(),
                t.role.to_string(),
                output::list(&t.nodes),
                output::time(t.created_at),
                t.description.clone().unwrap_or_default(),
            ]
        })
        .collect();
    print!(
        "{}",
        output::table(&["ID", "ROLE", "NODES", "CREATED", "DESCRIPTION"], &rows)
    );
    Ok(())
}

/// The secret alone on stdout (so `$(opsbox tokens create …)` captures it), the rest on
/// stderr.
fn print_created(ctx: &Ctx, created: &CreatedToken) -> anyhow::Result<()> {
    if ctx.json {
        return output::json(created);
    }
    println!("{}", created.secret);
    eprintln!(
        "created token {} ({}); the secret above is shown this once only",
        created.token.id, created.token.role
    );
    Ok(())
}
