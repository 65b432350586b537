#!/usr/bin/env bash
# The README's first command: set up, make a small training-style .ckpt, inspect it,
# convert it to safetensors, inspect the result, scan the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
.venv/bin/python -m ckptkit.samples.demo demo/sample.ckpt
.venv/bin/ckpt inspect demo/sample.ckpt
.venv/bin/ckpt convert demo/sample.ckpt -o demo/sample.safetensors --keep-metadata
.venv/bin/ckpt inspect demo/sample.safetensors
.venv/bin/ckpt scan demo
