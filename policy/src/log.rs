//! The decision log: one JSON line per decision, for the security team's audit.
//!
//! A line holds the time (RFC 3339, UTC), the decision (`allow` or `deny`), the rule that
//! decided, the policy revision, the reasons of a denial and the input document. The input
//! document is the policy input, which holds identities and request facts only: certificate
//! bytes and update contents never reach it, so they never reach the log.

use std::io::Write;
use std::sync::Mutex;
use std::time::SystemTime;

use serde::Serialize;

use crate::engine::{Decision, Denial};

/// Writes decision lines to any writer (a file, stdout, a test buffer).
#[derive(Debug)]
pub struct DecisionLog<W> {
    out: Mutex<W>,
}

#[derive(Serialize)]
struct Line<'a, I> {
    time: String,
    decision: &'static str,
    rule: &'a str,
    policy_revision: &'a str,
    reasons: &'a [Denial],
    input: &'a I,
}

impl<W: Write> DecisionLog<W> {
    /// A log writing to `out`.
    pub fn new(out: W) -> Self {
        Self {
            out: Mutex::new(out),
        }
    }

    /// Appends the line for `decision` taken on `input`, stamped `now`.
    ///
    /// # Errors
    /// The writer's error; the decision stands either way.
    pub fn record_at<I: Serialize>(
        &self,
        now: SystemTime,
        decision: &Decision,
        input: &I,
    ) -> std::io::Result<()> {
        let line = Line {
            time: humantime::format_rfc3339_millis(now).to_string(),
            decision: if decision.allow { "allow" } else { "deny" },
            rule: &decision.rule,
            policy_revision: &decision.revision,
            reasons: &decision.reasons,
            input,
        };
        let mut bytes = serde_json::to_vec(&line)?;
        bytes.push(b'\n');

        // One write per line under the lock, so lines from concurrent decisions never
        // interleave.
        let mut out = self
            .out
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        out.write_all(&bytes)?;
        out.flush()
    }

    /// Appends the line for `decision` taken on `input`, stamped with the current time.
    ///
    /// # Errors
    /// The writer's error.
    pub fn record<I: Serialize>(&self, decision: &Decision, input: &I) -> std::io::Result<()> {
        self.record_at(SystemTime::now(), decision, input)
    }

    /// The writer, back.
    pub fn into_inner(self) -> W {
        self.out
            .into_inner()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}
