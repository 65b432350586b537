"""The KL autoencoder (SD/SDXL 4-channel, SD3/FLUX 16-channel) in diffusers' ``AutoencoderKL``
names, derived from its config.

Why more than a renaming: besides new block names (``down.L.block.B`` -> ``down_blocks.L.
resnets.B``, ``mid.attn_1`` -> ``mid_block.attentions.0``), diffusers numbers the decoder's
levels in the order they run (deepest first) where LDM numbers them by resolution, and its
mid-block attention is made of Linear layers where LDM has 1x1 convolutions: the same numbers,
[C, C] instead of [C, C, 1, 1] (a ``reshape`` move each way).
"""

from __future__ import annotations

from functools import cache

from .diffusers_unet import Modules, refuse_unknown, rename
from .keys import vae as vae_keys
from .keys.vae import VAEConfig
from .layouts import Move

_RESNET = (("nin_shortcut", "conv_shortcut"),)
_ATTENTION = (("norm", "group_norm"), ("q", "to_q"), ("k", "to_k"), ("v", "to_v"),
              ("proj_out", "to_out.0"))
_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "norm_out": "conv_norm_out",
        "mid.block_1": "mid_block.resnets.0", "mid.block_2": "mid_block.resnets.1"}

def _modules(cfg: VAEConfig) -> Modules:
    """LDM module path -> (diffusers module path, renames of the module's children)."""
    mods: Modules = {"quant_conv": ("quant_conv", ()), "post_quant_conv": ("post_quant_conv", ())}
    levels = len(cfg.ch_mult)
    for side in ("encoder", "decoder"):
        for old, new in _TOP.items():
            mods[f"{side}.{old}"] = (f"{side}.{new}", _RESNET if "block_" in old else ())
        mods[f"{side}.mid.attn_1"] = (f"{side}.mid_block.attentions.0", _ATTENTION)
    for level in range(levels):
        for b in range(cfg.num_res_blocks):
            mods[f"encoder.down.{level}.block.{b}"] = (
                f"encoder.down_blocks.{level}.resnets.{b}", _RESNET)
        mods[f"encoder.down.{level}.downsample.conv"] = (
            f"encoder.down_blocks.{level}.downsamplers.0.conv", ())
        up = levels - 1 - level  # diffusers runs the deepest level first
        for b in range(cfg.num_res_blocks + 1):
            mods[f"decoder.up.{level}.block.{b}"] = (f"decoder.up_blocks.{up}.resnets.{b}",
                                                     _RESNET)
        mods[f"decoder.up.{level}.upsample.conv"] = (
            f"decoder.up_blocks.{up}.upsamplers.0.conv", ())
    return mods


@cache
def _pairs(cfg: VAEConfig) -> tuple[tuple[str, str, tuple[int, ...]], ...]:
    """(LDM key, diffusers key, LDM shape) for every key of the VAE, in LDM order."""
    mods = _modules(cfg)
    return tuple((key, rename(key, mods, "VAE"), shape)
                 for key, shape in vae_keys.vae_keys(cfg).items())


def _is_conv_as_linear(ldm_key: str, shape: tuple[int, ...]) -> bool:
    return ".mid.attn_1." in ldm_key and len(shape) == 4


def to_diffusers(cfg: VAEConfig, present: set[str]) -> list[Move]:
    """Moves from the canonical (LDM) VAE keys in ``present`` to diffusers names."""
    refuse_unknown(present, {ldm for ldm, _, _ in _pairs(cfg)}, "LDM VAE")
    return [Move(new, (ldm,), "reshape", shape=shape[:2]) if _is_conv_as_linear(ldm, shape)
            else Move(new, (ldm,)) for ldm, new, shape in _pairs(cfg) if ldm in present]


def from_diffusers(cfg: VAEConfig, present: set[str]) -> list[Move]:
    """Moves from the diffusers VAE keys in ``present`` back to the canonical names."""
    refuse_unknown(present, {new for _, new, _ in _pairs(cfg)}, "diffusers VAE")
    return [Move(ldm, (new,), "reshape", shape=shape) if _is_conv_as_linear(ldm, shape)
            else Move(ldm, (new,)) for ldm, new, shape in _pairs(cfg) if new in present]


def diffusers_config(cfg: VAEConfig, *, sample_size: int, scaling_factor: float,
                     shift_factor: float | None = None) -> dict:
    """The ``vae/config.json`` of this VAE; the latent scaling is the model's, not the VAE's
    shape, so the caller gives it (with the image side it is made for)."""
    levels = len(cfg.ch_mult)
    config: dict = {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [cfg.ch * m for m in cfg.ch_mult],
        "down_block_types": ["DownEncoderBlock2D"] * levels,
        "force_upcast": True,
        "in_channels": cfg.image_channels,
        "latent_channels": cfg.latent_channels,
        "layers_per_block": cfg.num_res_blocks,
        "norm_num_groups": 32,
        "out_channels": cfg.image_channels,
        "sample_size": sample_size,
        "scaling_factor": scaling_factor,
        "up_block_types": ["UpDecoderBlock2D"] * levels,
    }
    if shift_factor is not None:
        config["shift_factor"] = shift_factor
    if not cfg.quant_conv:
        config.update(use_quant_conv=False, use_post_quant_conv=False)
    return config
