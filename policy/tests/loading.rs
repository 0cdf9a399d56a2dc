//! Loading policies from directories and bundles, reloading them, and refusing broken ones.

use std::fs;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedmesh_policy::{
    DEFAULT_ENTRYPOINT, DecisionLog, LoadError, PolicyLocation, PolicyStore, Reload, TestOutcome,
};
use serde_json::{Value, json};

/// A minimal policy: allow when the input's `user` is in `data.fedmesh.config.users`.
const SMALL_POLICY: &str = r#"
package fedmesh.pop

default allow := false

allow if input.user in data.fedmesh.config.users

deny contains {"rule": "user", "reason": sprintf("user %v is unknown", [input.user])} if not allow

decision := {"allow": allow, "deny": deny}
"#;

fn write_policy(dir: &Path, users: &[&str]) {
    fs::create_dir_all(dir.join("fedmesh/pop")).unwrap();
    fs::write(dir.join("fedmesh/pop/policy.rego"), SMALL_POLICY).unwrap();
    let data = json!({"fedmesh": {"config": {"users": users}}});
    fs::write(dir.join("data.json"), data.to_string()).unwrap();
}

fn allows(store: &PolicyStore, user: &str) -> bool {
    store.current().decide_json(json!({"user": user})).allow
}

#[test]
fn reload_picks_up_changed_data() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let store =
        PolicyStore::open(PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap();
    let first = store.current();
    assert!(allows(&store, "alice"));
    assert!(!allows(&store, "bob"));
    assert_eq!(store.reload_if_changed().unwrap(), Reload::Unchanged);

    write_policy(dir.path(), &["bob"]);
    let Reload::Reloaded { revision } = store.reload_if_changed().unwrap() else {
        panic!("a changed data.json must reload");
    };
    assert_ne!(revision, first.revision());
    assert!(allows(&store, "bob"));
    assert!(!allows(&store, "alice"));

    // A decision holding the old revision keeps deciding with it.
    assert!(first.decide_json(json!({"user": "alice"})).allow);
}

#[test]
fn broken_policy_is_refused_and_the_last_good_one_stays() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let store =
        PolicyStore::open(PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap();
    let good = store.current().revision().to_string();

    fs::write(
        dir.path().join("fedmesh/pop/broken.rego"),
        "package fedmesh.pop\nallow if {",
    )
    .unwrap();
    let err = store.reload_if_changed().unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, LoadError::Compile(_)), "{err:?}");
    assert!(message.contains("fedmesh/pop/broken.rego"), "{message}");
    assert_eq!(store.current().revision(), good);
    assert!(allows(&store, "alice"));

    // Invalid data is refused the same way.
    fs::remove_file(dir.path().join("fedmesh/pop/broken.rego")).unwrap();
    fs::write(dir.path().join("data.json"), "{not json").unwrap();
    assert!(matches!(
        store.reload_if_changed(),
        Err(LoadError::Source(_))
    ));
    assert_eq!(store.current().revision(), good);
}

#[test]
fn first_load_of_a_broken_policy_fails() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(
        dir.path().join("p.rego"),
        "package fedmesh.pop\ndecision := {",
    )
    .unwrap();
    let err =
        PolicyStore::open(PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap_err();
    assert!(err.to_string().contains("p.rego"), "{err}");
}

#[test]
fn policy_without_the_entrypoint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("p.rego"), "package other\nx := 1\n").unwrap();
    let err =
        PolicyStore::open(PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap_err();
    assert!(err.to_string().contains(DEFAULT_ENTRYPOINT), "{err}");
}

#[test]
fn watcher_reloads_without_being_asked() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let store = Arc::new(
        PolicyStore::open(PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap(),
    );
    let _watcher = store.watch(Duration::from_millis(20));
    write_policy(dir.path(), &["carol"]);

    // Bounded wait: 250 polls of 20 ms.
    let reloaded = (0..250).any(|_| {
        std::thread::sleep(Duration::from_millis(20));
        allows(&store, "carol")
    });
    assert!(
        reloaded,
        "the watcher did not pick up the change within 5 s"
    );
}

fn write_bundle(path: &Path, manifest: &Value, files: &[(&str, &str)]) {
    let gz = flate2::write::GzEncoder::new(
        fs::File::create(path).unwrap(),
        flate2::Compression::default(),
    );
    let mut tar = tar::Builder::new(gz);
    let manifest = manifest.to_string();
    let entries = std::iter::once((".manifest", manifest.as_str())).chain(files.iter().copied());
    for (name, body) in entries {
        let mut header = tar::Header::new_gnu();
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        tar.append_data(&mut header, name, body.as_bytes()).unwrap();
    }
    tar.into_inner().unwrap().finish().unwrap();
}

#[test]
fn loads_an_opa_bundle_with_its_revision() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("bundle.tar.gz");
    let data = json!({"fedmesh": {"config": {"users": ["dave"]}}}).to_string();
    write_bundle(
        &bundle,
        &json!({"revision": "2026-12-03.1", "roots": ["fedmesh"]}),
        &[
            ("fedmesh/pop/policy.rego", SMALL_POLICY),
            ("data.json", &data),
        ],
    );
    let store = PolicyStore::open(PolicyLocation::from_path(&bundle), DEFAULT_ENTRYPOINT).unwrap();
    assert_eq!(store.current().revision(), "2026-12-03.1");
    assert!(allows(&store, "dave"));
    assert!(!allows(&store, "alice"));
}

