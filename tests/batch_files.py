"""A folder of many small files of every kind for the batch tests and benchmark.

One of each: tiny samples (SD1 as safetensors, fp8 and .ckpt; FLUX and SDXL parts in
ComfyUI's layout), the scan corpus's hostile and benign files (tests/corpus.py), broken
files (truncated, empty, an HTML page and a Git LFS pointer under model names, random bytes)
and a text file. The rest of the ``n`` files are hard links to them under other names, in
subfolders of 100 (no disk space, and each is a file of its own to the batch).
"""

from __future__ import annotations

import os
import random
import shutil

import corpus

BROKEN = {
    "truncated.safetensors": b"\x40\x00\x00\x00\x00\x00\x00\x00{\"a\": {\"dtype\"",
    "empty.safetensors": b"",
    "page.ckpt": b"<!DOCTYPE html><html><body>Not found</body></html>",
    "pointer.safetensors": b"version https://git-lfs.github.com/spec/v1\noid sha256:"
                           + b"0" * 64 + b"\nsize 123\n",
    "noise.pt": random.Random(0).randbytes(3000),
    "readme.txt": b"a note beside the models\n",
}


def originals(folder: str, hostile: bool = True) -> list[str]:
    """Writes one file of each kind under ``folder``/originals; returns their paths."""
    from ckptkit.ops.sample import sample

    top = os.path.join(folder, "originals")
    os.makedirs(os.path.join(top, "hostile"))
    os.makedirs(os.path.join(top, "benign"))
    markers = os.path.join(folder, "markers")
    os.makedirs(markers)
    sample("sd1", os.path.join(top, "sd1.safetensors"), tiny=True)
    sample("sd1", os.path.join(top, "sd1-fp8.safetensors"), tiny=True, dtype="fp8-e4m3fn")
    sample("sd1", os.path.join(top, "sd1.ckpt"), tiny=True)
    sample("flux1-schnell", os.path.join(top, "flux-dit.safetensors"), tiny=True,
           layout="comfyui", components=["diffusion_model"])
    sample("sdxl", os.path.join(top, "sdxl-vae.safetensors"), tiny=True, layout="comfyui",
           components=["vae"])
    if hostile:
        corpus.build_hostile(os.path.join(top, "hostile"), markers)
    corpus.build_benign(os.path.join(top, "benign"))
    for name, data in BROKEN.items():
        with open(os.path.join(top, name), "wb") as f:
            f.write(data)
    return sorted(os.path.join(root, name) for root, _, names in os.walk(top)
                  for name in names)


def build(folder: str, n: int, faults: list[str] | None = None) -> list[str]:
    """``n`` files (the originals, then hard links to them in turn); returns every path.
    ``faults``: names of more links, among the originals, to the first of them (for the
    batch's test hook, see ``numbered``), not counted in ``n`` nor returned."""
    paths = originals(folder)
    for name in faults or []:
        os.link(paths[0], os.path.join(folder, "originals", name))
    sources = list(paths)
    i = 0
    while len(paths) < n:
        source = sources[i % len(sources)]
        sub = os.path.join(folder, "links", f"{i // 100:04d}")
        os.makedirs(sub, exist_ok=True)
        link = os.path.join(sub, f"{i:06d}-{os.path.basename(source)}")
        os.link(source, link)
        paths.append(link)
        i += 1
    return paths


def numbered(folder: str, sources: list[str], faults: list[str] | None = None,
             copy_first: bool = False) -> dict[str, str]:
    """Links to ``sources`` in ``folder`` named ``NNN-name`` in order, and one to the first
    source for each ``faults`` entry (a file name such as ``050-HANG.safetensors``: the
    batch's test hook acts on files by name); ``copy_first``: the first is a copy (a file of
    its own mtime, to change). Returns {link: source}."""
    os.makedirs(folder, exist_ok=True)
    names = {os.path.join(folder, f"{i:03d}-{os.path.basename(s)}"): s
             for i, s in enumerate(sources)}
    names.update({os.path.join(folder, name): sources[0] for name in faults or {}})
    for i, (link, source) in enumerate(names.items()):
        (shutil.copy2 if copy_first and i == 0 else os.link)(source, link)
    return names


class Interrupt:
    """A batch progress that presses Ctrl-C after ``after`` files: an interrupted run, for the
    resume tests."""

    def __init__(self, after: int):
        self.after, self.items = after, 0

    def start(self, total_bytes, total_items):
        pass

    def update(self, nbytes, items=0):
        self.items += items
        if self.items >= self.after:
            raise KeyboardInterrupt

    def failed(self):
        pass


def process_tree(roots: set[int]) -> set[int]:
    """``roots`` and every process below them, from the kernel's list of each thread's
    children (reading every process's stat cost 4 ms a sample: on 2 cores, CPU that the
    measured run lacks)."""
    found: set[int] = set()
    frontier = list(roots)
    while frontier:
        pid = frontier.pop()
        if pid in found:
            continue
        found.add(pid)
        try:
            threads = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for tid in threads:
            try:
                with open(f"/proc/{pid}/task/{tid}/children") as f:
                    frontier += map(int, f.read().split())
            except OSError:
                continue
    return found
