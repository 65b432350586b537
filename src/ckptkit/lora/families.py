"""Which family a LoRA was trained for and which text encoders it adapts, from the names
and shapes of its modules (``keys.Parsed``).

The family comes from the structure of the adapted module names (which blocks exist, how many)
and from widths the shapes give away: the cross-attention context (768 SD1, 1024 SD2, 2048
SDXL, 1280 refiner), the transformer width (1536 SD3 Medium / 3.5 Medium, 2432 SD3.5 Large,
3072 FLUX.1).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable

from .keys import T5_NAMES, Parsed

_UNET_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
SD3_FAMILIES = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
_DIT_FAMILIES = (*SD3_FAMILIES, "flux1")
ALL_FAMILIES = (*_UNET_FAMILIES, *_DIT_FAMILIES)

_CLIP_WIDTHS = {768: "clip_l", 1280: "clip_g", 1024: "openclip_h"}
_ENCODER_NAMES = {"clip_l": "CLIP-L", "clip_g": "CLIP-G", "openclip_h": "OpenCLIP-H",
                  "t5xxl": "T5-XXL"}
_TE_SLOT_DEFAULT = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g", "te3": "t5xxl"}

# --- diffusion-model structure per family -------------------------------------------------

# U-Nets: levels (diffusers down/up blocks), blocks holding attention, deepest transformer
# block, original (LDM) input/output block counts and the ones holding attention. From the
# configs (SD1 v1-inference.yaml, SD2 v2-inference.yaml, SDXL/refiner sd_xl_*.yaml in
# Stability's generative-models), i.e. the block lists diffusers' UNet2DConditionModel builds.
_UNETS: dict[str, dict] = {
    "sd1": dict(levels=4, down_attn={0, 1, 2}, up_attn={1, 2, 3}, tb_max=0, ldm=12,
                in_attn={1, 2, 4, 5, 7, 8}, out_attn=set(range(3, 12))),
    "sdxl": dict(levels=3, down_attn={1, 2}, up_attn={0, 1}, tb_max=9, ldm=9,
                 in_attn={4, 5, 7, 8}, out_attn=set(range(0, 6))),
    "sdxl-refiner": dict(levels=4, down_attn={1, 2}, up_attn={1, 2}, tb_max=3, ldm=12,
                         in_attn={4, 5, 7, 8}, out_attn=set(range(3, 9))),
}
_UNETS["sd2"] = _UNETS["sd1"]
_CONTEXT_WIDTHS = {768: "sd1", 1024: "sd2", 2048: "sdxl", 1280: "sdxl-refiner"}
_CONTEXT_NAMES = {"sd1": "SD1 (CLIP-L)", "sd2": "SD2 (OpenCLIP-H)", "sdxl": "SDXL (CLIP-L + G)",
                  "sdxl-refiner": "the SDXL refiner (CLIP-G)"}

_UNET_DIFFUSERS = re.compile(
    r"^(?:(down|up)_blocks_(\d+)_(attentions|resnets|downsamplers|upsamplers)_(\d+)_(.+)"
    r"|mid_block_(?:attentions|resnets)_\d+_(.+)"
    r"|conv_in|conv_out|conv_norm_out|time_embedding_linear_[12]|add_embedding_linear_[12])$")
_UNET_LDM = re.compile(
    r"^(?:(input|output)_blocks_(\d+)_(\d+)(?:_(.+))?|middle_block_[0-2]_(.+)"
    r"|time_embed_[02]|label_emb_0_[02]|out_[02])$")
_UNET_ATTN_PART = re.compile(r"^(transformer_blocks_\d+_|proj_in$|proj_out$|norm$)")
_TB_INDEX = re.compile(r"transformer_blocks_(\d+)_")
_ADD_EMBEDDING = re.compile(r"^(add_embedding_|label_emb_)")

# MMDiT / FLUX: (pattern, group of the captured block index). Names after the prefix, "_"-joined.
_DIT_ATTN = (r"attn_(?:to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out|norm_(?:q|k|added_q|added_k))"
             r"|ff_net_(?:0_proj|2)|ff_context_net_(?:0_proj|2)|norm1_linear|norm1_context_linear")
_FLUX_PATTERNS = (
    (re.compile(r"^double_blocks_(\d+)_(?:img|txt)_(?:attn_qkv|attn_proj|mlp_0|mlp_2|mod_lin|"
                r"attn_norm_(?:query|key)_norm)$"), "double"),
    (re.compile(r"^double_blocks_(\d+)_processor_(?:qkv|proj)_lora[12]$"), "double"),
    (re.compile(r"^single_blocks_(\d+)_(?:linear1|linear1_qkv|linear2|modulation_lin|"
                r"norm_(?:query|key)_norm)$"), "single"),
    (re.compile(r"^single_blocks_(\d+)_processor_(?:qkv|proj)_lora$"), "single"),
    (re.compile(r"^(?:img_in|txt_in|(?:time_in|vector_in|guidance_in)_(?:in|out)_layer|"
                r"final_layer_(?:linear|adaLN_modulation_1))$"), None),
    (re.compile(rf"^transformer_blocks_(\d+)_(?:{_DIT_ATTN})$"), "double"),
    (re.compile(r"^single_transformer_blocks_(\d+)_(?:attn_(?:to_[qkv]|norm_[qk])|proj_mlp|"
                r"proj_out|norm_linear)$"), "single"),
    (re.compile(r"^(?:x_embedder|context_embedder|time_text_embed_(?:timestep|guidance|text)"
                r"_embedder_linear_[12]|norm_out_linear|proj_out)$"), None),
)
_SD3_PATTERNS = (
    (re.compile(r"^joint_blocks_(\d+)_(?:context_block|x_block)_(?:attn_(?:qkv|proj|ln_[qk])|"
                r"mlp_fc[12]|adaLN_modulation_1)$"), "joint"),
    (re.compile(r"^joint_blocks_(\d+)_x_block_attn2_(?:qkv|proj|ln_[qk])$"), "attn2"),
    (re.compile(r"^(?:x_embedder_proj|context_embedder|[ty]_embedder_mlp_[02]|"
                r"final_layer_(?:linear|adaLN_modulation_1))$"), None),
    (re.compile(rf"^transformer_blocks_(\d+)_(?:{_DIT_ATTN})$"), "joint"),
    (re.compile(r"^transformer_blocks_(\d+)_attn2_(?:to_[qkv]|to_out_0|norm_[qk])$"), "attn2"),
    (re.compile(r"^(?:pos_embed_proj|context_embedder|time_text_embed_(?:timestep|text)"
                r"_embedder_linear_[12]|norm_out_linear|proj_out)$"), None),
)
# Blocks (last index) and width of each DiT family: FLUX.1 19 double + 38 single blocks at
# 3072 (BFL flux/model.py FluxParams); SD3 Medium 24 blocks at 1536, SD3.5 Medium 24 at 1536
# with attn2 in its first 13 x blocks, SD3.5 Large 38 at 2432 (sd3.5 mmditx.py / diffusers
# SD3Transformer2DModel configs).
_DIT_LAST = {"flux1": {"double": 18, "single": 37}, "sd3-medium": {"joint": 23},
             "sd3.5-medium": {"joint": 23, "attn2": 12}, "sd3.5-large": {"joint": 37}}
_DIT_WIDTH = {"flux1": 3072, "sd3-medium": 1536, "sd3.5-medium": 1536, "sd3.5-large": 2432}
# Modules whose input is the transformer width; those whose output is 4x it (the MLP in).
_HIDDEN_IN = re.compile(
    r"(?:_(?:img|txt)_(?:attn_qkv|attn_proj|mlp_0|mod_lin)|_linear1|_linear1_qkv|_modulation_lin"
    r"|_processor_(?:qkv|proj)_lora[12]?|_(?:context_block|x_block)_(?:attn2?_(?:qkv|proj)"
    r"|mlp_fc1|adaLN_modulation_1)|_attn2?_(?:to_[qkv]|add_[qkv]_proj|to_out_0|to_add_out)"
    r"|_ff(?:_context)?_net_0_proj|_norm1(?:_context)?_linear|_proj_mlp|_norm_linear)$")
_MLP_IN = re.compile(r"_(?:(?:img|txt)_mlp_0|mlp_fc1|ff(?:_context)?_net_0_proj|proj_mlp)$")


def _fits_unet(fam: str, flat: str) -> bool:
    spec = _UNETS[fam]
    tb = _TB_INDEX.search(flat)
    if tb and int(tb.group(1)) > spec["tb_max"]:
        return False
    if _ADD_EMBEDDING.match(flat) and fam in ("sd1", "sd2"):
        return False
    m = _UNET_DIFFUSERS.match(flat)
    if m:
        if not m.group(1):
            return True
        side, block, kind, index = m.group(1), int(m.group(2)), m.group(3), int(m.group(4))
        if block >= spec["levels"]:
            return False
        if kind == "attentions":
            allowed = spec["down_attn"] if side == "down" else spec["up_attn"]
            return block in allowed and index <= (1 if side == "down" else 2)
        if kind == "resnets":
            return index <= (1 if side == "down" else 2)
        # Every level but the last resamples.
        return (side == "down") == (kind == "downsamplers") and block < spec["levels"] - 1
    m = _UNET_LDM.match(flat)
    if m:
        if not m.group(1):
            return True
        side, block, sub, rest = m.group(1), int(m.group(2)), int(m.group(3)), m.group(4)
        if block >= spec["ldm"]:
            return False
        if sub == 1 and rest and _UNET_ATTN_PART.match(rest):
            return block in (spec["in_attn"] if side == "input" else spec["out_attn"])
        return True
    return False


def _fits_dit(fam: str, flat: str) -> bool:
    last = _DIT_LAST[fam]
    for pattern, group in _FLUX_PATTERNS if fam == "flux1" else _SD3_PATTERNS:
        m = pattern.match(flat)
        if m:
            return group is None or (group in last and int(m.group(1)) <= last[group])
    return False


def _fits(fam: str, flat: str) -> bool:
    return _fits_unet(fam, flat) if fam in _UNETS else _fits_dit(fam, flat)


def names(fams: Iterable[str]) -> str:
    wanted = set(fams)
    return ", ".join(f for f in ALL_FAMILIES if f in wanted) or "none"


def diffusion_families(mods: list[Parsed], reasons: list[str]) -> set[str]:
    """Families whose diffusion model has every adapted module, narrowed by the widths."""
    fitting = {f for f in ALL_FAMILIES if all(_fits(f, m.flat) for m in mods)}
    if not fitting:
        stray = next((m for m in mods if not any(_fits(f, m.flat) for f in ALL_FAMILIES)),
                     None)
        if stray is not None:
            reasons.append(f"diffusion-model module {stray.name} is in no family ckptkit knows "
                           "(SD1/SD2/SDXL U-Nets, SD3/SD3.5 MMDiT, FLUX.1)")
        else:
            reasons.append("the diffusion-model modules mix the blocks of different families")
        return set()
    groups = ", ".join(sorted({m.group for m in mods}))
    reasons.append(f"{len(mods)} diffusion-model modules ({groups}): their block names and "
                   f"counts fit {names(fitting)}")
    if fitting & set(_UNETS):
        fitting = _unet_widths(mods, fitting, reasons)
    if fitting & set(_DIT_FAMILIES):
        fitting = _dit_widths(mods, fitting, reasons)
    return fitting


def _unet_widths(mods: list[Parsed], fitting: set[str], reasons: list[str]) -> set[str]:
    context = [m for m in mods if m.width_in and re.search(r"attn2_to_[kv]$", m.flat)]
    widths = Counter(m.width_in for m in context)
    if widths:
        width = widths.most_common(1)[0][0]
        example = next(m for m in context if m.width_in == width)
        if len(widths) > 1:
            reasons.append(f"cross-attention inputs have several widths {sorted(widths)}")
        fam = _CONTEXT_WIDTHS.get(width)
        if fam is None:
            reasons.append(f"cross-attention to_k/to_v take {width}-wide context "
                           f"({example.evidence}): no U-Net family ckptkit knows")
            return set()
        reasons.append(f"cross-attention to_k/to_v take {width}-wide context "
                       f"({example.evidence}): {_CONTEXT_NAMES[fam]}")
        fitting = fitting & {fam}
    proj_in = [m for m in mods if m.flat.endswith("proj_in") and m.conv is not None]
    if proj_in and len(fitting) > 1:
        conv = proj_in[0].conv
        keep = {"sd1"} if conv else {"sd2", "sdxl", "sdxl-refiner"}
        if fitting & keep:
            reasons.append(f"{proj_in[0].evidence} adapts a {'1x1-conv' if conv else 'linear'} "
                           f"proj_in: {'SD1' if conv else 'SD2 or SDXL'}")
            fitting = fitting & keep
    return fitting


def _dit_widths(mods: list[Parsed], fitting: set[str], reasons: list[str]) -> set[str]:
    hidden = [m for m in mods if m.width_in and _HIDDEN_IN.search("_" + m.flat)]
    if hidden:
        width = Counter(m.width_in for m in hidden).most_common(1)[0][0]
        example = next(m for m in hidden if m.width_in == width)
        by_width = {f for f in fitting if _DIT_WIDTH.get(f) == width}
        reasons.append(f"the transformer is {width} wide ({example.evidence}): "
                       + (names(by_width) if by_width else "no family ckptkit knows"))
        fitting = (fitting - set(_DIT_FAMILIES)) | by_width
        for m in mods:
            mlp = m.width_out and _MLP_IN.search("_" + m.flat) and m.width_out != 4 * width
            fused = (m.width_out and m.flat.endswith("_linear1")
                     and m.width_out != 7 * width)
            if mlp or fused:
                reasons.append(f"{m.name} gives {m.width_out} outputs, not the "
                               f"{7 * width if fused else 4 * width} of a {width}-wide FLUX.1 "
                               "or SD3 block: another model with these block names")
                return fitting - set(_DIT_FAMILIES)
    guidance = next((m for m in mods if re.match(r"(guidance_in|time_text_embed_guidance)",
                                                 m.flat)), None)
    if "flux1" in fitting and guidance is not None:
        reasons.append(f"{guidance.name} adapts the guidance embedder, which FLUX.1 dev has "
                       "and schnell has not")
    if "sd3.5-medium" in fitting and any(re.search(r"(^|_)attn2_", m.flat) for m in mods):
        reasons.append("x-block attn2 modules exist only in SD3.5 Medium (MMDiT-X)")
        fitting &= {"sd3.5-medium"}
    return fitting


def encoder_of(mods: list[Parsed], reasons: list[str]) -> str:
    """Which text encoder a group of modules (one prefix) adapts: by names and width."""
    group, slot = mods[0].group, mods[0].slot
    if sum(1 for m in mods if T5_NAMES.search(m.flat)) * 2 > len(mods):
        widths = Counter(m.width_in for m in mods if m.width_in
                         and re.search(r"_(SelfAttention_[qkv]|wi|wi_[01])$", m.flat))
        width = widths.most_common(1)[0][0] if widths else None
        reasons.append(f"{group}: {len(mods)} T5 encoder modules"
                       + (f" {width} wide" if width else "")
                       + ("" if width in (None, 4096) else " (not T5-XXL's 4096)"))
        return "t5xxl"
    if slot in _ENCODER_NAMES:
        reasons.append(f"{group}: {len(mods)} modules of ComfyUI's {slot} text encoder")
        return slot
    widths: Counter[int] = Counter()
    for m in mods:
        if m.width_in and re.search(r"_(fc2)$", m.flat):
            widths[m.width_in // 4] += 1
        elif m.width_in and re.search(r"_(q_proj|k_proj|v_proj|out_proj|fc1|to_[qkv])$",
                                      m.flat):
            widths[m.width_in] += 1
    width = widths.most_common(1)[0][0] if widths else None
    name = _CLIP_WIDTHS.get(width) if width else None
    if name:
        reasons.append(f"{group}: {len(mods)} CLIP text-encoder modules {width} wide: "
                       f"{_ENCODER_NAMES[name]}")
        return name
    name = _TE_SLOT_DEFAULT.get(slot, "clip_l")
    found = f" {width} wide, no CLIP ckptkit knows" if width else ", width not in the shapes"
    reasons.append(f"{group}: {len(mods)} text-encoder modules{found}; taken by position as "
                   f"{_ENCODER_NAMES[name]}")
    return name


def encoder_families(encoders: set[str], groups: set[str]) -> set[str]:
    """Families whose text encoders are the adapted ones."""
    sd3 = set(SD3_FAMILIES)
    if "openclip_h" in encoders:
        return {"sd2"}
    if "t5xxl" in encoders:
        return sd3 if "clip_g" in encoders else sd3 | {"flux1"}
    if "clip_g" in encoders:
        return {"sdxl"} | sd3 if "clip_l" in encoders else {"sdxl", "sdxl-refiner"} | sd3
    if groups == {"lora_te_"}:
        return {"sd1"}  # kohya names the one text encoder of SD1/SD2 lora_te_
    return {"sd1", "sdxl", "flux1"} | sd3


# --- metadata ------------------------------------------------------------------------------
