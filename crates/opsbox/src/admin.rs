//! Identity management directly on a data directory's store (`opsbox users … --data
//! DIR`, `opsbox tokens … --data DIR`): how the first admin is made before a server is
//! exposed. It goes through the same core service as the API, so the rules (name
//! checks, hashing, events) are the same.

use std::path::Path;

use opsbox_api::{CreatedToken, NewToken, NewUser, Token, User};
use opsbox_core::identities::{Identities, LastAdmin};
use opsbox_core::Core;

/// `--data` names a data directory, or a shared store by its `postgres://` URL.
async fn identities(data: &Path) -> anyhow::Result<Identities> {
    let text = data.to_string_lossy();
    if text.starts_with("postgres://") || text.starts_with("postgresql://") {
        let store = opsbox_core::store::open(&text, "opsbox-admin").await?;
        return Ok(Identities::new(store));
    }
    Ok(Identities::new(Core::open_store(data).await?))
}

pub async fn add_user(data: &Path, user: NewUser) -> anyhow::Result<User> {
    Ok(identities(data).await?.add_user(user).await?)
}

pub async fn import_htpasswd(
    data: &Path,
    text: &str,
    role: opsbox_api::Role,
) -> anyhow::Result<Vec<String>> {
    Ok(identities(data).await?.import_htpasswd(text, role).await?)
}

pub async fn remove_user(data: &Path, name: &str) -> anyhow::Result<()> {
    Ok(identities(data)
        .await?
        .remove_user(name, LastAdmin::MayGo)
        .await?)
}

pub async fn list_users(data: &Path) -> anyhow::Result<Vec<User>> {
    Ok(identities(data).await?.users().await?)
}

pub async fn create_token(data: &Path, token: NewToken) -> anyhow::Result<CreatedToken> {
    Ok(identities(data).await?.create_token(token).await?)
}

pub async fn revoke_token(data: &Path, id: &str) -> anyhow::Result<()> {
    Ok(identities(data)
        .await?
        .revoke_token(id, LastAdmin::MayGo)
        .await?)
}

pub async fn list_tokens(data: &Path) -> anyhow::Result<Vec<Token>> {
    Ok(identities(data).await?.tokens().await?)
}
