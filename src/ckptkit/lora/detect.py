"""Says whether a file is a LoRA (or another adapter), in which format, for which family and
which components, from its header: ``detect_lora``, what ``ckpt inspect`` and ``ckpt lora
check`` report.

Pure Python, no torch (the parsing is ``keys``, the family knowledge ``families``, the
metadata ``metadata``). A file is an adapter only when nearly all its keys belong to complete
adapter modules: a model with a few LoRA-looking keys is not one.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field

from .families import SD3_FAMILIES, diffusion_families, encoder_families, encoder_of, names
from .keys import BFL_ROOT, DIFFUSION_MODEL, Parsed, locate, measured, naming, split_keys
from .metadata import metadata_families, read_alphas

COMPONENT_ORDER = ("diffusion_model", "clip_l", "clip_g", "openclip_h", "t5xxl")

# The adapter type of each tensor convention (keys.Parsed.fmt); "dora" where a lora has a
# dora_scale.
_ADAPTER_OF = {"kohya-lora": "lora", "peft": "lora", "diffusers-legacy": "lora",
             "xlabs-flux": "lora", "lycoris-loha": "loha", "lycoris-lokr": "lokr",
             "lycoris-glora": "glora", "lycoris-oft": "oft", "kohya-oft": "oft",
             "lycoris-boft": "boft", "lycoris-ia3": "ia3", "lycoris-full": "diff"}
ADAPTERS = ("lora", "dora", "loha", "lokr", "glora", "oft", "boft", "ia3", "diff", "set")

# The key format of a file, by the naming most of its modules have and its tensor convention.
KEY_FORMATS = {"kohya": "kohya (lora_unet_/lora_te*_)", "lycoris": "LyCORIS (lycoris_)",
               "comfyui": "ComfyUI (diffusion_model./text_encoders.)",
               "diffusers": "diffusers/PEFT (unet./transformer./text_encoder.)",
               "diffusers-legacy": "pre-PEFT diffusers (unet./text_encoder. with .lora.down)",
               "peft": "PEFT (base_model.model.)", "ai-toolkit": "AI-toolkit (diffusers/PEFT "
               "names)", "xlabs": "XLabs (double_blocks.N.processor.*_lora)",
               "bfl-control": "BFL control LoRA (FLUX names, lora_A/lora_B, norm scales)",
               "bare": "the model's own names, no prefix"}


def adapter_type(mod: Parsed) -> str:
    """A module's adapter type (one of ``ADAPTERS``)."""
    adapter = _ADAPTER_OF.get(mod.fmt or "lycoris-full", "lora")
    return "dora" if adapter == "lora" and "dora_scale" in mod.roles else adapter


def _key_format(adapters: list[Parsed], fmt: str, metadata: Mapping[str, str]) -> str:
    """The naming most modules have (``KEY_FORMATS``), told apart further by the tensors."""
    if fmt == "bfl-control-lora":
        return "bfl-control"
    name = Counter(naming(p) for p in adapters).most_common(1)[0][0]
    if name == "diffusers" and fmt == "diffusers-legacy":
        return "diffusers-legacy"
    if name == "diffusers" and "ai-toolkit" in (metadata.get("software") or ""):
        return "ai-toolkit"
    return name

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
    # The naming of the module names (KEY_FORMATS) and the modules by adapter type.
    key_format: str = ""
    adapters: dict[str, int] = field(default_factory=dict)
    # Modules by component and format: {"component", "format", "modules", "ranks": [lo, hi]},
    # what a report shows instead of a line per module.
    groups: list[dict] = field(default_factory=list)


@dataclass
class Analysis:
    """A LoRA file as ``detect_lora`` saw it: its report (``info``), its complete adapter
    modules (located: component and flat path set), the BFL control LoRA's ``*_norm.scale``
    replacement weights, and the keys in no complete module."""

    info: LoraInfo
    adapters: list[Parsed]
    scales: list[str]
    leftover: list[str]


def detect_lora(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
                values: Mapping[str, float] | None = None) -> LoraInfo | None:
    """What adapter the header ``shapes`` (key -> shape) is, or None when it is not one."""
    found = analyse(shapes, metadata, values)
    return found.info if found is not None else None


