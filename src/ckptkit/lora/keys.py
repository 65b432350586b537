"""The key formats of LoRA files (and other adapters): which tensors form one adapted module,
what each tensor's role is, which prefix names which component.

Pure Python, no torch: read from key names and shapes only, so that identification, ``ckpt
lora check`` and the matching of a LoRA against a model answer from headers in milliseconds.

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
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

Shape = tuple[int, ...]

DIFFUSION_MODEL = "diffusion_model"

# Tensor suffixes -> (format, role). Longest first, so ".lora_B.weight" wins over ".lora_B".
_SUFFIXES: tuple[tuple[str, str | None, str], ...] = tuple(sorted((
    (".lora_down.weight", "kohya-lora", "down"),
    (".lora_up.weight", "kohya-lora", "up"),
    (".lora_mid.weight", "kohya-lora", "mid"),
    (".lora_A.weight", "peft", "down"),
    (".lora_B.weight", "peft", "up"),
    (".lora_B.bias", None, "diff_b"),
    (".lora_A.default.weight", "peft", "down"),
    (".lora_B.default.weight", "peft", "up"),
    (".lora_A", "peft", "down"),
    (".lora_B", "peft", "up"),
    (".lora_magnitude_vector.weight", None, "dora_scale"),
    (".lora_magnitude_vector", None, "dora_scale"),
    ("_lora.down.weight", "diffusers-legacy", "down"),
    ("_lora.up.weight", "diffusers-legacy", "up"),
    (".lora.down.weight", "diffusers-legacy", "down"),
    (".lora.up.weight", "diffusers-legacy", "up"),
    (".lora_linear_layer.down.weight", "diffusers-legacy", "down"),
    (".lora_linear_layer.up.weight", "diffusers-legacy", "up"),
    (".hada_w1_a", "lycoris-loha", "w1a"),
    (".hada_w1_b", "lycoris-loha", "w1b"),
    (".hada_w2_a", "lycoris-loha", "w2a"),
    (".hada_w2_b", "lycoris-loha", "w2b"),
    (".hada_t1", "lycoris-loha", "t1"),
    (".hada_t2", "lycoris-loha", "t2"),
    (".lokr_w1", "lycoris-lokr", "w1"),
    (".lokr_w1_a", "lycoris-lokr", "w1a"),
    (".lokr_w1_b", "lycoris-lokr", "w1b"),
    (".lokr_w2", "lycoris-lokr", "w2"),
    (".lokr_w2_a", "lycoris-lokr", "w2a"),
    (".lokr_w2_b", "lycoris-lokr", "w2b"),
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
    (".oft_diag", "lycoris-oft", "blocks"),  # LyCORIS' older name of diag-OFT's blocks
    (".on_input", "lycoris-ia3", "on_input"),
    (".rescale", None, "rescale"),
    (".alpha", None, "alpha"),
    (".dora_scale", None, "dora_scale"),
    (".set_weight", None, "set"),
    (".reshape_weight", None, "reshape"),
), key=lambda s: -len(s[0])))
_ANY_SUFFIX = tuple(suffix for suffix, _, _ in _SUFFIXES)
_XLABS = re.compile(r"^(.*\.processor\.(?:qkv|proj)_lora[12]?)\.(down|up)\.weight$")
# A block of FLUX's before a "_norm.scale" weight. Not one pattern with ".*" between them: a
# search would rescan the rest of the key from every block name, the square of its length.
_BFL_BLOCK = re.compile(r"(?:^|\.)(?:double|single)_blocks\.\d+\.")
_NORM_SCALE = "_norm.scale"
BFL_ROOT = re.compile(r"^(?:double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|"
                       r"guidance_in|final_layer)(?:\.|$)")

# Module prefixes and the slot they name: DIFFUSION_MODEL or a text encoder by position.
# (Their naming convention is in _NAMINGS.)
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
# The naming convention of each prefix: "kohya" (and LyCORIS' own "lycoris_" prefix) flatten
# the module path with "_"; the others keep its dots. "comfyui" names modules as ComfyUI's
# single files do, "diffusers" as diffusers' model classes, "peft" as PEFT's wrapped model.
_NAMINGS = {"lora_unet_": "kohya", "lora_transformer_": "kohya", "oft_unet_": "kohya",
            "lora_te1_": "kohya", "lora_te2_": "kohya", "lora_te3_": "kohya",
            "lora_te_": "kohya", "lycoris_": "lycoris", "model.diffusion_model.": "comfyui",
            "diffusion_model.": "comfyui", "unet.base_model.model.": "peft",
            "base_model.model.": "peft", "unet.": "diffusers", "transformer.": "diffusers",
            "text_encoder_3.": "diffusers", "text_encoder_2.": "diffusers",
            "text_encoder.": "diffusers"}
FLAT_NAMINGS = ("kohya", "lycoris")
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
CLIP_NAMES = re.compile(r"(^|_)(text_model_)?encoder_layers_(\d+)_(self_attn|mlp)_"
                         r"(q_proj|k_proj|v_proj|out_proj|fc1|fc2|to_[qkv]|to_out)$|(^|_)text_projection$")
T5_NAMES = re.compile(r"(^|_)encoder_block_(\d+)_layer_(\d+)_"
                       r"(SelfAttention_[qkvo]|DenseReluDense_(wi|wi_0|wi_1|wo))$")


@dataclass
class Parsed:
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


def fmt_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


# --- parsing --------------------------------------------------------------------------------


def _is_norm_scale(key: str) -> bool:
    """Whether ``key`` is a ``*_norm.scale`` weight inside a FLUX double or single block."""
    return key.endswith(_NORM_SCALE) and _BFL_BLOCK.search(
        key, 0, len(key) - len(_NORM_SCALE)) is not None


def split_keys(keys: Iterable[str]) -> tuple[dict[str, Parsed], list[str], list[str], list[str]]:
    """Groups keys by module: (modules, bundled-embedding keys, norm-scale keys, the rest)."""
    modules: dict[str, Parsed] = {}
    bundles: list[str] = []
    scales: list[str] = []
    others: list[str] = []
    for key in keys:
        if key.startswith("bundle_emb."):
            bundles.append(key)
            continue
        match = _XLABS.match(key)
        if match:
            mod = modules.setdefault(match.group(1), Parsed(match.group(1)))
            mod.roles[match.group(2)] = key
            mod.fmt = "xlabs-flux"
            continue
        for suffix, fmt, role in _SUFFIXES if key.endswith(_ANY_SUFFIX) else ():
            if key.endswith(suffix) and len(key) > len(suffix):
                name = key[: -len(suffix)]
                mod = modules.setdefault(name, Parsed(name))
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


def measured(mod: Parsed, shapes: Mapping[str, Shape]) -> bool:
    """``_measure``, with tensors of too few dimensions for their role (a malformed or
    hostile file) counting as not an adapter rather than an error."""
    try:
        return _measure(mod, shapes)
    except (ValueError, IndexError):
        return False


def _measure(mod: Parsed, shapes: Mapping[str, Shape]) -> bool:
    """Whether the module holds a whole adapter of its format; sets its rank and widths
    (in x out of the layer it adapts) where the shapes give them away."""
    roles = mod.roles

    def shape(role: str) -> Shape:
        return tuple(shapes[roles[role]])

    def note(role: str) -> str:
        return f"{roles[role]} {fmt_shape(shape(role))}"

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
        if not {"w1a", "w1b", "w2a", "w2b"} <= set(roles):
            return False
        w1a, w1b = shape("w1a"), shape("w1b")
        if len(w1a) != 2 or len(w1b) != 2:
            return False
        # hada_w1_b is (r, in[*k*k]); hada_w1_a is (out, r), or (r, out) with a Tucker core.
        mod.rank, mod.width_in, mod.evidence = w1b[0], w1b[1], note("w1b")
        mod.width_out = w1a[1] if "t1" in roles else w1a[0]
    elif fmt == "lycoris-lokr":
        if not (("w1" in roles or {"w1a", "w1b"} <= set(roles))
                and ("w2" in roles or {"w2a", "w2b"} <= set(roles))):
            return False
        # W = kron(w1, w2): w1 is (a, c), w2 is (b, d[, k, k]); the layer is (a*b, c*d).
        if "w1" in roles:
            a, c = shape("w1")[:2]
        else:
            a, c = shape("w1a")[0], shape("w1b")[1]
        if "w2" in roles:
            b, d = shape("w2")[:2]
        else:
            b = shape("w2a")[1] if "t2" in roles else shape("w2a")[0]
            d = shape("w2b")[1]
        mod.width_in, mod.width_out = c * d, a * b
        mod.evidence = note("w2" if "w2" in roles else "w2b")
        # Its rank is that of the factor stored as a product; none when both are full.
        for role in ("w2b", "w1b"):
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


def locate(mod: Parsed) -> None:
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
        elif CLIP_NAMES.search(mod.flat) or T5_NAMES.search(mod.flat):
            mod.slot = "te"
    if mod.slot == DIFFUSION_MODEL:
        # Pre-PEFT diffusers attention processors: ...attn1.processor.to_q_lora, .to_out_lora.
        mod.flat = mod.flat.replace("_processor_to_", "_to_")
        if mod.flat.endswith("_to_out"):
            mod.flat += "_0"


def naming(mod: Parsed) -> str:
    """The naming convention of a located module's name: one of ``_NAMINGS``' values, or for
    a name without prefix "xlabs" (x-flux's processor names) or "bare" (a model's own names,
    as BFL's control LoRAs have them)."""
    if mod.group in _NAMINGS:
        return _NAMINGS[mod.group]
    if _COMFY_TE.match(mod.name):
        return "comfyui"
    return "xlabs" if mod.fmt == "xlabs-flux" else "bare"


def path(mod: Parsed) -> str:
    """A located module's path after its prefix, as the file spells it."""
    match = _COMFY_TE.match(mod.name)
    if match:
        return mod.name[match.end():]
    return mod.name[len(mod.group):] if mod.group in _NAMINGS else mod.name


# --- families ------------------------------------------------------------------------------
