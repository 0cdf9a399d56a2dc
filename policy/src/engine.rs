//! A compiled policy and the decisions it makes.
//!
//! The output contract: the entrypoint rule (by default `data.fedmesh.pop.decision`)
//! evaluates to an object with `allow` (a boolean) and `deny` (a set or array whose members
//! are `{"rule": ..., "reason": ...}` objects, or plain strings taken as reasons of a rule
//! named `deny`). A policy that breaks the contract, fails to evaluate or leaves the
//! entrypoint undefined denies: the PoP fails closed.

use std::sync::Arc;

use regorus::{CompiledPolicy, Engine, Value};
use serde::{Deserialize, Serialize};

use crate::input::PolicyInput;
use crate::source::{PolicySource, RegoVersion};

/// The rule every Fedmesh policy exposes unless configured otherwise.
pub const DEFAULT_ENTRYPOINT: &str = "data.fedmesh.pop.decision";

/// The `rule` of a decision that allowed.
pub const RULE_ALLOW: &str = "allow";
/// The `rule` of a denial that no `deny` entry explains.
pub const RULE_DEFAULT_DENY: &str = "default_deny";
/// The `rule` of a denial caused by a policy that failed to evaluate.
pub const RULE_POLICY_ERROR: &str = "policy_error";

/// A compiled policy at one revision. Cheap to share: decisions take `&self`.
#[derive(Debug, Clone)]
pub struct Policy {
    compiled: CompiledPolicy,
    engine: Engine,
    revision: Arc<str>,
    content_hash: String,
    entrypoint: String,
}

/// One reason a request was denied.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Denial {
    /// The policy rule that denied.
    pub rule: String,
    /// Why, in words for the operator.
    pub reason: String,
}

/// The outcome of evaluating a policy on one input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    /// Whether the request may proceed.
    pub allow: bool,
    /// The rule that decided: [`RULE_ALLOW`], the first denying rule, [`RULE_DEFAULT_DENY`]
    /// or [`RULE_POLICY_ERROR`].
    pub rule: String,
    /// Every reason for a denial, sorted; empty when allowed.
    pub reasons: Vec<Denial>,
    /// The revision of the policy that decided.
    pub revision: String,
}

/// Why a policy could not be compiled.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// A module does not parse.
    #[error("policy module {path} does not parse: {message}")]
    Parse {
        /// The module's path inside the policy.
        path: String,
        /// The parser's message, with line and column.
        message: String,
    },
    /// The data document was refused by the engine.
    #[error("policy data is invalid: {0}")]
    Data(String),
    /// The modules parse but do not compile together (conflicts, unsafe variables, an
    /// entrypoint that does not exist).
    #[error("policy does not compile for entrypoint {entrypoint}: {message}")]
    Compile {
        /// The entrypoint rule.
        entrypoint: String,
        /// The compiler's message.
        message: String,
    },
    /// The entrypoint does not evaluate to a decision object on a probe input.
    #[error("policy entrypoint {entrypoint} does not produce a decision: {message}")]
    NoDecision {
        /// The entrypoint rule.
        entrypoint: String,
        /// What was wrong with the value.
        message: String,
    },
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawDenial {
    Entry { rule: String, reason: String },
    Reason(String),
}

#[derive(Deserialize)]
struct RawDecision {
    allow: bool,
    #[serde(default)]
    deny: Vec<RawDenial>,
}

