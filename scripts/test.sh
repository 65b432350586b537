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
.venv/bin/python -m pytest -q ${basetemp[@]+"${basetemp[@]}"} "$@"
