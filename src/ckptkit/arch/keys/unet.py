"""Keys and shapes of the LDM/SGM UNet (SD 1.x, SD 2.x, SDXL base and refiner).

Why a generator and not a list: the four UNets differ only in a handful of numbers (widths,
levels, where attention sits and how deep, the text context width, linear or 1x1-conv
projections, the size of the extra "ADM" vector of SDXL), and so do their inpainting and
instruct-pix2pix variants and every tiny test model. One function of those numbers gives them
all, in the original (CompVis ``openaimodel.UNetModel`` / SGM) names that monolithic files store
under ``model.diffusion_model.`` and standalone ComfyUI files store bare.

Structure, as the reference module builds it (and so lists its ``state_dict``)::

    time_embed.{0,2}                      Linear(C, 4C), Linear(4C, 4C)
    label_emb.0.{0,2}                     Linear(adm, 4C), Linear(4C, 4C)       (SDXL only)
    input_blocks.0.0                      Conv(in, C, 3)
    input_blocks.N.0                      ResBlock     (per level: num_res_blocks of them,
    input_blocks.N.1                      SpatialTransformer   when that level has attention)
    input_blocks.N.0.op                   Downsample conv (between levels)
    middle_block.{0,1,2}                  ResBlock, SpatialTransformer, ResBlock
    output_blocks.N.{0,1,2}               ResBlock (+ skip input), SpatialTransformer, Upsample
    out.{0,2}                             GroupNorm(C), Conv(C, out, 3)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable, conv, linear, norm


@dataclass(frozen=True)
class UNetConfig:
    """The numbers that decide the UNet's key names and shapes (nothing else)."""

    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    # Transformer blocks per SpatialTransformer at each level; 0 = no attention at that level.
    transformer_depth: tuple[int, ...] = (1, 1, 1, 0)
    # Transformer blocks in the middle block; 0 = the middle block is a single ResBlock.
    transformer_depth_middle: int = 1
    # Width of the text conditioning the cross-attention reads (attn2.to_k/to_v inputs).
    context_dim: int = 768
    # proj_in/proj_out as Linear [C, C] (SD2, SDXL) instead of a 1x1 Conv [C, C, 1, 1] (SD1).
    linear_proj: bool = False
    # Input width of label_emb (SDXL's pooled text + size/crop embeddings); None = no label_emb.
    adm_in_channels: int | None = None
    # Width of the GEGLU feed-forward, as a multiple of the block width (4 in every SD UNet).
    ff_mult: int = 4

    def __post_init__(self) -> None:
        if not self.channel_mult or len(self.transformer_depth) != len(self.channel_mult):
            raise ValueError("UNetConfig: transformer_depth needs one entry per channel_mult level")
        numbers = (self.in_channels, self.out_channels, self.model_channels, self.num_res_blocks,
                   self.context_dim, self.ff_mult, *self.channel_mult)
        if min(numbers) <= 0:
            raise ValueError("UNetConfig: channel counts and block counts must be positive")
        if min(self.transformer_depth) < 0 or self.transformer_depth_middle < 0:
            raise ValueError("UNetConfig: transformer depths cannot be negative")
        if self.adm_in_channels is not None and self.adm_in_channels <= 0:
            raise ValueError("UNetConfig: adm_in_channels must be positive or None")

    @property
    def time_embed_dim(self) -> int:
        """Width of the timestep embedding every ResBlock reads (4 x model_channels)."""
        return 4 * self.model_channels


def inpainting(cfg: UNetConfig) -> UNetConfig:
    """The inpainting variant: latent + masked-image latent + 1 mask channel in (9 for SD)."""
    return dataclasses.replace(cfg, in_channels=2 * cfg.out_channels + 1)


def instruct_pix2pix(cfg: UNetConfig) -> UNetConfig:
    """The instruct-pix2pix variant: latent + source-image latent in (8 for SD)."""
    return dataclasses.replace(cfg, in_channels=2 * cfg.out_channels)








def _resblock(t: KeyTable, p: str, cin: int, cout: int, emb: int) -> None:
    norm(t, f"{p}.in_layers.0", cin)
    conv(t, f"{p}.in_layers.2", cin, cout, 3)
    linear(t, f"{p}.emb_layers.1", emb, cout)
    norm(t, f"{p}.out_layers.0", cout)
    conv(t, f"{p}.out_layers.3", cout, cout, 3)
    if cin != cout:  # otherwise the skip is an Identity, with no weights
        conv(t, f"{p}.skip_connection", cin, cout, 1)


def _attention(t: KeyTable, p: str, ch: int, kv: int) -> None:
    linear(t, f"{p}.to_q", ch, ch, bias=False)
    linear(t, f"{p}.to_k", kv, ch, bias=False)
    linear(t, f"{p}.to_v", kv, ch, bias=False)
    linear(t, f"{p}.to_out.0", ch, ch)


