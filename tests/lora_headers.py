"""LoRA headers with the real key names of each format and family, for the LoRA tests.

Where the module lists come from (none from ``ckptkit.lora`` itself):

- sd-mecha 1.1.8's shipped key tables (YAML read directly): ``sd1-kohya`` and ``sdxl-kohya``
  (+ ``_but_diffusers``) hold the module paths and shapes of the networks kohya's sd-scripts
  wraps for SD1 (diffusers block names) and SDXL (original/LDM block names) with its te/te1/te2
  text encoders; ``sd3-comfyui`` is SD3 Medium (SAI MMDiT names) and ``flux-flux`` FLUX.1 (BFL
  names), both with their CLIP and T5 encoders; ``sd1-ldm`` / ``sdxl-sgm`` full checkpoints.
- diffusers models built on the meta device from explicit configs (SD2 and SDXL-refiner
  U-Nets, SD3 / SD3.5 / FLUX.1 transformers, a ControlNet) and a transformers CLIP on meta.
- diffusers' own LoRA converters (``loaders.lora_conversion_utils``, ``utils.state_dict_utils``)
  run on tiny-rank headers: kohya SD1/SDXL -> pre-PEFT diffusers -> PEFT, kohya FLUX -> PEFT
  (the ai-toolkit layout), and the XLabs and BFL-control converters, which raise on any key
  they do not expect, so our headers for those formats are the ones diffusers reads.
- SD3.5 Large / Medium in SAI names: ``ckptkit.arch.keys.mmdit`` (checked against diffusers'
  single-file converter in test_arch_keys_dit.py).

kohya's naming (sd-scripts networks/lora.py ``create_modules``): every Linear / Conv2d inside a
target module class gets ``prefix + "." + path``, with "." -> "_"; lora_flux.py / lora_sd3.py
use prefixes lora_unet, lora_te1 (CLIP-L), lora_te2 (CLIP-G, SD3), lora_te3 (T5).
Tensor shapes per format follow the writers: kohya LoRAModule (down r x in[,k,k], up out x r),
LyCORIS modules/loha.py, lokr.py, ia3.py, full.py, glora.py, diag_oft.py, boft.py, PEFT
(lora_A r x in, lora_B out x r). Nothing is downloaded.
"""

from __future__ import annotations

import functools
import math
import re
from pathlib import Path

import torch
import yaml

from ckptkit.lora.detect import LoraInfo

Shape = tuple[int, ...]
Header = dict[str, Shape]

# --------------------------------------------------------------------------- sources


@functools.cache
def mecha(config: str) -> dict[str, dict[str, Shape]]:
    import sd_mecha

    path = (Path(sd_mecha.__file__).parent / "extensions" / "builtin" / "model_configs"
            / f"{config}.yaml")
    components = yaml.safe_load(path.read_text())["components"]
    return {name: {k: tuple(v["shape"]) for k, v in keys.items()}
            for name, keys in components.items()}


def linear_weights(table: dict[str, Shape], strip: str, select: str) -> dict[str, Shape]:
    """Module path -> weight shape of the Linear/Conv2d weights under ``strip`` whose path
    (after it) matches ``select``: what kohya's create_modules wraps in a target class."""
    out = {}
    for key, shape in table.items():
        if key.startswith(strip) and key.endswith(".weight") and len(shape) >= 2:
            path = key[len(strip):-len(".weight")]
            if re.search(select, path):
                out[path] = shape
    return out


def kohya_named(paths: dict[str, Shape], prefix: str) -> dict[str, Shape]:
    return {f"{prefix}_{p.replace('.', '_')}": s for p, s in paths.items()}


def modules_of(model: torch.nn.Module, classes: set[str]) -> dict[str, Shape]:
    """kohya's create_modules on a live (meta) model: Linear/Conv2d children of the target
    classes, by their path in the model."""
    out = {}
    for name, module in model.named_modules():
        if type(module).__name__ in classes:
            for child_name, child in module.named_modules():
                if isinstance(child, torch.nn.Linear | torch.nn.Conv2d) and child_name:
                    out[f"{name}.{child_name}"] = tuple(child.weight.shape)
    return out


