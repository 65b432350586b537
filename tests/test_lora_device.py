"""``ckpt lora extract --device cuda`` against the CPU: at a rank at least the change's, both
give the change back, so their products agree within fp32 tolerance (the factors may differ:
the randomized range finder draws on each device).

Needs a CUDA device, so it is deselected by default (``-m "not gpu"`` in pyproject); run it
with ``.venv/bin/python -m pytest -m gpu``. Without CUDA it fails rather than skips: asking
for it there is a mistake, not a pass.
"""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli
from lora_changes import CHANGED, delta, tuned, write_base
from safetensors.torch import load_file

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def base(module_tmp):
    return write_base(module_tmp("extract"))


def test_cuda_extracts_what_the_cpu_does(base, tmp_path, capsys):
    if not torch.cuda.is_available():
        pytest.fail("torch sees no CUDA device: run -m gpu where there is one")
    tuned_path = tmp_path / "tuned.safetensors"
    changes = tuned(base, tuned_path, list(CHANGED), rank=3)
    outs = {}
    for device in ("cpu", "cuda"):
        outs[device] = tmp_path / f"{device}.safetensors"
        code, _, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o",
                               outs[device], "--rank", "4", "--device", device, "--dtype",
                               "fp32", "--quiet")
        assert code == 0, err
    cpu, gpu = load_file(str(outs["cpu"])), load_file(str(outs["cuda"]))
    assert cpu.keys() == gpu.keys()
    for key, name in CHANGED.items():
        shape = changes[key].shape
        expected = changes[key].double()
        for out in (cpu, gpu):
            got = delta(out, name, shape)
            assert torch.allclose(got, expected, atol=1e-5 * float(expected.abs().max()))
