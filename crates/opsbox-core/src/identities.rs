//! The one identity store every face authenticates against: users with password
//! hashes, and API tokens with roles (and, for node tokens, the node ids they may act
//! as). Faces turn their own credential forms into [`Credentials`].
//!
//! Password hashes are argon2id (PHC strings). Verifying one costs tens of
//! milliseconds by design, and old clients send HTTP Basic on every request, so a
//! successful check is remembered, keyed by a SHA-256 of name and password, for as long
//! as the user's stored hash stays the same.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::Engine;
use chrono::Utc;
use opsbox_api::{CreatedToken, NewToken, NewUser, Role, Token, User};
use rand::RngCore;
use sha2::{Digest, Sha256};

use crate::error::{CoreError, CoreResult};
use crate::store::{NewEvent, Store, TokenRecord, UserRecord};

/// Prefix of every token secret, so leaked ones are easy to grep for.
pub const TOKEN_PREFIX: &str = "obx_";

/// What a caller presented.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    Password { user: String, password: String },
    Token(String),
}

/// Who a caller is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// A user name, or `token:<id>`.
    pub name: String,
    pub role: Role,
    /// Node ids a node token may act as.
    pub nodes: Vec<String>,
}

impl Identity {
    /// A node token acts only as the nodes it names; any other identity as any node.
    pub fn may_act_as(&self, node: &str) -> bool {
        self.nodes.is_empty() || self.nodes.iter().any(|n| n == node)
    }

    /// True for a token bound to nodes.
    pub fn is_node_bound(&self) -> bool {
        !self.nodes.is_empty()
    }

    pub fn require(&self, role: Role) -> CoreResult<()> {
        if self.role.allows(role) {
            Ok(())
        } else {
            Err(CoreError::Forbidden(format!(
                "{} has role {}, this needs {}",
                self.name, self.role, role
            )))
        }
    }
}

#[derive(Clone)]
pub struct Identities {
    store: Arc<dyn Store>,
    /// SHA-256(name, 0, password) → the stored hash it was verified against.
    verified: Arc<Mutex<HashMap<[u8; 32], String>>>,
    /// Whether auth is required, and when that was read: every request asks, so the
    /// answer is kept for [`REQUIRED_TTL`]; changes made through this process clear it
    /// at once, changes by another process (`opsbox users … --data`) show within the TTL.
    required: Arc<Mutex<Option<(bool, std::time::Instant)>>>,
}

/// How long the answer to "is auth required?" is trusted.
const REQUIRED_TTL: std::time::Duration = std::time::Duration::from_secs(1);

fn valid_user_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '@'))
}

impl Identities {
    pub fn new(store: Arc<dyn Store>) -> Self {
        Identities {
            store,
            verified: Arc::new(Mutex::new(HashMap::new())),
            required: Arc::new(Mutex::new(None)),
        }
    }

    fn forget_required(&self) {
        *self.required.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// True once any user or token exists: from then on every request needs credentials.
    pub async fn auth_required(&self) -> CoreResult<bool> {
        if let Some((required, at)) = *self.required.lock().unwrap_or_else(|e| e.into_inner()) {
            if at.elapsed() < REQUIRED_TTL {
                return Ok(required);
            }
        }
        let required = self.store.count_identities().await? > 0;
        *self.required.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((required, std::time::Instant::now()));
        Ok(required)
    }

    pub async fn authenticate(&self, credentials: &Credentials) -> CoreResult<Identity> {
        match credentials {
            Credentials::Password { user, password } => {
                let record = self
                    .store
                    .get_user(user)
                    .await?
                    .ok_or(CoreError::Unauthenticated)?;
                let key: [u8; 32] = Sha256::new()
                    .chain_update(user.as_bytes())
                    .chain_update([0u8])
                    .chain_update(password.as_bytes())
                    .finalize()
                    .into();
                let cached = self
                    .verified
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&key)
                    .is_some_and(|h| *h == record.password_hash);
                if !cached {
                    let hash = record.password_hash.clone();
                    let password = password.clone();
                    let ok = tokio::task::spawn_blocking(move || verify_password(&hash, &password))
                        .await
                        .unwrap_or(false);
                    if !ok {
                        return Err(CoreError::Unauthenticated);
                    }
                    let mut verified = self.verified.lock().unwrap_or_else(|e| e.into_inner());
                    if verified.len() > 10_000 {
                        verified.clear();
                    }
                    verified.insert(key, record.password_hash.clone());
                }
                Ok(Identity {
                    name: record.name,
                    role: record.role,
                    nodes: Vec::new(),
                })
            }
            Credentials::Token(secret) => {
                let id = token_id(secret).ok_or(CoreError::Unauthenticated)?;
                let record = self
                    .store
                    .get_token(id)
                    .await?
                    .ok_or(CoreError::Unauthenticated)?;
                if record.secret_hash != hash_secret(secret) {
                    return Err(CoreError::Unauthenticated);
                }
                Ok(Identity {
                    name: format!("token:{}", record.id),
                    role: record.role,
                    nodes: record.nodes,
                })
            }
        }
    }

