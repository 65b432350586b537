"""Says whether a file is a LoRA (or another adapter) and for which model, from its header.

Pure Python, no torch: everything here is read from key names, shapes and metadata (plus the
0-d alpha tensors when the caller has decoded them), so that ``ckpt inspect`` answers for a
LoRA in milliseconds and ``arch/`` stays importable without the compute backend (DESIGN.md:
``formats/`` and ``arch/`` need no torch).

What the keys look like, by the code that writes or reads them:

- kohya sd-scripts (``networks/lora.py``, ``lora_flux.py``, ``lora_sd3.py``): ``lora_unet_`` /
  ``lora_te_`` / ``lora_te1_``-``lora_te3_`` + module path with "." turned into "_", tensors
  ``.lora_down.weight`` (r x in[, k, k]), ``.lora_up.weight`` (out x r), ``.alpha`` (0-d).
  SD1/SD2 U-Nets use diffusers block names, SDXL the original (LDM) ones; FLUX and SD3 use the
  BFL / SAI names. FLUX: te1 = CLIP-L, te3 = T5; SD3: te1 CLIP-L, te2 CLIP-G, te3 T5.
- LyCORIS (``lycoris/modules``): the same names (or a ``lycoris_`` prefix), with LoCon
  (``lora_mid``), LoHa (``hada_*``), LoKr (``lokr_*``), (IA)^3 (``weight`` + ``on_input``),
  full (``diff``/``diff_b``, ``w_norm``/``b_norm``), GLoRA (``a1``/``a2``/``b1``/``b2``),
  diag-OFT / BOFT (``oft_blocks`` 3-D / 4-D); ``dora_scale`` for DoRA. kohya's own OFT
  (``networks/oft.py``) writes ``oft_unet_*.oft_blocks``.
- diffusers / PEFT: ``unet.`` / ``transformer.`` / ``text_encoder[_2|_3].`` + dotted module path,
  ``.lora_A.weight`` (r x in) and ``.lora_B.weight`` (out x r), no alpha tensor (the adapter
  config, saved as JSON under metadata ``lora_adapter_metadata``, carries ``lora_alpha``);
  DoRA as ``lora_magnitude_vector``. Older diffusers files (``utils/state_dict_utils.py``
  ``DIFFUSERS_OLD`` / ``DIFFUSERS``) use ``to_q_lora.down``, ``.lora.down`` and
  ``.lora_linear_layer.down``. ai-toolkit's FLUX files are this PEFT naming too.
- XLabs (x-flux ``DoubleStreamBlockLoraProcessor``): ``double_blocks.N.processor.qkv_lora1.down
  .weight``; BFL control LoRAs (flux ``LinearLora``): bare BFL names with ``lora_A``/``lora_B``
  (+ ``lora_B.bias``) and the replaced ``*_norm.scale`` weights (diffusers and ComfyUI detect
  them by those scales).
- ComfyUI (``comfy/lora.py``) also reads ``diffusion_model.<name>`` (its LoraSave output),
  ``text_encoders.<clip_l|clip_g|t5xxl>.transformer.``, ``lora_transformer_``,
  ``base_model.model.``; OneTrainer bundles embeddings as ``bundle_emb.*``.

The family comes from the structure of the adapted module names (which blocks exist, how many)
and from widths the shapes give away: the cross-attention context (768 SD1, 1024 SD2, 2048
SDXL, 1280 refiner), the transformer width (1536 SD3 Medium / 3.5 Medium, 2432 SD3.5 Large,
3072 FLUX.1). Metadata (kohya ``ss_*``, ModelSpec, diffusers' adapter config) narrows what the
weights leave open and is checked against them; the weights decide when they disagree.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Shape = tuple[int, ...]

DIFFUSION_MODEL = "diffusion_model"
_COMPONENT_ORDER = ("diffusion_model", "clip_l", "clip_g", "openclip_h", "t5xxl")

_UNET_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
_SD3_FAMILIES = ("sd3-medium", "sd3.5-medium", "sd3.5-large")
_DIT_FAMILIES = (*_SD3_FAMILIES, "flux1")
_ALL_FAMILIES = (*_UNET_FAMILIES, *_DIT_FAMILIES)

# Tensor suffixes -> (format, role). Longest first, so ".lora_B.weight" wins over ".lora_B".
_SUFFIXES: tuple[tuple[str, str | None, str], ...] = tuple(sorted((
    (".lora_down.weight", "kohya-lora", "down"),
    (".lora_up.weight", "kohya-lora", "up"),
    (".lora_mid.weight", "kohya-lora", "mid"),
    (".lora_A.weight", "peft", "down"),
    (".lora_B.weight", "peft", "up"),
    (".lora_B.bias", "peft", "bias"),
    (".lora_A.default.weight", "peft", "down"),
    (".lora_B.default.weight", "peft", "up"),
    (".lora_A", "peft", "down"),
    (".lora_B", "peft", "up"),
    (".lora_magnitude_vector.weight", None, "dora"),
    (".lora_magnitude_vector", None, "dora"),
    ("_lora.down.weight", "diffusers-legacy", "down"),
    ("_lora.up.weight", "diffusers-legacy", "up"),
    (".lora.down.weight", "diffusers-legacy", "down"),
    (".lora.up.weight", "diffusers-legacy", "up"),
    (".lora_linear_layer.down.weight", "diffusers-legacy", "down"),
    (".lora_linear_layer.up.weight", "diffusers-legacy", "up"),
    (".hada_w1_a", "lycoris-loha", "w1_a"),
    (".hada_w1_b", "lycoris-loha", "w1_b"),
    (".hada_w2_a", "lycoris-loha", "w2_a"),
    (".hada_w2_b", "lycoris-loha", "w2_b"),
    (".hada_t1", "lycoris-loha", "t1"),
    (".hada_t2", "lycoris-loha", "t2"),
    (".lokr_w1", "lycoris-lokr", "w1"),
    (".lokr_w1_a", "lycoris-lokr", "w1_a"),
    (".lokr_w1_b", "lycoris-lokr", "w1_b"),
    (".lokr_w2", "lycoris-lokr", "w2"),
    (".lokr_w2_a", "lycoris-lokr", "w2_a"),
    (".lokr_w2_b", "lycoris-lokr", "w2_b"),
    (".lokr_t2", "lycoris-lokr", "t2"),
    (".diff", "lycoris-full", "diff"),
    (".diff_b", None, "diff_b"),  # beside a LoRA too (ComfyUI's LoraSave, bias_diff)
    (".w_norm", "lycoris-full", "diff"),
    (".b_norm", None, "diff_b"),
    (".a1.weight", "lycoris-glora", "a1"),
    (".a2.weight", "lycoris-glora", "a2"),
    (".b1.weight", "lycoris-glora", "b1"),
    (".b2.weight", "lycoris-glora", "b2"),
    (".oft_blocks", "lycoris-oft", "blocks"),
    (".on_input", "lycoris-ia3", "on_input"),
    (".rescale", None, "rescale"),
    (".alpha", None, "alpha"),
    (".dora_scale", None, "dora"),
    (".set_weight", None, "set"),
    (".reshape_weight", None, "reshape"),
), key=lambda s: -len(s[0])))
_ANY_SUFFIX = tuple(suffix for suffix, _, _ in _SUFFIXES)
_XLABS = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")
# A block of FLUX's before a "_norm.scale" weight. Not one pattern with ".*" between them: a
# search would rescan the rest of the key from every block name, the square of its length.
_BFL_BLOCK = re.compile(r"(?:^|\.)(?:double|single)_blocks\.\d+\.")
_NORM_SCALE = "_norm.scale"
_BFL_ROOT = re.compile(r"^(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|"
                       r"guidance_in|final_layer)(?:\.|$)")

# Module prefixes and the slot they name: DIFFUSION_MODEL or a text encoder by position.
_PREFIXES: tuple[tuple[str, str], ...] = (
    ("lora_unet_", DIFFUSION_MODEL),
    ("lora_transformer_", DIFFUSION_MODEL),
    ("lycoris_", DIFFUSION_MODEL),
    ("oft_unet_", DIFFUSION_MODEL),
    ("lora_te1_", "te1"),
    ("lora_te2_", "te2"),
    ("lora_te3_", "te3"),
    ("lora_te_", "te"),
    ("model.diffusion_model.", DIFFUSION_MODEL),
    ("diffusion_model.", DIFFUSION_MODEL),
    ("unet.base_model.model.", DIFFUSION_MODEL),
    ("base_model.model.", DIFFUSION_MODEL),
    ("unet.", DIFFUSION_MODEL),
    ("transformer.", DIFFUSION_MODEL),
    ("text_encoder_3.", "te3"),
    ("text_encoder_2.", "te2"),
    ("text_encoder.", "te"),
)
_COMFY_TE = re.compile(r"^text_encoders\.(clip_l|clip_g|clip_h|t5xxl)\.(?:transformer\.)?")
_COMFY_TE_NAMES = {"clip_l": "clip_l", "clip_g": "clip_g", "clip_h": "openclip_h",
                   "t5xxl": "t5xxl"}
# First name of a diffusion model's module path, for bare (prefix-less) keys.
_DM_ROOTS = re.compile(
    r"^(down_blocks|up_blocks|mid_block|conv_in|conv_out|time_embedding|add_embedding|"
    r"input_blocks|middle_block|output_blocks|time_embed|label_emb|joint_blocks|double_blocks|"
    r"single_blocks|transformer_blocks|single_transformer_blocks|img_in|txt_in|time_in|"
    r"vector_in|guidance_in|final_layer|x_embedder|context_embedder|pos_embed|"
    r"time_text_embed|norm_out|proj_out|t_embedder|y_embedder)(_|$)")
_CLIP_NAMES = re.compile(r"(^|_)(text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_"
                         r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2|to_[qkv]|to_out)$|(^|_)text_projection$")
_T5_NAMES = re.compile(r"(^|_)encoder_block_(\d+)_layer_(\d+)_"
                       r"(SelfAttention_[qkvo]|DenseReluDense_(wi|wi_0|wi_1|wo))$")
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

# --- metadata vocabularies ------------------------------------------------------------------

# kohya ss_base_model_version: model_util.get_model_version_str_for_sd1_sd2 ("sd_v1[_v]",
# "sd_v2[_v]"), sdxl_model_util ("sdxl_base_v1-0"), flux_utils ("flux1", "chroma") and the
# MMDiT's model_type for SD3 (sd3_utils: "medium", "5-large", "5-medium").
_SS_BASE = {"sd_v1": {"sd1"}, "sd_v1_v": {"sd1"}, "sd_v2": {"sd2"}, "sd_v2_v": {"sd2"},
            "sdxl_base_v1-0": {"sdxl"}, "flux1": {"flux1"}, "chroma": {"flux1"},
            "medium": {"sd3-medium"}, "5-large": {"sd3.5-large"}, "5-medium": {"sd3.5-medium"}}
# ModelSpec architecture ids (ModelSpec README; kohya sai_model_spec.py spells SD3 as
# "stable-diffusion-3-<type>" and FLUX as "flux-1-dev|schnell", "flux-1", "chroma").
_MODELSPEC = (
    (re.compile(r"^stable-diffusion-v1"), {"sd1"}),
    (re.compile(r"^stable-diffusion-v2"), {"sd2"}),
    (re.compile(r"^stable-diffusion-xl-v1-refiner"), {"sdxl-refiner"}),
    (re.compile(r"^stable-diffusion-xl"), {"sdxl"}),
    (re.compile(r"^stable-diffusion-v?3-5-large"), {"sd3.5-large"}),
    (re.compile(r"^stable-diffusion-v?3-5-medium"), {"sd3.5-medium"}),
    (re.compile(r"^stable-diffusion-v?3-medium"), {"sd3-medium"}),
    (re.compile(r"^stable-diffusion-v?3"), set(_SD3_FAMILIES)),
    (re.compile(r"^(flux-1|chroma)"), {"flux1"}),
)
# LyCORIS algo names (lycoris/config.py) in kohya's ss_network_args, as our formats.
_ALGOS = {"lora": "kohya-lora", "locon": "kohya-lora", "dylora": "kohya-lora",
          "loha": "lycoris-loha", "lokr": "lycoris-lokr", "ia3": "lycoris-ia3",
          "full": "lycoris-full", "glora": "lycoris-glora", "diag-oft": "lycoris-oft",
          "boft": "lycoris-boft"}
_FORMAT_NAMES = {
    "kohya-lora": "kohya LoRA/LoCon (.lora_down/.lora_up)",
    "lycoris-loha": "LyCORIS LoHa (.hada_w*)",
    "lycoris-lokr": "LyCORIS LoKr (.lokr_w*)",
    "lycoris-ia3": "LyCORIS (IA)^3 (.weight + .on_input)",
    "lycoris-full": "LyCORIS full / diff (.diff)",
    "lycoris-glora": "LyCORIS GLoRA (.a1/.a2/.b1/.b2)",
    "lycoris-oft": "LyCORIS diag-OFT (.oft_blocks)",
    "lycoris-boft": "LyCORIS BOFT (4-D .oft_blocks)",
    "kohya-oft": "kohya OFT (oft_unet_*.oft_blocks)",
    "peft": "diffusers/PEFT LoRA (.lora_A/.lora_B)",
    "diffusers-legacy": "pre-PEFT diffusers LoRA (.lora.down / _lora.down / .lora_linear_layer)",
    "xlabs-flux": "XLabs FLUX LoRA (.processor.*_lora*.down/.up)",
    "bfl-control-lora": "BFL FLUX control LoRA (.lora_A/.lora_B with replaced norm scales)",
}


@dataclass
class LoraInfo:
    """What an adapter file is. ``format`` names its tensor convention (see the module doc);
    ``family`` is a ckptkit family id, ``"sd3"`` when the SD3 variant is open, ``"flux1"`` for
    FLUX.1 (dev and schnell have the same blocks; only dev has the guidance embedder, which
    LoRAs seldom adapt: reasons say so when one does), or None when the weights do not tell.
    ``alphas`` is None when the file stores none (or their values were not read and no
    metadata gives them)."""

    format: str
    dora: bool
    family: str | None
    components: list[str]
    modules: int
    ranks: list[int]
    alphas: list[float] | None
    reasons: list[str] = field(default_factory=list)
    # Modules by component and format: {"component", "format", "modules", "ranks": [lo, hi]},
    # what a report shows instead of a line per module.
    groups: list[dict] = field(default_factory=list)


@dataclass
class _Module:
    name: str  # as in the file, without the tensor suffix
    roles: dict[str, str] = field(default_factory=dict)  # role -> key
    fmt: str | None = None
    slot: str = "other"  # DIFFUSION_MODEL, te, te1, te2, te3, clip_l, clip_g, ..., other
    group: str = ""  # the prefix it was found under
    component: str = "other"  # DIFFUSION_MODEL or the text encoder it adapts (clip_l...)
    flat: str = ""  # module path after the prefix, "_"-joined
    rank: int | None = None
    width_in: int | None = None
    width_out: int | None = None
    conv: bool | None = None
    evidence: str = ""  # "key [shape]" the input width was read from


def _fmt_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _num(value: float) -> str:
    return f"{value:g}"


# --- parsing --------------------------------------------------------------------------------


def _is_norm_scale(key: str) -> bool:
    """Whether ``key`` is a ``*_norm.scale`` weight inside a FLUX double or single block."""
    return key.endswith(_NORM_SCALE) and _BFL_BLOCK.search(
        key, 0, len(key) - len(_NORM_SCALE)) is not None


def _split(keys: Iterable[str]) -> tuple[dict[str, _Module], list[str], list[str], list[str]]:
    """Groups keys by module: (modules, bundled-embedding keys, norm-scale keys, the rest)."""
    modules: dict[str, _Module] = {}
    bundles: list[str] = []
    scales: list[str] = []
    others: list[str] = []
    for key in keys:
        if key.startswith("bundle_emb."):
            bundles.append(key)
            continue
        match = _XLABS.match(key)
        if match:
            mod = modules.setdefault(match.group(1), _Module(match.group(1)))
            mod.roles[match.group(2)] = key
            mod.fmt = "xlabs-flux"
            continue
        for suffix, fmt, role in _SUFFIXES if key.endswith(_ANY_SUFFIX) else ():
            if key.endswith(suffix) and len(key) > len(suffix):
                name = key[: -len(suffix)]
                mod = modules.setdefault(name, _Module(name))
                mod.roles[role] = key
                if fmt is not None and mod.fmt is None:
                    mod.fmt = fmt
                break
        else:
            (scales if _is_norm_scale(key) else others).append(key)
    for mod in modules.values():  # a bias difference alone: a full difference of the bias
        if mod.fmt is None and "diff_b" in mod.roles:
            mod.fmt = "lycoris-full"
    # (IA)^3 stores its vector as "<module>.weight" next to "<module>.on_input".
    rest = []
    for key in others:
        mod = modules.get(key[:-7]) if key.endswith(".weight") else None
        if mod is not None and "on_input" in mod.roles:
            mod.roles["weight"] = key
        else:
            rest.append(key)
    return modules, bundles, scales, rest


def _measured(mod: _Module, shapes: Mapping[str, Shape]) -> bool:
    """``_measure``, with tensors of too few dimensions for their role (a malformed or
    hostile file) counting as not an adapter rather than an error."""
    try:
        return _measure(mod, shapes)
    except (ValueError, IndexError):
        return False


def _measure(mod: _Module, shapes: Mapping[str, Shape]) -> bool:
    """Whether the module holds a whole adapter of its format; sets its rank and widths
    (in x out of the layer it adapts) where the shapes give them away."""
    roles = mod.roles

    def shape(role: str) -> Shape:
        return tuple(shapes[roles[role]])

    def note(role: str) -> str:
        return f"{roles[role]} {_fmt_shape(shape(role))}"

    fmt = mod.fmt
    if fmt in ("kohya-lora", "peft", "diffusers-legacy", "xlabs-flux"):
        if "down" not in roles or "up" not in roles:
            return False
        down, up = shape("down"), shape("up")
        if len(down) < 2 or len(up) < 2:
            return False
        mod.rank, mod.width_in, mod.width_out = down[0], down[1], up[0]
        mod.conv, mod.evidence = len(down) == 4, note("down")
    elif fmt == "lycoris-loha":
        if not {"w1_a", "w1_b", "w2_a", "w2_b"} <= set(roles):
            return False
        w1a, w1b = shape("w1_a"), shape("w1_b")
        if len(w1a) != 2 or len(w1b) != 2:
            return False
        # hada_w1_b is (r, in[*k*k]); hada_w1_a is (out, r), or (r, out) with a Tucker core.
        mod.rank, mod.width_in, mod.evidence = w1b[0], w1b[1], note("w1_b")
        mod.width_out = w1a[1] if "t1" in roles else w1a[0]
    elif fmt == "lycoris-lokr":
        if not (("w1" in roles or {"w1_a", "w1_b"} <= set(roles))
                and ("w2" in roles or {"w2_a", "w2_b"} <= set(roles))):
            return False
        # W = kron(w1, w2): w1 is (a, c), w2 is (b, d[, k, k]); the layer is (a*b, c*d).
        if "w1" in roles:
            a, c = shape("w1")[:2]
        else:
            a, c = shape("w1_a")[0], shape("w1_b")[1]
        if "w2" in roles:
            b, d = shape("w2")[:2]
        else:
            b = shape("w2_a")[1] if "t2" in roles else shape("w2_a")[0]
            d = shape("w2_b")[1]
        mod.width_in, mod.width_out = c * d, a * b
        mod.evidence = note("w2" if "w2" in roles else "w2_b")
        # Its rank is that of the factor stored as a product; none when both are full.
        for role in ("w2_b", "w1_b"):
            if role in roles:
                mod.rank = shape(role)[0]
                break
    elif fmt == "lycoris-ia3":
        return "weight" in roles
    elif fmt == "lycoris-full":
        if "diff" not in roles:
            return "diff_b" in roles  # a bias only
        diff = shape("diff")
        if len(diff) >= 2:
            mod.width_out, mod.width_in, mod.evidence = diff[0], diff[1], note("diff")
    elif fmt == "lycoris-glora":
        if not {"a1", "a2", "b1", "b2"} <= set(roles):
            return False
        mod.rank, mod.width_in = shape("a2")[:2]
        mod.width_out, mod.evidence = shape("b1")[0], note("a2")
    elif fmt == "lycoris-oft":
        blocks = shape("blocks")
        if len(blocks) not in (3, 4):
            return False
        if mod.name.startswith("oft_"):
            mod.fmt = "kohya-oft"
        elif len(blocks) == 4:
            mod.fmt = "lycoris-boft"
        mod.width_out = blocks[-3] * blocks[-1]
    else:
        return False
    return True


def _locate(mod: _Module) -> None:
    """Sets the module's slot (diffusion model / which text encoder), group and flat path."""
    name = mod.name
    match = _COMFY_TE.match(name)
    if match:
        mod.slot, mod.group = _COMFY_TE_NAMES[match.group(1)], match.group(0)
        mod.flat = name[match.end():].replace(".", "_")
        return
    for prefix, slot in _PREFIXES:
        if name.startswith(prefix):
            mod.slot, mod.group = slot, prefix
            mod.flat = name[len(prefix):].replace(".", "_")
            break
    else:
        mod.group, mod.flat = "(no prefix)", name.replace(".", "_")
        if _DM_ROOTS.match(mod.flat):
            mod.slot = DIFFUSION_MODEL
        elif _CLIP_NAMES.search(mod.flat) or _T5_NAMES.search(mod.flat):
            mod.slot = "te"
    if mod.slot == DIFFUSION_MODEL:
        # Pre-PEFT diffusers attention processors: ...attn1.processor.to_q_lora, .to_out_lora.
        mod.flat = mod.flat.replace("_processor_to_", "_to_")
        if mod.flat.endswith("_to_out"):
            mod.flat += "_0"