def linear_modules(model: torch.nn.Module, select: str) -> dict[str, Shape]:
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and re.search(select, name)}


# Target paths of kohya's networks, as regexes over module paths.
# SD1/SD2 (diffusers names): Transformer2DModel; LoCon adds ResnetBlock2D, Down/Upsample2D.
UNET_ATTN_DIFFUSERS = r"^((down|up)_blocks\.\d+\.attentions|mid_block\.attentions)\.\d+\."
UNET_CONV_DIFFUSERS = (r"^((down|up)_blocks\.\d+\.(resnets|downsamplers|upsamplers)"
                       r"|mid_block\.resnets)\.\d+\.")
# SDXL (kohya's sdxl_original_unet, LDM names): the Transformer2DModel is block [N].1.
UNET_ATTN_LDM = (r"^(input_blocks\.\d+\.1|middle_block\.1|output_blocks\.\d+\.1)\."
                 r"(transformer_blocks|proj_in|proj_out)")
CLIP_TARGETS = r"^text_model\.encoder\.layers\.\d+\.(self_attn|mlp)\."
# T5Attention / T5DenseGatedActDense Linears (the relative_attention_bias is an Embedding).
T5_TARGETS = r"\.(SelfAttention\.[qkvo]|DenseReluDense\.w\w*)$"
MMDIT_TARGETS = r"^joint_blocks\.\d+\.(context_block|x_block)\."
FLUX_TARGETS = r"^(double_blocks|single_blocks)\.\d+\."


# --------------------------------------------------------------------------- formats


def kohya(paths: dict[str, Shape], rank: int = 4, conv_rank: int | None = None,
          alpha: bool = True, dora: bool = False) -> Header:
    """kohya LoRA / LoCon tensors (networks/lora.py LoRAModule)."""
    out: Header = {}
    for name, (cout, cin, *k) in paths.items():
        r = conv_rank if conv_rank and k and k != [1, 1] else rank
        out[f"{name}.lora_down.weight"] = (r, cin, *k)
        out[f"{name}.lora_up.weight"] = (cout, r, *([1, 1] if k else []))
        if alpha:
            out[f"{name}.alpha"] = ()
        if dora:  # LyCORIS wd_on_out=True: one magnitude per output row
            out[f"{name}.dora_scale"] = (cout, *([1] * (1 + len(k))))
    return out


def peft(paths: dict[str, Shape], rank: int = 4) -> Header:
    out: Header = {}
    for name, (cout, cin, *k) in paths.items():
        out[f"{name}.lora_A.weight"] = (rank, cin, *k)
        out[f"{name}.lora_B.weight"] = (cout, rank, *([1, 1] if k else []))
    return out


def loha(paths: dict[str, Shape], rank: int = 8) -> Header:
    """LyCORIS LoHa, no Tucker core: w*_a (out, r), w*_b (r, in*k*k)."""
    out: Header = {}
    for name, (cout, cin, *k) in paths.items():
        for i in (1, 2):
            out[f"{name}.hada_w{i}_a"] = (cout, rank)
            out[f"{name}.hada_w{i}_b"] = (rank, cin * math.prod(k))
        out[f"{name}.alpha"] = ()
    return out


def factor(n: int) -> tuple[int, int]:
    """LyCORIS factorization(n, -1): the most square split, smaller factor first."""
    a = max(d for d in range(1, int(n**0.5) + 1) if n % d == 0)
    return a, n // a


def lokr(paths: dict[str, Shape], rank: int = 4) -> Header:
    """LyCORIS LoKr on the Linear layers: full w1 (a, c), w2 as w2_a (b, r) @ w2_b (r, d);
    (out, in) = (a*b, c*d)."""
    out: Header = {}
    for name, (cout, cin, *k) in paths.items():
        if k:
            continue
        (a, b), (c, d) = factor(cout), factor(cin)
        out[f"{name}.lokr_w1"] = (a, c)
        out[f"{name}.lokr_w2_a"] = (b, rank)
        out[f"{name}.lokr_w2_b"] = (rank, d)
        out[f"{name}.alpha"] = ()
    return out


