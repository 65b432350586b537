"""A quantized diffusion model (GGUF, fp8-scaled) loads into its pipeline as its values.

``load_pipeline`` reads a quantized file through the same reader as every command: the
pipeline that takes the GGUF (or fp8-scaled) diffusion model beside the tiny monolithic file
gives the same latents, bit for bit, as the one that takes that file's dequantized copy
written by ``ckpt convert`` (in the 16-bit type the quantized weights read as), and latents
near (not equal to) the unquantized model's.
"""

from __future__ import annotations

import pytest
import torch

from ckptkit import load_pipeline
from ckptkit.ops.convert import convert
from ckptkit.ops.quantize import quantize

pytestmark = pytest.mark.usefixtures("no_network", "one_thread")


def _latents(pipe) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt="a cat on the dog", num_inference_steps=2, height=32, width=32,
                max_sequence_length=16, generator=torch.Generator().manual_seed(0),
                output_type="latent").images


@pytest.mark.parametrize(("qtype", "name"), [("Q8_0", "model.gguf"),
                                              ("fp8-scaled", "model-fp8.safetensors")])
def test_a_quantized_diffusion_model_loads_as_its_dequantized_values(qtype, name, tiny,
                                                                    tokenizers, tmp_path):
    source = str(tiny("flux1-schnell"))
    quantized, dequantized = tmp_path / name, tmp_path / "dequantized.safetensors"
    report = quantize(source, str(quantized), qtype, fsync=False)
    assert sum(t.tensors for t in report.types.values()) > 0
    convert(str(quantized), str(dequantized), fsync=False)  # as the file reads (16-bit)

    from_quantized = load_pipeline(source, diffusion_model=str(quantized), dtype="fp32",
                                   tokenizers=tokenizers)
    from_values = load_pipeline(source, diffusion_model=str(dequantized), dtype="fp32",
                                tokenizers=tokenizers)
    original = load_pipeline(source, dtype="fp32", tokenizers=tokenizers)
    ours, theirs, exact = (_latents(p) for p in (from_quantized, from_values, original))
    assert torch.equal(ours, theirs)
    assert not torch.equal(ours, exact)
    assert (ours - exact).norm() / exact.norm() < 0.1
