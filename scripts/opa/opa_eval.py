#!/usr/bin/env python3
"""Evaluate a Fedmesh policy directory with the real OPA engine (the reference for
Fedmesh's in-process regorus evaluation).

The policy directory is loaded the way `fedmesh-policy` loads it: every `.rego` file as a
module, and every `data.json` merged into `data` at the path of its directory (so
`a/b/data.json` lands under `data.a.b`).

Modes:
  opa_eval.py DIR --entrypoint fedmesh.pop.decision < inputs.jsonl
      one JSON line per input line: the decision object with `deny` as a sorted list, or
      {"error": "..."} when OPA fails or the document is undefined.
  opa_eval.py DIR --tests
      one JSON line per `test_` rule: {"package", "name", "passed"}.

OPA comes from the `opa-golib-python-bindings` wheel unpacked by setup.sh; pass its
directory with --opa-dir or FEDMESH_OPA_DIR.
"""

import argparse
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OPA_DIR = os.path.join(HERE, "..", "..", "target", "opa", "site")


def load_engine(policy_dir):
    from opa_bindings import OpaEngine

    engine = OpaEngine()
    modules = []
    for root, dirs, files in os.walk(policy_dir):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, policy_dir)
            if name.endswith(".rego"):
                with open(path, encoding="utf-8") as f:
                    source = f.read()
                engine.add_policy(rel, source)
                modules.append(source)
            elif name == "data.json":
                with open(path, encoding="utf-8") as f:
                    value = json.load(f)
                prefix = os.path.relpath(root, policy_dir)
                dotted = "" if prefix == "." else prefix.replace(os.sep, ".")
                engine.add_data(value, dotted)
    return engine, modules


def deny_key(entry):
    """Order denials by rule, then reason, as fedmesh-policy does."""
    if isinstance(entry, dict):
        return (0, str(entry.get("rule")), str(entry.get("reason")))
    return (1, json.dumps(entry, sort_keys=True), "")


def canonical(value):
    """Sets come back from OPA as lists in OPA's order; sort them so that two engines'
    answers compare equal when they hold the same members."""
    if isinstance(value, dict):
        out = {k: canonical(v) for k, v in value.items()}
        if isinstance(out.get("deny"), list):
            out["deny"] = sorted(out["deny"], key=deny_key)
        return out
    return value


def evaluate(engine, entrypoint, lines):
    from opa_bindings import OpaError

    for line in lines:
        line = line.strip()
        if not line:
            continue
        doc = json.loads(line)
        try:
            out = canonical(engine.eval_document(entrypoint, doc))
        except OpaError as err:
            out = {"error": str(err)}
        print(json.dumps(out, sort_keys=True), flush=False)


def run_tests(engine, modules):
    package_re = re.compile(r"^package\s+([A-Za-z0-9_.]+)", re.M)
    test_re = re.compile(r"^(test_[A-Za-z0-9_]+)\b", re.M)
    failed = 0
    for source in modules:
        package = package_re.search(source)
        if package is None:
            continue
        for name in sorted(set(test_re.findall(source))):
            rows = engine.eval_query(f"data.{package.group(1)}.{name} == true")
            passed = bool(rows)
            failed += 0 if passed else 1
            print(json.dumps({"package": package.group(1), "name": name, "passed": passed}))
    return failed


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("policy_dir")
    parser.add_argument("--entrypoint", default="fedmesh.pop.decision")
    parser.add_argument("--tests", action="store_true")
    parser.add_argument("--opa-dir", default=os.environ.get("FEDMESH_OPA_DIR", DEFAULT_OPA_DIR))
    args = parser.parse_args()

    sys.path.insert(0, os.path.abspath(args.opa_dir))
    engine, modules = load_engine(args.policy_dir)
    if args.tests:
        sys.exit(1 if run_tests(engine, modules) else 0)
    evaluate(engine, args.entrypoint, sys.stdin)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