def ia3(paths: dict[str, Shape]) -> Header:
    out: Header = {}
    for name, (cout, *_rest) in paths.items():
        out[f"{name}.weight"] = (cout,)
        out[f"{name}.on_input"] = ()
    return out


def full(paths: dict[str, Shape]) -> Header:
    out: Header = {}
    for name, shape in paths.items():
        out[f"{name}.diff"] = shape
        out[f"{name}.diff_b"] = (shape[0],)
    return out


def values_for(header: Header, alpha: float) -> dict[str, float]:
    return {k: alpha for k in header if k.endswith(".alpha")}


def check(info: LoraInfo | None, fmt: str, family: str | None, components: list[str],
          ranks: list[int] | None = None, alphas: list[float] | None = None) -> LoraInfo:
    assert info is not None
    assert (info.format, info.family, info.components) == (fmt, family, components), \
        info.reasons
    if ranks is not None:
        assert info.ranks == ranks
    assert info.alphas == alphas, info.reasons
    assert info.reasons and all(isinstance(r, str) and r for r in info.reasons)
    return info


# --------------------------------------------------------------------------- module lists


@functools.cache
def sd1_unet() -> dict[str, Shape]:
    return linear_weights(mecha("sd1-kohya")["diffuser"], "unet.", UNET_ATTN_DIFFUSERS)


@functools.cache
def sd1_te() -> dict[str, Shape]:
    return linear_weights(mecha("sd1-kohya")["clip_l"], "te.", CLIP_TARGETS)


@functools.cache
def sdxl_unet() -> dict[str, Shape]:
    return linear_weights(mecha("sdxl-kohya")["diffuser"], "unet.", UNET_ATTN_LDM)


@functools.cache
def sdxl_te(n: int) -> dict[str, Shape]:
    return linear_weights(mecha("sdxl-kohya")[("clip_l", "clip_g")[n - 1]], f"te{n}.",
                          CLIP_TARGETS)


def sdxl_kohya(rank: int = 4) -> Header:
    return (kohya(kohya_named(sdxl_unet(), "lora_unet"), rank)
            | kohya(kohya_named(sdxl_te(1), "lora_te1"), rank)
            | kohya(kohya_named(sdxl_te(2), "lora_te2"), rank))


def sd1_kohya(rank: int = 4) -> Header:
    return (kohya(kohya_named(sd1_unet(), "lora_unet"), rank)
            | kohya(kohya_named(sd1_te(), "lora_te"), rank))


@functools.cache
def sd3_medium() -> dict[str, dict[str, Shape]]:
    tables = mecha("sd3-comfyui")
    return {
        "unet": linear_weights(tables["diffuser"], "model.diffusion_model.", MMDIT_TARGETS),
        "te1": linear_weights(tables["clip_l"], "text_encoders.clip_l.transformer.",
                              CLIP_TARGETS),
        "te2": linear_weights(tables["clip_g"], "text_encoders.clip_g.transformer.",
                              CLIP_TARGETS),
        "te3": linear_weights(tables["t5xxl"], "text_encoders.t5xxl.transformer.", T5_TARGETS),
    }


@functools.cache
def flux() -> dict[str, dict[str, Shape]]:
    tables = mecha("flux-flux")
    return {
        "unet": linear_weights(tables["diffuser"], "model.diffusion_model.", FLUX_TARGETS),
        "all": linear_weights(tables["diffuser"], "model.diffusion_model.", r"."),
        "te1": linear_weights(tables["clip_l"], "text_encoders.clip_l.transformer.",
                              CLIP_TARGETS),
        "te3": linear_weights(tables["t5xxl"], "text_encoders.t5xxl.transformer.", T5_TARGETS),
        "scales": {k[len("model.diffusion_model."):]: s for k, s in tables["diffuser"].items()
                   if k.endswith("_norm.scale")},
    }


