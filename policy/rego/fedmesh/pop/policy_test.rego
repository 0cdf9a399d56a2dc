# Tests of the default PoP policy; run with `pop-proxy policy test policy/rego`.
package fedmesh.pop_test

import rego.v1

import data.fedmesh.pop

# A store that passes every check under policy/rego/data.json.
valid := {
	"spiffe_id": "spiffe://stores.fedmesh.example/store/midwest/store-0042",
	"trust_domain": "stores.fedmesh.example",
	"runtime_version": "1.4.2",
	"epsilon_remaining": 3.5,
	"region": "midwest",
	"round": 17,
	"route": "/v1/rounds/{round}/update",
	"method": "PUT",
}

with_fields(fields) := object.union(valid, fields)

without_field(field) := object.remove(valid, [field])

denied_by(rule, doc) if {
	reasons := pop.deny with input as doc
	some entry in reasons
	entry.rule == rule
}

allowed(doc) if pop.allow with input as doc

denied_only_by(rule, doc) if {
	not allowed(doc)
	reasons := pop.deny with input as doc
	rules := {entry.rule | some entry in reasons}
	rules == {rule}
}

test_allows_valid_store if allowed(valid)

test_allowed_decision_has_no_reasons if {
	d := pop.decision with input as valid
	d.allow == true
	count(d.deny) == 0
}

# Identity.

test_denies_other_trust_domain if {
	doc := with_fields({
		"trust_domain": "evil.example",
		"spiffe_id": "spiffe://evil.example/store/midwest/store-0042",
	})
	not allowed(doc)
	denied_by("trust_domain", doc)
}

test_denies_pop_identity_of_stores_domain if {
	denied_only_by("store_identity", with_fields({"spiffe_id": "spiffe://stores.fedmesh.example/pop/chicago"}))
}

test_denies_missing_identity if denied_by("trust_domain", without_field("trust_domain"))

# Runtime version: semantic, not lexical, comparison against the 1.4.2 minimum.

test_allows_equal_runtime_version if allowed(with_fields({"runtime_version": "1.4.2"}))

test_allows_multi_digit_minor_version if allowed(with_fields({"runtime_version": "1.10.0"}))

test_allows_multi_digit_patch_version if allowed(with_fields({"runtime_version": "1.4.10"}))

test_allows_newer_major_version if allowed(with_fields({"runtime_version": "10.0.0"}))

test_denies_older_patch_version if denied_only_by("runtime_version", with_fields({"runtime_version": "1.4.1"}))

test_denies_older_minor_version if denied_only_by("runtime_version", with_fields({"runtime_version": "1.3.99"}))

test_denies_prerelease_of_minimum if denied_only_by("runtime_version", with_fields({"runtime_version": "1.4.2-rc.1"}))

test_denies_version_with_prefix if denied_only_by("runtime_version", with_fields({"runtime_version": "v1.5.0"}))

test_denies_version_with_leading_zero if denied_only_by("runtime_version", with_fields({"runtime_version": "1.05.0"}))

test_denies_non_string_version if denied_only_by("runtime_version", with_fields({"runtime_version": 2}))

# Privacy budget.

test_allows_epsilon_just_above_floor if allowed(with_fields({"epsilon_remaining": 0.5000001}))

test_denies_epsilon_at_floor if denied_only_by("epsilon_remaining", with_fields({"epsilon_remaining": 0.5}))

test_denies_expired_budget if denied_only_by("epsilon_remaining", with_fields({"epsilon_remaining": 0}))

test_denies_overspent_budget if denied_only_by("epsilon_remaining", with_fields({"epsilon_remaining": -1.25}))

test_denies_missing_epsilon if denied_only_by("epsilon_remaining", without_field("epsilon_remaining"))

test_denies_epsilon_as_string if denied_only_by("epsilon_remaining", with_fields({"epsilon_remaining": "3"}))

# A store past its budget may still read, and settle its queue; it may not contribute.

test_exhausted_store_may_fetch_its_receipt if allowed(with_fields({
	"epsilon_remaining": 0,
	"method": "GET",
	"route": "/v1/rounds/{round}/receipt",
}))

test_exhausted_store_may_poll_the_round if allowed(with_fields({
	"epsilon_remaining": 0,
	"method": "GET",
	"route": "/v1/round",
}))

test_exhausted_store_may_not_advertise_keys if denied_only_by("epsilon_remaining", with_fields({
	"epsilon_remaining": 0.2,
	"method": "POST",
	"route": "/v1/rounds/{round}/secagg",
}))

test_exhausted_store_may_not_fetch_its_neighbours_shares if denied_only_by("epsilon_remaining", with_fields({
	"epsilon_remaining": 0.2,
	"method": "GET",
	"route": "/v1/rounds/{round}/secagg/{step}",
}))

test_unknown_route_needs_budget_and_is_denied if {
	doc := with_fields({"epsilon_remaining": 0, "method": "GET", "route": "/v1/rounds/{round}/sum"})
	denied_by("route", doc)
	denied_by("epsilon_remaining", doc)
}

# Routes.

test_allows_round_poll if allowed(with_fields({"method": "GET", "route": "/v1/round"}))

test_allows_model_and_blob_fetch if {
	allowed(with_fields({"method": "GET", "route": "/v1/models/{model}/versions/{version}"}))
	allowed(with_fields({"method": "GET", "route": "/v1/blobs/{sha256}"}))
}

test_allows_secagg_steps if {
	allowed(with_fields({"method": "POST", "route": "/v1/rounds/{round}/secagg"}))
	allowed(with_fields({"method": "GET", "route": "/v1/rounds/{round}/secagg/{step}"}))
}

test_denies_admin_route if denied_only_by("route", with_fields({"method": "POST", "route": "/v1/admin/drain"}))

test_denies_wrong_method_on_store_route if denied_only_by("route", with_fields({"method": "DELETE", "route": "/v1/rounds/{round}/update"}))

# Several failures are all reported.

test_reports_every_failed_rule if {
	doc := with_fields({"runtime_version": "1.0.0", "epsilon_remaining": 0.1})
	reasons := pop.deny with input as doc
	{entry.rule | some entry in reasons} == {"runtime_version", "epsilon_remaining"}
}
