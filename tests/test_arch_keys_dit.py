"""Our SD3-family MMDiT and FLUX.1 key tables against sources we did not write.

- sd-mecha 1.1.8's shipped key tables (YAML read directly; no sd-mecha API is called):
  ``sd3-comfyui`` is an SD3 *Medium* (2B) ComfyUI all-in-one (pos_embed 192**2, no ln_q, no
  attn2) under ``model.diffusion_model.``; ``flux-flux`` is FLUX.1 dev (it has guidance_in)
  under ``model.diffusion_model.``, with the bare BFL names as aliases.
- diffusers' single-file converters fed our tables as meta tensors, compared with the diffusers
  transformers built on meta from the official configs written out here, for every variant;
  and diffusers' own model-type detection run on our tables.
- Parameter totals of the diffusers models.

Nothing is downloaded; every model lives on the meta device (no memory, no data).
"""

from __future__ import annotations

import functools
import math

import pytest
import torch
from helpers import mecha, meta, params, shapes

from ckptkit.arch.keys import KeyTable
from ckptkit.arch.keys import flux as F
from ckptkit.arch.keys import mmdit as M

PREFIX = "model.diffusion_model."


def test_sd3_comfyui_is_sd3_medium():
    entries = mecha("sd3-comfyui")["diffuser"]
    assert not any(v.get("optional") or v.get("aliases") for v in entries.values())
    # One key outside the diffusion model: ComfyUI's sampling schedule buffer, not a weight of
    # the MMDiT (ComfyUI's CheckpointSave writes it); accounted for by name.
    stray = {k for k in entries if not k.startswith(PREFIX)}
    assert stray == {"model.model_sampling.sigmas"}
    table = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in entries.items() if k not in stray}
    assert M.mmdit_keys(M.SD3_MEDIUM) == table
    # Which variant: 24 blocks of width 1536, pos_embed 192**2, no q/k norm, no MMDiT-X.
    assert table["pos_embed"] == (1, 192 ** 2, 1536)
    assert not any(".ln_q." in k or ".attn2." in k for k in table)
    for other in (M.SD35_MEDIUM, M.SD35_LARGE):
        assert M.mmdit_keys(other) != table


def test_flux_flux_is_flux_dev():
    entries = mecha("flux-flux")["diffuser"]
    assert all(k.startswith(PREFIX) for k in entries)
    assert not any(v.get("optional") for v in entries.values())
    # Aliases: the bare BFL names (flux1-dev.safetensors), a pure prefix change.
    for key, entry in entries.items():
        assert entry["aliases"] == [key[len(PREFIX):]]
    table = {k[len(PREFIX):]: tuple(v["shape"]) for k, v in entries.items()}
    assert F.flux_keys(F.FLUX_DEV) == table
    assert "guidance_in.in_layer.weight" in table
    assert F.flux_keys(F.FLUX_SCHNELL) == {k: v for k, v in table.items()
                                           if not k.startswith("guidance_in.")}


# --------------------------------------------------------------------------- diffusers

# The official SD3Transformer2DModel configs (transformer/config.json of each Hub repo).
_SD3_BASE = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16,
                 attention_head_dim=64, joint_attention_dim=4096, pooled_projection_dim=2048)
SD3_CONFIGS = {
    "SD3_MEDIUM": dict(  # stabilityai/stable-diffusion-3-medium-diffusers
        _SD3_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=192),
    "SD35_MEDIUM": dict(  # stabilityai/stable-diffusion-3.5-medium
        _SD3_BASE, num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
        pos_embed_max_size=384, qk_norm="rms_norm", dual_attention_layers=tuple(range(13))),
    "SD35_LARGE": dict(  # stabilityai/stable-diffusion-3.5-large
        _SD3_BASE, num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
        pos_embed_max_size=192, qk_norm="rms_norm"),
}

# The official FluxTransformer2DModel configs (transformer/config.json).
_FLUX_BASE = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                  attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                  pooled_projection_dim=768, axes_dims_rope=(16, 56, 56))
FLUX_CONFIGS = {
    "FLUX_DEV": dict(_FLUX_BASE, guidance_embeds=True),  # black-forest-labs/FLUX.1-dev
    "FLUX_SCHNELL": dict(_FLUX_BASE, guidance_embeds=False),  # FLUX.1-schnell
    "FLUX_FILL_DEV": dict(_FLUX_BASE, guidance_embeds=True, in_channels=384,  # FLUX.1-Fill-dev
                          out_channels=64),
    "FLUX_DEPTH_DEV": dict(_FLUX_BASE, guidance_embeds=True, in_channels=128,  # FLUX.1-Depth-dev
                           out_channels=64),
}


def _freeze(config: dict) -> tuple:
    return tuple(sorted(config.items()))


@functools.cache
def diffusers_model(kind: str, frozen: tuple):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    cls = {"sd3": SD3Transformer2DModel, "flux": FluxTransformer2DModel}[kind]
    with torch.device("meta"):
        return cls(**dict(frozen))