def _spatial_transformer(t: KeyTable, p: str, ch: int, depth: int, cfg: UNetConfig) -> None:
    norm(t, f"{p}.norm", ch)
    proj = linear if cfg.linear_proj else (lambda t, p, a, b: conv(t, p, a, b, 1))
    proj(t, f"{p}.proj_in", ch, ch)
    inner = cfg.ff_mult * ch
    for i in range(depth):
        b = f"{p}.transformer_blocks.{i}"
        _attention(t, f"{b}.attn1", ch, ch)
        linear(t, f"{b}.ff.net.0.proj", ch, 2 * inner)  # GEGLU: value and gate halves
        linear(t, f"{b}.ff.net.2", inner, ch)
        _attention(t, f"{b}.attn2", ch, cfg.context_dim)
        for n in (1, 2, 3):
            norm(t, f"{b}.norm{n}", ch)
    proj(t, f"{p}.proj_out", ch, ch)


def unet_keys(cfg: UNetConfig) -> KeyTable:
    """Bare UNet keys (``time_embed.0.weight`` ... ``out.2.bias``) in ``state_dict`` order."""
    t: KeyTable = {}
    mc, emb = cfg.model_channels, cfg.time_embed_dim
    last = len(cfg.channel_mult) - 1

    linear(t, "time_embed.0", mc, emb)
    linear(t, "time_embed.2", emb, emb)
    if cfg.adm_in_channels is not None:
        linear(t, "label_emb.0.0", cfg.adm_in_channels, emb)
        linear(t, "label_emb.0.2", emb, emb)

    conv(t, "input_blocks.0.0", cfg.in_channels, mc, 3)
    skips, ch, n = [mc], mc, 1
    for level, mult in enumerate(cfg.channel_mult):
        depth = cfg.transformer_depth[level]
        for _ in range(cfg.num_res_blocks):
            _resblock(t, f"input_blocks.{n}.0", ch, mc * mult, emb)
            ch = mc * mult
            if depth:
                _spatial_transformer(t, f"input_blocks.{n}.1", ch, depth, cfg)
            skips.append(ch)
            n += 1
        if level != last:
            conv(t, f"input_blocks.{n}.0.op", ch, ch, 3)
            skips.append(ch)
            n += 1

    _resblock(t, "middle_block.0", ch, ch, emb)
    if cfg.transformer_depth_middle:
        _spatial_transformer(t, "middle_block.1", ch, cfg.transformer_depth_middle, cfg)
        _resblock(t, "middle_block.2", ch, ch, emb)

    n = 0
    for level in reversed(range(len(cfg.channel_mult))):
        depth = cfg.transformer_depth[level]
        for i in range(cfg.num_res_blocks + 1):
            width = mc * cfg.channel_mult[level]
            _resblock(t, f"output_blocks.{n}.0", ch + skips.pop(), width, emb)
            ch, layer = width, 1
            if depth:
                _spatial_transformer(t, f"output_blocks.{n}.1", ch, depth, cfg)
                layer = 2
            if level and i == cfg.num_res_blocks:
                conv(t, f"output_blocks.{n}.{layer}.conv", ch, ch, 3)
            n += 1

    norm(t, "out.0", ch)
    conv(t, "out.2", ch, cfg.out_channels, 3)
    return t


# Full-size models, as released.
SD1_UNET = UNetConfig()
SD2_UNET = dataclasses.replace(SD1_UNET, context_dim=1024, linear_proj=True)
SDXL_UNET = UNetConfig(
    channel_mult=(1, 2, 4), transformer_depth=(0, 2, 10), transformer_depth_middle=10,
    context_dim=2048, linear_proj=True,
    adm_in_channels=2816,  # pooled CLIP-G 1280 + 6 size/crop Fourier embeddings of 256
)
SDXL_REFINER_UNET = UNetConfig(
    model_channels=384, transformer_depth=(0, 4, 4, 0), transformer_depth_middle=4,
    context_dim=1280, linear_proj=True,
    adm_in_channels=2560,  # pooled CLIP-G 1280 + 5 size/crop/aesthetic embeddings of 256
)

# Tiny test models: the same levels, depths, key names and in/out channels; narrow widths
# (every width a multiple of 32 so that GroupNorm(32) still works, hence model_channels 32 for
# the refiner too: 48 would break GroupNorm and 64 would make it 60 M parameters). context_dim
# and adm_in_channels follow the tiny text encoders: SDXL context = CLIP-L 32 + CLIP-G 48,
# adm = pooled CLIP-G 48 + 6 x 256; refiner context = CLIP-G 48, adm = 48 + 5 x 256. The
# depth-10 transformers of SDXL keep its tiny UNet at about 24 M parameters.
SD1_UNET_TINY = dataclasses.replace(SD1_UNET, model_channels=32, context_dim=32)
SD2_UNET_TINY = dataclasses.replace(SD2_UNET, model_channels=32, context_dim=40)
SDXL_UNET_TINY = dataclasses.replace(SDXL_UNET, model_channels=32, context_dim=80,
                                     adm_in_channels=48 + 1536)
SDXL_REFINER_UNET_TINY = dataclasses.replace(SDXL_REFINER_UNET, model_channels=32,
                                             context_dim=48, adm_in_channels=48 + 1280)
