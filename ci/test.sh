#!/usr/bin/env bash
# The project's test command: fresh virtualenv, install the checkout with its test extras
# (this builds the compiled core), then run the suite against the installed package twice
# (compiled core, then AGENTPOOL_NO_EXTENSIONS=1), each over two pytest-xdist workers
# (AGENTPOOL_TEST_WORKERS), then ruff and mypy.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$(mktemp -d /tmp/agentpool-ci.XXXXXX)"
WORK="$(mktemp -d /tmp/agentpool-run.XXXXXX)"
trap 'rm -rf "$VENV" "$WORK"' EXIT

echo "==> creating virtualenv in $VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
echo "==> installing agentpool[test,grpc] from $ROOT (builds the compiled core)"
"$VENV/bin/python" -m pip install -q "$ROOT[test,grpc]"

cd "$WORK"  # never import the source tree
PYTEST=("$VENV/bin/python" -I -m pytest -c "$ROOT/pyproject.toml" --rootdir "$ROOT"
        -p no:cacheprovider -q -n "${AGENTPOOL_TEST_WORKERS:-2}" "$ROOT/tests" "$@")

echo "==> pytest, compiled core"
"${PYTEST[@]}"
echo "==> pytest, pure-Python core (AGENTPOOL_NO_EXTENSIONS=1)"
AGENTPOOL_NO_EXTENSIONS=1 "${PYTEST[@]}"

cd "$ROOT"
echo "==> ruff"
"$VENV/bin/ruff" check agentpool tests benchmarks
echo "==> mypy"
"$VENV/bin/mypy" agentpool
echo "==> all checks passed"
