//! Users and tokens, as every face authenticates them.

mod common;

use common::*;
use opsbox_api::{NewToken, NewUser, Role};
use opsbox_core::identities::{Credentials, LastAdmin, TOKEN_PREFIX};
use opsbox_core::CoreError;

fn user(name: &str, password: &str, role: Role) -> NewUser {
    NewUser {
        name: name.into(),
        password: password.into(),
        role,
    }
}

fn password(user: &str, password: &str) -> Credentials {
    Credentials::Password {
        user: user.into(),
        password: password.into(),
    }
}

#[tokio::test]
async fn users_authenticate_with_their_password_only() {
    let t = open(&[]).await;
    let ids = &t.core.identities;
    assert!(!ids.auth_required().await.unwrap());

    let colon = "pa:ss:word with spaces";
    let alice = ids
        .add_user(user("alice", colon, Role::Operator))
        .await
        .unwrap();
    assert_eq!(alice.name, "alice");
    assert!(ids.auth_required().await.unwrap());

    let who = ids.authenticate(&password("alice", colon)).await.unwrap();
    assert_eq!(who.name, "alice");
    assert_eq!(who.role, Role::Operator);
    assert!(who.nodes.is_empty());
    // Again: served from the cache of verified passwords, same answer.
    assert_eq!(
        ids.authenticate(&password("alice", colon)).await.unwrap(),
        who
    );

    for (name, pw) in [
        ("alice", "pa"),
        ("alice", "ss:word with spaces"),
        ("alice", "pa:ss:word with spaces "),
        ("alice", ""),
        ("Alice", colon),
        ("bob", colon),
        ("", ""),
    ] {
        let err = ids.authenticate(&password(name, pw)).await.unwrap_err();
        assert!(
            matches!(err, CoreError::Unauthenticated),
            "{name}:{pw} → {err:?}"
        );
    }

    // Duplicate user.
    let err = ids
        .add_user(user("alice", "other", Role::Admin))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, CoreError::Conflict(what) if what.contains("alice")),
        "{err:?}"
    );
    assert!(ids.authenticate(&password("alice", colon)).await.is_ok());

    // Bad names and empty passwords are refused.
    for bad in ["", "has space", "colon:name", "slash/name", &"x".repeat(65)] {
        let err = ids
            .add_user(user(bad, "pw", Role::Reader))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Invalid(_)), "{bad:?}: {err:?}");
    }
    let err = ids
        .add_user(user("carol", "", Role::Reader))
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Invalid(_)), "{err:?}");

    // set_user replaces the password and role: the old (cached) password stops working.
    ids.set_user(user("alice", "new", Role::Admin))
        .await
        .unwrap();
    let err = ids
        .authenticate(&password("alice", colon))
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Unauthenticated), "{err:?}");
    let who = ids.authenticate(&password("alice", "new")).await.unwrap();
    assert_eq!(who.role, Role::Admin);
    let users = ids.users().await.unwrap();
    assert_eq!(users.len(), 1);
    assert_eq!(users[0].role, Role::Admin);

    // Over the API the last identity cannot go: the server would need no credentials.
    assert!(matches!(
        ids.remove_user("alice", LastAdmin::Keep).await,
        Err(CoreError::Conflict(_))
    ));
    assert!(ids.auth_required().await.unwrap());
    // Offline (`--data`) it can: no more access, and no credentials left means no auth
    // required.
    ids.remove_user("alice", LastAdmin::MayGo).await.unwrap();
    assert!(matches!(
        ids.authenticate(&password("alice", "new")).await,
        Err(CoreError::Unauthenticated)
    ));
    assert!(matches!(
        ids.remove_user("alice", LastAdmin::Keep).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(!ids.auth_required().await.unwrap());

    let kinds: Vec<String> = t
        .core
        .events
        .page(0, 100)
        .await
        .unwrap()
        .events
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, ["user.added", "user.added", "user.removed"]);
}