    pub async fn add_user(&self, user: NewUser) -> CoreResult<User> {
        self.write_user(user, false).await
    }

    /// Adds the user, or replaces its password and role.
    pub async fn set_user(&self, user: NewUser) -> CoreResult<User> {
        self.write_user(user, true).await
    }

    async fn write_user(&self, user: NewUser, replace: bool) -> CoreResult<User> {
        if !valid_user_name(&user.name) {
            return Err(CoreError::Invalid(format!(
                "user name '{}' must be 1-64 of letters, digits, '_', '-', '.', '@'",
                user.name
            )));
        }
        if user.password.is_empty() {
            return Err(CoreError::Invalid("the password is empty".into()));
        }
        let password = user.password.clone();
        let hash = tokio::task::spawn_blocking(move || hash_password(&password))
            .await
            .map_err(|e| CoreError::Invalid(format!("cannot hash the password: {e}")))??;
        let record = UserRecord {
            name: user.name.clone(),
            password_hash: hash,
            role: user.role,
            created_at: Utc::now(),
            source: None,
        };
        self.store_user(record, replace).await
    }

    /// Stores a user whose hash was made elsewhere (an imported htpasswd line).
    pub async fn import_user(&self, name: &str, hash: &str, role: Role) -> CoreResult<User> {
        self.import_user_from(name, hash, role, None).await
    }

    async fn import_user_from(
        &self,
        name: &str,
        hash: &str,
        role: Role,
        source: Option<&str>,
    ) -> CoreResult<User> {
        if !valid_user_name(name) {
            return Err(CoreError::Invalid(format!(
                "user name '{name}' is not valid"
            )));
        }
        let record = UserRecord {
            name: name.to_owned(),
            password_hash: hash.to_owned(),
            role,
            created_at: Utc::now(),
            source: source.map(str::to_owned),
        };
        self.store_user(record, true).await
    }

    /// Imports every user of an htpasswd file with `role` (existing users get the file's
    /// hash), once; returns their names.
    pub async fn import_htpasswd(&self, text: &str, role: Role) -> CoreResult<Vec<String>> {
        let mut names = Vec::new();
        for (user, hash) in parse_htpasswd(text)? {
            self.import_user(&user, &hash, role).await?;
            names.push(user);
        }
        Ok(names)
    }