# --- families ------------------------------------------------------------------------------


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


def _names(fams: Iterable[str]) -> str:
    wanted = set(fams)
    return ", ".join(f for f in _ALL_FAMILIES if f in wanted) or "none"


def _diffusion_families(mods: list[_Module], reasons: list[str]) -> set[str]:
    """Families whose diffusion model has every adapted module, narrowed by the widths."""
    fitting = {f for f in _ALL_FAMILIES if all(_fits(f, m.flat) for m in mods)}
    if not fitting:
        stray = next((m for m in mods if not any(_fits(f, m.flat) for f in _ALL_FAMILIES)),
                     None)
        if stray is not None:
            reasons.append(f"diffusion-model module {stray.name} is in no family ckptkit knows "
                           "(SD1/SD2/SDXL U-Nets, SD3/SD3.5 MMDiT, FLUX.1)")
        else:
            reasons.append("the diffusion-model modules mix the blocks of different families")
        return set()
    groups = ", ".join(sorted({m.group for m in mods}))
    reasons.append(f"{len(mods)} diffusion-model modules ({groups}): their block names and "
                   f"counts fit {_names(fitting)}")
    if fitting & set(_UNETS):
        fitting = _unet_widths(mods, fitting, reasons)
    if fitting & set(_DIT_FAMILIES):
        fitting = _dit_widths(mods, fitting, reasons)
    return fitting


