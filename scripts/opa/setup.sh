#!/usr/bin/env bash
# Download the OPA reference engine (OPA 1.20.2 inside the PyPI wheel
# opa-golib-python-bindings 0.4.4) and unpack it where opa_eval.py and the policy crate's
# differential test look for it. Idempotent: a second run only checks that it imports.
#
# The wheel's metadata asks for Python 3.14 but its code runs on 3.11, so pip is told the
# target interpreter and platform and the wheel is unzipped instead of installed.
#
# Usage: scripts/opa/setup.sh            (prints the directory to put on sys.path)
# Env:   FEDMESH_OPA_DIR  where to unpack (default: <repo>/target/opa/site)
#        PYTHON           interpreter to check the import with (default: python3)
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
site="${FEDMESH_OPA_DIR:-$repo/target/opa/site}"
python="${PYTHON:-python3}"
wheel_spec="opa-golib-python-bindings==0.4.4"

imports() {
    "$python" -c "import sys; sys.path.insert(0, sys.argv[1]); import opa_bindings" "$site" \
        >/dev/null 2>&1
}

if [ -f "$site/.complete" ] && imports; then
    echo "$site"
    exit 0
fi

download="$(mktemp -d)"
trap 'rm -rf "$download"' EXIT
"$python" -m pip download --quiet --no-deps --only-binary=:all: \
    --python-version 3.14 --platform manylinux_2_34_x86_64 \
    --dest "$download" "$wheel_spec" >&2

rm -rf "$site"
mkdir -p "$site"
"$python" -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])" \
    "$download"/opa_golib_python_bindings-*.whl "$site"
chmod +x "$site"/opa_bindings/*.so 2>/dev/null || true

if ! imports; then
    echo "opa setup: unpacked $wheel_spec into $site but it does not import" >&2
    exit 1
fi
touch "$site/.complete"
echo "$site"