def diffusers_state(kind: str, config: dict) -> KeyTable:
    return shapes(diffusers_model(kind, _freeze(config)).state_dict())


def convert(kind: str, table: KeyTable) -> tuple[KeyTable, dict]:
    """Our table through diffusers' converter, as a monolithic file would hold it. Returns the
    converted shapes and what the converter left unread (it pops every key it uses)."""
    from diffusers.loaders.single_file_utils import (
        convert_flux_transformer_checkpoint_to_diffusers,
        convert_sd3_transformer_checkpoint_to_diffusers,
    )

    fn = {"sd3": convert_sd3_transformer_checkpoint_to_diffusers,
          "flux": convert_flux_transformer_checkpoint_to_diffusers}[kind]
    checkpoint = meta(table, PREFIX)
    converted = fn(checkpoint)
    return shapes(converted), checkpoint


@pytest.mark.parametrize("name", list(SD3_CONFIGS))
def test_mmdit_converts_to_diffusers(name):
    converted, left = convert("sd3", M.mmdit_keys(getattr(M, name)))
    assert not left, f"keys diffusers does not know: {sorted(left)[:5]}"
    assert converted == diffusers_state("sd3", SD3_CONFIGS[name])


@pytest.mark.parametrize("name", list(FLUX_CONFIGS))
def test_flux_converts_to_diffusers(name):
    converted, left = convert("flux", F.flux_keys(getattr(F, name)))
    assert not left, f"keys diffusers does not know: {sorted(left)[:5]}"
    assert converted == diffusers_state("flux", FLUX_CONFIGS[name])


@pytest.mark.parametrize(("name", "model_type"), [
    ("SD3_MEDIUM", "sd3"), ("SD35_MEDIUM", "sd35_medium"), ("SD35_LARGE", "sd35_large"),
    ("FLUX_DEV", "flux-dev"), ("FLUX_SCHNELL", "flux-schnell"),
    ("FLUX_FILL_DEV", "flux-fill"), ("FLUX_DEPTH_DEV", "flux-depth"),
])
@pytest.mark.parametrize("prefix", [PREFIX, ""])
def test_diffusers_detects_our_tables(name, model_type, prefix):
    from diffusers.loaders.single_file_utils import infer_diffusers_model_type

    table = M.mmdit_keys(getattr(M, name)) if name.startswith("SD") else F.flux_keys(
        getattr(F, name))
    assert infer_diffusers_model_type(meta(table, prefix)) == model_type


# The tiny MMDiTs through the same diffusers code (their feed-forward is 4x wide, the only
# ratio diffusers' SD3 knows). The FLUX converter has the 3072 width written in, so tiny FLUX
# tables cannot go through it.
TINY_SD3 = {"SD3_MEDIUM_TINY": "SD3_MEDIUM", "SD35_MEDIUM_TINY": "SD35_MEDIUM",
            "SD35_LARGE_TINY": "SD35_LARGE"}


@pytest.mark.parametrize("name", list(TINY_SD3))
def test_tiny_mmdit_converts_to_diffusers(name):
    tiny = getattr(M, name)
    config = dict(SD3_CONFIGS[TINY_SD3[name]], attention_head_dim=tiny.head_dim,
                  num_attention_heads=tiny.num_heads, caption_projection_dim=tiny.hidden_size,
                  joint_attention_dim=tiny.context_dim, pooled_projection_dim=tiny.pooled_dim,
                  pos_embed_max_size=tiny.pos_embed_max_size)
    converted, left = convert("sd3", M.mmdit_keys(tiny))
    assert not left
    assert converted == diffusers_state("sd3", config)


# --------------------------------------------------------------------------- totals

# Computed from the diffusers models built above (model.parameters(); diffusers keeps the SD3
# pos_embed as a buffer, so it is not a parameter there: our tables add it on top).
SD3_PARAMETERS = {
    "SD3_MEDIUM": 2_028_328_000,
    "SD35_MEDIUM": 2_243_171_520,
    "SD35_LARGE": 8_056_627_520,
}
FLUX_PARAMETERS = {
    "FLUX_DEV": 11_901_408_320,  # the published figure for the FLUX.1 dev transformer
    "FLUX_SCHNELL": 11_891_178_560,
    "FLUX_FILL_DEV": 11_902_391_360,
    "FLUX_DEPTH_DEV": 11_901_604_928,
}


@pytest.mark.parametrize("name", list(SD3_PARAMETERS))
def test_mmdit_parameter_totals(name):
    model = diffusers_model("sd3", _freeze(SD3_CONFIGS[name]))
    total = sum(p.numel() for p in model.parameters())
    assert total == SD3_PARAMETERS[name]
    table = M.mmdit_keys(getattr(M, name))
    assert params(table) == total + math.prod(table["pos_embed"])


@pytest.mark.parametrize("name", list(FLUX_PARAMETERS))
def test_flux_parameter_totals(name):
    model = diffusers_model("flux", _freeze(FLUX_CONFIGS[name]))
    total = sum(p.numel() for p in model.parameters())
    assert total == FLUX_PARAMETERS[name]
    assert params(F.flux_keys(getattr(F, name))) == total


