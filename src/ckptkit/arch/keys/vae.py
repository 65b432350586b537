"""Keys and shapes of the LDM/SGM KL autoencoder (the VAE of SD 1.x/2.x/SDXL, SD3 and FLUX).

Why a generator: the 4-channel VAE of SD1/SD2/SDXL and the 16-channel VAE of SD3/FLUX are the
same network with a different latent width, and the latter drops the 1x1 ``quant_conv`` /
``post_quant_conv`` around the latent; tiny test VAEs only narrow the widths. The names are
the original ones (``ldm.modules.diffusionmodules.model.Encoder/Decoder``), which monolithic
files store under ``first_stage_model.`` (``vae.`` in FLUX all-in-ones) and standalone VAE
files store bare.

``state_dict`` order: ``encoder.*`` (conv_in, down.L.block.B, down.L.downsample, mid.block_1,
mid.attn_1, mid.block_2, norm_out, conv_out), ``decoder.*`` (conv_in, mid, up.0 ... up.N with
up.L.block.B and up.L.upsample, norm_out, conv_out), then ``quant_conv``, ``post_quant_conv``.
The decoder's ``up`` list is indexed by resolution level (``up.0`` is the full-resolution,
narrowest level), not by the order the decoder runs them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from . import KeyTable, conv, norm


@dataclass(frozen=True)
class VAEConfig:
    """The numbers that decide the VAE's key names and shapes."""

    latent_channels: int = 4
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 2, 4, 4)
    # ResnetBlocks per encoder level; the decoder has one more per level.
    num_res_blocks: int = 2
    image_channels: int = 3
    # 1x1 convs on the latent moments (encoder side) and the latent (decoder side).
    quant_conv: bool = True

    def __post_init__(self) -> None:
        numbers = (self.latent_channels, self.ch, self.num_res_blocks, self.image_channels,
                   *self.ch_mult)
        if not self.ch_mult or min(numbers) <= 0:
            raise ValueError("VAEConfig: channel and block counts must be positive")






def _resblock(t: KeyTable, p: str, cin: int, cout: int) -> None:
    norm(t, f"{p}.norm1", cin)
    conv(t, f"{p}.conv1", cin, cout, 3)
    norm(t, f"{p}.norm2", cout)
    conv(t, f"{p}.conv2", cout, cout, 3)
    if cin != cout:
        conv(t, f"{p}.nin_shortcut", cin, cout, 1)


def _mid(t: KeyTable, p: str, c: int) -> None:
    _resblock(t, f"{p}.block_1", c, c)
    norm(t, f"{p}.attn_1.norm", c)
    for name in ("q", "k", "v", "proj_out"):  # single-head attention as 1x1 convs
        conv(t, f"{p}.attn_1.{name}", c, c, 1)
    _resblock(t, f"{p}.block_2", c, c)


def vae_keys(cfg: VAEConfig) -> KeyTable:
    """Bare VAE keys (``encoder.conv_in.weight`` ... ``post_quant_conv.bias``), in order."""
    t: KeyTable = {}
    z = cfg.latent_channels
    widths = [cfg.ch * m for m in cfg.ch_mult]
    last = len(widths) - 1

    conv(t, "encoder.conv_in", cfg.image_channels, cfg.ch, 3)
    ch = cfg.ch
    for level, width in enumerate(widths):
        for b in range(cfg.num_res_blocks):
            _resblock(t, f"encoder.down.{level}.block.{b}", ch, width)
            ch = width
        if level != last:
            conv(t, f"encoder.down.{level}.downsample.conv", ch, ch, 3)
    _mid(t, "encoder.mid", ch)
    norm(t, "encoder.norm_out", ch)
    conv(t, "encoder.conv_out", ch, 2 * z, 3)  # mean and log-variance

    conv(t, "decoder.conv_in", z, widths[-1], 3)
    _mid(t, "decoder.mid", widths[-1])
    # The decoder builds levels from the deepest up; each level's input width is the width of
    # the level below it (the previous one built).
    inputs = [*widths[1:], widths[-1]]
    for level, width in enumerate(widths):
        ch = inputs[level]
        for b in range(cfg.num_res_blocks + 1):
            _resblock(t, f"decoder.up.{level}.block.{b}", ch, width)
            ch = width
        if level != 0:
            conv(t, f"decoder.up.{level}.upsample.conv", ch, ch, 3)
    norm(t, "decoder.norm_out", widths[0])
    conv(t, "decoder.conv_out", widths[0], cfg.image_channels, 3)

    if cfg.quant_conv:
        conv(t, "quant_conv", 2 * z, 2 * z, 1)
        conv(t, "post_quant_conv", z, z, 1)
    return t


# SD 1.x, SD 2.x and SDXL (same architecture; SDXL's weights differ).
VAE_SD = VAEConfig()
# SD3 / SD3.5 and FLUX.1: 16 latent channels, no quant convs.
VAE_16 = VAEConfig(latent_channels=16, quant_conv=False)

VAE_SD_TINY = dataclasses.replace(VAE_SD, ch=32)
VAE_16_TINY = dataclasses.replace(VAE_16, ch=32)
