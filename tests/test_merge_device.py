"""``ckpt merge --device cuda`` against the CPU: the same merges within fp32 tolerance.

Needs a CUDA device, so it is deselected by default (``-m "not gpu"`` in pyproject); run it
with ``.venv/bin/python -m pytest -m gpu`` on a machine that has one. Without CUDA it fails
rather than skips: asking for it there is a mistake, not a pass.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from ckptkit.ops.merge import merge
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.gpu

CASES = [("weighted-sum", 2, {"alpha": 0.3}), ("add-difference", 3, {"alpha": 0.7}),
         ("train-difference", 3, {"alpha": 0.5}), ("slerp", 2, {"alpha": 0.4}),
         ("ties", 3, {"density": 0.3}), ("dare", 3, {"drop": 0.5, "seed": 3}),
         ("model-stock", 3, {})]


@pytest.mark.parametrize(("method", "count", "params"), CASES)
@pytest.mark.parametrize("dtype", ["fp32", "fp16"])
def test_cuda_gives_the_cpu_result(tmp_path, method, count, params, dtype):
    if not torch.cuda.is_available():
        pytest.fail("torch sees no CUDA device: run -m gpu where there is one")
    paths = []
    for seed in range(count):
        paths.append(str(tmp_path / f"m{seed}.safetensors"))
        sample("sdxl", paths[-1], tiny=True, dtype=dtype, seed=seed)
    on_cpu, on_gpu = tmp_path / "cpu.safetensors", tmp_path / "gpu.safetensors"
    merge(method, paths, str(on_cpu), params=dict(params))
    merge(method, paths, str(on_gpu), params=dict(params), device="cuda")
    cpu, gpu = load_file(str(on_cpu)), load_file(str(on_gpu))
    assert cpu.keys() == gpu.keys()
    tolerance = 1e-5 if dtype == "fp32" else 1e-3
    for key, value in cpu.items():
        assert torch.allclose(value.float(), gpu[key].float(), atol=tolerance), key