def _unet_widths(mods: list[_Module], fitting: set[str], reasons: list[str]) -> set[str]:
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


def _dit_widths(mods: list[_Module], fitting: set[str], reasons: list[str]) -> set[str]:
    hidden = [m for m in mods if m.width_in and _HIDDEN_IN.search("_" + m.flat)]
    if hidden:
        width = Counter(m.width_in for m in hidden).most_common(1)[0][0]
        example = next(m for m in hidden if m.width_in == width)
        by_width = {f for f in fitting if _DIT_WIDTH.get(f) == width}
        reasons.append(f"the transformer is {width} wide ({example.evidence}): "
                       + (_names(by_width) if by_width else "no family ckptkit knows"))
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


def _encoder_of(mods: list[_Module], reasons: list[str]) -> str:
    """Which text encoder a group of modules (one prefix) adapts: by names and width."""
    group, slot = mods[0].group, mods[0].slot
    if sum(1 for m in mods if _T5_NAMES.search(m.flat)) * 2 > len(mods):
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


def _encoder_families(encoders: set[str], groups: set[str]) -> set[str]:
    """Families whose text encoders are the adapted ones."""
    sd3 = set(_SD3_FAMILIES)
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


def _metadata_families(metadata: Mapping[str, str], reasons: list[str]) -> set[str] | None:
    claims: list[tuple[str, set[str]]] = []
    base = metadata.get("ss_base_model_version")
    if base:
        if base in _SS_BASE:
            claims.append((f"ss_base_model_version={base}", _SS_BASE[base]))
        else:
            reasons.append(f"metadata ss_base_model_version={base} is no family ckptkit knows")
    arch = metadata.get("modelspec.architecture") or ""
    if arch:
        found = next((fams for rx, fams in _MODELSPEC if rx.match(arch.split("/")[0])), None)
        if found:
            claims.append((f"modelspec.architecture={arch}", set(found)))
        else:
            reasons.append(f"metadata modelspec.architecture={arch} is no family ckptkit knows")
    if metadata.get("ss_v2") == "True":
        claims.append(("ss_v2=True", {"sd2"}))
    if not claims:
        return None
    together = set(_ALL_FAMILIES)
    for _, fams in claims:
        together &= fams
    said = ", ".join(c for c, _ in claims)
    if not together:
        reasons.append(f"the metadata contradicts itself ({said}): not used")
        return None
    reasons.append(f"metadata {said}: {_names(together)}")
    if base == "chroma" or arch.startswith("chroma"):
        reasons.append("Chroma is a FLUX.1 [schnell] derivative with FLUX.1's block names; "
                       "ckptkit reports it as flux1")
    elif arch.startswith("flux-1-"):
        reasons.append(f"trained on {arch.split('/')[0]}; FLUX.1 dev and schnell LoRAs have the "
                       "same layers")
    return together