    /// Keeps the users of the htpasswd file `source` in step with its `text`, as Pyjojo
    /// did by reading the file on each request: its users are stored with their hash and
    /// `role` (a user of the same name made with opsbox becomes the file's), and users
    /// that came from this file but are no longer in it are removed, so deleting a line
    /// takes that access away. A file that does not parse changes nothing.
    pub async fn sync_htpasswd(
        &self,
        text: &str,
        role: Role,
        source: &str,
    ) -> CoreResult<HtpasswdSync> {
        let lines = parse_htpasswd(text)?;
        let stored: HashMap<String, UserRecord> = self
            .store
            .list_users()
            .await?
            .into_iter()
            .map(|u| (u.name.clone(), u))
            .collect();
        let mut sync = HtpasswdSync::default();
        for (user, hash) in &lines {
            let unchanged = stored.get(user).is_some_and(|u| {
                u.password_hash == *hash && u.role == role && u.source.as_deref() == Some(source)
            });
            if !unchanged {
                self.import_user_from(user, hash, role, Some(source))
                    .await?;
            }
            sync.users.push(user.clone());
        }
        for user in stored.values() {
            if user.source.as_deref() == Some(source) && !sync.users.contains(&user.name) {
                match self.remove_user(&user.name, LastAdmin::Keep).await {
                    Ok(()) | Err(CoreError::NotFound(_)) => sync.removed.push(user.name.clone()),
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(sync)
    }

    async fn store_user(&self, record: UserRecord, replace: bool) -> CoreResult<User> {
        let user = User {
            name: record.name.clone(),
            role: record.role,
            created_at: record.created_at,
        };
        let event = NewEvent::new(
            "user.added",
            &user.name,
            serde_json::json!({"name": user.name, "role": user.role}),
        );
        if replace {
            self.store.upsert_user(&record, event).await?;
        } else {
            self.store
                .insert_user(&record, event)
                .await
                .map_err(|e| match e {
                    crate::store::StoreError::Conflict(_) => {
                        CoreError::Conflict(format!("user '{}'", user.name))
                    }
                    e => e.into(),
                })?;
        }
        self.forget_required();
        Ok(user)
    }

    pub async fn remove_user(&self, name: &str, last: LastAdmin) -> CoreResult<()> {
        if last == LastAdmin::Keep {
            self.check_removal(Some(name), None).await?;
        }
        let event = NewEvent::new("user.removed", name, serde_json::json!({"name": name}));
        self.store
            .delete_user(name, event)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound(_) => {
                    CoreError::NotFound(format!("user '{name}'"))
                }
                e => e.into(),
            })?;
        self.forget_required();
        Ok(())
    }

    /// Refuses a removal that would leave no admin, or no identity at all: without an
    /// admin nobody can manage users and tokens over the API, and without any identity
    /// the server needs no credentials (a server started on a non-loopback address that
    /// way refuses to start, so it must not get there at run time either).
    async fn check_removal(&self, user: Option<&str>, token: Option<&str>) -> CoreResult<()> {
        let users = self.store.list_users().await?;
        let tokens = self.store.list_tokens().await?;
        let removed_role = match (user, token) {
            (Some(name), _) => users.iter().find(|u| u.name == name).map(|u| u.role),
            (_, Some(id)) => tokens.iter().find(|t| t.id == id).map(|t| t.role),
            _ => None,
        };
        // An unknown name or id: the removal itself says so.
        let Some(removed_role) = removed_role else {
            return Ok(());
        };
        let other_roles: Vec<Role> = users
            .iter()
            .filter(|u| Some(u.name.as_str()) != user)
            .map(|u| u.role)
            .chain(
                tokens
                    .iter()
                    .filter(|t| Some(t.id.as_str()) != token)
                    .map(|t| t.role),
            )
            .collect();
        let what = match (user, token) {
            (Some(name), _) => format!("user '{name}'"),
            (_, Some(id)) => format!("token '{id}'"),
            _ => String::new(),
        };
        if other_roles.is_empty() {
            return Err(CoreError::Conflict(format!(
                "{what} is the last user or token: without one the server would need no \
                 credentials at all. Add another first, or remove it with `--data DIR` \
                 while the server is stopped"
            )));
        }
        if removed_role == Role::Admin && !other_roles.contains(&Role::Admin) {
            return Err(CoreError::Conflict(format!(
                "{what} is the last admin: nobody could manage users and tokens any more. \
                 Add another admin user or token first"
            )));
        }
        Ok(())
    }

    pub async fn users(&self) -> CoreResult<Vec<User>> {
        Ok(self
            .store
            .list_users()
            .await?
            .into_iter()
            .map(|u| User {
                name: u.name,
                role: u.role,
                created_at: u.created_at,
            })
            .collect())
    }

    pub async fn create_token(&self, new: NewToken) -> CoreResult<CreatedToken> {
        let mut bytes = [0u8; 6];
        rand::thread_rng().fill_bytes(&mut bytes);
        let id = hex::encode(bytes);
        let mut secret_bytes = [0u8; 24];
        rand::thread_rng().fill_bytes(&mut secret_bytes);
        let secret = format!("{TOKEN_PREFIX}{id}_{}", hex::encode(secret_bytes));
        let record = TokenRecord {
            id: id.clone(),
            secret_hash: hash_secret(&secret),
            role: new.role,
            nodes: new.nodes,
            description: new.description,
            created_at: Utc::now(),
        };
        let token = token_from_record(&record);
        let event = NewEvent::new(
            "token.created",
            &id,
            serde_json::json!({"id": id, "role": token.role, "nodes": token.nodes}),
        );
        self.store.insert_token(&record, event).await?;
        self.forget_required();
        Ok(CreatedToken { secret, token })
    }

    pub async fn revoke_token(&self, id: &str, last: LastAdmin) -> CoreResult<()> {
        if last == LastAdmin::Keep {
            self.check_removal(None, Some(id)).await?;
        }
        let event = NewEvent::new("token.revoked", id, serde_json::json!({"id": id}));
        self.store
            .delete_token(id, event)
            .await
            .map_err(|e| match e {
                crate::store::StoreError::NotFound(_) => {
                    CoreError::NotFound(format!("token '{id}'"))
                }
                e => e.into(),
            })?;
        self.forget_required();
        Ok(())
    }

    pub async fn tokens(&self) -> CoreResult<Vec<Token>> {
        Ok(self
            .store
            .list_tokens()
            .await?
            .iter()
            .map(token_from_record)
            .collect())
    }
}

fn token_from_record(record: &TokenRecord) -> Token {
    Token {
        id: record.id.clone(),
        role: record.role,
        nodes: record.nodes.clone(),
        description: record.description.clone(),
        created_at: record.created_at,
    }
}

/// The id part of `obx_<id>_<secret>`.
fn token_id(secret: &str) -> Option<&str> {
    let rest = secret.strip_prefix(TOKEN_PREFIX)?;
    let (id, _) = rest.split_once('_')?;
    Some(id)
}

fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// An argon2id PHC string for a new password.
pub fn hash_password(password: &str) -> CoreResult<String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| CoreError::Invalid(format!("cannot hash the password: {e}")))
}

