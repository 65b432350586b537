"""Keys and shapes of the MMDiT denoiser of SD3 / SD3.5, in the original (SGM / ComfyUI) naming.

Why a generator: SD3 Medium, SD3.5 Medium and SD3.5 Large are one network, ``MMDiT(X)``, that
differs only in a handful of numbers (depth, width, the size of the stored positional table,
q/k RMS norms, and the blocks that carry MMDiT-X's second image self-attention). Real files and
our tiny test samples must come out of the same code so that a detector cannot tell them apart
by anything but those numbers. Monolithic files store these keys under
``model.diffusion_model.``; standalone ComfyUI files store them bare.

``state_dict`` order of the reference module: ``pos_embed`` first (it is a buffer of the root
module, and ``state_dict`` lists a module's own tensors before its children's), then
``x_embedder``, ``t_embedder``, ``y_embedder``, ``context_embedder``, ``joint_blocks.N``
(``context_block`` then ``x_block``, each ``attn`` [qkv, proj, ln_q, ln_k], ``attn2``,
``mlp`` [fc1, fc2], ``adaLN_modulation.1``) and ``final_layer`` (linear, adaLN_modulation.1).

Detection notes: the reference derives ``depth = x_embedder width / 64`` (64-wide heads) and
``pos_embed_max_size = sqrt(N)``. The tiny configs keep the real depth but not the real width or
positional size, so neither signature holds for them; a detector must read the block count from
the ``joint_blocks.N`` keys and treat ``pos_embed`` N (192**2 vs 384**2) as one hint among several.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable, TransformerWidths, linear


@dataclass(frozen=True)
class MMDiTConfig(TransformerWidths):
    """The numbers that decide the MMDiT's key names and shapes."""

    depth: int  # number of joint blocks
    hidden_size: int  # 64 * depth in every released model
    num_heads: int  # = depth in every released model (64-wide heads)
    pos_embed_max_size: int  # pos_embed is [1, size**2, hidden]
    pooled_dim: int = 2048  # y_embedder input: CLIP-L (768) + CLIP-G (1280) pooled outputs
    context_dim: int = 4096  # context_embedder input: T5-XXL width
    patch_size: int = 2
    in_channels: int = 16
    out_channels: int = 16
    mlp_ratio: float = 4.0
    # SD3.5: per-head RMSNorm weights ``attn.ln_q`` / ``attn.ln_k`` in every attention.
    qk_norm: bool = False
    # MMDiT-X (SD3.5 Medium): joint blocks whose x_block has a second self-attention
    # (``x_block.attn2.*``) and 9 instead of 6 modulation vectors.
    x_block_attn2: tuple[int, ...] = ()
    # The last block's context_block only feeds the joint attention: no proj, no mlp and
    # 2 modulation vectors.
    pre_only_last: bool = True
    qkv_bias: bool = True
    time_embed_dim: int = 256  # sinusoidal timestep features fed to t_embedder

    def __post_init__(self) -> None:
        numbers = (self.depth, self.hidden_size, self.num_heads, self.pos_embed_max_size,
                   self.pooled_dim, self.context_dim, self.patch_size, self.in_channels,
                   self.out_channels, self.time_embed_dim)
        self.check_widths(numbers)
        if any(not 0 <= i < self.depth for i in self.x_block_attn2):
            raise ValueError("MMDiTConfig: x_block_attn2 names a block outside 0..depth-1")
        if tuple(sorted(set(self.x_block_attn2))) != self.x_block_attn2:
            raise ValueError("MMDiTConfig: x_block_attn2 must be sorted and without repeats")





def _attention(t: KeyTable, p: str, cfg: MMDiTConfig, pre_only: bool) -> None:
    h = cfg.hidden_size
    linear(t, f"{p}.qkv", h, 3 * h, cfg.qkv_bias)
    if not pre_only:
        linear(t, f"{p}.proj", h, h)
    if cfg.qk_norm:
        t[f"{p}.ln_q.weight"] = (cfg.head_dim,)
        t[f"{p}.ln_k.weight"] = (cfg.head_dim,)


def _dismantled(t: KeyTable, p: str, cfg: MMDiTConfig, pre_only: bool, attn2: bool) -> None:
    h = cfg.hidden_size
    _attention(t, f"{p}.attn", cfg, pre_only)
    if attn2:
        _attention(t, f"{p}.attn2", cfg, False)
    if not pre_only:
        linear(t, f"{p}.mlp.fc1", h, cfg.mlp_hidden)
        linear(t, f"{p}.mlp.fc2", cfg.mlp_hidden, h)
    mods = 9 if attn2 else (2 if pre_only else 6)
    linear(t, f"{p}.adaLN_modulation.1", h, mods * h)


def mmdit_keys(cfg: MMDiTConfig) -> KeyTable:
    """Bare MMDiT keys (``pos_embed``, ``x_embedder.proj.weight`` ... ``final_layer.linear``)."""
    t: KeyTable = {}
    h = cfg.hidden_size
    p = cfg.patch_size
    t["pos_embed"] = (1, cfg.pos_embed_max_size ** 2, h)
    t["x_embedder.proj.weight"] = (h, cfg.in_channels, p, p)
    t["x_embedder.proj.bias"] = (h,)
    linear(t, "t_embedder.mlp.0", cfg.time_embed_dim, h)
    linear(t, "t_embedder.mlp.2", h, h)
    linear(t, "y_embedder.mlp.0", cfg.pooled_dim, h)
    linear(t, "y_embedder.mlp.2", h, h)
    linear(t, "context_embedder", cfg.context_dim, h)
    attn2 = set(cfg.x_block_attn2)
    for i in range(cfg.depth):
        last = i == cfg.depth - 1
        _dismantled(t, f"joint_blocks.{i}.context_block", cfg,
                    pre_only=last and cfg.pre_only_last, attn2=False)
        _dismantled(t, f"joint_blocks.{i}.x_block", cfg, pre_only=False, attn2=i in attn2)
    linear(t, "final_layer.linear", h, p * p * cfg.out_channels)
    linear(t, "final_layer.adaLN_modulation.1", h, 2 * h)
    return t


# Official numbers (Stability's sd3.5 reference and the diffusers transformer configs).
SD3_MEDIUM = MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=192)
SD35_MEDIUM = MMDiTConfig(depth=24, hidden_size=1536, num_heads=24, pos_embed_max_size=384,
                          qk_norm=True, x_block_attn2=tuple(range(13)))
SD35_LARGE = MMDiTConfig(depth=38, hidden_size=2432, num_heads=38, pos_embed_max_size=192,
                         qk_norm=True)


def _tiny(cfg: MMDiTConfig) -> MMDiTConfig:
    """Same depth, key names and channels; widths of the tiny text encoders (CLIP-L 32 + CLIP-G
    48 pooled = 80, T5 d_model 32); a 16x16 positional table instead of 192x192 / 384x384, so a
    tiny sample does not carry the pos_embed size signature; width 48 (2 heads of 24) keeps
    the 38-block SD3.5 Large below 5 M parameters with diffusers' fixed mlp ratio of 4, so
    that a tiny sample also loads into diffusers' SD3Transformer2DModel."""
    return dataclasses.replace(cfg, hidden_size=48, num_heads=2, pos_embed_max_size=16,
                               pooled_dim=80, context_dim=32)


SD3_MEDIUM_TINY = _tiny(SD3_MEDIUM)
SD35_MEDIUM_TINY = _tiny(SD35_MEDIUM)
SD35_LARGE_TINY = _tiny(SD35_LARGE)