def _diffusers_config(metadata: Mapping[str, str], reasons: list[str]) -> dict | None:
    """Ranks, alphas and flags of diffusers' ``lora_adapter_metadata`` (PEFT LoraConfig dicts,
    each key prefixed with its component: ``transformer.lora_alpha``...; lora_base.py)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return None
    config = _json_metadata(raw)
    if config is None:
        reasons.append("metadata lora_adapter_metadata is not valid JSON: not used")
        return None
    if not isinstance(config, dict):
        return None
    out: dict = {"ranks": set(), "alphas": set(), "dora": False, "rslora": False}
    unreadable: set[str] = set()

    def numbers(key: str, value) -> list[float]:
        items = value.values() if isinstance(value, dict) else [value]
        found = [_as_float(v) for v in items if isinstance(v, int | float)
                 and not isinstance(v, bool)]
        if None in found:  # NaN, infinity or an integer beyond any float
            unreadable.add(key)
        return [v for v in found if v is not None]

    for key, value in config.items():
        leaf = key.rsplit(".", 1)[-1]
        if leaf in ("r", "rank_pattern"):
            out["ranks"].update(int(v) for v in numbers(key, value))
        elif leaf in ("lora_alpha", "alpha_pattern"):
            out["alphas"].update(numbers(key, value))
        elif leaf == "use_dora" and value is True:
            out["dora"] = True
        elif leaf == "use_rslora" and value is True:
            out["rslora"] = True
    if unreadable:
        reasons.append(f"metadata lora_adapter_metadata holds values that are not finite "
                       f"numbers ({', '.join(sorted(unreadable))}): those are not used")
    return out


def _as_float(text: object) -> float | None:
    """A finite number from metadata, or None (not a number, NaN, infinite, too large)."""
    try:
        value = float(text) if text is not None else None  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return value if value is not None and math.isfinite(value) else None


def _is_number_text(text: str) -> bool:
    """Whether ``float`` reads ``text`` at all (``nan``, ``1e400`` included)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _json_metadata(text: str) -> object | None:
    """A metadata value's JSON, or None when it is not JSON a reader can take: malformed, or
    nested too deep for the parser (a RecursionError, not a ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def _network_args(metadata: Mapping[str, str]) -> dict:
    args = _json_metadata(metadata.get("ss_network_args") or "{}")
    return args if isinstance(args, dict) else {}


# --- the detector -----------------------------------------------------------------------------


def detect_lora(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                values: Mapping[str, float] | None = None) -> LoraInfo | None:
    """What adapter the header ``shapes`` (key -> shape) is, or None when it is not one.

    ``metadata`` is the file's string metadata; ``values`` may hold the decoded 0-d ``.alpha``
    tensors by key. A file is an adapter only when at least 90% of its keys belong to complete
    adapter modules or their companions (alphas, DoRA scales, bundled embeddings): a model
    with a few LoRA-looking keys, an embedding, a VAE or a ControlNet is not.
    """
    if not shapes:
        return None
    metadata = metadata or {}
    modules, bundles, scales, others = _split(shapes)
    adapters: list[_Module] = []
    unexplained = len(others)
    for mod in modules.values():
        if mod.fmt is not None and _measured(mod, shapes):
            adapters.append(mod)
        else:
            unexplained += len(mod.roles)
    if not adapters or unexplained * 10 > len(shapes):
        return None
    for mod in adapters:
        _locate(mod)
    formats = Counter(m.fmt for m in adapters)
    fmt = formats.most_common(1)[0][0] or ""
    count = formats[fmt]
    control = fmt == "peft" and bool(scales) and all(
        _BFL_ROOT.match(m.name) for m in adapters)
    if control:
        fmt = "bfl-control-lora"
    else:
        unexplained += len(scales)
        if unexplained * 10 > len(shapes):
            return None

    reasons = [f"{count} modules hold {_FORMAT_NAMES[fmt]} tensors"]
    if len(formats) > 1:
        reasons.append("also: " + ", ".join(f"{n} {_FORMAT_NAMES[f or '']}"
                                            for f, n in formats.items() if f != fmt))
    if control:
        reasons.append(f"{len(scales)} *_norm.scale weights replace FLUX's q/k norms: a BFL "
                       "control LoRA (FLUX.1 Canny/Depth LoRA), as diffusers and ComfyUI tell it")
        img_in = next((m for m in adapters if m.flat == "img_in" and m.width_in), None)
        if img_in is not None:
            reasons.append(f"img_in takes {img_in.width_in} input channels ({img_in.evidence}); "
                           "FLUX.1 takes 64")
    if bundles:
        reasons.append(f"{len(bundles)} bundled embedding tensors (bundle_emb.*, OneTrainer)")
    if unexplained:
        reasons.append(f"{unexplained} keys belong to no adapter module")

    components, candidates = _components(adapters, reasons)
    family = _conclude(candidates, _metadata_families(metadata, reasons), reasons)
    ranks = sorted({m.rank for m in adapters if m.rank is not None})
    if not ranks:
        reasons.append("no module stores a low-rank factor, so there is no rank")
    dora = any("dora" in m.roles for m in adapters)
    alphas = _alphas(adapters, fmt, values or {}, metadata, ranks, dora, reasons)
    if dora:
        reasons.append("DoRA: weight-decomposition magnitudes are stored (dora_scale / "
                       "lora_magnitude_vector)")
    return LoraInfo(format=fmt, dora=dora, family=family,
                    components=[c for c in _COMPONENT_ORDER if c in components],
                    modules=len(adapters), ranks=ranks, alphas=alphas, reasons=reasons,
                    groups=_groups(adapters))


def _groups(adapters: list[_Module]) -> list[dict]:
    """The adapted modules counted by component and format, each with its rank range."""
    counted: dict[tuple[str, str], list] = {}
    for mod in adapters:
        entry = counted.setdefault((mod.component, mod.fmt or ""), [0, set()])
        entry[0] += 1
        if mod.rank is not None:
            entry[1].add(mod.rank)
    order = {c: i for i, c in enumerate(_COMPONENT_ORDER)}
    return [{"component": comp, "format": fmt, "modules": n,
             "ranks": [min(ranks), max(ranks)] if ranks else []}
            for (comp, fmt), (n, ranks) in sorted(
                counted.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0]))]


def _components(adapters: list[_Module],
                reasons: list[str]) -> tuple[set[str], set[str] | None]:
    """The adapted components, and the families the weights allow (None: they do not say)."""
    dm = [m for m in adapters if m.slot == DIFFUSION_MODEL]
    te_groups: dict[str, list[_Module]] = {}
    for m in adapters:
        if m.slot not in (DIFFUSION_MODEL, "other"):
            te_groups.setdefault(m.group, []).append(m)
    other = [m for m in adapters if m.slot == "other"]
    if other:
        reasons.append(f"{len(other)} modules are in no component ckptkit knows "
                       f"(e.g. {other[0].name})")
    components: set[str] = set()
    candidates: set[str] | None = None
    if dm:
        components.add(DIFFUSION_MODEL)
        candidates = _diffusion_families(dm, reasons)
        for m in dm:
            m.component = DIFFUSION_MODEL
    encoders = set()
    for mods in te_groups.values():
        encoder = _encoder_of(mods, reasons)
        encoders.add(encoder)
        for m in mods:
            m.component = encoder
    components |= encoders
    if encoders:
        hint = _encoder_families(encoders, set(te_groups))
        if candidates is None:
            candidates = hint
            reasons.append(f"only text encoders are adapted; theirs are those of {_names(hint)}")
        elif candidates and not candidates & hint:
            reasons.append(f"the text encoders are those of {_names(hint)}: the diffusion "
                           "model decides")
        elif candidates & hint != candidates:
            candidates &= hint
            reasons.append(f"the text encoders narrow it to {_names(candidates)}")
    return components, candidates


def _conclude(candidates: set[str] | None, claimed: set[str] | None,
              reasons: list[str]) -> str | None:
    if candidates is not None and claimed is not None:
        if candidates & claimed:
            if candidates & claimed != candidates:
                reasons.append(f"the metadata picks {_names(candidates & claimed)} among "
                               f"{_names(candidates)}")
            else:
                reasons.append("the metadata agrees with the weights")
            candidates &= claimed
        elif candidates:
            reasons.append(f"the metadata says {_names(claimed)} but the weights say "
                           f"{_names(candidates)}: the weights decide")
        else:
            reasons.append(f"the metadata says {_names(claimed)}, but the weights fit no "
                           "family: not taken")
    elif candidates is None and claimed is not None:
        reasons.append(f"no adapted module tells the family; the metadata does "
                       f"({_names(claimed)})")
        candidates = claimed
    if not candidates:
        return None
    if len(candidates) == 1:
        return next(iter(candidates))
    if candidates <= set(_SD3_FAMILIES):
        reasons.append(f"an SD3-family adapter; its weights do not tell {_names(candidates)} "
                       "apart")
        return "sd3"
    reasons.append(f"family left open between {_names(candidates)}")
    return None


def _alphas(adapters: list[_Module], fmt: str, values: Mapping[str, float],
            metadata: Mapping[str, str], ranks: list[int], dora: bool,
            reasons: list[str]) -> list[float] | None:
    """The alphas the file stores (or its metadata gives), checked against the metadata."""
    alpha_keys = [m.roles["alpha"] for m in adapters if "alpha" in m.roles]
    stored = [float(values[k]) for k in alpha_keys if k in values]
    # NaN and infinities are kept, once each, after the numbers: they are what the file holds
    # (and make the adapter unusable); a JSON report writes them as strings.
    odd = sorted({repr(a) for a in stored if not math.isfinite(a)})
    read = sorted({a for a in stored if math.isfinite(a)}) + [float(a) for a in odd]
    alphas: list[float] | None = read or None
    kohya_like = fmt in ("kohya-lora", "lycoris-loha", "lycoris-lokr", "lycoris-glora")
    if alpha_keys:
        got = sum(1 for k in alpha_keys if k in values)
        reasons.append(f"alphas read from {got} of {len(alpha_keys)} .alpha tensors" if got
                       else f"{len(alpha_keys)} .alpha tensors, whose values were not read")
        without = len(adapters) - len(alpha_keys)
        if without and kohya_like:
            reasons.append(f"{without} adapted module{'s have' if without > 1 else ' has'} no "
                           ".alpha tensor: alpha = rank there (scale 1)")
        if 0.0 in read and kohya_like:
            reasons.append("an alpha of 0 means alpha = rank (scale 1) to kohya and ComfyUI, "
                           "not a scale of 0")
    elif kohya_like:
        reasons.append("no .alpha tensors: kohya and ComfyUI then use alpha = rank (scale 1)")
    if odd:
        count = sum(1 for a in stored if not math.isfinite(a))
        reasons.append(f"{count} .alpha tensor{'s hold' if count > 1 else ' holds'} "
                       f"{' or '.join(odd)}: applying this adapter would give NaN or infinite "
                       "weights")

    # kohya sd-scripts' training metadata (train_util.py, ss_*).
    args = _network_args(metadata)
    dim_text = metadata.get("ss_network_dim")
    if dim_text is not None and ranks:
        dims = {d for d in (_as_float(dim_text), _as_float(args.get("conv_dim"))) if d}
        if not dims and _is_number_text(dim_text):
            reasons.append(f"metadata ss_network_dim={dim_text} is not a finite number: not "
                           "used")
        elif not dims:
            reasons.append(f"metadata ss_network_dim={dim_text}: no single rank (resized?)")
        elif {int(d) for d in dims} & set(ranks):
            reasons.append(f"metadata ss_network_dim={dim_text} agrees with the weights")
        else:
            reasons.append(f"metadata ss_network_dim={dim_text}, but the weights have rank(s) "
                           f"{ranks}: the weights decide")
    alpha_text = metadata.get("ss_network_alpha")
    if alpha_text is not None and alpha_keys:
        said = {a for a in (_as_float(alpha_text), _as_float(args.get("conv_alpha")))
                if a is not None}
        if not said:
            reasons.append(f"metadata ss_network_alpha={alpha_text} is not a number")
        elif not read:
            alphas = sorted(said)
            reasons.append(f"alphas taken from metadata ss_network_alpha={alpha_text}"
                           + (f" (conv_alpha={args['conv_alpha']})" if "conv_alpha" in args
                              else ""))
        elif said & set(read):
            reasons.append(f"metadata ss_network_alpha={alpha_text} agrees with the weights")
        else:
            reasons.append(f"metadata ss_network_alpha={alpha_text}, but the .alpha tensors "
                           f"hold {', '.join(_num(a) for a in read)}: the weights decide")
    module = metadata.get("ss_network_module")
    if module:
        algo = str(args.get("algo", "lora")).lower() if module.startswith("lycoris") else None
        said_fmt = (_ALGOS.get(algo or "") if algo else
                    "kohya-oft" if "oft" in module else "kohya-lora")
        text = f"metadata ss_network_module={module}" + (f", algo={algo}" if algo else "")
        if said_fmt in (None, fmt):
            reasons.append(text)
        else:
            reasons.append(f"{text} means {said_fmt}, but the tensors are {fmt}: the tensors "
                           "decide")
        if "dora_wd" in args and (str(args["dora_wd"]).lower() == "true") != dora:
            reasons.append(f"metadata dora_wd={args['dora_wd']}, but the tensors "
                           f"{'hold' if dora else 'hold no'} DoRA scales")
    software = metadata.get("software") or ""
    if "ai-toolkit" in software:
        reasons.append(f"written by ai-toolkit (metadata software), in the {fmt} convention")

    config = _diffusers_config(metadata, reasons)
    if config is not None:
        if config["ranks"] and ranks and not config["ranks"] <= set(ranks):
            reasons.append(f"lora_adapter_metadata says rank(s) {sorted(config['ranks'])}, but "
                           f"the weights have {ranks}: the weights decide")
        if config["alphas"] and alphas is None:
            alphas = sorted(config["alphas"])
            reasons.append("alphas taken from diffusers' lora_adapter_metadata (lora_alpha"
                           + ("; rsLoRA scales by alpha/sqrt(r)" if config["rslora"] else "")
                           + ")")
        elif config["alphas"] and alphas is not None and not config["alphas"] <= set(alphas):
            reasons.append("lora_adapter_metadata's lora_alpha differs from the .alpha "
                           "tensors: the tensors decide")
        if config["dora"] != dora:
            reasons.append(f"lora_adapter_metadata use_dora={config['dora']}, but the tensors "
                           f"{'hold' if dora else 'hold no'} DoRA magnitudes")
    if alphas is None and not alpha_keys:
        if fmt in ("peft", "xlabs-flux", "bfl-control-lora", "diffusers-legacy"):
            reasons.append("this format stores no alpha: diffusers and ComfyUI apply it at "
                           "scale 1 unless a config says otherwise")
        elif fmt in ("lycoris-ia3", "lycoris-full"):
            reasons.append("this format has no alpha")
    return alphas
