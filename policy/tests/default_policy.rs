//! The shipped default policy, evaluated in process: each rule allows and denies as the
//! security team expects, and its own Rego tests pass.

use fedmesh_policy::{DEFAULT_ENTRYPOINT, Decision, Policy, PolicyInput, PolicyLocation};
use fedmesh_protocol::ids::{Region, RoundId};
use serde_json::json;

fn default_policy() -> Policy {
    let location = PolicyLocation::Dir(fedmesh_policy::default_policy_dir());
    fedmesh_policy::load(&location, DEFAULT_ENTRYPOINT).expect("default policy loads")
}

/// A store that passes every rule of policy/rego/data.json.
fn valid_input() -> PolicyInput {
    PolicyInput {
        spiffe_id: "spiffe://stores.fedmesh.example/store/midwest/store-0042".into(),
        trust_domain: "stores.fedmesh.example".into(),
        runtime_version: "1.4.2".into(),
        epsilon_remaining: 3.5,
        region: Region("midwest".into()),
        round: Some(RoundId(17)),
        route: "/v1/rounds/{round}/update".into(),
        method: "PUT".into(),
    }
}

fn denied_rules(decision: &Decision) -> Vec<&str> {
    let mut rules: Vec<&str> = decision.reasons.iter().map(|d| d.rule.as_str()).collect();
    rules.dedup();
    rules
}

#[test]
fn allows_store_that_passes_every_rule() {
    let decision = default_policy().decide(&valid_input());
    assert!(decision.allow, "{decision:?}");
    assert_eq!(decision.rule, "allow");
    assert!(decision.reasons.is_empty());
}

#[test]
fn denies_store_from_another_trust_domain() {
    let input = PolicyInput {
        spiffe_id: "spiffe://evil.example/store/midwest/store-0042".into(),
        trust_domain: "evil.example".into(),
        ..valid_input()
    };
    let decision = default_policy().decide(&input);
    assert!(!decision.allow);
    assert_eq!(denied_rules(&decision), ["store_identity", "trust_domain"]);
    assert!(
        decision
            .reasons
            .iter()
            .any(|d| d.reason.contains("evil.example"))
    );
}

#[test]
fn denies_non_store_identity_of_the_stores_domain() {
    let input = PolicyInput {
        spiffe_id: "spiffe://stores.fedmesh.example/pop/chicago".into(),
        ..valid_input()
    };
    let decision = default_policy().decide(&input);
    assert_eq!(denied_rules(&decision), ["store_identity"]);
}

#[test]
fn compares_runtime_versions_semantically() {
    let policy = default_policy();
    // Minimum 1.4.2 (data.json). A string comparison would put "1.10.0" below "1.4.2".
    for (version, allowed) in [
        ("1.10.0", true),
        ("1.4.10", true),
        ("1.4.2", true),
        ("10.0.0", true),
        ("1.4.1", false),
        ("1.3.99", false),
        ("0.99.99", false),
        ("1.4.2-rc.1", false),
        ("v1.5.0", false),
        ("1.5", false),
    ] {
        let input = PolicyInput {
            runtime_version: version.into(),
            ..valid_input()
        };
        let decision = policy.decide(&input);
        assert_eq!(decision.allow, allowed, "runtime {version}: {decision:?}");
        if !allowed {
            assert_eq!(
                denied_rules(&decision),
                ["runtime_version"],
                "runtime {version}"
            );
        }
    }
}

#[test]
fn denies_store_whose_budget_is_spent() {
    let policy = default_policy();
    // The floor is 0.5 and must be exceeded: 0.5 itself is denied, 0 is an expired budget.
    for (epsilon, allowed) in [(0.51, true), (0.5, false), (0.0, false), (-2.0, false)] {
        let input = PolicyInput {
            epsilon_remaining: epsilon,
            ..valid_input()
        };
        let decision = policy.decide(&input);
        assert_eq!(decision.allow, allowed, "epsilon {epsilon}: {decision:?}");
        if !allowed {
            assert_eq!(decision.rule, "epsilon_remaining");
        }
    }
}

#[test]
fn denies_routes_a_store_may_not_use() {
    let policy = default_policy();
    let admin = PolicyInput {
        route: "/v1/admin/drain".into(),
        method: "POST".into(),
        ..valid_input()
    };
    assert_eq!(denied_rules(&policy.decide(&admin)), ["route"]);

    let wrong_method = PolicyInput {
        method: "DELETE".into(),
        ..valid_input()
    };
    assert_eq!(denied_rules(&policy.decide(&wrong_method)), ["route"]);

    let poll = PolicyInput {
        route: "/v1/round".into(),
        method: "GET".into(),
        round: None,
        ..valid_input()
    };
    assert!(policy.decide(&poll).allow);
}

#[test]
fn denies_input_missing_fields() {
    let decision = default_policy().decide_json(json!({"spiffe_id": "spiffe://x/store/a/b"}));
    assert!(!decision.allow);
    assert_eq!(
        denied_rules(&decision),
        [
            "epsilon_remaining",
            "route",
            "runtime_version",
            "store_identity",
            "trust_domain"
        ]
    );
}

#[test]
fn default_policy_rego_tests_pass() {
    let results = fedmesh_policy::run_tests(&default_policy());
    // policy_test.rego defines 32 test_ rules; each must be found and pass.
    assert_eq!(results.len(), 32, "{results:#?}");
    let failed: Vec<_> = results.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "{failed:#?}");
}

#[test]
fn revision_is_the_content_hash_without_a_manifest() {
    let policy = default_policy();
    assert!(policy.revision().starts_with("sha256:"));
    assert_eq!(policy.revision(), policy.content_hash());
}
