"""``ckpt`` makes torch's idle OpenMP workers sleep (``OMP_WAIT_POLICY=PASSIVE``) before torch
loads, since libgomp reads the setting only then; a value the user set is kept."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from ckptkit.ops.sample import sample

# Records OMP_WAIT_POLICY at the moment torch is first imported, then runs one merge.
SCRIPT = """
import importlib.abc, os, sys
seen = []

class Watch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and not seen:
            seen.append(os.environ.get("OMP_WAIT_POLICY"))
        return None

sys.meta_path.insert(0, Watch())
from ckptkit.cli.main import main
assert "torch" not in sys.modules, "torch loaded before a command ran"
code = main(["merge", "weighted-sum", sys.argv[1], sys.argv[2], "-o", sys.argv[3], "--quiet"])
print(code, seen)
"""


@pytest.fixture(scope="module")
def pair(module_tmp):
    folder = module_tmp("threads")
    paths = [str(folder / f"m{seed}.safetensors") for seed in range(2)]
    for seed, path in enumerate(paths):
        sample("sd1", path, tiny=True, dtype="fp16", seed=seed)
    return paths


@pytest.mark.parametrize(("given", "expected"), [(None, "PASSIVE"), ("ACTIVE", "ACTIVE")])
def test_workers_sleep_unless_told_otherwise(pair, tmp_path, given, expected):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if given:
        env["OMP_WAIT_POLICY"] = given
    done = subprocess.run([sys.executable, "-c", SCRIPT, *pair, str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-2:] == ["0", f"['{expected}']"]