# --------------------------------------------------------------------------- tiny tables

TINY = {
    "SD3_MEDIUM_TINY": ("SD3_MEDIUM", M.mmdit_keys),
    "SD35_MEDIUM_TINY": ("SD35_MEDIUM", M.mmdit_keys),
    "SD35_LARGE_TINY": ("SD35_LARGE", M.mmdit_keys),
    "FLUX_DEV_TINY": ("FLUX_DEV", F.flux_keys),
    "FLUX_SCHNELL_TINY": ("FLUX_SCHNELL", F.flux_keys),
    "FLUX_FILL_DEV_TINY": ("FLUX_FILL_DEV", F.flux_keys),
    "FLUX_DEPTH_DEV_TINY": ("FLUX_DEPTH_DEV", F.flux_keys),
}


@pytest.mark.parametrize("name", list(TINY))
def test_tiny_tables(name):
    full_name, keys = TINY[name]
    module = M if keys is M.mmdit_keys else F
    tiny_cfg, full_cfg = getattr(module, name), getattr(module, full_name)
    tiny, full = keys(tiny_cfg), keys(full_cfg)
    assert list(tiny) == list(full)  # same names, same order
    assert params(tiny) < 5_000_000
    assert all(math.prod(s) <= math.prod(full[k]) for k, s in tiny.items())
    assert all(len(s) == len(full[k]) for k, s in tiny.items())
    if module is M:
        in_key, out_key = "x_embedder.proj.weight", "final_layer.linear.weight"
        assert tiny[in_key][1:] == full[in_key][1:] == (16, 2, 2)
        assert tiny[out_key][0] == full[out_key][0] == 64
        assert tiny["y_embedder.mlp.0.weight"] == (48, 32 + 48)  # pooled tiny CLIP-L + CLIP-G
        assert tiny["context_embedder.weight"] == (48, 32)  # tiny T5 d_model
        assert tiny["pos_embed"] == (1, 16 ** 2, 48)  # not the 192**2 / 384**2 signature
    else:
        assert tiny["img_in.weight"][1] == full["img_in.weight"][1] == full_cfg.in_channels
        assert tiny["final_layer.linear.weight"][0] == full["final_layer.linear.weight"][0] == 64
        assert tiny["vector_in.in_layer.weight"] == (48, 32)  # tiny CLIP-L
        assert tiny["txt_in.weight"] == (48, 32)  # tiny T5
        assert tiny["double_blocks.0.img_attn.norm.query_norm.scale"] == (24,)
        assert sum(tiny_cfg.axes_dim) == tiny_cfg.head_dim


# --------------------------------------------------------------------------- config checks


def test_signatures_of_the_full_tables():
    """The numbers detection reads (reference doc section 1), on our own tables."""
    sd3, m35, l35 = (M.mmdit_keys(c) for c in (M.SD3_MEDIUM, M.SD35_MEDIUM, M.SD35_LARGE))
    assert sd3["x_embedder.proj.weight"] == (64 * 24, 16, 2, 2)
    assert l35["x_embedder.proj.weight"] == (64 * 38, 16, 2, 2)
    assert m35["pos_embed"][1] == 147456 and sd3["pos_embed"][1] == l35["pos_embed"][1] == 36864
    assert {int(k.split(".")[1]) for k in m35 if ".x_block.attn2." in k} == set(range(13))
    assert m35["joint_blocks.12.x_block.adaLN_modulation.1.bias"] == (13824,)  # 9 x 1536
    assert m35["joint_blocks.13.x_block.adaLN_modulation.1.bias"] == (9216,)
    for table, depth in ((sd3, 24), (m35, 24), (l35, 38)):
        last = f"joint_blocks.{depth - 1}.context_block."
        assert not any(k.startswith((last + "mlp.", last + "attn.proj.")) for k in table)
        assert f"joint_blocks.{depth}.x_block.attn.qkv.weight" not in table
    assert ("joint_blocks.0.x_block.attn.ln_q.weight" in m35) and (
        "joint_blocks.0.x_block.attn.ln_q.weight" not in sd3)


@pytest.mark.parametrize(("cls", "bad"), [
    (M.MMDiTConfig, dict(depth=2, hidden_size=64, num_heads=3, pos_embed_max_size=4)),
    (M.MMDiTConfig, dict(depth=2, hidden_size=64, num_heads=2, pos_embed_max_size=4,
                         x_block_attn2=(2,))),
    (M.MMDiTConfig, dict(depth=0, hidden_size=64, num_heads=2, pos_embed_max_size=4)),
    (F.FluxConfig, dict(hidden_size=64, num_heads=2)),  # axes (16, 56, 56) != 32
    (F.FluxConfig, dict(num_heads=5)),
])
def test_configs_refuse_inconsistent_numbers(cls, bad):
    with pytest.raises(ValueError):
        cls(**bad)
