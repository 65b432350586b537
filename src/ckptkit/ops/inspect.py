"""``inspect``: what a checkpoint holds, from its header (or pickle) alone.

The report is a plain dict (the ``--json`` output): format, sizes, counts, dtypes, the key
prefixes that group the tensors, decoded metadata and, for pickles, the non-weight entries.
No tensor data is read, so a 24 GB file is inspected in the time it takes to read its header.

``safe_text.json_safe`` makes a report printable as strict JSON (``inspect --json``): JSON
has no NaN or infinity, so non-finite numbers (a LoRA's ``.alpha`` tensor holding NaN) become
the strings ``"nan"``, ``"inf"`` and ``"-inf"``, as Python spells them and as pickle extras
already are; text that is not valid Unicode (a file name with bytes that are not UTF-8, a
lone surrogate escaped in a header) has those bytes written as ``\\xNN`` escapes, so the output
is always valid UTF-8. Metadata values are decoded as JSON only when that JSON is plain data:
NaN, infinity (``1e999``) or nesting deeper than ``MAX_METADATA_DEPTH`` keep the value as its
original string.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict
from typing import Any

from ..arch.detect import Identification, identify
from ..engine.writer import Progress
from ..errors import FormatError, UnsafeFileError
from ..formats import Checkpoint, open_checkpoint
from ..formats.checkpoint import paused_gc
from ..formats.quantized import QuantizedTensor, stored_nbytes, stored_type
from ..lora.detect import detect_lora
from .hashing import file_hashes

_CONTAINERS = {"text_encoders", "embedders"}  # their children are separate components


def inspect_file(path: str, hashes: bool = False, progress: Progress | None = None
                 ) -> dict[str, Any]:
    """The report of one file; ``hashes`` adds SHA-256/AutoV2/AutoV3 (reads the whole file)."""
    with open_checkpoint(path) as checkpoint:
        digests = file_hashes(path, progress) if hashes else None
        with paused_gc():  # tables of every key: many objects, no cycles
            report = describe_checkpoint(checkpoint)
            report["identification"] = identify_checkpoint(
                checkpoint, digests["sha256"] if digests else None).to_dict()
    if digests:
        report["hashes"] = digests
    return report


# No model or adapter ckptkit knows holds more than a few thousand tensors (SD3.5 Large with
# its text encoders and EMA copies, a LyCORIS LoRA of every FLUX block: under 20,000).
MAX_IDENTIFIED_TENSORS = 200_000
MAX_PREFIX_DEPTH = 8  # components of a key-prefix group, at most


def identify_checkpoint(checkpoint: Checkpoint, sha256: str | None = None) -> Identification:
    """What the file is, from its header: a LoRA (``lora.detect``, with its alphas decoded),
    else what ``arch.detect`` says. LoRAs are told apart here, above ``arch``, because the
    ``lora`` package sits at the ops level (it does tensor math too).

    A file of more tensors than ``MAX_IDENTIFIED_TENSORS`` is no model ckptkit knows, and is
    said so at once: matching its keys against every family took seconds and hundreds of MB
    for a header of a million empty tensors."""
    tensors = checkpoint.tensors
    if len(tensors) > MAX_IDENTIFIED_TENSORS:
        return Identification("unknown", reasons=[
            f"it holds {len(tensors):,} tensors, over the {MAX_IDENTIFIED_TENSORS:,} that "
            "ckptkit matches (no model or adapter it knows holds a tenth of that)"])
    shapes = {k: t.shape for k, t in tensors.items()}
    dtypes = {k: stored_type(t) for k, t in tensors.items()}  # Q8_0, NF4...: as stored
    values = {}
    for key in [k for k in tensors if k.endswith(".alpha")]:
        if tensors[key].numel == 1:
            # An alpha we cannot decode stays unknown rather than guessed.
            with contextlib.suppress(FormatError):
                values[key] = tensors[key].scalar()
    lora = detect_lora(shapes, checkpoint.metadata, values)
    if lora is not None:
        return Identification("lora", family=lora.family, reasons=list(lora.reasons),
                              lora=asdict(lora))
    return identify(shapes, dtypes, checkpoint.metadata, sha256)


def describe_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    dtypes: dict[str, dict[str, int]] = {}
    sizes: dict[str, int] = {}
    tensor_bytes = 0
    quantized: list[QuantizedTensor] = []
    for key, tensor in checkpoint.items():
        numel = sizes[key] = tensor.numel
        tensor_bytes += stored_nbytes(tensor)
        entry = dtypes.setdefault(stored_type(tensor), {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += numel
        if isinstance(tensor, QuantizedTensor):
            quantized.append(tensor)
    report: dict[str, Any] = {
        "path": checkpoint.path,
        "format": checkpoint.format,
        "file_size": os.path.getsize(checkpoint.path),
        "tensor_count": len(checkpoint),
        "parameter_count": sum(e["parameters"] for e in dtypes.values()),
        "tensor_bytes": tensor_bytes,
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["parameters"])),
        "prefixes": key_prefixes(sizes),
        "metadata": {k: decode_metadata_value(v) for k, v in checkpoint.metadata.items()},
    }
    if quantized:
        report["quantization"] = quantization_summary(checkpoint, quantized, dtypes,
                                                      tensor_bytes)
    if checkpoint.format != "safetensors":
        report["weights_at"] = checkpoint.weights_at
        report["extras"] = checkpoint.extras
    report["notes"] = list(checkpoint.notes)
    return report


def quantization_summary(checkpoint: Checkpoint, quantized: list[QuantizedTensor],
                         dtypes: dict[str, dict[str, int]], tensor_bytes: int
                         ) -> dict[str, Any]:
    """How a quantized file stores its weights: the scheme (``gguf``, ``fp8-scaled``,
    ``bnb-4bit``), each stored type's share of the parameters, the bits per weight overall
    (codes and scales of every tensor, per parameter), the type the quantized weights read
    as, and each tensor's stored type."""
    total = sum(e["parameters"] for e in dtypes.values())
    return {
        "scheme": "/".join(sorted({t.scheme for t in quantized})),
        "types": {name: {**entry, "share": round(entry["parameters"] / total, 6) if total else 0}
                  for name, entry in dtypes.items()},
        "bits_per_weight": round(tensor_bytes * 8 / total, 4) if total else 0,
        "quantized_tensors": len(quantized),
        "reads_as": "/".join(sorted({t.dtype.name for t in quantized})),
        "tensor_types": {k: stored_type(t) for k, t in checkpoint.items()},
    }


