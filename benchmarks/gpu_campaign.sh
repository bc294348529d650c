#!/usr/bin/env bash
# The GPU campaign from a bare checkout (docs/GPU.md): the lent GPU machine has no package registry,
# so freedit is not installed there. This makes the checkout importable as `freedit` through a
# folder of links (the package's folder mapping of pyproject.toml), then runs
#   python3 -m freedit.benchmarks.gpu_campaign "$@"
# with this checkout's code, whatever else is installed. PYTHON overrides the interpreter.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
tree="$(mktemp -d "${TMPDIR:-/tmp}/freedit-import.XXXXXX")"
trap 'rm -rf "$tree"' EXIT
mkdir "$tree/freedit"
for f in "$root"/freedit/*.py; do ln -s "$f" "$tree/freedit/"; done
for d in export engine runtime benchmarks; do ln -s "$root/$d" "$tree/freedit/$d"; done
export PYTHONPATH="$tree${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"${PYTHON:-python3}" -m freedit.benchmarks.gpu_campaign "$@"
