"""Quantized weights inside a safetensors (or torch) file: fp8 "scaled" and bitsandbytes 4-bit.

Both keep each quantized weight under its usual key, with what decodes it in tensors beside
it. Read here as ComfyUI and Forge read them, the weight becomes one ``QuantizedTensor`` (its
values on request) and the tensors that decode it become its ``parts``, no longer listed as
tensors of their own: identification, conversion and merging see the model's weights, and
nothing else.

fp8 scaled (ComfyUI): an fp8 ``<layer>.weight`` with a float32 scale ``<layer>.weight_scale``
(ComfyUI's current spelling, diffusers') or ``<layer>.scale_weight`` (the first generation,
whose file carries a ``scaled_fp8`` marker tensor); its value is stored x scale. The layer's
``input_scale``/``scale_input`` (for fp8 matrix products) and its ``comfy_quant`` description
(a uint8 tensor of JSON, or the same under ``_quantization_metadata`` in the header) go with
it. Layers that ``comfy_quant`` gives another format (nvfp4, int8) are left as stored, and
said so.

bitsandbytes 4-bit (Forge, diffusers): a uint8 ``W`` of packed codes, ``W.absmax``,
``W.quant_map`` and optionally ``W.nested_absmax``/``W.nested_quant_map``, described by
``W.quant_state.bitsandbytes__nf4`` (or ``__fp4``): a uint8 tensor of JSON giving the quant
type, block size, original dtype and shape, and the nested block size and offset.
"""

from __future__ import annotations

import json
import math
from typing import Any

from ..errors import FormatError
from .checkpoint import Checkpoint, LazyTensor
from .dtypes import BY_NAME
from .quantized import QuantizedTensor, majority_float

_FP8 = {"F8_E4M3": "F8_E4M3-scaled", "F8_E5M2": "F8_E5M2-scaled"}
_FP8_FORMATS = ("float8_e4m3fn", "float8_e5m2")
_SCALES = (".weight_scale", ".scale_weight")
_INPUT_SCALES = (".input_scale", ".scale_input")
_BNB = ".quant_state.bitsandbytes__"
_BNB_PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
_TORCH_DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}
MAX_DESCRIPTION = 1 << 16  # a comfy_quant or quant_state JSON is a few hundred bytes


def recognise(checkpoint: Checkpoint) -> None:
    """Replaces, in ``checkpoint.tensors``, each quantized weight and the tensors that decode
    it by one ``QuantizedTensor``; notes what was found."""
    tensors = checkpoint.tensors
    if any(_BNB in k for k in tensors):
        _bnb(checkpoint)
    if any(t.dtype.name in _FP8 for t in tensors.values()):
        _fp8(checkpoint)