def kohya_flux(rank: int = 4) -> Header:
    f = flux()
    return (kohya(kohya_named(f["unet"], "lora_unet"), rank)
            | kohya(kohya_named(f["te1"], "lora_te1"), rank)
            | kohya(kohya_named(f["te3"], "lora_te3"), rank))


SD2_UNET = dict(sample_size=96, cross_attention_dim=1024, use_linear_projection=True,
                attention_head_dim=(5, 10, 20, 20))
REFINER_UNET = dict(
    sample_size=128, block_out_channels=(384, 768, 1536, 1536), cross_attention_dim=1280,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                      "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=4, attention_head_dim=(6, 12, 24, 24),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2560)
SDXL_UNET = dict(
    sample_size=128, block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
# SD3Transformer2DModel configs of the three releases (their transformer/config.json).
SD3_CONFIGS = {
    "sd3-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                       pos_embed_max_size=192),
    "sd3.5-medium": dict(num_layers=24, num_attention_heads=24, caption_projection_dim=1536,
                         pos_embed_max_size=384, qk_norm="rms_norm",
                         dual_attention_layers=tuple(range(13))),
    "sd3.5-large": dict(num_layers=38, num_attention_heads=38, caption_projection_dim=2432,
                        pos_embed_max_size=192, qk_norm="rms_norm"),
}


@functools.cache
def unet_model(config: tuple) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(**dict(config))


@functools.cache
def sd3_model(variant: str) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16,
                                     attention_head_dim=64, joint_attention_dim=4096,
                                     pooled_projection_dim=2048, out_channels=16,
                                     **SD3_CONFIGS[variant])


@functools.cache
def flux_model() -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        return FluxTransformer2DModel(num_layers=19, num_single_layers=38, guidance_embeds=True)


@functools.cache
def clip_model(width: int, layers: int, heads: int) -> torch.nn.Module:
    from transformers import CLIPTextConfig, CLIPTextModel

    config = CLIPTextConfig(hidden_size=width, intermediate_size=4 * width,
                            num_hidden_layers=layers, num_attention_heads=heads)
    with torch.device("meta"):
        return CLIPTextModel(config)


def items(d: dict) -> tuple:
    return tuple(sorted(d.items()))


def real(header: Header, dtype=torch.float32) -> dict[str, torch.Tensor]:
    return {k: (torch.tensor(2.0) if k.endswith(".alpha") else torch.zeros(s, dtype=dtype))
            for k, s in header.items()}


def shapes_of(state_dict: dict[str, torch.Tensor]) -> Header:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def xlabs_header(rank: int = 16) -> Header:
    """x-flux DoubleStreamBlockLoraProcessor: qkv_lora1/proj_lora1 (image), *2 (text)."""
    header: Header = {}
    for i in range(19):
        for stream in (1, 2):
            for name, cout in (("qkv", 3 * 3072), ("proj", 3072)):
                key = f"double_blocks.{i}.processor.{name}_lora{stream}"
                header[f"{key}.down.weight"] = (rank, 3072)
                header[f"{key}.up.weight"] = (cout, rank)
    return header


def bfl_control_header(rank: int = 2) -> Header:
    """BFL's replace_linear_with_lora on every Linear of the flow model (flux/modules/lora.py):
    lora_A, lora_B (+ bias); img_in widened to 128 inputs (Canny/Depth); plus the q/k norm
    scales the control model replaces."""
    header: Header = {}
    for path, (cout, cin) in flux()["all"].items():
        if path == "img_in":
            cin = 128
        r = min(rank, cin, cout)
        header[f"{path}.lora_A.weight"] = (r, cin)
        header[f"{path}.lora_B.weight"] = (cout, r)
        header[f"{path}.lora_B.bias"] = (cout,)
    return header | flux()["scales"]
