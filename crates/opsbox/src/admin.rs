//! Identity management directly on a data directory's store (`opsbox users … --data DIR`,
//! `opsbox tokens … --data DIR`), for setting up a server before it first starts.
//! (Owned by the server work; filled in with the core crate.)

use std::path::Path;

use opsbox_api::{CreatedToken, NewToken, NewUser, Token, User};

pub async fn add_user(_data: &Path, _user: NewUser) -> anyhow::Result<User> {
    anyhow::bail!("not wired yet")
}
pub async fn remove_user(_data: &Path, _name: &str) -> anyhow::Result<()> {
    anyhow::bail!("not wired yet")
}
pub async fn list_users(_data: &Path) -> anyhow::Result<Vec<User>> {
    anyhow::bail!("not wired yet")
}
pub async fn create_token(_data: &Path, _token: NewToken) -> anyhow::Result<CreatedToken> {
    anyhow::bail!("not wired yet")
}
pub async fn revoke_token(_data: &Path, _id: &str) -> anyhow::Result<()> {
    anyhow::bail!("not wired yet")
}
pub async fn list_tokens(_data: &Path) -> anyhow::Result<Vec<Token>> {
    anyhow::bail!("not wired yet")
}