#[test]
fn bundle_declaring_rego_v0_is_accepted() {
    // Rego v0: rule bodies without `if`, sets without `contains`.
    let v0_policy = r#"
package fedmesh.pop

default allow = false

allow { input.user == "erin" }

deny[{"rule": "user", "reason": "unknown user"}] { not allow }

decision = {"allow": allow, "deny": deny}
"#;
    let dir = tempfile::tempdir().unwrap();
    let v1_bundle = dir.path().join("v1.tar.gz");
    write_bundle(&v1_bundle, &json!({}), &[("p.rego", v0_policy)]);
    assert!(PolicyStore::open(PolicyLocation::from_path(&v1_bundle), DEFAULT_ENTRYPOINT).is_err());

    let v0_bundle = dir.path().join("v0.tar.gz");
    write_bundle(
        &v0_bundle,
        &json!({"rego_version": 0}),
        &[("p.rego", v0_policy)],
    );
    let store = PolicyStore::open(PolicyLocation::from_path(&v0_bundle), DEFAULT_ENTRYPOINT)
        .expect("a bundle declaring rego_version 0 parses as v0");
    assert!(allows(&store, "erin"));
    assert!(!allows(&store, "frank"));
}

#[test]
fn bundle_escaping_its_root_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bundle = dir.path().join("evil.tar.gz");
    let gz = flate2::write::GzEncoder::new(
        fs::File::create(&bundle).unwrap(),
        flate2::Compression::default(),
    );
    let mut tar = tar::Builder::new(gz);
    let body = SMALL_POLICY.as_bytes();
    let mut header = tar::Header::new_gnu();
    // Written into the raw name field: the tar crate refuses to build `..` paths itself.
    header.as_gnu_mut().unwrap().name[..12].copy_from_slice(b"../evil.rego");
    header.set_size(body.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append(&header, body).unwrap();
    tar.into_inner().unwrap().finish().unwrap();

    let err =
        PolicyStore::open(PolicyLocation::from_path(&bundle), DEFAULT_ENTRYPOINT).unwrap_err();
    assert!(err.to_string().contains("invalid entry path"), "{err}");
}

#[test]
fn failing_rego_test_is_reported_by_name() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let tests = r#"
package fedmesh.pop_test

import data.fedmesh.pop

test_alice_allowed if pop.allow with input as {"user": "alice"}

test_bob_allowed if pop.allow with input as {"user": "bob"}
"#;
    fs::write(dir.path().join("fedmesh/pop/policy_test.rego"), tests).unwrap();
    let policy =
        fedmesh_policy::load(&PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap();
    let results = fedmesh_policy::run_tests(&policy);
    let outcomes: Vec<(&str, &TestOutcome)> = results
        .iter()
        .map(|r| (r.name.as_str(), &r.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("test_alice_allowed", &TestOutcome::Passed),
            ("test_bob_allowed", &TestOutcome::Failed)
        ]
    );
}

#[test]
fn decision_log_line_holds_the_decision_and_input_fields() {
    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let policy =
        fedmesh_policy::load(&PolicyLocation::Dir(dir.path().into()), DEFAULT_ENTRYPOINT).unwrap();
    let input = json!({"user": "mallory", "round": 3});
    let decision = policy.decide_json(input.clone());

    let log = DecisionLog::new(Vec::new());
    log.record(&decision, &input).unwrap();
    let text = String::from_utf8(log.into_inner()).unwrap();
    assert_eq!(text.lines().count(), 1);
    let line: Value = serde_json::from_str(text.trim_end()).unwrap();
    assert_eq!(line["decision"], "deny");
    assert_eq!(line["rule"], "user");
    assert_eq!(line["policy_revision"], policy.revision());
    assert_eq!(line["input"], input);
    assert_eq!(line["reasons"][0]["reason"], "user mallory is unknown");
    // RFC 3339 in UTC, e.g. 2026-12-03T18:00:00.123Z.
    let time = line["time"].as_str().unwrap();
    assert!(time.ends_with('Z') && time.contains('T'), "{time}");
}

/// A `data.json` whose size claims far more than memory holds: a sparse file, so it costs
/// no disk. Reading it whole would fail to allocate (or exhaust memory); it must instead
/// be read only up to the policy budget and refused as too large.
#[test]
fn oversized_data_file_in_a_directory_is_refused_without_reading_it_whole() {
    use fedmesh_policy::source::{self, SourceError};

    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let data = fs::OpenOptions::new()
        .write(true)
        .open(dir.path().join("data.json"))
        .unwrap();
    data.set_len(1 << 40).unwrap();
    drop(data);

    let err = source::read(&PolicyLocation::Dir(dir.path().to_path_buf())).unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
}

/// A file one byte over the budget is refused; the budget counts every file together.
#[test]
fn data_file_one_byte_over_the_budget_is_refused() {
    use fedmesh_policy::source::{self, MAX_POLICY_BYTES, SourceError};

    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    let big = fs::File::create(dir.path().join("fedmesh/data.json")).unwrap();
    big.set_len(MAX_POLICY_BYTES + 1).unwrap();
    drop(big);

    let err = source::read(&PolicyLocation::Dir(dir.path().to_path_buf())).unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
}

/// A `data.json` that is a link to an endless device is read only up to the budget.
#[cfg(unix)]
#[test]
fn data_file_linked_to_an_endless_device_is_refused() {
    use fedmesh_policy::source::{self, SourceError};

    let dir = tempfile::tempdir().unwrap();
    write_policy(dir.path(), &["alice"]);
    std::os::unix::fs::symlink("/dev/zero", dir.path().join("fedmesh/data.json")).unwrap();

    let err = source::read(&PolicyLocation::Dir(dir.path().to_path_buf())).unwrap_err();
    assert!(matches!(err, SourceError::TooLarge { .. }), "{err}");
}
