"""``load_pipeline`` and ``generate`` on CUDA: full-size SD 1.5 and SDXL-shaped random models
at their own resolutions, and the CUDA latents of a tiny model against the CPU's.

Needs a CUDA device, so deselected by default (``-m "not gpu"`` in pyproject); run with
``-m gpu`` on a machine that has one. Without CUDA these fail rather than skip, as
test_merge_device.py does. Full-size files are written by ``sample`` (2 GB and 6.9 GB fp16).
"""

from __future__ import annotations

import pytest
import torch
from PIL import Image
from tiny_tokenizers import write_all

from ckptkit import load_pipeline
from ckptkit.ops.generate import generate
from ckptkit.ops.sample import sample

pytestmark = pytest.mark.gpu


def _need_cuda() -> None:
    if not torch.cuda.is_available():
        pytest.fail("torch sees no CUDA device: run -m gpu where there is one")


@pytest.fixture(scope="module")
def tokenizers(module_tmp):
    return write_all(module_tmp("tokenizers"))


@pytest.mark.parametrize(("fid", "side"), [("sd1", 512), ("sdxl", 1024)])
def test_full_size_models_generate_at_their_resolution(fid, side, tokenizers, tmp_path):
    _need_cuda()
    path, out = tmp_path / f"{fid}.safetensors", tmp_path / f"{fid}.png"
    sample(fid, str(path), dtype="fp16")
    report = generate([str(path)], "a cat", str(out), steps=2, seed=1, device="cuda",
                      tokenizers=tokenizers)
    assert (report["settings"]["width"], report["settings"]["height"]) == (side, side)
    with Image.open(out) as image:
        assert image.size == (side, side)
    path.unlink()


def test_cuda_latents_are_the_cpu_latents(tokenizers, tmp_path):
    _need_cuda()
    path = tmp_path / "sd1.safetensors"
    sample("sd1", str(path), tiny=True, dtype="fp32", seed=2)
    latents = []
    for device in ("cpu", "cuda"):
        pipe = load_pipeline(str(path), device=device, dtype="fp32", tokenizers=tokenizers)
        assert pipe.unet.conv_in.weight.device.type == device
        out = pipe(prompt="a cat", num_inference_steps=4, height=64, width=64,
                   output_type="latent", generator=torch.Generator("cpu").manual_seed(3))
        latents.append(out.images.float().cpu())
    assert torch.allclose(latents[0], latents[1], atol=1e-3), (
        (latents[0] - latents[1]).abs().max())
