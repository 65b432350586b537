#!/usr/bin/env bash
# The README's second command: set up with the test extras, lint, run the tests.
# Arguments go to pytest. The tests marked slow (bounded memory on a 2 GB model) are left out
# by default: `bash scripts/test.sh -m slow` runs only them, `-m "not gpu"` all (no GPU).
# The tests' temporary files (each test's removed as it passes, GBs written in all) go to
# /dev/shm when it has room, so that a run does not wear the disk; CKPTKIT_TEST_TMP=disk
# keeps them in the system's temporary folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh test
.venv/bin/ruff check src tests bench
basetemp=()
free_kb=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}') || free_kb=0
if [ "${CKPTKIT_TEST_TMP:-}" != disk ] && [ -w /dev/shm ] && [ "${free_kb:-0}" -gt 6291456 ]; then
    dir=$(mktemp -d /dev/shm/ckptkit-tests.XXXXXX)
    trap 'rm -rf "$dir"' EXIT
    basetemp=(--basetemp "$dir")
fi
# The tests run in one worker process per core (pytest-xdist), at most 4: on this project's
# 2-core machine that halves the run (9.5 -> 5.5 minutes); more workers would mostly add
# memory (each holds torch, diffusers...). CKPTKIT_TEST_WORKERS sets the count; 0 runs them in
# this process, as does `-n 0` among the arguments (the last -n wins).
workers=${CKPTKIT_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}
[ "$workers" -gt 4 ] && workers=4
[ "$workers" -lt 2 ] && workers=0
.venv/bin/python -m pytest -q -n "$workers" ${basetemp[@]+"${basetemp[@]}"} "$@"