#[tokio::test]
async fn tokens_are_created_authenticated_and_revoked() {
    let t = open(&[]).await;
    let ids = &t.core.identities;
    let created = ids
        .create_token(NewToken {
            role: Role::Reader,
            nodes: vec!["node-1".into()],
            description: Some("ci".into()),
        })
        .await
        .unwrap();
    assert!(created.secret.starts_with(TOKEN_PREFIX));
    assert!(created.secret.contains(&created.token.id));
    assert!(ids.auth_required().await.unwrap());
    let other = ids
        .create_token(NewToken {
            role: Role::Admin,
            nodes: vec![],
            description: None,
        })
        .await
        .unwrap();
    assert_ne!(other.token.id, created.token.id);
    assert_ne!(other.secret, created.secret);

    let who = ids
        .authenticate(&Credentials::Token(created.secret.clone()))
        .await
        .unwrap();
    assert_eq!(who.name, format!("token:{}", created.token.id));
    assert_eq!(who.role, Role::Reader);
    assert_eq!(who.nodes, ["node-1"]);
    assert!(who.require(Role::Reader).is_ok());
    assert!(matches!(
        who.require(Role::Operator),
        Err(CoreError::Forbidden(_))
    ));

    // Tampered secrets: same id with another secret, an unknown id, no prefix, garbage.
    let mut tampered = created.secret.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == '0' { '1' } else { '0' });
    let other_id = other.secret.replace(&other.token.id, &created.token.id);
    for bad in [
        tampered,
        other_id,
        created.secret.trim_start_matches(TOKEN_PREFIX).to_string(),
        format!("{}x", created.secret),
        "obx_nope_nope".into(),
        String::new(),
    ] {
        let err = ids
            .authenticate(&Credentials::Token(bad.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CoreError::Unauthenticated),
            "{bad:?}: {err:?}"
        );
    }

    let listed = ids.tokens().await.unwrap();
    assert_eq!(listed.len(), 2);
    let mine = listed.iter().find(|t| t.id == created.token.id).unwrap();
    assert_eq!(*mine, created.token);
    assert!(
        !format!("{listed:?}").contains(&created.secret),
        "a listing never shows a secret"
    );

    ids.revoke_token(&created.token.id, LastAdmin::Keep)
        .await
        .unwrap();
    assert!(matches!(
        ids.authenticate(&Credentials::Token(created.secret.clone()))
            .await,
        Err(CoreError::Unauthenticated)
    ));
    assert!(matches!(
        ids.revoke_token(&created.token.id, LastAdmin::Keep).await,
        Err(CoreError::NotFound(_))
    ));
    assert!(ids
        .authenticate(&Credentials::Token(other.secret.clone()))
        .await
        .is_ok());
    assert!(ids.auth_required().await.unwrap());
    ids.revoke_token(&other.token.id, LastAdmin::MayGo)
        .await
        .unwrap();
    assert!(!ids.auth_required().await.unwrap());

    // The secret never reaches the event log.
    let page = t.core.events.page(0, 100).await.unwrap();
    let kinds: Vec<&str> = page.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "token.created",
            "token.created",
            "token.revoked",
            "token.revoked"
        ]
    );
    let log = serde_json::to_string(&page.events).unwrap();
    assert!(!log.contains(&created.secret) && !log.contains(&other.secret));
}

#[tokio::test]
async fn htpasswd_users_authenticate_and_identities_outlive_a_restart() {
    let t = open(&[]).await;
    let ids = &t.core.identities;
    // {SHA} and plaintext lines, as `htpasswd -s` and passlib write them.
    let names = ids
        .import_htpasswd(
            "# users\nsha:{SHA}W6ph5Mm5Pz8GgiULbPgzG37mj9g=\n\nplain:pl:ain\n",
            Role::Reader,
        )
        .await
        .unwrap();
    assert_eq!(names, ["sha", "plain"]);
    assert!(ids.authenticate(&password("sha", "password")).await.is_ok());
    assert!(ids
        .authenticate(&password("sha", "Password"))
        .await
        .is_err());
    let who = ids
        .authenticate(&password("plain", "pl:ain"))
        .await
        .unwrap();
    assert_eq!(who.role, Role::Reader);
    assert!(matches!(
        ids.import_htpasswd("no colon here\n", Role::Reader).await,
        Err(CoreError::Invalid(_))
    ));

    let token = ids
        .create_token(NewToken {
            role: Role::Operator,
            nodes: vec![],
            description: None,
        })
        .await
        .unwrap();
    let config = t.core.config.as_ref().clone();
    drop(t.core);
    let core = opsbox_core::Core::open(config).await.unwrap();
    assert!(core.identities.auth_required().await.unwrap());
    assert!(core
        .identities
        .authenticate(&password("sha", "password"))
        .await
        .is_ok());
    let who = core
        .identities
        .authenticate(&Credentials::Token(token.secret))
        .await
        .unwrap();
    assert_eq!(who.role, Role::Operator);
}