def quantization_label(report: dict[str, Any], extra: dict[str, Any]) -> str | None:
    """How the weights are stored smaller than 16 bits, in a word, from ``describe_checkpoint``'s
    report and the identification's ``extra``: ComfyUI's scaled fp8 (a scale per weight), a
    file's quantized types by share of parameters (a small model keeps most of its parameters
    in F16 and still is a Q4_0 file), or plain fp8/fp6/fp4/int8 (the type of most
    parameters). The library's ``quantization`` column and ``ckpt batch inspect``'s."""
    quantized = report.get("quantization")
    if extra.get("scaled-fp8") or (quantized or {}).get("scheme") == "fp8-scaled":
        return "scaled-fp8"
    if quantized:
        kinds = sorted(quantized["types"].items(), key=lambda kv: -kv[1]["parameters"])
        low = [name for name, _ in kinds if name not in ("F32", "F16", "BF16")]
        if low:
            return "+".join(low)
    dtype = next(iter(report["dtypes"]), None)
    if dtype and dtype.startswith(("F8", "F6", "F4", "I8", "U8")):
        return dtype.lower()
    return None


MAX_METADATA_DEPTH = 64  # real metadata nests a few levels; a report must stay printable


def decode_metadata_value(value: str) -> Any:
    """Metadata values that hold JSON (kohya's tag frequencies, recipes) decoded; else as is.

    A value whose JSON has NaN or infinite numbers, nests deeper than ``MAX_METADATA_DEPTH``
    or is too deep for the parser itself stays the string it was."""
    text = value.strip()
    if text[:1] in ("{", "["):
        try:
            decoded = json.loads(text, parse_constant=_no_constants, parse_float=_finite)
        except (ValueError, RecursionError):
            return value
        if _depth(decoded) <= MAX_METADATA_DEPTH:
            return decoded
    return value


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would make --json output invalid


def _finite(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(f"{text} is beyond a float")  # 1e999 would decode to infinity
    return number


def _depth(value: Any) -> int:
    """How deeply lists and dicts nest in decoded JSON (iterative: no recursion limit)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            if depth > MAX_METADATA_DEPTH:
                break
            stack.extend((v, depth + 1) for v in (item.values() if isinstance(item, dict)
                                                   else item))
    return deepest


def key_prefixes(sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Groups keys by their leading components: ``model.diffusion_model``, ``first_stage_model``,
    ``conditioner.embedders.0``... Single-child chains are followed and the children of
    component folders (``text_encoders``, ``embedders``) split, so that each group is one part
    of the model. Groups come largest first (then by name).

    Time and memory are linear in the total length of the keys: groups are refined one
    component at a time, each key's next component read where its group's prefix ends, and a
    group's name is cut only once it stops growing (storing every prefix of every key made a
    60 KB key of 30,000 components take 20 s and 1.1 GB). Groups stop at ``MAX_PREFIX_DEPTH``
    components (models' prefixes have at most five), so that the work per key is bounded too:
    20,000 keys of 2,250 components each took two minutes."""
    found: dict[str, list[str]] = {}
    top = [k for k in sizes if "." not in k]
    if top:
        found["(top level)"] = top
    # (begin, end, depth, keys): keys sharing key[:end], ``depth`` components (the last one
    # starting at ``begin``), and having a "." at ``end``.
    pending = [(0, len(first), 1, keys)
               for first, keys in _by_component([k for k in sizes if "." in k], 0).items()]
    while pending:
        begin, end, depth, keys = pending.pop()
        start = end + 1
        deeper = [k for k in keys if k.find(".", start) >= 0]
        container = keys[0][begin:end] in _CONTAINERS
        if deeper and depth < MAX_PREFIX_DEPTH and (container or _one_child(keys, start)):
            if len(deeper) < len(keys):  # keys that end one component further stop here
                found.setdefault(keys[0][:end], []).extend(
                    k for k in keys if k.find(".", start) < 0)
            pending.extend((start, start + len(child), depth + 1, group)
                           for child, group in _by_component(deeper, start).items())
        else:
            found.setdefault(keys[0][:end], []).extend(keys)
    groups = [{"prefix": prefix, "tensors": len(keys), "parameters": sum(sizes[k] for k in keys)}
              for prefix, keys in found.items()]
    return sorted(groups, key=lambda g: (-g["parameters"], -g["tensors"], g["prefix"]))


def _by_component(keys: list[str], start: int) -> dict[str, list[str]]:
    """``keys`` (each with a "." after ``start``) by their component that begins at ``start``."""
    out: dict[str, list[str]] = {}
    for key in keys:
        out.setdefault(key[start:key.index(".", start)], []).append(key)
    return out


def _one_child(keys: list[str], start: int) -> bool:
    """Whether every key has the same component (up to the next "." or its end) at ``start``."""
    stop = keys[0].find(".", start)
    first = keys[0][start:] if stop < 0 else keys[0][start:stop]
    after = start + len(first)
    return all(k.startswith(first, start) and (len(k) == after or k[after] == ".")
               for k in keys)


_PIPELINES = {"StableDiffusionPipeline": ("sd1", "sd2"), "StableDiffusionXLPipeline": ("sdxl",),
              "StableDiffusionXLImg2ImgPipeline": ("sdxl", "sdxl-refiner"),
              "StableDiffusion3Pipeline": ("sd3-medium", "sd3.5-medium", "sd3.5-large"),
              "FluxPipeline": ("flux1-dev", "flux1-schnell")}


def is_diffusers_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "model_index.json"))


