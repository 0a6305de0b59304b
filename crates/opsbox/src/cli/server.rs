//! `opsbox info` and `opsbox reload`: the server as a whole.

use super::{output, scripts, Ctx};

pub async fn info(ctx: &Ctx) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    let info = client.info().await?;
    if ctx.json {
        output::json(&info)?;
        return Ok(0);
    }
    print!(
        "{}",
        output::fields(&[
            ("server", client.server().to_string()),
            ("version", info.version.clone()),
            ("revision", info.revision.to_string()),
            ("scripts", info.scripts.to_string()),
            ("nodes", output::list(&info.nodes)),
            (
                "auth",
                if info.auth_required {
                    "required".into()
                } else {
                    "off".into()
                }
            ),
            (
                "you",
                info.you.clone().unwrap_or_else(|| "anonymous".into())
            ),
        ])
    );
    Ok(0)
}

pub async fn reload(ctx: &Ctx) -> anyhow::Result<u8> {
    let client = ctx.client()?;
    let report = client.reload().await?;
    if ctx.json {
        output::json(&report)?;
        return Ok(0);
    }
    println!(
        "reloaded: {} scripts, {} problems (revision {})",
        report.scripts,
        report.problems.len(),
        report.revision
    );
    scripts::print_problems(&report.problems);
    Ok(0)
}
