"""LoRA files with random weights for every adaptable weight of a family's tiny (or full)
components, named as a key format names them (``lora.names``): shared by test_lora_bake and
test_load_lora."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ckptkit.arch.families import family
from ckptkit.lora.names import module_names


def _adaptable(key: str, shape) -> bool:
    return key.endswith(".weight") and len(shape) in (2, 4) and min(shape[:2]) > 1 \
        and not any(s in key for s in ("embedding", "embed_tokens", "text_projection"))


def make_lora(path, fid: str, components, fmt: str, *, rank=4, alpha=2.0, seed=0,
              every=1, metadata=None, tiny=True, twin=None) -> Path:
    """A LoRA for every ``every``-th adaptable weight of ``components`` (canonical names),
    named in ``fmt`` by ``lora.names``; diffusers splits a fused weight into several modules,
    each gets its own factors. kohya files carry alpha tensors, diffusers files none. With
    ``twin`` (kohya only), the same changes written to that file in diffusers' names: a
    fused module's up rows split, alpha/rank folded into them."""
    gen = torch.Generator().manual_seed(seed)
    fam = family(fid)
    tensors, twins = {}, {}
    for component in components:
        table = fam.component(component).keys(tiny=tiny)
        for i, (key, shape) in enumerate(t for t in table.items() if _adaptable(*t)):
            if i % every:
                continue
            try:
                named = module_names(fid, component, key, fmt, rows=shape[0])
                split_as = module_names(fid, component, key, "diffusers", rows=shape[0]) \
                    if twin else ()
            except KeyError:
                continue
            if any(n.swap for n in (*named, *split_as)):
                continue
            for n in named:
                out = (n.rows[1] - n.rows[0]) if n.rows else shape[0]
                down = torch.randn((rank, *shape[1:]), generator=gen) * 0.1
                up = torch.randn((out, rank, *([1] * (len(shape) - 2))), generator=gen) * 0.1
                if fmt == "diffusers":
                    tensors[n.name + ".lora_A.weight"] = down
                    tensors[n.name + ".lora_B.weight"] = up
                    continue
                tensors[n.name + ".lora_down.weight"] = down
                tensors[n.name + ".lora_up.weight"] = up
                tensors[n.name + ".alpha"] = torch.tensor(alpha)
                for part in split_as:
                    rows = slice(*part.rows) if part.rows else slice(None)
                    twins[part.name + ".lora_A.weight"] = down.clone()
                    twins[part.name + ".lora_B.weight"] = up[rows] * (alpha / rank)
    save_file(tensors, str(path), metadata)
    if twin:
        save_file(twins, str(twin))
    return Path(path)
