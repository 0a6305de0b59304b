//! The model against a real store, with the example charms whose hooks really run on
//! the server's own node: relation rules, unit numbers never reused, destroy with
//! units and relations, hooks and statuses, and the watcher (snapshot, changes, resume).

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;

use common::{eventually, open_with, TestCore};
use opsbox_api::model::{AddUnitsRequest, ConfigChange, DeployRequest, UnitStatus};
use opsbox_core::model::Delta;
use opsbox_core::CoreError;

fn charms_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/charms")
}

async fn open() -> TestCore {
    open_with(&[], |c| c.model.charms_dir = charms_dir()).await
}

fn deploy(name: &str, charm: &str, units: u32) -> DeployRequest {
    DeployRequest {
        name: name.into(),
        charm: charm.into(),
        num_units: units,
        config: BTreeMap::new(),
        constraints: BTreeMap::new(),
        to: None,
    }
}

async fn until_status(t: &TestCore, unit: &str, status: UnitStatus) {
    eventually(&format!("{unit} to be {}", status.as_str()), 20, || async {
        let u = t.core.model.unit(unit).await.ok()?;
        (u.status == status).then_some(())
    })
    .await
}

async fn until_gone(t: &TestCore, unit: &str) {
    eventually(&format!("{unit} to be gone"), 20, || async {
        t.core.model.unit(unit).await.is_err().then_some(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hooks_run_and_relations_pass_settings_between_units() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "cs:precise/mysql", 1), "admin")
        .await
        .unwrap();
    model
        .deploy(deploy("blog", "cs:precise/wordpress-3", 1), "admin")
        .await
        .unwrap();
    until_status(&t, "db/0", UnitStatus::Started).await;
    until_status(&t, "blog/0", UnitStatus::Started).await;
    let relation = model
        .relate(&["blog".to_string(), "db".to_string()])
        .await
        .unwrap();
    assert_eq!(relation.key, "blog:db db:db");
    assert_eq!(relation.interface, "mysql");
    // mysql's joined hook sets credentials; wordpress's changed hook writes them.
    let settings = eventually("db/0 to set its relation settings", 20, || async {
        let status = model.status().await;
        let r = status.relations.iter().find(|r| r.id == relation.id)?;
        r.settings.get("db/0").cloned()
    })
    .await;
    assert_eq!(settings.get("database").map(String::as_str), Some("blog"));
    let config = eventually("wordpress to write wp-config.php", 20, || async {
        let jobs = t.core.jobs.list(&Default::default()).await.unwrap();
        let job = jobs
            .iter()
            .find(|j| j.script == "hook-blog-0-db-relation-changed")?;
        let path = t
            .core
            .jobs
            .results_dir(&job.name)
            .join("map-0/wp-config.php");
        std::fs::read_to_string(path)
            .ok()
            .filter(|text| text.contains("DB_NAME"))
    })
    .await;
    assert!(config.contains("'blog'"), "{config}");
    let db = model.unit("db/0").await.unwrap();
    assert_eq!(db.ports, vec!["3306/tcp".to_string()]);
    assert_eq!(db.machine, "1");
    assert_eq!(model.unit("blog/0").await.unwrap().machine, "2");

    // The same relation twice, and a pair with no shared interface, are refused.
    let again = model.relate(&["db".into(), "blog".into()]).await;
    assert!(matches!(again, Err(CoreError::Conflict(_))), "{again:?}");
    model
        .deploy(deploy("lb", "haproxy", 0), "admin")
        .await
        .unwrap();
    let err = model
        .relate(&["lb".into(), "db".into()])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no relations found"), "{err}");
    let lb = model.relate(&["blog".into(), "lb".into()]).await.unwrap();
    assert_eq!(lb.key, "lb:reverseproxy blog:website");
    assert_eq!(lb.interface, "http");
    let err = model
        .relate(&["blog:nosuch".into(), "db".into()])
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("no \"nosuch\" relation"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unit_numbers_are_never_reused_and_destroy_takes_units_and_relations() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    model
        .deploy(deploy("blog", "wordpress", 2), "admin")
        .await
        .unwrap();
    model.relate(&["blog".into(), "db".into()]).await.unwrap();
    until_status(&t, "blog/1", UnitStatus::Started).await;
    model.destroy_units(&["blog/1".into()]).await.unwrap();
    until_gone(&t, "blog/1").await;
    let added = model
        .add_units(
            "blog",
            AddUnitsRequest {
                num_units: 2,
                to: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(added, vec!["blog/2".to_string(), "blog/3".to_string()]);
    let err = model
        .destroy_units(&["blog/0".into(), "blog/9".into()])
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(
        err,
        "some units were not destroyed: unit \"blog/9\" does not exist"
    );
    // Destroying the application takes its units, then it and its relation.
    model.destroy_application("blog").await.unwrap();
    eventually("blog to be gone", 30, || async {
        let status = model.status().await;
        (status.applications.iter().all(|a| a.name != "blog")
            && status.units.iter().all(|u| u.application != "blog")
            && status.relations.is_empty())
        .then_some(())
    })
    .await;
    let status = model.status().await;
    // Only machine 0 and db's machine are left.
    let machines: Vec<&str> = status.machines.iter().map(|m| m.id.as_str()).collect();
    assert_eq!(machines, vec!["0", "1"]);
    // A new application of the same name starts numbering where the old one stopped.
    model
        .deploy(deploy("blog", "wordpress", 1), "admin")
        .await
        .unwrap();
    assert!(model.unit("blog/4").await.is_ok());
    let err = model
        .deploy(deploy("blog", "wordpress", 1), "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("already exists"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_is_checked_against_the_charm_and_a_failed_hook_puts_the_unit_in_error() {
    let t = open().await;
    let model = &t.core.model;
    let mut request = deploy("blog", "wordpress", 1);
    request.config.insert("nosuch".into(), "x".into());
    let err = model
        .deploy(request, "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown option \"nosuch\""), "{err}");
    let err = model
        .deploy(deploy("many", "wordpress", 5000), "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 1000 units"), "{err}");
    let mut request = deploy("blog", "wordpress", 1);
    request.config.insert("engine".into(), "a\0b".into());
    let err = model
        .deploy(request, "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("NUL"), "{err}");
    let mut request = deploy("blog", "wordpress", 1);
    request.constraints.insert("cpu-cores".into(), 4.into());
    model.deploy(request, "admin").await.unwrap();
    until_status(&t, "blog/0", UnitStatus::Started).await;
    let err = model
        .set_config(
            "blog",
            ConfigChange {
                set: [("debug".to_string(), "maybe".to_string())].into(),
                unset: vec![],
            },
        )
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("expected boolean"), "{err}");
    // wordpress's config-changed refuses an unknown engine: the unit goes to error.
    model
        .set_config(
            "blog",
            ConfigChange {
                set: [("engine".to_string(), "lighttpd".to_string())].into(),
                unset: vec![],
            },
        )
        .await
        .unwrap();
    until_status(&t, "blog/0", UnitStatus::Error).await;
    let unit = model.unit("blog/0").await.unwrap();
    assert_eq!(unit.status_info, "hook failed: \"config-changed\"");
    let config = model.config("blog").await.unwrap();
    assert_eq!(config.config["engine"].value, Some("lighttpd".into()));
    assert!(!config.config["engine"].default);
    assert!(config.config["tuning"].default);
    assert_eq!(config.constraints["cpu-cores"], 4);
    // Fixed config, then a retry: the unit is back.
    model
        .set_config(
            "blog",
            ConfigChange {
                set: [("engine".to_string(), "apache".to_string())].into(),
                unset: vec![],
            },
        )
        .await
        .unwrap();
    model.resolved("blog/0", true).await.unwrap();
    until_status(&t, "blog/0", UnitStatus::Started).await;
    assert!(model.resolved("blog/0", true).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_watcher_gives_a_snapshot_then_only_changes_and_resumes_after_a_restart() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    until_status(&t, "db/0", UnitStatus::Started).await;
    let mut watcher = model.watcher();
    let first = watcher.next().await.unwrap();
    let kinds: Vec<(String, String)> = first.iter().map(|d| (d.kind.clone(), d.id())).collect();
    assert_eq!(
        kinds,
        vec![
            ("application".to_string(), "db".to_string()),
            ("machine".to_string(), "0".to_string()),
            ("machine".to_string(), "1".to_string()),
            ("unit".to_string(), "db/0".to_string()),
        ]
    );
    assert!(first.iter().all(|d| !d.removed));
    // A change, then an entity that comes and goes before the next call.
    model.expose("db", true).await.unwrap();
    model
        .deploy(deploy("tmp", "haproxy", 0), "admin")
        .await
        .unwrap();
    model.destroy_application("tmp").await.unwrap();
    let next = watcher.next().await.unwrap();
    assert_eq!(next.len(), 1, "{next:?}");
    assert_eq!(next[0].kind, "application");
    assert_eq!(next[0].data["exposed"], true);
    // Removal of an entity the watcher has seen.
    model.destroy_units(&["db/0".into()]).await.unwrap();
    let mut removed: Vec<Delta> = Vec::new();
    while !removed.iter().any(|d| d.kind == "unit" && d.removed) {
        removed.extend(watcher.next().await.unwrap());
    }
    let unit = removed
        .iter()
        .find(|d| d.kind == "unit" && d.removed)
        .unwrap();
    assert_eq!(unit.data["name"], "db/0");
    assert_eq!(unit.data["status"], "stopped");

    // After a restart the model is all there, and a watcher from scratch sees it.
    let data_root = t.root.path().to_path_buf();
    t.core.shutdown().await;
    let TestCore { core, root } = t;
    drop(core);
    let mut config = common::config(&data_root);
    config.model.charms_dir = charms_dir();
    let core = opsbox_core::Core::open(config).await.unwrap();
    let status = core.model.status().await;
    assert_eq!(status.applications.len(), 1, "{status:#?}");
    assert!(status.applications[0].exposed);
    assert!(status.units.is_empty());
    let mut watcher = core.model.watcher();
    let snapshot = watcher.next().await.unwrap();
    assert_eq!(snapshot.len(), 2, "{snapshot:?}");
    drop(root);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_event_log_resumes_the_model_from_the_revision_of_a_status() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 0), "admin")
        .await
        .unwrap();
    let status = model.status().await;
    model.expose("db", true).await.unwrap();
    model
        .set_config(
            "db",
            ConfigChange {
                set: [("dataset-size".to_string(), "50%".to_string())].into(),
                unset: vec![],
            },
        )
        .await
        .unwrap();
    // Everything after the status's revision, and nothing before it.
    let page = t.core.events.page(status.revision, 100).await.unwrap();
    let kinds: Vec<&str> = page.events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        ["model.application.change", "model.application.change"]
    );
    assert_eq!(page.events[0].data["exposed"], true);
    assert_eq!(page.events[1].data["config"]["dataset-size"], "50%");
    // A watcher snapshot is as of the newest of them.
    let mut watcher = model.watcher();
    watcher.next().await.unwrap();
    assert_eq!(watcher.revision(), page.events[1].rev);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn queued_hooks_survive_a_restart_and_the_interrupted_one_runs_again() {
    // A charm whose install takes a while, so the server stops in the middle of it.
    let root = tempfile::tempdir().unwrap();
    let charms = root.path().join("charms");
    let hooks = charms.join("slow/hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::write(
        charms.join("slow/metadata.yaml"),
        "name: slow\nsummary: slow\n",
    )
    .unwrap();
    let marker = root.path().join("installs");
    for (hook, body) in [
        (
            "install",
            // The first run waits to be cut short by the stop; the rerun goes through.
            format!(
                "echo once >> {m}\n[ \"$(wc -l < {m})\" -ge 2 ] || sleep 30",
                m = marker.display()
            ),
        ),
        ("start", "echo started".to_string()),
    ] {
        let path = hooks.join(hook);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let config = |charms: &std::path::Path| {
        let mut config = common::config(root.path());
        config.model.charms_dir = charms.to_path_buf();
        config
    };
    let core = opsbox_core::Core::open(config(&charms)).await.unwrap();
    core.model
        .deploy(deploy("s", "slow", 1), "admin")
        .await
        .unwrap();
    eventually("the install hook to start", 20, || async {
        std::fs::metadata(&marker).is_ok().then_some(())
    })
    .await;
    core.shutdown().await;
    // The scheduler outlives the shutdown in this process (a real server exits): give
    // it time to settle the killed install, which must not count as a failure.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    drop(core);

    let core = opsbox_core::Core::open(config(&charms)).await.unwrap();
    eventually("s/0 to start after the restart", 30, || async {
        let unit = core.model.unit("s/0").await.ok()?;
        (unit.status == UnitStatus::Started).then_some(())
    })
    .await;
    // The interrupted install ran again; nothing is left queued.
    let installs = std::fs::read_to_string(&marker).unwrap();
    assert_eq!(installs.lines().count(), 2, "{installs}");
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_of_one_application_meet_and_see_each_others_settings() {
    let root = tempfile::tempdir().unwrap();
    let charms = root.path().join("charms");
    let hooks = charms.join("cluster/hooks");
    std::fs::create_dir_all(&hooks).unwrap();
    std::fs::write(
        charms.join("cluster/metadata.yaml"),
        "name: cluster\nsummary: peers\npeers:\n  ring:\n    interface: ring\n",
    )
    .unwrap();
    for (hook, body) in [
        ("ring-relation-joined", "echo \"relation-set addr=$JUJU_UNIT_NAME\""),
        (
            "ring-relation-changed",
            "[ -n \"$RELATION_ADDR\" ] && echo \"$JUJU_UNIT_NAME sees $RELATION_ADDR\" > \"$OPSBOX_RESULTS/peer\"; true",
        ),
    ] {
        let path = hooks.join(hook);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    let mut config = common::config(root.path());
    config.model.charms_dir = charms;
    let core = opsbox_core::Core::open(config).await.unwrap();
    core.model
        .deploy(deploy("c", "cluster", 2), "admin")
        .await
        .unwrap();
    let status = core.model.status().await;
    assert_eq!(status.relations.len(), 1);
    assert_eq!(status.relations[0].key, "c:ring");
    // Each unit set its address, and each saw the other's in a changed hook.
    let seen = eventually("both peers to see each other", 30, || async {
        let jobs = core.jobs.list(&Default::default()).await.unwrap();
        let mut seen = Vec::new();
        for job in jobs
            .iter()
            .filter(|j| j.script.ends_with("ring-relation-changed"))
        {
            let path = core.jobs.results_dir(&job.name).join("map-0/peer");
            if let Ok(text) = std::fs::read_to_string(path) {
                seen.push(text.trim().to_owned());
            }
        }
        seen.sort();
        seen.dedup();
        (seen.len() == 2).then_some(seen)
    })
    .await;
    assert_eq!(seen, ["c/0 sees c/1", "c/1 sees c/0"]);
    let relation = core.model.status().await.relations.remove(0);
    assert_eq!(relation.settings["c/0"]["addr"], "c/0");
    core.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_names_are_checked_for_form_and_length_before_anything_is_made() {
    let t = open().await;
    let model = &t.core.model;
    // What QA deployed: accepted, then every hook failed with ENAMETOOLONG.
    let long = "a".repeat(5000);
    for bad in [
        long.as_str(),
        "mysql-2",
        "Mysql",
        "2mysql",
        "my_sql",
        "mysql-",
    ] {
        let err = model
            .deploy(deploy(bad, "cs:precise/mysql", 1), "admin")
            .await;
        assert!(matches!(err, Err(CoreError::Invalid(_))), "{bad}: {err:?}");
    }
    let err = model
        .deploy(deploy(&long, "mysql", 1), "admin")
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("at most 63"), "{err}");
    let status = model.status().await;
    assert!(status.applications.is_empty(), "{status:?}");
    assert!(status.units.is_empty(), "{status:?}");
    assert_eq!(status.machines.len(), 1, "only machine 0: {status:?}");

    // The longest name allowed still fits in every path its hooks use: its unit starts.
    let longest = format!("mysql-b2-{}", "x".repeat(63 - 9));
    assert_eq!(longest.len(), opsbox_core::model::MAX_APP_NAME_LEN);
    model
        .deploy(deploy(&longest, "cs:precise/mysql", 1), "admin")
        .await
        .unwrap();
    until_status(&t, &format!("{longest}/0"), UnitStatus::Started).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn size_constraints_take_juju_suffixes_and_are_kept_in_megabytes() {
    let t = open().await;
    let model = &t.core.model;
    let mut request = deploy("blog", "wordpress", 0);
    request.constraints.insert("mem".into(), "4G".into());
    request
        .constraints
        .insert("root-disk".into(), "1.5G".into());
    request.constraints.insert("cpu-cores".into(), "2".into());
    request.constraints.insert("arch".into(), "amd64".into());
    model.deploy(request, "admin").await.unwrap();
    let constraints = model.config("blog").await.unwrap().constraints;
    assert_eq!(
        serde_json::to_value(&constraints).unwrap(),
        serde_json::json!({"mem": 4096, "root-disk": 1536, "cpu-cores": 2, "arch": "amd64"})
    );

    // Replacing them: the same rule, and what the application reports is what was kept.
    let set = |pairs: &[(&str, serde_json::Value)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<BTreeMap<_, _>>()
    };
    model
        .set_constraints(
            "blog",
            set(&[("mem", "512M".into()), ("root-disk", 2048.into())]),
        )
        .await
        .unwrap();
    let app = model.application("blog").await.unwrap();
    assert_eq!(app.constraints["mem"], 512);
    assert_eq!(app.constraints["root-disk"], 2048);
    for bad in ["4g", "-1G", "4GB", "lots"] {
        let err = model
            .set_constraints("blog", set(&[("mem", bad.into())]))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::Invalid(_)), "{bad}: {err:?}");
        assert!(err.to_string().contains("M, G, T or P suffix"), "{err}");
    }
    assert_eq!(
        model.application("blog").await.unwrap().constraints["mem"],
        512
    );

    // A unit's machine carries the same megabytes.
    let mut request = deploy("db", "mysql", 1);
    request.constraints.insert("mem".into(), "0.5G".into());
    model.deploy(request, "admin").await.unwrap();
    let machine = model.unit("db/0").await.unwrap().machine;
    let status = model.status().await;
    let machine = status.machines.iter().find(|m| m.id == machine).unwrap();
    assert_eq!(machine.constraints["mem"], 512);
}

/// Writes a charm `name` under `charms`: its metadata and `#!/bin/sh` hooks.
fn write_charm(charms: &std::path::Path, name: &str, hooks: &[(&str, &str)]) {
    let dir = charms.join(name);
    std::fs::create_dir_all(dir.join("hooks")).unwrap();
    std::fs::write(
        dir.join("metadata.yaml"),
        format!("name: {name}\nsummary: {name}\n"),
    )
    .unwrap();
    for (hook, body) in hooks {
        let path = dir.join("hooks").join(hook);
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
}

/// A core whose charms directory holds the charms `write` puts in it.
async fn open_with_charms(write: impl FnOnce(&std::path::Path)) -> (TestCore, tempfile::TempDir) {
    let charms = tempfile::tempdir().unwrap();
    write(charms.path());
    let dir = charms.path().to_path_buf();
    (open_with(&[], |c| c.model.charms_dir = dir).await, charms)
}

/// How many jobs of a unit's hook there were (`hook-s-0-stop` for s/0's stop).
async fn hook_runs(t: &TestCore, unit: &str, hook: &str) -> usize {
    let script = format!("hook-{}-{hook}", unit.replace('/', "-"));
    let jobs = t.core.jobs.list(&Default::default()).await.unwrap();
    jobs.iter().filter(|j| j.script == script).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_stop_hook_waits_in_error_for_resolved_instead_of_running_again() {
    // QA: a dying unit's failing stop hook ran about 8 times a second, forever.
    let (t, _charms) = open_with_charms(|dir| {
        write_charm(dir, "stubborn", &[("stop", "echo cannot stop >&2; exit 1")])
    })
    .await;
    let model = &t.core.model;
    model
        .deploy(deploy("s", "stubborn", 1), "admin")
        .await
        .unwrap();
    until_status(&t, "s/0", UnitStatus::Started).await;
    model.destroy_units(&["s/0".into()]).await.unwrap();
    until_status(&t, "s/0", UnitStatus::Error).await;
    let unit = model.unit("s/0").await.unwrap();
    assert_eq!(unit.status_info, "hook failed: \"stop\"");
    assert_eq!(unit.life, opsbox_api::model::Life::Dying);
    tokio::time::sleep(std::time::Duration::from_millis(1200)).await;
    assert_eq!(
        hook_runs(&t, "s/0", "stop").await,
        1,
        "the stop hook ran again"
    );
    assert_eq!(model.unit("s/0").await.unwrap().status, UnitStatus::Error);

    // Resolved with retry runs it once more; it fails again and waits again.
    model.resolved("s/0", true).await.unwrap();
    eventually("the retried stop hook to run", 20, || async {
        (hook_runs(&t, "s/0", "stop").await == 2).then_some(())
    })
    .await;
    until_status(&t, "s/0", UnitStatus::Error).await;
    tokio::time::sleep(std::time::Duration::from_millis(600)).await;
    assert_eq!(
        hook_runs(&t, "s/0", "stop").await,
        2,
        "the stop hook ran again"
    );

    // Resolved without retry takes the stop as done: the unit goes on dying, and goes.
    model.resolved("s/0", false).await.unwrap();
    until_gone(&t, "s/0").await;
    assert_eq!(hook_runs(&t, "s/0", "stop").await, 2);
    let status = model.status().await;
    assert_eq!(
        status.machines.len(),
        1,
        "only machine 0 is left: {status:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_machine_with_a_dying_unit_on_it_is_not_destroyed_unless_forced() {
    let (t, _charms) = open_with_charms(|dir| {
        write_charm(dir, "stubborn", &[("stop", "echo cannot stop >&2; exit 1")])
    })
    .await;
    let model = &t.core.model;
    model
        .deploy(deploy("s", "stubborn", 1), "admin")
        .await
        .unwrap();
    until_status(&t, "s/0", UnitStatus::Started).await;
    let machine = model.unit("s/0").await.unwrap().machine;
    let err = model
        .destroy_machines(std::slice::from_ref(&machine), false)
        .await
        .unwrap_err()
        .to_string();
    assert_eq!(err, format!("machine {machine} has unit \"s/0\" assigned"));

    // Dying, its stop hook failed: still on the machine.
    model.destroy_units(&["s/0".into()]).await.unwrap();
    until_status(&t, "s/0", UnitStatus::Error).await;
    let err = model
        .destroy_machines(std::slice::from_ref(&machine), false)
        .await
        .unwrap_err();
    assert!(matches!(err, CoreError::Invalid(_)), "{err:?}");
    assert_eq!(
        err.to_string(),
        format!("machine {machine} has unit \"s/0\" assigned")
    );
    let status = model.status().await;
    assert!(
        status.machines.iter().any(|m| m.id == machine),
        "{status:?}"
    );

    // Forced: the machine is dying, takes no new unit, and goes with its last unit.
    model
        .destroy_machines(std::slice::from_ref(&machine), true)
        .await
        .unwrap();
    let status = model.status().await;
    let dying = status.machines.iter().find(|m| m.id == machine).unwrap();
    assert_eq!(dying.life, opsbox_api::model::Life::Dying);
    let err = model
        .add_units(
            "s",
            AddUnitsRequest {
                num_units: 1,
                to: Some(machine.clone()),
            },
        )
        .await;
    assert!(matches!(err, Err(CoreError::NotFound(_))), "{err:?}");
    model.resolved("s/0", false).await.unwrap();
    until_gone(&t, "s/0").await;
    eventually("the machine to go with its unit", 10, || async {
        let status = model.status().await;
        status
            .machines
            .iter()
            .all(|m| m.id != machine)
            .then_some(())
    })
    .await;
}

/// A node that says hello as an agent would (nothing runs its tasks).
async fn connect_node(t: &TestCore, id: &str, label: &str) -> opsbox_core::nodes::Connection {
    t.core
        .nodes
        .connect(opsbox_api::AgentMessage::Hello {
            node_id: id.into(),
            labels: vec![label.into()],
            slots: 1,
            hostname: None,
            version: None,
            running: vec![],
            instance: Some(format!("{id}-agent")),
            prefetch: 0,
        })
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn units_and_machines_on_a_node_that_is_gone_read_down_in_status_and_watcher() {
    let t = open().await;
    let model = &t.core.model;
    let far = connect_node(&t, "far", "far").await;
    let machines = model
        .add_machines(vec![[("tags".to_string(), "far".into())].into()])
        .await
        .unwrap();
    let machine = machines[0].clone();
    let mut request = deploy("db", "mysql", 1);
    request.to = Some(machine.clone());
    model.deploy(request, "admin").await.unwrap();
    let status = model.status().await;
    let m = status.machines.iter().find(|m| m.id == machine).unwrap();
    assert_eq!((m.node.as_str(), m.agent_lost), ("far", false));
    assert_eq!(m.status, "started");
    assert!(!status.units[0].agent_lost);
    let mut watcher = model.watcher();
    watcher.next().await.unwrap();

    // The node goes: its machine and unit read down, the server's machine 0 does not.
    t.core.nodes.disconnect("far", far.session).await.unwrap();
    let status = model.status().await;
    let m = status.machines.iter().find(|m| m.id == machine).unwrap();
    assert!(m.agent_lost);
    assert_eq!(m.status, "down");
    assert!(status.units[0].agent_lost, "{status:?}");
    let zero = status.machines.iter().find(|m| m.id == "0").unwrap();
    assert!(!zero.agent_lost);
    assert_eq!(zero.status, "started");
    let deltas = watcher.next().await.unwrap();
    let unit = deltas
        .iter()
        .find(|d| d.kind == "unit" && d.id() == "db/0")
        .unwrap_or_else(|| panic!("no unit delta: {deltas:?}"));
    assert_eq!(unit.data["agent_lost"], true);
    let m = deltas
        .iter()
        .find(|d| d.kind == "machine" && d.id() == machine)
        .unwrap_or_else(|| panic!("no machine delta: {deltas:?}"));
    assert_eq!(m.data["status"], "down");
    assert_eq!(m.data["agent_lost"], true);
    assert!(deltas.iter().all(|d| d.id() != "0"), "{deltas:?}");
    // A watcher from scratch sees the same.
    let snapshot = model.watcher().next().await.unwrap();
    let unit = snapshot.iter().find(|d| d.kind == "unit").unwrap();
    assert_eq!(unit.data["agent_lost"], true);

    // It comes back: they are up again, as last known.
    let _far = connect_node(&t, "far", "far").await;
    let status = model.status().await;
    assert!(!status.units[0].agent_lost);
    let m = status.machines.iter().find(|m| m.id == machine).unwrap();
    assert_eq!((m.status.as_str(), m.agent_lost), ("started", false));
    let deltas = watcher.next().await.unwrap();
    let m = deltas
        .iter()
        .find(|d| d.kind == "machine" && d.id() == machine)
        .unwrap_or_else(|| panic!("no machine delta: {deltas:?}"));
    assert_eq!(m.data["status"], "started");
    assert!(m.data.get("agent_lost").is_none(), "{m:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_patterns_name_applications_units_or_machines_and_bring_their_machines_and_relations(
) {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    model
        .deploy(deploy("blog", "wordpress", 2), "admin")
        .await
        .unwrap();
    model
        .deploy(deploy("lb", "haproxy", 0), "admin")
        .await
        .unwrap();
    model.relate(&["blog".into(), "db".into()]).await.unwrap();
    let machine_of = |unit: &str| {
        let unit = unit.to_owned();
        async move { model.unit(&unit).await.unwrap().machine }
    };
    let (db0, blog0, blog1) = (
        machine_of("db/0").await,
        machine_of("blog/0").await,
        machine_of("blog/1").await,
    );
    let names = |patterns: &[&str]| {
        let patterns: Vec<String> = patterns.iter().map(|p| p.to_string()).collect();
        async move {
            let s = model.status_matching(&patterns).await;
            let apps: Vec<String> = s.applications.iter().map(|a| a.name.clone()).collect();
            let units: Vec<String> = s.units.iter().map(|u| u.name.clone()).collect();
            let machines: Vec<String> = s.machines.iter().map(|m| m.id.clone()).collect();
            let relations: Vec<String> = s.relations.iter().map(|r| r.key.clone()).collect();
            (apps, units, machines, relations)
        }
    };
    // QA: "blog/0" found nothing.
    assert_eq!(
        names(&["blog/0"]).await,
        (
            vec!["blog".to_string()],
            vec!["blog/0".to_string()],
            vec![blog0.clone()],
            vec!["blog:db db:db".to_string()]
        )
    );
    assert_eq!(
        names(&["db"]).await,
        (
            vec!["db".to_string()],
            vec!["db/0".to_string()],
            vec![db0.clone()],
            vec!["blog:db db:db".to_string()]
        )
    );
    let (_, units, machines, _) = names(&["blog/*"]).await;
    assert_eq!(units, ["blog/0", "blog/1"]);
    assert_eq!(machines, [blog0.clone(), blog1]);
    // A machine brings its units; an application without units comes alone.
    let (apps, units, machines, _) = names(&[db0.as_str(), "lb"]).await;
    assert_eq!(apps, ["db", "lb"]);
    assert_eq!(units, ["db/0"]);
    assert_eq!(machines, [db0]);
    let (apps, units, machines, relations) = names(&["nosuch"]).await;
    assert!(apps.is_empty() && units.is_empty() && machines.is_empty() && relations.is_empty());
    // No pattern: everything.
    let (apps, _, machines, _) = names(&[]).await;
    assert_eq!(apps.len(), 3);
    assert_eq!(machines.len(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_charm_runs_upgrade_charm_then_config_changed_on_each_unit() {
    let (t, _charms) = open_with_charms(|dir| {
        write_charm(
            dir,
            "up",
            &[
                ("upgrade-charm", "echo \"upgraded $JUJU_UNIT_NAME\""),
                ("config-changed", "echo configured"),
            ],
        )
    })
    .await;
    let model = &t.core.model;
    model
        .deploy(deploy("u", "cs:precise/up-1", 2), "admin")
        .await
        .unwrap();
    until_status(&t, "u/0", UnitStatus::Started).await;
    until_status(&t, "u/1", UnitStatus::Started).await;
    assert_eq!(hook_runs(&t, "u/0", "upgrade-charm").await, 0);
    model.set_charm("u", "cs:precise/up-2").await.unwrap();
    for unit in ["u/0", "u/1"] {
        eventually(
            &format!("{unit} to run upgrade-charm and config-changed"),
            20,
            || async {
                (hook_runs(&t, unit, "upgrade-charm").await == 1
                    && hook_runs(&t, unit, "config-changed").await == 2)
                    .then_some(())
            },
        )
        .await;
        let u = model.unit(unit).await.unwrap();
        assert_eq!(u.charm_url, "cs:precise/up-2");
        let jobs = t.core.jobs.list(&Default::default()).await.unwrap();
        let job = jobs
            .iter()
            .find(|j| j.script == format!("hook-{}-upgrade-charm", unit.replace('/', "-")))
            .unwrap();
        assert_eq!(job.state, opsbox_api::JobState::Succeeded, "{job:?}");
        let output = t.core.jobs.output(&job.name).await.unwrap();
        assert_eq!(output.stdout, [format!("upgraded {unit}")]);
        // On the unit's node, like its other hooks.
        let tasks = t.core.nodes.tasks(&job.name).await.unwrap();
        assert_eq!(tasks[0].node.as_deref(), Some(u.node.as_str()));
    }
    // The URL it has already: nothing to run.
    model.set_charm("u", "cs:precise/up-2").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    assert_eq!(hook_runs(&t, "u/0", "upgrade-charm").await, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn annotations_need_an_existing_entity_and_go_with_it() {
    let t = open().await;
    let model = &t.core.model;
    let pairs = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
    // QA: annotations on entities that do not exist were kept.
    for (tag, error) in [
        ("service-nosuch", "application \"nosuch\" not found"),
        ("unit-nosuch-0", "unit \"nosuch/0\" not found"),
        ("machine-42", "machine 42 not found"),
        ("environment-0000", "environment \"0000\" not found"),
        (
            "charm-cs:precise/nosuch",
            "charm \"cs:precise/nosuch\" not found",
        ),
    ] {
        let err = model
            .set_annotations(tag, pairs("a", "b"))
            .await
            .unwrap_err();
        assert!(matches!(err, CoreError::NotFound(_)), "{tag}: {err:?}");
        assert_eq!(err.to_string(), error);
        assert!(model.annotations(tag).await.is_err(), "{tag}");
    }
    let err = model.set_annotations("bogus", pairs("a", "b")).await;
    assert!(matches!(err, Err(CoreError::Invalid(_))), "{err:?}");

    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    let machine = model.unit("db/0").await.unwrap().machine;
    model
        .set_annotations("service-db", pairs("owner", "team-a"))
        .await
        .unwrap();
    // The client writes a unit's tag both ways; it is one entity.
    model
        .set_annotations("unit-db/0", pairs("note", "first"))
        .await
        .unwrap();
    assert_eq!(
        model.annotations("unit-db-0").await.unwrap(),
        pairs("note", "first")
    );
    model
        .set_annotations(&format!("machine-{machine}"), pairs("rack", "r1"))
        .await
        .unwrap();
    let env = format!("environment-{}", model.uuid());
    model.set_annotations(&env, pairs("k", "v")).await.unwrap();
    model
        .set_annotations("charm-cs:precise/mysql", pairs("k", "v"))
        .await
        .unwrap();
    let mut watcher = model.watcher();
    watcher.next().await.unwrap();

    // The entities go: so do their annotations, and the watcher is told.
    model.destroy_application("db").await.unwrap();
    let mut removed = Vec::new();
    while removed.len() < 3 {
        for delta in watcher.next().await.unwrap() {
            if delta.kind == "annotation" && delta.removed {
                removed.push(delta.id());
            }
        }
    }
    removed.sort();
    assert_eq!(
        removed,
        [
            format!("machine-{machine}"),
            "service-db".to_string(),
            "unit-db-0".to_string()
        ]
    );
    assert_eq!(model.annotations(&env).await.unwrap(), pairs("k", "v"));
    model
        .deploy(deploy("db", "mysql", 0), "admin")
        .await
        .unwrap();
    assert!(model.annotations("service-db").await.unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_entities_are_reported_dead() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    until_status(&t, "db/0", UnitStatus::Started).await;
    let machine = model.unit("db/0").await.unwrap().machine;
    let mut watcher = model.watcher();
    watcher.next().await.unwrap();
    model.destroy_application("db").await.unwrap();
    let mut removed = BTreeMap::new();
    while removed.len() < 3 {
        for d in watcher.next().await.unwrap() {
            if d.removed {
                removed.insert((d.kind.clone(), d.id()), d.data["life"].clone());
            }
        }
    }
    let dead = serde_json::json!("dead");
    assert_eq!(
        removed,
        BTreeMap::from([
            (("application".to_string(), "db".to_string()), dead.clone()),
            (("machine".to_string(), machine), dead.clone()),
            (("unit".to_string(), "db/0".to_string()), dead),
        ])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_port_lines_are_checked_and_a_bad_one_fails_the_hook() {
    let (t, _charms) = open_with_charms(|dir| {
        write_charm(
            dir,
            "good",
            &[(
                "start",
                "echo open-port 80\necho open-port 8000-8080/UDP\necho open-port icmp",
            )],
        );
        write_charm(
            dir,
            "bad",
            &[("start", "echo open-port 443/tcp\necho open-port 99999/tcp")],
        );
    })
    .await;
    let model = &t.core.model;
    model.deploy(deploy("g", "good", 1), "admin").await.unwrap();
    model.deploy(deploy("b", "bad", 1), "admin").await.unwrap();
    until_status(&t, "g/0", UnitStatus::Started).await;
    assert_eq!(
        model.unit("g/0").await.unwrap().ports,
        ["80/tcp", "8000-8080/udp", "icmp"]
    );
    // QA: garbage was taken as a port.
    until_status(&t, "b/0", UnitStatus::Error).await;
    let unit = model.unit("b/0").await.unwrap();
    assert_eq!(unit.status_info, "hook failed: \"start\"");
    assert_eq!(
        unit.ports,
        ["443/tcp"],
        "the line before the bad one counts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn constraint_values_are_checked_for_every_key() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("blog", "wordpress", 0), "admin")
        .await
        .unwrap();
    let one = |key: &str, value: serde_json::Value| BTreeMap::from([(key.to_string(), value)]);
    for (key, value, why) in [
        ("mem", "abc".into(), "M, G, T or P suffix"),
        ("cpu-cores", "many".into(), "non-negative integer"),
        ("arch", "z80".into(), "one of amd64"),
        ("arch", 64.into(), "one of amd64"),
        ("container", "docker".into(), "one of kvm, lxc, lxd, none"),
        ("instance-type", true.into(), "expected text"),
        ("tags", serde_json::json!([1, 2]), "list of strings"),
    ] {
        let err = model
            .set_constraints("blog", one(key, value.clone()))
            .await
            .unwrap_err();
        assert!(
            matches!(err, CoreError::Invalid(_)),
            "{key}={value}: {err:?}"
        );
        let text = err.to_string();
        assert!(
            text.contains(&format!("bad \"{key}\" constraint")),
            "{text}"
        );
        assert!(text.contains(why), "{text}");
    }
    let mut good = one("arch", "arm64".into());
    good.insert("container".into(), "lxd".into());
    good.insert("tags".into(), serde_json::json!(["a", "b"]));
    good.insert("spaces".into(), "db,web".into());
    good.insert("instance-type".into(), "m1.small".into());
    model.set_constraints("blog", good.clone()).await.unwrap();
    assert_eq!(model.application("blog").await.unwrap().constraints, good);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn min_units_adds_units_and_replaces_destroyed_ones() {
    let t = open().await;
    let model = &t.core.model;
    model
        .deploy(deploy("db", "mysql", 1), "admin")
        .await
        .unwrap();
    let alive = || async {
        let status = model.status().await;
        status
            .units
            .iter()
            .filter(|u| u.life == opsbox_api::model::Life::Alive)
            .map(|u| u.name.clone())
            .collect::<Vec<_>>()
    };
    model.set_min_units("db", 3).await.unwrap();
    assert_eq!(model.application("db").await.unwrap().min_units, 3);
    assert_eq!(alive().await, ["db/0", "db/1", "db/2"]);
    // A destroyed unit is replaced by a new one.
    model.destroy_units(&["db/1".into()]).await.unwrap();
    assert_eq!(alive().await, ["db/0", "db/2", "db/3"]);
    until_gone(&t, "db/1").await;
    // Lower again: nothing goes.
    model.set_min_units("db", 0).await.unwrap();
    model.destroy_units(&["db/0".into()]).await.unwrap();
    assert_eq!(alive().await, ["db/2", "db/3"]);
    let err = model.set_min_units("db", 5000).await.unwrap_err();
    assert!(err.to_string().contains("at most 1000"), "{err}");
}
