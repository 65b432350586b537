#!/usr/bin/env bash
# The README's first command: set up .venv; make an SD 1.x training checkpoint as the original
# training code leaves it (narrow widths, so 50 MB), then do what one does with a downloaded
# .ckpt: check it is safe, see what it is, convert it to safetensors, prune it, split it into
# ComfyUI's folders. Every file is written under demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p demo
rm -rf demo/sd1-training.ckpt demo/sd1-training.safetensors demo/sd1.safetensors demo/comfyui

run() {
    printf '\n$ ckpt %s\n' "$*"
    .venv/bin/ckpt "$@"
}

.venv/bin/python -m ckptkit.samples.demo demo/sd1-training.ckpt
run scan demo/sd1-training.ckpt
run inspect demo/sd1-training.ckpt
run convert demo/sd1-training.ckpt -o demo/sd1-training.safetensors
run prune demo/sd1-training.ckpt -o demo/sd1.safetensors
run split demo/sd1.safetensors -o demo/comfyui

cat <<'EOF'

Done; the files are in demo/. ckpt is installed in .venv/bin: run it as .venv/bin/ckpt, or
put it on this shell's PATH with

    source .venv/bin/activate

Then try it on your own files:

    ckpt scan ~/Downloads                  is anything there unsafe to load?
    ckpt inspect MODEL.safetensors         what is it: family, components, what is missing
    ckpt convert MODEL.ckpt -o MODEL.safetensors
    ckpt --help                            every command; ckpt COMMAND --help for one

README.md has recipes for the common jobs.
EOF
