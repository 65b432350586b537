"""Keys and shapes of the FLUX.1 transformer, in Black Forest Labs' naming.

Why a generator: FLUX.1 dev, schnell, Fill and Depth are one network (``flux.model.Flux``) that
differs in the width of its image input (64 latent-patch channels; 384 for Fill, which also gets
the masked image and the mask; 128 for Depth/Canny, which also get the control latents) and in
whether it has a guidance embedder (the guidance-distilled dev models) or not (schnell). The
names are BFL's, as ``flux1-dev.safetensors`` stores them bare and ComfyUI all-in-one files
store them under ``model.diffusion_model.``.

``state_dict`` order of the reference module: ``img_in``, ``time_in`` / ``vector_in`` /
``guidance_in`` (``in_layer``, ``out_layer``), ``txt_in``, ``double_blocks.N`` (``img_mod.lin``,
``img_attn`` [qkv, norm.query_norm.scale, norm.key_norm.scale, proj], ``img_mlp.0`` / ``.2``,
then the same for ``txt_*``), ``single_blocks.N`` (linear1, linear2, norm, modulation.lin) and
``final_layer`` (linear, adaLN_modulation.1). ``in_channels`` here is BFL's: already
patchified (16 latent channels x 2 x 2); ComfyUI's ``in_channels`` is a quarter of it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable, TransformerWidths, linear


@dataclass(frozen=True)
class FluxConfig(TransformerWidths):
    """The numbers that decide the FLUX transformer's key names and shapes (BFL's FluxParams)."""

    in_channels: int = 64
    out_channels: int = 64
    hidden_size: int = 3072
    num_heads: int = 24
    depth: int = 19  # double-stream blocks
    depth_single: int = 38  # single-stream blocks
    mlp_ratio: float = 4.0
    vec_in_dim: int = 768  # pooled CLIP-L
    context_in_dim: int = 4096  # T5-XXL width
    guidance_embed: bool = True  # dev: guidance_in.*; schnell: none
    qkv_bias: bool = True
    # Rotary position axes (text/index, height, width); they must add up to the head width.
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10_000
    time_embed_dim: int = 256  # sinusoidal features fed to time_in and guidance_in

    def __post_init__(self) -> None:
        numbers = (self.in_channels, self.out_channels, self.hidden_size, self.num_heads,
                   self.depth, self.depth_single, self.vec_in_dim, self.context_in_dim,
                   self.time_embed_dim, *self.axes_dim)
        self.check_widths(numbers)
        if sum(self.axes_dim) != self.head_dim or any(d % 2 for d in self.axes_dim):
            raise ValueError("FluxConfig: axes_dim must be even and add up to the head width")





def _mlp_embedder(t: KeyTable, p: str, cin: int, h: int) -> None:
    linear(t, f"{p}.in_layer", cin, h)
    linear(t, f"{p}.out_layer", h, h)


def _qk_norm(t: KeyTable, p: str, head_dim: int) -> None:
    t[f"{p}.query_norm.scale"] = (head_dim,)
    t[f"{p}.key_norm.scale"] = (head_dim,)


def _stream(t: KeyTable, p: str, cfg: FluxConfig) -> None:
    """One half (``img_`` or ``txt_``) of a double-stream block."""
    h = cfg.hidden_size
    linear(t, f"{p}_mod.lin", h, 6 * h)
    linear(t, f"{p}_attn.qkv", h, 3 * h, cfg.qkv_bias)
    _qk_norm(t, f"{p}_attn.norm", cfg.head_dim)
    linear(t, f"{p}_attn.proj", h, h)
    linear(t, f"{p}_mlp.0", h, cfg.mlp_hidden)
    linear(t, f"{p}_mlp.2", cfg.mlp_hidden, h)


def flux_keys(cfg: FluxConfig) -> KeyTable:
    """Bare FLUX keys (``img_in.weight`` ... ``final_layer.adaLN_modulation.1.bias``), in order."""
    t: KeyTable = {}
    h = cfg.hidden_size
    linear(t, "img_in", cfg.in_channels, h)
    _mlp_embedder(t, "time_in", cfg.time_embed_dim, h)
    _mlp_embedder(t, "vector_in", cfg.vec_in_dim, h)
    if cfg.guidance_embed:
        _mlp_embedder(t, "guidance_in", cfg.time_embed_dim, h)
    linear(t, "txt_in", cfg.context_in_dim, h)
    for i in range(cfg.depth):
        _stream(t, f"double_blocks.{i}.img", cfg)
        _stream(t, f"double_blocks.{i}.txt", cfg)
    for i in range(cfg.depth_single):
        p = f"single_blocks.{i}"
        # linear1 = fused q, k, v and MLP input; linear2 = fused attention out and MLP output.
        linear(t, f"{p}.linear1", h, 3 * h + cfg.mlp_hidden)
        linear(t, f"{p}.linear2", h + cfg.mlp_hidden, h)
        _qk_norm(t, f"{p}.norm", cfg.head_dim)
        linear(t, f"{p}.modulation.lin", h, 3 * h)
    linear(t, "final_layer.linear", h, cfg.out_channels)  # patch size 1: already patchified
    linear(t, "final_layer.adaLN_modulation.1", h, 2 * h)
    return t


# Official numbers (BFL's flux.util configs and the diffusers transformer configs).
FLUX_DEV = FluxConfig()
FLUX_SCHNELL = dataclasses.replace(FLUX_DEV, guidance_embed=False)
# Fill: noisy latents + masked-image latents (64 each) + the 8x8-packed mask (256) = 384.
FLUX_FILL_DEV = dataclasses.replace(FLUX_DEV, in_channels=384)
# Depth (and Canny): noisy latents + control-image latents = 128.
FLUX_DEPTH_DEV = dataclasses.replace(FLUX_DEV, in_channels=128)


def _tiny(cfg: FluxConfig) -> FluxConfig:
    """Same block counts, key names and in/out channels; width 48 in 2 heads of 24 (rotary axes
    4 + 10 + 10), the tiny CLIP-L (32) and T5 (32) widths; diffusers' fixed mlp ratio of 4 (so
    a tiny sample loads into its FluxTransformer2DModel) with the 57 blocks below 5 M
    parameters."""
    return dataclasses.replace(cfg, hidden_size=48, num_heads=2, axes_dim=(4, 10, 10),
                               vec_in_dim=32, context_in_dim=32)


FLUX_DEV_TINY = _tiny(FLUX_DEV)
FLUX_SCHNELL_TINY = _tiny(FLUX_SCHNELL)
FLUX_FILL_DEV_TINY = _tiny(FLUX_FILL_DEV)
FLUX_DEPTH_DEV_TINY = _tiny(FLUX_DEPTH_DEV)
