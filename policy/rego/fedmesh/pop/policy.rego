# The default PoP policy: which stores may call which PoP routes.
#
# Input: the document described in policy/README.md (spiffe_id, trust_domain,
# runtime_version, epsilon_remaining, region, round, route, method).
# Configuration: data.fedmesh.config (policy/rego/data.json).
#
# Output contract the PoP relies on: `decision` is an object with `allow` (boolean) and
# `deny` (a set of {"rule", "reason"} objects). Each check is written as "ok" rule plus a
# denial when it is not provable, so that a missing or mistyped input field denies rather
# than silently passing.
package fedmesh.pop

import rego.v1

config := data.fedmesh.config

# Strict semantic versions only (no "v" prefix, no leading zeros), checked before
# semver.compare so that both OPA and regorus see the same set of versions.
semver_pattern := `^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(-[0-9A-Za-z.-]+)?(\+[0-9A-Za-z.-]+)?$`

default allow := false

allow if count(deny) == 0

decision := {"allow": allow, "deny": deny}

# 1. Identity: the caller is a store of the stores trust domain.

trust_domain_ok if input.trust_domain == config.stores_trust_domain

store_identity_ok if {
	is_string(input.spiffe_id)
	startswith(input.spiffe_id, concat("", ["spiffe://", config.stores_trust_domain, "/store/"]))
}

deny contains {
	"rule": "trust_domain",
	"reason": sprintf("trust domain %v is not the stores trust domain %v", [
		object.get(input, "trust_domain", "(missing)"),
		config.stores_trust_domain,
	]),
} if not trust_domain_ok

deny contains {
	"rule": "store_identity",
	"reason": sprintf("identity %v is not a store of %v", [
		object.get(input, "spiffe_id", "(missing)"),
		config.stores_trust_domain,
	]),
} if not store_identity_ok

# 2. Runtime: at least the configured minimum, compared as semantic versions
# (1.10.0 is newer than 1.4.2, which a string comparison gets wrong).

runtime_version_valid if {
	is_string(input.runtime_version)
	regex.match(semver_pattern, input.runtime_version)
}

runtime_version_ok if {
	runtime_version_valid
	semver.compare(input.runtime_version, config.min_runtime_version) >= 0
}

deny contains {
	"rule": "runtime_version",
	"reason": sprintf("runtime version %v is not a semantic version", [
		object.get(input, "runtime_version", "(missing)"),
	]),
} if not runtime_version_valid

deny contains {
	"rule": "runtime_version",
	"reason": sprintf("runtime version %v is older than the minimum %v", [
		input.runtime_version,
		config.min_runtime_version,
	]),
} if {
	runtime_version_valid
	not runtime_version_ok
}

# 3. Privacy budget: the epsilon core's ledger says is left must exceed the floor on the
# routes by which a store takes part in a round (those marked budgeted, and any route the
# list does not name). Reading rounds, models and its own receipts stays open to a store
# past its budget, so that its upload queue settles; it cannot contribute again.

budget_exempt if {
	some r in config.store_routes
	r.method == input.method
	r.route == input.route
	r.budgeted == false
}

epsilon_ok if budget_exempt

epsilon_ok if {
	is_number(input.epsilon_remaining)
	input.epsilon_remaining > config.min_epsilon_remaining
}

deny contains {
	"rule": "epsilon_remaining",
	"reason": sprintf("remaining epsilon %v is not above %v", [
		object.get(input, "epsilon_remaining", "(missing)"),
		config.min_epsilon_remaining,
	]),
} if not epsilon_ok

# 4. Routes: only those a store may use, by method and route template.

route_ok if {
	some allowed in config.store_routes
	allowed.method == input.method
	allowed.route == input.route
}

deny contains {
	"rule": "route",
	"reason": sprintf("%v %v is not a store route", [
		object.get(input, "method", "(missing)"),
		object.get(input, "route", "(missing)"),
	]),
} if not route_ok