#[tokio::test]
async fn an_htpasswd_file_kept_in_step_adds_changes_and_removes_its_users() {
    let t = open(&[]).await;
    let ids = &t.core.identities;
    let file = "htpasswd:/etc/opsbox/passfile";
    ids.add_user(NewUser {
        name: "own".into(),
        password: "own-pw".into(),
        role: Role::Admin,
    })
    .await
    .unwrap();
    let sync = ids
        .sync_htpasswd("a:plain-a\nb:plain-b\n", Role::Operator, file)
        .await
        .unwrap();
    assert_eq!(sync.users, ["a", "b"]);
    assert!(sync.removed.is_empty());
    assert!(ids.authenticate(&password("b", "plain-b")).await.is_ok());

    // A line removed and a hash changed: b loses access, a's new password works.
    let sync = ids
        .sync_htpasswd("a:new-a\n", Role::Operator, file)
        .await
        .unwrap();
    assert_eq!(sync.removed, ["b"]);
    assert!(ids.authenticate(&password("b", "plain-b")).await.is_err());
    assert!(ids.authenticate(&password("a", "plain-a")).await.is_err());
    assert!(ids.authenticate(&password("a", "new-a")).await.is_ok());
    // Users made with opsbox, or kept by another file, are not the file's to remove.
    ids.sync_htpasswd("c:plain-c\n", Role::Reader, "htpasswd:/other")
        .await
        .unwrap();
    let sync = ids.sync_htpasswd("", Role::Operator, file).await.unwrap();
    assert_eq!(sync.removed, ["a"]);
    let mut left: Vec<String> = ids
        .users()
        .await
        .unwrap()
        .into_iter()
        .map(|u| u.name)
        .collect();
    left.sort();
    assert_eq!(left, ["c", "own"]);
    // A file that does not parse changes nothing.
    assert!(ids
        .sync_htpasswd("no colon\n", Role::Operator, "htpasswd:/other")
        .await
        .is_err());
    assert!(ids.authenticate(&password("c", "plain-c")).await.is_ok());
}

#[tokio::test]
async fn the_last_admin_stays_unless_removed_offline() {
    let t = open(&[]).await;
    let ids = &t.core.identities;
    ids.add_user(user("root", "pw", Role::Admin)).await.unwrap();
    let ops = ids
        .create_token(NewToken {
            role: Role::Operator,
            nodes: Vec::new(),
            description: None,
        })
        .await
        .unwrap();
    // Others remain, but no admin would: refused, and nothing changed.
    let refused = ids.remove_user("root", LastAdmin::Keep).await.unwrap_err();
    assert!(
        matches!(&refused, CoreError::Conflict(m) if m.contains("last admin")),
        "{refused:?}"
    );
    assert!(ids.authenticate(&password("root", "pw")).await.is_ok());
    // With a second admin, either may go; a non-admin may go while an admin stays.
    let admin = ids
        .create_token(NewToken {
            role: Role::Admin,
            nodes: Vec::new(),
            description: None,
        })
        .await
        .unwrap();
    ids.revoke_token(&ops.token.id, LastAdmin::Keep)
        .await
        .unwrap();
    ids.remove_user("root", LastAdmin::Keep).await.unwrap();
    assert!(matches!(
        ids.revoke_token(&admin.token.id, LastAdmin::Keep).await,
        Err(CoreError::Conflict(_))
    ));
    ids.revoke_token(&admin.token.id, LastAdmin::MayGo)
        .await
        .unwrap();
    assert!(!ids.auth_required().await.unwrap());
}