/// Checks a password against a stored hash: argon2id for users made here, and every
/// format an Apache htpasswd file holds (what passlib accepted for Pyjojo): bcrypt
/// `$2y$`, Apache MD5 `$apr1$`, `{SHA}`, DES crypt, and plaintext.
pub fn verify_password(hash: &str, password: &str) -> bool {
    if hash.starts_with("$argon2") {
        return PasswordHash::new(hash)
            .map(|parsed| {
                Argon2::default()
                    .verify_password(password.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
    }
    if let Some(digest) = hash.strip_prefix("{SHA}") {
        // htpasswd -s: base64 of a bare SHA-1. No crypt library names this format, so
        // it is two lines here.
        use sha1::Digest as _;
        let ours = base64::engine::general_purpose::STANDARD
            .encode(sha1::Sha1::digest(password.as_bytes()));
        return constant_time_eq(ours.as_bytes(), digest.as_bytes());
    }
    if hash.starts_with('$') || is_des_crypt(hash) {
        return crypt3_rs::unix::verify(password, hash);
    }
    constant_time_eq(hash.as_bytes(), password.as_bytes())
}

/// A traditional 13-character DES crypt hash.
fn is_des_crypt(hash: &str) -> bool {
    hash.len() == 13
        && hash
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'/')
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Whether removing a user or token may take away the last admin or the last identity.
/// Over the API it may not ([`LastAdmin::Keep`]); the offline commands (`--data`, the
/// server stopped) are the way back from any state and may ([`LastAdmin::MayGo`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LastAdmin {
    Keep,
    MayGo,
}

/// What [`Identities::sync_htpasswd`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct HtpasswdSync {
    /// The file's users.
    pub users: Vec<String>,
    /// Users that came from the file and were removed because it no longer lists them.
    pub removed: Vec<String>,
}

/// Parses an Apache htpasswd file into (user, hash) pairs; blank lines and `#`
/// comments are skipped, a line without `:` is an error naming its number.
pub fn parse_htpasswd(text: &str) -> CoreResult<Vec<(String, String)>> {
    let mut users = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (user, hash) = line.split_once(':').ok_or_else(|| {
            CoreError::Invalid(format!("htpasswd line {}: expected user:hash", number + 1))
        })?;
        users.push((user.to_owned(), hash.to_owned()));
    }
    Ok(users)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn argon2_round_trip() {
        let hash = hash_password("a good: password").unwrap();
        assert!(verify_password(&hash, "a good: password"));
        assert!(!verify_password(&hash, "a good password"));
    }

    #[test]
    fn htpasswd_formats() {
        // Made with: htpasswd -nbm/-nbB/-nbs/-nbd user secret, and passlib's plaintext.
        let apr1 = "$apr1$RandSalt$PgCXHRrkpSt4cbyC2C6bm/"; // "password"
        assert!(verify_password(apr1, "password"));
        assert!(!verify_password(apr1, "passwort"));
        let bcrypt = "$2y$05$bvIG6Nmid91Mu9RcmmWZfO5HJIMCT8riNW0hEp8f6/FuA2/mHZFpe";
        assert!(verify_password(bcrypt, "password"));
        assert!(!verify_password(bcrypt, "Password"));
        // {SHA} of "password"
        assert!(verify_password(
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "password"
        ));
        assert!(!verify_password(
            "{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=",
            "passwore"
        ));
        assert!(verify_password("aZGJuE6EXrjEE", "test"));
        assert!(verify_password("plain", "plain"));
        assert!(!verify_password("plain", "plan"));
        let users = parse_htpasswd("# c\nalice:$apr1$x$y\n\nbob:{SHA}abc\n").unwrap();
        assert_eq!(users.len(), 2);
        assert!(parse_htpasswd("nocolon").is_err());
    }

    #[test]
    fn token_ids() {
        assert_eq!(token_id("obx_abc_def"), Some("abc"));
        assert_eq!(token_id("abc_def"), None);
        assert_eq!(token_id("obx_nounderscore"), None);
    }
}
