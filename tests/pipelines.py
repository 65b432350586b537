"""The tiny pipelines' test inputs and diffusers' own pipeline of a folder, shared by the tests
that compare pipelines (test_load_pipeline, test_load_folder, test_load_lora,
test_generate_inputs)."""

from __future__ import annotations

import json

import torch

SIZE = 32  # image side: 4x4 latents, 2x2 SD3 patches and FLUX tokens


def inputs(pipe, fid: str, seed: int = 0, **more) -> dict:
    kwargs = dict(prompt="a cat on the dog", num_inference_steps=2,
                  generator=torch.Generator().manual_seed(seed), **more)
    if fid == "sdxl-refiner":  # img2img: a grey image, every step run
        kwargs.update(image=torch.full((1, 3, SIZE, SIZE), 0.5), strength=1.0)
    else:
        kwargs.update(height=SIZE, width=SIZE)
    if fid.startswith(("sd3", "flux")):
        kwargs["max_sequence_length"] = 16
    return kwargs


def latents(pipe, fid: str, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**inputs(pipe, fid, seed, output_type="latent")).images


def image(pipe, fid: str, seed: int = 0) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    return pipe(**inputs(pipe, fid, seed, output_type="pt")).images


def diffusers_folder(fid: str, folder, pipe):
    """diffusers' own pipeline from our tiny diffusers folder of the same seed, given the
    tokenizers (the folder names none) and nothing else."""
    from diffusers import DiffusionPipeline

    index = json.loads((folder / "model_index.json").read_text())
    given = {k: getattr(pipe, k) for k in index if k.startswith("tokenizer")
             and getattr(pipe, k, None) is not None}
    absent = {k: None for k, v in index.items()
              if isinstance(v, list) and v[0] is None and k not in given}
    return DiffusionPipeline.from_pretrained(str(folder), **given, **absent)


def realigned(pipe):
    """diffusers' ``pipe`` with every parameter copied into memory of its own. diffusers
    leaves parameters as views of the mapped file at the offsets the file put them; CPU
    matrix kernels round the last bit differently for data that is not 64-byte aligned (an
    SDXL pooled embedding differed by 6e-8), which says nothing about the weights or the
    configs. ckptkit's own pipelines are compared as loaded: ``load_pipeline`` maps only
    aligned tensors and reads the others into memory of their own."""
    for module in pipe.components.values():
        if isinstance(module, torch.nn.Module):
            for param in module.parameters():
                param.data = param.data.clone()
    return pipe