def inspect_diffusers_folder(path: str) -> dict[str, Any]:
    """A diffusers pipeline folder: each component's weight files identified (shards
    together), the family from the diffusion model's weights, checked against
    ``model_index.json``'s pipeline class."""
    index_path = os.path.join(path, "model_index.json")
    try:
        with open(index_path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError) as exc:
        raise FormatError(f"model_index.json cannot be read ({exc})", path) from None
    if not isinstance(index, dict):
        raise FormatError("model_index.json is not a JSON object", path)
    pipeline = str(index.get("_class_name", ""))
    components, family, reasons = {}, None, []
    for sub in sorted(index):
        if sub.startswith("_"):
            continue
        if not _is_plain_name(sub):
            raise UnsafeFileError(f"model_index.json names the component {sub!r}, which is not "
                                  "a folder name (a path out of the pipeline folder is refused)",
                                  path)
        folder = os.path.join(path, sub)
        if not os.path.isdir(folder):
            continue
        weights = weight_files(folder)
        if not weights:
            continue
        ident = _identify_shards(weights)
        components[sub] = {"files": [os.path.relpath(w, path) for w in weights],
                           "identification": ident.to_dict()}
        if ident.kind == "diffusion-model" and ident.family:
            family = ident.family
    expected = _PIPELINES.get(pipeline)
    if family and expected and family not in expected:
        reasons.append(f"model_index.json names {pipeline} but the weights are {family}'s")
    elif family:
        reasons.append(f"the diffusion model's weights are {family}'s ({pipeline})")
    else:
        reasons.append(f"pipeline {pipeline or 'unnamed'}: the diffusion model was not "
                       "recognised")
    return {"path": path, "format": "diffusers-folder", "pipeline": pipeline,
            "identification": {"kind": "diffusers-folder", "family": family,
                               "reasons": reasons},
            "components": components}


def _is_plain_name(name: str) -> bool:
    """Whether ``name`` names an entry of a folder, not a path (``..``, ``/etc``, ``a/b``,
    ``C:x``): a component of ``model_index.json`` must be a subfolder of the pipeline."""
    return (name not in ("", ".", "..") and "/" not in name and "\0" not in name
            and os.sep not in name and (os.altsep is None or os.altsep not in name)
            and not os.path.splitdrive(name)[0])


def weight_files(folder: str) -> list[str]:
    """The weight files of a diffusers component folder (its shards, in order)."""
    names = sorted(os.listdir(folder))
    safetensors = [n for n in names if n.endswith(".safetensors")]
    # A folder may hold both precisions (model.safetensors, model.fp16.safetensors): the
    # full-precision files are the component; variants are the same component again.
    plain = [n for n in safetensors if ".fp16." not in n and ".bf16." not in n] or safetensors
    chosen = plain or [n for n in names if n.endswith(".bin")]
    return [os.path.join(folder, n) for n in chosen]


def _identify_shards(paths: list[str]) -> Identification:
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, str] = {}
    metadata: dict[str, str] = {}
    for path in paths:
        with open_checkpoint(path) as checkpoint:
            shapes.update({k: t.shape for k, t in checkpoint.items()})
            dtypes.update({k: t.dtype.name for k, t in checkpoint.items()})
            metadata.update(checkpoint.metadata)
    return identify(shapes, dtypes, metadata)
