"""Models with known low-rank changes for the LoRA extraction tests (test_lora_extract,
test_lora_device): a tiny SD 1.x BASE, TUNED = BASE plus a rank-r change of chosen layers
(written with safetensors' own ``save_file``), and a kohya module's change as kohya and
ComfyUI apply it."""

from __future__ import annotations

import math

import torch
from safetensors.torch import load_file, save_file

from ckptkit.ops.sample import sample

UNET = "model.diffusion_model."
TE = "cond_stage_model.transformer."
# Changed layers: (checkpoint key, kohya module name as sd-scripts' networks/lora.py writes
# it for SD 1.x: diffusers block names, "." -> "_").
CHANGED = {
    UNET + "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight":
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
    UNET + "input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight":
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
    UNET + "input_blocks.1.1.proj_in.weight": "lora_unet_down_blocks_0_attentions_0_proj_in",
    UNET + "input_blocks.1.0.in_layers.2.weight": "lora_unet_down_blocks_0_resnets_0_conv1",
    UNET + "output_blocks.3.1.transformer_blocks.0.attn2.to_v.weight":
        "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v",
}
TE_CHANGED = {TE + "text_model.encoder.layers.0.self_attn.q_proj.weight":
              "lora_te_text_model_encoder_layers_0_self_attn_q_proj"}


def write_base(folder):
    """BASE: the U-Net and CLIP-L of a tiny SD 1.x sample, fp32, in ``folder``."""
    path = folder / "base.safetensors"
    sample("sd1", str(path), tiny=True, dtype="fp32", components=["diffusion_model", "clip_l"])
    return path


def _change(shape, rank: int, seed: int, size: float = 0.05) -> torch.Tensor:
    """A rank-``rank`` change with singular values spread over a decade."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = shape[0], math.prod(shape[1:])
    up = torch.randn(rows, rank, generator=g) * torch.logspace(0, -1, rank)
    down = torch.randn(rank, cols, generator=g)
    change = up @ down
    return (change / change.abs().max() * size).reshape(shape)


def tuned(base, path, keys, rank: int, size: float = 0.05) -> dict[str, torch.Tensor]:
    """Writes BASE + a rank-``rank`` change of each of ``keys``; returns the changes."""
    state = load_file(str(base))
    changes = {k: _change(state[k].shape, rank, seed=i, size=size) for i, k in enumerate(keys)}
    for key, change in changes.items():
        state[key] = state[key] + change
    save_file(state, str(path))
    return {k: (state[k] - load_file(str(base))[k]) for k in changes}  # as stored, exactly


def delta(out: dict, name: str, shape) -> torch.Tensor:
    """A module's change as kohya and ComfyUI apply it (up @ down · alpha / rank)."""
    down, up = out[name + ".lora_down.weight"].double(), out[name + ".lora_up.weight"].double()
    rank = down.shape[0]
    return ((up.reshape(up.shape[0], rank) @ down.reshape(rank, -1))
            * float(out[name + ".alpha"]) / rank).reshape(shape)
