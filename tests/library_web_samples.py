"""A small model library for the web page's tests: tiny SD 1.x models written by ckptkit's
sample generator, as the files a user keeps, then indexed with ``ckpt library scan``.

- ``base.safetensors`` with a preview image beside it (``base.preview.png``);
- ``base_copy.ckpt``: the same weights as a PyTorch checkpoint (same weights, other bytes);
- ``other.safetensors``: other weights (another seed);
- ``merged.safetensors``: ``ckpt merge weighted-sum`` of base and other (its lineage);
- ``odd/``: a LoRA-sized file whose name and metadata are hostile text (markup, a bidi
  override, a byte that is not UTF-8), to show the page escapes what files say; its
  training base model (kohya's metadata) is not in the library;
- ``parts/vae/base*.safetensors``: base's VAE alone, split out by ``ckpt split`` (a shared
  component, and a file whose lineage names base as its source), and ``vae_copy.safetensors``,
  a copy of its bytes;
- ``merged.civitai.info``: what Civitai says of the merge (a title, trigger words).
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from ckptkit.cli.main import main
from ckptkit.ops.sample import sample


def png(width: int = 8, height: int = 8, rgb: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    """A valid PNG of one colour, built by hand (chunks with their CRCs)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    rows = b"".join(b"\0" + bytes(rgb) * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2,
                                                                0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


HOSTILE_NAME = os.fsdecode(b"<img src=x onerror=alert(1)>\xe2\x80\xaeevil\xff.safetensors")
HOSTILE_TEXT = "</pre><script>alert('meta')</script><img src=https://example.com/x.png>"


def make_library(root: Path) -> Path:
    """Writes the models under ``root/models`` and indexes them into ``root/library.sqlite``;
    returns the database's path."""
    models = root / "models"
    models.mkdir(parents=True)
    sample("sd1", str(models / "base.safetensors"), tiny=True, seed=0)
    sample("sd1", str(models / "base_copy.ckpt"), tiny=True, seed=0)
    sample("sd1", str(models / "other.safetensors"), tiny=True, seed=1)
    (models / "base.preview.png").write_bytes(png(64, 64))
    (models / "odd").mkdir()
    (models / "odd" / HOSTILE_NAME).write_bytes(save(
        {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 8)},
        metadata={"ss_training_comment": HOSTILE_TEXT, "ss_base_model_version": "sd_v1",
                  "ss_sd_model_name": "v1-5-pruned.ckpt", "ss_sd_model_hash": "e1441589"}))
    assert main(["merge", "weighted-sum", str(models / "base.safetensors"),
                 str(models / "other.safetensors"), "--alpha", "0.3", "--quiet", "--no-fsync",
                 "-o", str(models / "merged.safetensors")]) == 0
    assert main(["split", str(models / "base.safetensors"), "--components", "vae", "--quiet",
                 "--no-fsync", "-o", str(models / "parts")]) == 0
    shutil.copyfile(models / "parts" / "vae" / "base.safetensors", models / "vae_copy.safetensors")
    (models / "merged.civitai.info").write_text(json.dumps(
        {"id": 7, "modelId": 3, "model": {"name": "Merged From Civitai"}, "baseModel": "SD 1.5",
         "trainedWords": ["shiny", "test words"]}))
    db = root / "library.sqlite"
    assert main(["library", "scan", str(models), "--db", str(db), "--quiet"]) == 0
    return db


def start_server(db: Path, *args: str) -> tuple[subprocess.Popen, str, int]:
    """``ckpt library serve`` on a free port, in a child process; its address and port."""
    proc = subprocess.Popen([sys.executable, "-m", "ckptkit.cli.main", "library", "serve",
                             "--db", str(db), "--port", "0", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"at (http://127\.0\.0\.1:(\d+)/\S*) \(Ctrl-C stops\)", line)
    if not match:
        proc.kill()
        pytest.fail(f"no address printed: {line!r} {proc.stderr.read()!r}")
    return proc, match.group(1), int(match.group(2))


def get(port: int, path: str, headers: dict[str, str] | None = None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    body = r.read()
    conn.close()
    return r, body


def stop_server(proc: subprocess.Popen) -> tuple[int, str]:
    """Ctrl-C; the exit code and what it wrote on stderr."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the server did not stop on Ctrl-C")
    return proc.returncode, proc.stderr.read()