def _json_tensor(tensor: LazyTensor, key: str, path: str) -> dict[str, Any]:
    """A uint8 tensor holding a JSON object (``comfy_quant``, a packed quant state)."""
    if tensor.dtype.name not in ("U8", "I8") or tensor.numel > MAX_DESCRIPTION:
        raise FormatError(f"{key} is not a short uint8 tensor of JSON", path)
    try:
        value = json.loads(bytes(tensor.raw()).decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FormatError(f"{key} does not hold valid JSON", path) from None
    if not isinstance(value, dict):
        raise FormatError(f"{key} does not hold a JSON object", path)
    return value


def _layer_formats(checkpoint: Checkpoint) -> dict[str, str]:
    """Each layer's ``comfy_quant`` format, from its tensor or ``_quantization_metadata``."""
    formats: dict[str, str] = {}
    path = checkpoint.path
    text = checkpoint.metadata.get("_quantization_metadata")
    if text is not None:
        try:
            layers = json.loads(text)["layers"]
            if not isinstance(layers, dict):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            raise FormatError("_quantization_metadata is not JSON with a \"layers\" object",
                              path) from None
        for layer, conf in layers.items():
            # Some writers give the format alone instead of an object.
            formats[layer] = conf if isinstance(conf, str) else str(
                conf.get("format") if isinstance(conf, dict) else conf)
    for key, tensor in checkpoint.tensors.items():
        if key.endswith(".comfy_quant"):
            conf = _json_tensor(tensor, key, path)
            formats[key[:-len(".comfy_quant")]] = str(conf.get("format"))
    return formats


def _fp8(checkpoint: Checkpoint) -> None:
    tensors, path = checkpoint.tensors, checkpoint.path
    formats = _layer_formats(checkpoint)
    marker = next((k for k in tensors if k == "scaled_fp8" or k.endswith(".scaled_fp8")), None)
    absorbed: set[str] = set()
    made: dict[str, QuantizedTensor] = {}
    natural = majority_float([t for t in tensors.values() if t.dtype.name not in _FP8], "BF16")
    for key, tensor in tensors.items():
        if tensor.dtype.name not in _FP8 or not key.endswith(".weight"):
            continue
        layer = key[:-len(".weight")]
        scale_key = next((layer + s for s in _SCALES if layer + s in tensors), None)
        if scale_key is None or formats.get(layer, _FP8_FORMATS[0]) not in _FP8_FORMATS:
            continue  # plain fp8 (ComfyUI casts it, unscaled), or a format not read here
        scale = tensors[scale_key]
        if not scale.dtype.is_float or scale.numel > tensor.numel:
            raise FormatError(f"{scale_key} is not a float scale for {key}", path)
        made[key] = QuantizedTensor(
            tensor.source, natural, tensor.shape, tensor.byte_offset, tensor.storage_nbytes,
            storage_id=key, qtype=_FP8[tensor.dtype.name], scheme="fp8-scaled",
            block_size=tensor.numel // max(scale.numel, 1),
            parts={"data": tensor, "scale": scale})
        absorbed.add(scale_key)
        absorbed.update(layer + s for s in _INPUT_SCALES if layer + s in tensors)
        absorbed.add(layer + ".comfy_quant")
    if not made:
        return
    if marker:
        absorbed.add(marker)
    others = sorted({f for f in formats.values() if f not in _FP8_FORMATS})
    _replace(checkpoint, made, absorbed)
    how = ("ComfyUI's scaled_fp8 marker" if marker else
           "comfy_quant layer descriptions" if formats else "weight_scale tensors")
    checkpoint.notes.append(
        f"fp8-scaled weights ({how}): {len(made):,} read as stored x scale, as ComfyUI does; "
        "their scale tensors belong to them" +
        (f"; layers in {', '.join(others)} are left as stored (not dequantized by ckptkit)"
         if others else ""))


def _bnb(checkpoint: Checkpoint) -> None:
    tensors, path = checkpoint.tensors, checkpoint.path
    made: dict[str, QuantizedTensor] = {}
    absorbed: set[str] = set()
    for key, state_tensor in tensors.items():
        at = key.find(_BNB)
        if at < 0:
            continue
        name = key[:at]
        state = _json_tensor(state_tensor, key, path)
        made[name] = _bnb_weight(name, state, tensors, path)
        absorbed.add(key)
        absorbed.update(name + "." + p for p in _BNB_PARTS if name + "." + p in tensors)
    _replace(checkpoint, made, absorbed)
    kinds = sorted({t.qtype for t in made.values()})
    checkpoint.notes.append(f"bitsandbytes {'/'.join(kinds)} weights: {len(made):,} read as "
                            "their values, as bitsandbytes dequantizes them; their absmax, "
                            "quant map and quant state tensors belong to them")


def _bnb_weight(name: str, state: dict[str, Any], tensors: dict[str, LazyTensor],
                path: str) -> QuantizedTensor:
    def fail(problem: str):
        return FormatError(f"bitsandbytes weight {name!r}: {problem}", path)

    if name not in tensors:
        raise fail("its quant state has no weight beside it")
    data = tensors[name]
    kind, blocksize, shape = state.get("quant_type"), state.get("blocksize"), state.get("shape")
    if kind not in ("nf4", "fp4"):
        raise fail(f"unknown quant_type {kind!r}")
    if not (isinstance(blocksize, int) and blocksize > 0 and isinstance(shape, list)
            and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise fail("its quant state lacks a valid blocksize or shape")
    numel = math.prod(shape)
    if data.dtype.name != "U8" or data.numel != (numel + 1) // 2:
        raise fail(f"{data.numel} packed bytes cannot hold shape {shape}")
    parts = {"data": data}
    for part in _BNB_PARTS:
        if name + "." + part in tensors:
            parts[part] = tensors[name + "." + part]
    for needed in ("absmax", "quant_map"):
        if needed not in parts:
            raise fail(f"{name}.{needed} is missing")
    blocks = -(-numel // blocksize)
    if parts["absmax"].numel != blocks or parts["quant_map"].numel != 16:
        raise fail(f"{blocks} absmax and 16 quant map values expected, found "
                   f"{parts['absmax'].numel} and {parts['quant_map'].numel}")
    params: dict[str, Any] = {"blocksize": blocksize}
    if "nested_absmax" in parts:
        nested = state.get("nested_blocksize")
        offset = state.get("nested_offset")
        if not (isinstance(nested, int) and nested > 0 and isinstance(offset, (int, float))
                and "nested_quant_map" in parts):
            raise fail("double quantisation without nested_blocksize, nested_offset or "
                       "nested_quant_map")
        if (parts["nested_absmax"].numel != -(-blocks // nested)
                or parts["nested_quant_map"].numel != 256):
            raise fail("nested absmax or nested quant map of the wrong size")
        params.update(nested_blocksize=nested, nested_offset=float(offset))
    elif parts["absmax"].dtype.name == "U8":
        raise fail("8-bit absmax without nested_absmax to decode them")
    dtype = BY_NAME[_TORCH_DTYPES.get(str(state.get("dtype")), "BF16")]
    return QuantizedTensor(data.source, dtype, tuple(shape), data.byte_offset,
                           data.storage_nbytes, storage_id=name, qtype=kind.upper(),
                           scheme="bnb-4bit", block_size=blocksize, parts=parts, params=params)


def _replace(checkpoint: Checkpoint, made: dict[str, QuantizedTensor], absorbed: set[str]):
    """The tensors in their order, each quantized weight in its place, its parts gone."""
    checkpoint.tensors = {k: made.get(k, t) for k, t in checkpoint.tensors.items()
                          if k not in absorbed}
