"""A LoRA or LoCon module as the product its change is: what resize and merge work on.

A module's change at strength 1 is ``scale · up @ down``, with scale = alpha / rank (a
missing or zero alpha meaning alpha = rank, kohya's and LyCORIS's rule; a PEFT file without
alpha tensors gets its alpha from diffusers' ``lora_adapter_metadata``: ``modules.alpha``).
A LoCon with a Tucker core (``mid``, r x r x k x k) is a product too: row ``o`` of its
flattened change is Σ_a up[o, a] · M_a, with M_a = Σ_b mid[a, b] ⊗ down[b], so its down is
M (r x in·k·k) and nothing needs the full matrix. Other adapter types (LoHa, LoKr, GLoRA,
OFT, (IA)^3, full diffs, DoRA) are not such products of a rank: ``LOW_RANK`` says which are.
"""

from __future__ import annotations

from typing import Any

from ..formats import Checkpoint
from .modules import Module, alpha

LOW_RANK = ("lora",)
_DESCRIBED = {"dora": "DoRA (its magnitudes were trained for this change; a new rank would "
                      "change the direction they normalize)",
              "loha": "LoHa", "lokr": "LoKr", "glora": "GLoRA", "oft": "OFT", "boft": "BOFT",
              "ia3": "(IA)^3", "diff": "full difference", "set": "replaced weight"}


def describe(adapter: str) -> str:
    """The adapter type in a few words, for notes about modules left as they are."""
    return _DESCRIBED.get(adapter, adapter)


def rank_of(module: Module) -> int:
    return module.shapes["down"][0]


def layer_shape(module: Module) -> tuple[int, ...]:
    """The shape of the weight the module changes: (out, in) or (out, in, kh, kw)."""
    up, down = module.shapes["up"], module.shapes["down"]
    if "mid" in module.keys:
        return (up[0], down[1], *module.shapes["mid"][2:])
    return (up[0], *down[1:])


def scale(module: Module, lora: Checkpoint) -> float:
    """alpha / rank for ``module`` (``modules.alpha``: its .alpha tensor, or diffusers'
    ``lora_adapter_metadata`` for PEFT names; none means scale 1)."""
    value = alpha(module, lora)
    return 1.0 if value is None else value / rank_of(module)


def factors(module: Module, lora: Checkpoint, device: Any = "cpu") -> tuple[Any, Any]:
    """``(up, down)`` as matrices in fp32 on ``device``: up (out x r), down (r x in·k·k),
    up @ down the module's change before its scale."""
    import torch

    up = lora[module.keys["up"]].read().to(device, torch.float32)
    down = lora[module.keys["down"]].read().to(device, torch.float32)
    up = up.reshape(up.shape[0], -1)
    if "mid" in module.keys:
        mid = lora[module.keys["mid"]].read().to(device, torch.float32)
        down = torch.einsum("a b ..., b i -> a i ...", mid, down.reshape(down.shape[0], -1))
    return up, down.reshape(down.shape[0], -1)