def analyse(shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str],
            values: Mapping[str, float] | None = None) -> Analysis | None:
    """The adapter the header ``shapes`` (key -> shape) is, or None when it is not one.

    ``metadata`` is the file's string metadata; ``values`` may hold the decoded 0-d ``.alpha``
    tensors by key. A file is an adapter only when at least 90% of its keys belong to complete
    adapter modules or their companions (alphas, DoRA scales, bundled embeddings): a model
    with a few LoRA-looking keys, an embedding, a VAE or a ControlNet is not.
    """
    if not shapes:
        return None
    metadata = metadata or {}
    modules, bundles, scales, others = split_keys(shapes)
    adapters: list[Parsed] = []
    leftover = list(others) + bundles
    for mod in modules.values():
        if mod.fmt is not None and measured(mod, shapes):
            adapters.append(mod)
        else:
            leftover.extend(mod.roles.values())
    unexplained = len(leftover) - len(bundles)
    if not adapters or unexplained * 10 > len(shapes):
        return None
    for mod in adapters:
        locate(mod)
    formats = Counter(m.fmt for m in adapters)
    fmt = formats.most_common(1)[0][0] or ""
    count = formats[fmt]
    control = fmt == "peft" and bool(scales) and all(
        BFL_ROOT.match(m.name) for m in adapters)
    if control:
        fmt = "bfl-control-lora"
    else:
        unexplained += len(scales)
        leftover += scales
        scales = []
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
    family = _conclude(candidates, metadata_families(metadata, reasons), reasons)
    ranks = sorted({m.rank for m in adapters if m.rank is not None})
    if not ranks:
        reasons.append("no module stores a low-rank factor, so there is no rank")
    dora = any("dora_scale" in m.roles for m in adapters)
    alphas = read_alphas(adapters, fmt, values or {}, metadata, ranks, dora, reasons)
    if dora:
        reasons.append("DoRA: weight-decomposition magnitudes are stored (dora_scale / "
                       "lora_magnitude_vector)")
    info = LoraInfo(format=fmt, dora=dora, family=family,
                    components=[c for c in COMPONENT_ORDER if c in components],
                    modules=len(adapters), ranks=ranks, alphas=alphas, reasons=reasons,
                    key_format=_key_format(adapters, fmt, metadata),
                    adapters=dict(Counter(adapter_type(m) for m in adapters)
                                  + Counter({"set": len(scales)})),
                    groups=_groups(adapters))
    return Analysis(info, adapters, scales, leftover)


def _groups(adapters: list[Parsed]) -> list[dict]:
    """The adapted modules counted by component and format, each with its rank range."""
    counted: dict[tuple[str, str], list] = {}
    for mod in adapters:
        entry = counted.setdefault((mod.component, mod.fmt or ""), [0, set()])
        entry[0] += 1
        if mod.rank is not None:
            entry[1].add(mod.rank)
    order = {c: i for i, c in enumerate(COMPONENT_ORDER)}
    return [{"component": comp, "format": fmt, "modules": n,
             "ranks": [min(ranks), max(ranks)] if ranks else []}
            for (comp, fmt), (n, ranks) in sorted(
                counted.items(), key=lambda kv: (order.get(kv[0][0], len(order)), kv[0]))]


def _components(adapters: list[Parsed],
                reasons: list[str]) -> tuple[set[str], set[str] | None]:
    """The adapted components, and the families the weights allow (None: they do not say)."""
    dm = [m for m in adapters if m.slot == DIFFUSION_MODEL]
    te_groups: dict[str, list[Parsed]] = {}
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
        candidates = diffusion_families(dm, reasons)
        for m in dm:
            m.component = DIFFUSION_MODEL
    encoders = set()
    for mods in te_groups.values():
        encoder = encoder_of(mods, reasons)
        encoders.add(encoder)
        for m in mods:
            m.component = encoder
    components |= encoders
    if encoders:
        hint = encoder_families(encoders, set(te_groups))
        if candidates is None:
            candidates = hint
            reasons.append(f"only text encoders are adapted; theirs are those of {names(hint)}")
        elif candidates and not candidates & hint:
            reasons.append(f"the text encoders are those of {names(hint)}: the diffusion "
                           "model decides")
        elif candidates & hint != candidates:
            candidates &= hint
            reasons.append(f"the text encoders narrow it to {names(candidates)}")
    return components, candidates


def _conclude(candidates: set[str] | None, claimed: set[str] | None,
              reasons: list[str]) -> str | None:
    if candidates is not None and claimed is not None:
        if candidates & claimed:
            if candidates & claimed != candidates:
                reasons.append(f"the metadata picks {names(candidates & claimed)} among "
                               f"{names(candidates)}")
            else:
                reasons.append("the metadata agrees with the weights")
            candidates &= claimed
        elif candidates:
            reasons.append(f"the metadata says {names(claimed)} but the weights say "
                           f"{names(candidates)}: the weights decide")
        else:
            reasons.append(f"the metadata says {names(claimed)}, but the weights fit no "
                           "family: not taken")
    elif candidates is None and claimed is not None:
        reasons.append(f"no adapted module tells the family; the metadata does "
                       f"({names(claimed)})")
        candidates = claimed
    if not candidates:
        return None
    if len(candidates) == 1:
        return next(iter(candidates))
    if candidates <= set(SD3_FAMILIES):
        reasons.append(f"an SD3-family adapter; its weights do not tell {names(candidates)} "
                       "apart")
        return "sd3"
    reasons.append(f"family left open between {names(candidates)}")
    return None


