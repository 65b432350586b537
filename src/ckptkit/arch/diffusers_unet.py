"""The SD1/SD2/SDXL UNet in diffusers' ``UNet2DConditionModel`` names, derived from its config.

Why derived: diffusers regroups the LDM blocks (``input_blocks.N`` numbered through every level
become ``down_blocks.L.resnets.j`` / ``.attentions.j`` / ``.downsamplers.0``) and renames the
ResBlock layers, so which LDM block is which diffusers block depends on the levels, the blocks
per level and where attention sits. Walking the config the way ``keys.unet`` builds the network
gives the map for every UNet ckptkit declares (full size, tiny, inpainting) from one function.
The spatial transformers keep their inner names and shapes (a 1x1-conv ``proj_in`` stays a
conv: diffusers builds one when ``use_linear_projection`` is off), so every move is a copy.
"""

from __future__ import annotations

from functools import cache

from .keys import unet as unet_keys
from .keys.unet import UNetConfig
from .layouts import Move

_RESNET = (("in_layers.0", "norm1"), ("in_layers.2", "conv1"), ("emb_layers.1", "time_emb_proj"),
           ("out_layers.0", "norm2"), ("out_layers.3", "conv2"),
           ("skip_connection", "conv_shortcut"))
_TOP = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
        "label_emb.0.0": "add_embedding.linear_1", "label_emb.0.2": "add_embedding.linear_2",
        "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out"}
# Width of the Fourier embedding of each SDXL size/crop number (SGM's adm input is the pooled
# text embedding plus 5 or 6 of them); diffusers' text_time embedding takes it as a setting.
_TIME_EMBED_DIM = 256
# Heads: the SD 1.x config has 8 per block (num_heads: 8); SD 2.x and SGM configs have
# 64-channel heads (num_head_channels: 64), which diffusers spells as per-level head counts.
_SD1_HEADS = 8
_HEAD_CHANNELS = 64

Modules = dict[str, tuple[str, tuple[tuple[str, str], ...]]]


def _check(cfg: UNetConfig) -> None:
    """Refuses the UNets that diffusers' class cannot build."""
    if cfg.ff_mult != 4:
        raise ValueError("diffusers' UNet transformer blocks have a feed-forward of 4x width")
    if not cfg.transformer_depth_middle:
        raise ValueError("diffusers' UNet2DConditionModel has no middle block without attention")
    last = cfg.transformer_depth[-1]
    if last and last != cfg.transformer_depth_middle:
        raise ValueError("diffusers gives the middle block the deepest level's transformer "
                         "depth; this UNet's differ")


def _modules(cfg: UNetConfig) -> Modules:
    """LDM module path -> (diffusers module path, renames of the module's children)."""
    _check(cfg)
    mods: Modules = {ldm: (new, ()) for ldm, new in _TOP.items()}
    levels = len(cfg.channel_mult)
    n = 1
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            mods[f"input_blocks.{n}.0"] = (f"down_blocks.{level}.resnets.{j}", _RESNET)
            if cfg.transformer_depth[level]:
                mods[f"input_blocks.{n}.1"] = (f"down_blocks.{level}.attentions.{j}", ())
            n += 1
        if level != levels - 1:
            mods[f"input_blocks.{n}.0.op"] = (f"down_blocks.{level}.downsamplers.0.conv", ())
            n += 1
    mods["middle_block.0"] = ("mid_block.resnets.0", _RESNET)
    mods["middle_block.1"] = ("mid_block.attentions.0", ())
    mods["middle_block.2"] = ("mid_block.resnets.1", _RESNET)
    n = 0
    for up, level in enumerate(reversed(range(levels))):
        attention = bool(cfg.transformer_depth[level])
        for j in range(cfg.num_res_blocks + 1):
            mods[f"output_blocks.{n}.0"] = (f"up_blocks.{up}.resnets.{j}", _RESNET)
            if attention:
                mods[f"output_blocks.{n}.1"] = (f"up_blocks.{up}.attentions.{j}", ())
            if level and j == cfg.num_res_blocks:
                mods[f"output_blocks.{n}.{2 if attention else 1}.conv"] = (
                    f"up_blocks.{up}.upsamplers.0.conv", ())
            n += 1
    return mods


