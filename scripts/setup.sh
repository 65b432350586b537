#!/usr/bin/env bash
# Creates .venv (if missing) and installs ckptkit with the pins of constraints.txt.
# Usage: scripts/setup.sh [EXTRA]   e.g. scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
spec="."
[ $# -gt 0 ] && spec=".[$1]"
.venv/bin/python -m pip install -q --disable-pip-version-check -c constraints.txt -e "$spec"