impl Policy {
    /// Compiles `source` for `entrypoint` (a rule path such as [`DEFAULT_ENTRYPOINT`]).
    ///
    /// The policy is evaluated once on an empty input, so that an entrypoint which is
    /// undefined or not a decision object is refused here instead of denying everything
    /// later.
    ///
    /// # Errors
    /// [`CompileError`] naming the module, the data or the entrypoint at fault.
    pub fn compile(source: &PolicySource, entrypoint: &str) -> Result<Self, CompileError> {
        // 1. Parse every module in its declared dialect.
        let mut engine = Engine::new();
        for module in &source.modules {
            engine.set_rego_v0(module.version == RegoVersion::V0);
            engine
                .add_policy(module.path.clone(), module.text.clone())
                .map_err(|err| CompileError::Parse {
                    path: module.path.clone(),
                    message: err.to_string(),
                })?;
        }

        // 2. Data, then compile for the entrypoint.
        engine
            .add_data(Value::from(source.data.clone()))
            .map_err(|err| CompileError::Data(err.to_string()))?;
        let compiled = engine
            .compile_with_entrypoint(&entrypoint.into())
            .map_err(|err| CompileError::Compile {
                entrypoint: entrypoint.to_string(),
                message: err.to_string(),
            })?;

        // 3. Probe: the entrypoint must yield a decision object.
        let policy = Self {
            compiled,
            engine,
            revision: source.revision.as_str().into(),
            content_hash: source.content_hash.clone(),
            entrypoint: entrypoint.to_string(),
        };
        policy
            .evaluate_value(Value::new_object())
            .map_err(|message| CompileError::NoDecision {
                entrypoint: entrypoint.to_string(),
                message,
            })?;
        Ok(policy)
    }

    /// The revision: the bundle manifest's, or the content hash.
    pub fn revision(&self) -> &str {
        &self.revision
    }

    /// The hash of every file the policy was read from.
    pub fn content_hash(&self) -> &str {
        &self.content_hash
    }

    /// The entrypoint rule this policy was compiled for.
    pub fn entrypoint(&self) -> &str {
        &self.entrypoint
    }

    /// A copy of the loaded engine, for running the policy's own tests.
    pub(crate) fn engine(&self) -> Engine {
        self.engine.clone()
    }

    /// Decides on `input`. Fails closed: an evaluation error is a denial by
    /// [`RULE_POLICY_ERROR`].
    pub fn decide(&self, input: &PolicyInput) -> Decision {
        match serde_json::to_value(input) {
            Ok(json) => self.decide_json(json),
            Err(err) => self.error_decision(format!("input does not serialise: {err}")),
        }
    }

    /// Decides on an arbitrary JSON input document (for `policy eval` and tests that feed
    /// inputs a [`PolicyInput`] cannot express, such as missing fields).
    pub fn decide_json(&self, input: serde_json::Value) -> Decision {
        match self.evaluate_value(Value::from(input)) {
            Ok(raw) => self.decision_from(raw),
            Err(message) => self.error_decision(message),
        }
    }

    fn evaluate_value(&self, input: Value) -> Result<RawDecision, String> {
        let value = self
            .compiled
            .eval_with_input(input)
            .map_err(|err| err.to_string())?;
        if value == Value::Undefined {
            return Err(format!("{} is undefined", self.entrypoint));
        }
        let json = serde_json::to_value(&value).map_err(|err| err.to_string())?;
        serde_json::from_value(json).map_err(|err| format!("not a decision object: {err}"))
    }

    fn decision_from(&self, raw: RawDecision) -> Decision {
        let mut reasons: Vec<Denial> = raw
            .deny
            .into_iter()
            .map(|entry| match entry {
                RawDenial::Entry { rule, reason } => Denial { rule, reason },
                RawDenial::Reason(reason) => Denial {
                    rule: "deny".into(),
                    reason,
                },
            })
            .collect();
        reasons.sort();

        // A policy may both allow and list reasons; `allow` is what the contract says
        // decides, the reasons are then only informative and dropped.
        if raw.allow {
            return Decision {
                allow: true,
                rule: RULE_ALLOW.into(),
                reasons: Vec::new(),
                revision: self.revision.to_string(),
            };
        }
        let rule = reasons
            .first()
            .map_or_else(|| RULE_DEFAULT_DENY.to_string(), |d| d.rule.clone());
        Decision {
            allow: false,
            rule,
            reasons,
            revision: self.revision.to_string(),
        }
    }

    fn error_decision(&self, message: String) -> Decision {
        tracing::warn!(policy.revision = %self.revision, error = %message, "policy failed");
        Decision {
            allow: false,
            rule: RULE_POLICY_ERROR.into(),
            reasons: vec![Denial {
                rule: RULE_POLICY_ERROR.into(),
                reason: message,
            }],
            revision: self.revision.to_string(),
        }
    }
}
