"""Benchmark: ``ckpt library scan`` of a models folder against ``sha256sum`` of the same files.

The folder holds 8 full-size random-weight files of mixed families and formats (about 25 GB,
made with ``ckpt sample``): SD 1.5 as .safetensors and as .ckpt (the same weights), SD 2,
SDXL, the SDXL refiner, SD 3.5 Medium's diffusion model as a ComfyUI part, and FLUX's VAE and
CLIP-L parts. In one run, each with the page cache dropped first (as root: ``sync; echo 3 >
/proc/sys/vm/drop_caches``):

- ``cat`` of the files to /dev/null: what the disk gives;
- ``sha256sum`` (coreutils) of the files, the issue's baseline, and ``openssl dgst -sha256``
  (SHA-NI where the CPU has it: the fastest single SHA-256 at hand);
- the first ``ckpt library scan`` into an empty database: every file read once for SHA-256,
  AutoV1/V2/V3, CRC-32, BLAKE3 and the component digests, plus identification and scan.

Then, page cache warm, a second scan with nothing changed; and a folder of 10,000 small files
(a first scan, then the timed second). The report gives each command's wall time, CPU time
(user + system) and the scan's time as a multiple of ``sha256sum`` and of ``openssl``; and
the single-thread throughput of each hash on this CPU, which says where the CPU time goes.

    .venv/bin/python bench/library_bench.py [--workdir DIR] [--size full|small] [--keep]

``--size small`` makes the same eight files with ``--tiny`` widths (a few hundred MB: to
check the script). The files are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import zlib

import blake3

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
CKPT = [sys.executable, "-m", "ckptkit.cli.main"]

# (file name, family, extra `ckpt sample` options)
FILES = [
    ("sd15.safetensors", "sd1", []),
    ("sd15.ckpt", "sd1", []),
    ("sd2.safetensors", "sd2", []),
    ("sdxl.safetensors", "sdxl", []),
    ("sdxl_refiner.safetensors", "sdxl-refiner", []),
    ("sd35m_dit.safetensors", "sd3.5-medium", ["--layout", "comfyui", "--components",
                                               "diffusion_model"]),
    ("flux_ae.safetensors", "flux1-schnell", ["--layout", "comfyui", "--components", "vae"]),
    ("flux_clip_l.safetensors", "flux1-schnell", ["--layout", "comfyui", "--components",
                                                  "clip_l"]),
]


_CACHE = {}  # CKPTKIT_CACHE_DIR for every command: in the work folder, not the user's


def _env() -> dict[str, str]:
    src = os.path.join(ROOT, "src")
    return dict(os.environ, **_CACHE,
                PYTHONPATH=src + os.pathsep + os.environ.get("PYTHONPATH", ""))


def make_folder(folder: str, tiny: bool) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    paths = []
    for seed, (name, family, options) in enumerate(FILES):
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            subprocess.run([*CKPT, "sample", family, "-o", path, "--quiet", "--seed",
                            str(seed if name != "sd15.ckpt" else 0), *options,
                            *(["--tiny"] if tiny else [])], check=True, env=_env())
        paths.append(path)
    return paths


def drop_caches() -> bool:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return True
    except OSError:
        return False


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall, user and system seconds of one command (its children included); for a library
    scan (``--json``) also ``scan_seconds``, the scan's own time without Python's start."""
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, env=_env())
    wall = time.perf_counter() - start
    after = os.times()
    out = {"seconds": wall, "user": after.children_user - before.children_user,
           "system": after.children_system - before.children_system}
    if "--json" in cmd:
        out["scan_seconds"] = json.loads(proc.stdout)["seconds"]
    return out


def throughputs(mb: int = 512) -> dict[str, float]:
    """GB/s of each hash on one thread, on data in memory."""
    data = os.urandom(mb << 20)
    view = memoryview(data)
    out = {}
    for name, run in (("sha256", lambda: hashlib.sha256(view).digest()),
                      ("crc32", lambda: zlib.crc32(view)),
                      ("blake3", lambda: blake3.blake3(view).digest())):
        start = time.perf_counter()
        run()
        out[name] = len(data) / (time.perf_counter() - start) / 1e9
    return out


def small_files(folder: str, n: int) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        path = os.path.join(folder, f"{i // 1000:02d}", f"emb{i:05d}.safetensors")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if not os.path.exists(path):
            save_file({"emb": np.full((8,), i, dtype=np.float32)}, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", default=os.path.join(HERE, "out", "library"))
    parser.add_argument("--size", choices=("full", "small"), default="full")
    parser.add_argument("--small-files", type=int, default=10_000)
    parser.add_argument("--keep", action="store_true", help="keep the files made")
    args = parser.parse_args()
    folder = os.path.join(args.workdir, "models")
    _CACHE["CKPTKIT_CACHE_DIR"] = os.path.join(args.workdir, "cache")
    report: dict = {"size": args.size}
    try:
        t0 = time.perf_counter()
        paths = make_folder(folder, args.size == "small")
        report["made_seconds"] = time.perf_counter() - t0
        report["bytes"] = sum(os.path.getsize(p) for p in paths)
        report["hash_gb_per_s_one_thread"] = throughputs()
        report["cores"] = os.cpu_count()
        db = os.path.join(args.workdir, "library.sqlite")
        runs = {}
        for name, cmd in (("cat", ["cat", *paths]),
                          ("sha256sum", ["sha256sum", *paths]),
                          ("openssl-sha256", ["openssl", "dgst", "-sha256", *paths]),
                          ("library-scan-first", [*CKPT, "library", "scan", folder, "--db", db,
                                                  "--json"])):
            for suffix in ("", "-wal", "-shm"):
                if name.startswith("library") and os.path.exists(db + suffix):
                    os.unlink(db + suffix)
            report["cache_dropped"] = drop_caches()
            runs[name] = timed(cmd)
            print(name, json.dumps(runs[name]), flush=True)
        # twice: the first may read Python's modules back from disk (the models pushed
        # them out of the page cache)
        for name in ("library-scan-second", "library-scan-second-again"):
            runs[name] = timed([*CKPT, "library", "scan", folder, "--db", db, "--json"])
        small = os.path.join(args.workdir, "small")
        small_files(small, args.small_files)
        small_db = os.path.join(args.workdir, "small.sqlite")
        runs["small-first"] = timed([*CKPT, "library", "scan", small, "--db", small_db,
                                     "--json"])
        runs["small-second"] = timed([*CKPT, "library", "scan", small, "--db", small_db,
                                      "--json"])
        report["runs"] = runs
        scan = runs["library-scan-first"]["seconds"]
        report["scan_vs_sha256sum"] = scan / runs["sha256sum"]["seconds"]
        report["scan_vs_openssl"] = scan / runs["openssl-sha256"]["seconds"]
        report["disk_gb_per_s"] = report["bytes"] / runs["cat"]["seconds"] / 1e9
        print(json.dumps(report, indent=2))
    finally:
        if not args.keep:
            shutil.rmtree(args.workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
