#!/usr/bin/env bash
# The README's first command: set up; make a small training-style .ckpt, inspect it, convert
# it to safetensors; make a tiny SD 1.x .ckpt with every real key, convert it, inspect the
# result (identified as what it is); scan the folder.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
.venv/bin/python -m ckptkit.samples.demo demo/training.ckpt
.venv/bin/ckpt inspect demo/training.ckpt
.venv/bin/ckpt convert demo/training.ckpt -o demo/training.safetensors --keep-metadata
.venv/bin/ckpt sample sd1 --tiny --format ckpt -o demo/sd1-tiny.ckpt --quiet
.venv/bin/ckpt convert demo/sd1-tiny.ckpt -o demo/sd1-tiny.safetensors --quiet
.venv/bin/ckpt inspect demo/sd1-tiny.safetensors
.venv/bin/ckpt scan demo