def rename(key: str, mods: Modules, what: str) -> str:
    """``key`` renamed by the longest module path of ``mods`` it lies under (the VAE map
    uses it too)."""
    parts = key.split(".")
    for depth in range(len(parts) - 1, 0, -1):
        found = mods.get(".".join(parts[:depth]))
        if found:
            new, renames = found
            rest = ".".join(parts[depth:])
            for old, repl in renames:
                if rest.startswith(old + "."):
                    rest = repl + rest[len(old):]
                    break
            return f"{new}.{rest}"
    raise KeyError(f"no diffusers name for {what} key {key!r}")


def refuse_unknown(present: set[str], known: set[str], what: str) -> None:
    unknown = present - known
    if unknown:
        raise KeyError(f"{len(unknown)} keys are not {what} keys, e.g. {min(unknown)!r}")


@cache
def _pairs(cfg: UNetConfig) -> tuple[tuple[str, str], ...]:
    """(LDM key, diffusers key) for every key of the UNet, in LDM ``state_dict`` order."""
    mods = _modules(cfg)
    return tuple((key, rename(key, mods, "UNet")) for key in unet_keys.unet_keys(cfg))


def _moves(pairs, present: set[str], what: str) -> list[Move]:
    refuse_unknown(present, {src for src, _ in pairs}, what)
    return [Move(dst, (src,)) for src, dst in pairs if src in present]


def to_diffusers(cfg: UNetConfig, present: set[str]) -> list[Move]:
    """Moves from the canonical (LDM) UNet keys in ``present`` to diffusers names."""
    return _moves(_pairs(cfg), present, "LDM UNet")


def from_diffusers(cfg: UNetConfig, present: set[str]) -> list[Move]:
    """Moves from the diffusers UNet keys in ``present`` back to the canonical names."""
    return _moves([(dst, src) for src, dst in _pairs(cfg)], present, "diffusers UNet")


def _heads(cfg: UNetConfig) -> int | list[int]:
    if not cfg.linear_proj:
        return _SD1_HEADS
    return [max(1, cfg.model_channels * m // _HEAD_CHANNELS) for m in cfg.channel_mult]


def _transformer_layers(cfg: UNetConfig) -> int | list[int]:
    """One depth when every attention level and the middle share it (SD, the refiner), else
    one per level, levels without attention given 1 as the official SDXL config does."""
    depths = {d for d in cfg.transformer_depth if d} | {cfg.transformer_depth_middle}
    if len(depths) == 1:
        return depths.pop()
    layers = [d or 1 for d in cfg.transformer_depth]
    layers[-1] = cfg.transformer_depth_middle  # what diffusers builds the middle block with
    return layers


def diffusers_config(cfg: UNetConfig, sample_size: int) -> dict:
    """The ``unet/config.json`` of this UNet (``sample_size``: the latent side it is made for)."""
    _check(cfg)
    attention = [bool(d) for d in cfg.transformer_depth]
    config: dict = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": _heads(cfg),
        "block_out_channels": [cfg.model_channels * m for m in cfg.channel_mult],
        "center_input_sample": False,
        "cross_attention_dim": cfg.context_dim,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attention],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": cfg.in_channels,
        "layers_per_block": cfg.num_res_blocks,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": cfg.out_channels,
        "sample_size": sample_size,
        "up_block_types": ["CrossAttnUpBlock2D" if a else "UpBlock2D"
                           for a in reversed(attention)],
        "use_linear_projection": cfg.linear_proj,
    }
    layers = _transformer_layers(cfg)
    if layers != 1:
        config["transformer_layers_per_block"] = layers
    if cfg.adm_in_channels is not None:
        config.update(addition_embed_type="text_time", addition_embed_type_num_heads=64,
                      addition_time_embed_dim=_TIME_EMBED_DIM,
                      projection_class_embeddings_input_dim=cfg.adm_in_channels)
    return config
