"""Property tests: corrupt GGUF files, and corrupt fp8-scaled and NF4 safetensors, end as
a ``CkptError`` or read, never as another exception or a hang; what reads has the values its
shape says. Derandomized, as ``test_fuzz_readers`` (``CKPTKIT_FUZZ_EXAMPLES`` to explore)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import bitsandbytes.functional as bnb
import numpy as np
import pytest
import torch
from fuzzing import MUTATION, mutate
from gguf.quants import quantize as gguf_quantize
from helpers import Hang, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from quant_read_files import QT, random_blocks, write_gguf
from safetensors.torch import save_file

from ckptkit.errors import CkptError
from ckptkit.formats import open_checkpoint

_EXAMPLES = int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "100"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=3000, derandomize=_EXAMPLES <= 100,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture], database=None)
_READ_LIMIT = 1 << 26

# Tiny tensors: on a busy machine torch's thread pool costs more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def seeds(module_tmp) -> dict[str, bytes]:
    folder = module_tmp("seeds")
    rng = np.random.default_rng(0)
    values = rng.standard_normal((4, 256)).astype(np.float32)
    gguf_path = write_gguf(folder / "seed.gguf", {
        "a.weight": (gguf_quantize(values, QT.Q8_0), QT.Q8_0),
        "b.weight": (random_blocks(QT.Q4_K, 2), QT.Q4_K),
        "c.bias": np.ones(8, dtype=np.float32),
        "d.weight": np.ones((2, 256), dtype=np.float16)},
        kv={"comfy.gguf.orig_shape.d.weight": [2, 16, 16], "general.name": "seed"})
    torch.manual_seed(0)
    weight = torch.randn(8, 64)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                      compress_statistics=True)
    sd = {"q.weight": packed, **{f"q.weight.{k}": v for k, v in
                                 state.as_dict(packed=True).items()}}
    sd["f.weight"] = weight.to(torch.float8_e4m3fn)
    sd["f.weight_scale"] = torch.tensor(0.5)
    sd["f.comfy_quant"] = torch.tensor(list(json.dumps({"format": "float8_e4m3fn"}).encode()),
                                       dtype=torch.uint8)
    st_path = folder / "seed.safetensors"
    save_file(sd, st_path)
    return {"gguf": gguf_path.read_bytes(), "safetensors": st_path.read_bytes()}


def _check(path: Path) -> str:
    try:
        with time_limit(5):
            try:
                checkpoint = open_checkpoint(path)
            except CkptError as exc:
                assert str(exc).startswith(str(path)), str(exc)
                return "refused"
            with checkpoint:
                for tensor in checkpoint.values():
                    if tensor.numel * 4 > _READ_LIMIT:
                        continue
                    try:
                        values = tensor.read()
                    except CkptError:
                        continue
                    assert tuple(values.shape) == tensor.shape
            return "ok"
    except Hang as hang:
        raise AssertionError(f"{path.name}: {hang}") from None


def test_seeds_read(seeds, tmp_path):
    for name, data in seeds.items():
        path = tmp_path / f"seed.{name}"
        path.write_bytes(data)
        assert _check(path) == "ok"


@pytest.mark.parametrize("name", ["gguf", "safetensors"])
@FUZZ
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_corrupt_files_are_refused_or_read(seeds, tmp_path, name, mutations):
    data = seeds[name]
    header = 600 if name == "gguf" else int.from_bytes(data[:8], "little") + 8
    path = tmp_path / f"fuzz.{name}"
    path.write_bytes(mutate(data, mutations, within=header))
    _check(path)
