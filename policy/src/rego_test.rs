//! Running a policy's own Rego tests: every rule named `test_*` in any package passes
//! when it evaluates to `true`, as with `opa test`.

use regorus::unstable::{Rule, RuleHead};
use regorus::utils::get_path_string;
use serde::Serialize;

use crate::engine::Policy;

/// What a test rule evaluated to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum TestOutcome {
    /// The rule is `true`.
    Passed,
    /// The rule is undefined or not `true`.
    Failed,
    /// Evaluating the rule raised an error (the message).
    Error(String),
}

/// One test rule and its outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RegoTestResult {
    /// The rule's package, as `data.a.b`.
    pub package: String,
    /// The rule's name, `test_...`.
    pub name: String,
    /// How it went.
    pub outcome: TestOutcome,
}

impl RegoTestResult {
    /// Whether the test passed.
    pub fn passed(&self) -> bool {
        self.outcome == TestOutcome::Passed
    }
}

/// Evaluates every `test_` rule of `policy`, in module order; a rule defined by several
/// bodies is one test.
pub fn run_tests(policy: &Policy) -> Vec<RegoTestResult> {
    let mut engine = policy.engine();
    let mut tests: Vec<(String, String)> = Vec::new();
    for module in engine.get_modules().clone() {
        let Ok(package) = get_path_string(&module.package.refr, Some("data")) else {
            continue;
        };
        for rule in &module.policy {
            // Functions (`test_x(a) if ...`) take arguments and are helpers, not tests.
            let Rule::Spec { head, .. } = rule.as_ref() else {
                continue;
            };
            let refr = match head {
                RuleHead::Compr { refr, .. } | RuleHead::Set { refr, .. } => refr,
                RuleHead::Func { .. } => continue,
            };
            let Ok(name) = get_path_string(refr, None) else {
                continue;
            };
            let test = (package.clone(), name);
            if test.1.starts_with("test_") && !tests.contains(&test) {
                tests.push(test);
            }
        }
    }

    tests
        .into_iter()
        .map(|(package, name)| {
            let outcome = match engine.eval_rule(format!("{package}.{name}")) {
                Ok(regorus::Value::Bool(true)) => TestOutcome::Passed,
                Ok(_) => TestOutcome::Failed,
                Err(err) => TestOutcome::Error(err.to_string()),
            };
            RegoTestResult {
                package,
                name,
                outcome,
            }
        })
        .collect()
}
