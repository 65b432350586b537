"""GGUF reader: the header parsed by ggml's rules, the tensors read lazily, quantized or not.

A GGUF file (v2 and v3; v1 is long gone, and a big-endian file is named as such) is the magic
``GGUF``, a version, the tensor and key-value counts, the typed key-value pairs, one info per
tensor (name, dimensions innermost first, GGML type, offset) and, from the next multiple of
``general.alignment`` (32 by default), the data. Only the header is read on open; a file ggml
would refuse is refused here too, with a sentence saying what is wrong: keys and tensor names
once each, at most 4 dimensions, rows of whole blocks, and each tensor where ggml expects it
(right after the previous one, padded to the alignment; so no gaps, overlaps or trailing
bytes beyond the last padding).

Tensors come out as ComfyUI-GGUF's loader gives them to a model: shapes in torch order (ggml
lists dimensions innermost first), or the original shape recorded under
``comfy.gguf.orig_shape.<name>`` where the converter reshaped an SD1/SDXL tensor; files with
no ``general.architecture`` (stable-diffusion.cpp's, older city96 ones) have SDXL's 1x1
``proj_in``/``proj_out`` read as the linear layers they are; a T5 encoder with llama.cpp's
tensor names has them read as transformers' (``enc.blk.0.attn_q`` is
``encoder.block.0.layer.0.SelfAttention.q``). F32/F16/BF16 (and integer) tensors are plain
lazy tensors; the block-quantized types are ``QuantizedTensor``s that dequantize on request.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from ..errors import FormatError, UnsafeFileError
from ..quant.ggml_types import BY_ID, PLAIN_DTYPES
from .checkpoint import Checkpoint, LazyTensor, paused_gc
from .dtypes import BY_NAME
from .quantized import QuantizedTensor, majority_float
from .safetensors import MAX_TENSORS, TORCH_NAMES
from .source import Source
from .torch_pickle import refuse_what_torch_load_runs

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_HEADER_SIZE = 100_000_000  # as for safetensors: a bigger header is a bomb
MAX_KV = 100_000  # models carry tens; a tokenizer is one array, not many keys
MAX_KEPT_ARRAY = 4096  # longer arrays (tokenizer vocabularies) are summarised, not decoded
ORIG_SHAPE = "comfy.gguf.orig_shape."
# Keys that describe the file's own encoding: not carried as metadata of a converted file.
STRUCTURAL_KEYS = ("general.alignment", "general.quantization_version", "general.file_type")

# GGUF value types: struct code, or "string"/"array".
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q",
            12: "d"}
_TYPE_NAMES = {0: "uint8", 1: "int8", 2: "uint16", 3: "int16", 4: "uint32", 5: "int32",
               6: "float32", 7: "bool", 8: "string", 9: "array", 10: "uint64", 11: "int64",
               12: "float64"}
_STRING, _ARRAY, _UINT32, _INT32 = 8, 9, 4, 5
# llama.cpp's T5 tensor names to transformers', applied in order (as ComfyUI-GGUF does).
_T5_NAMES = (("enc.", "encoder."), (".blk.", ".block."), ("token_embd", "shared"),
             ("output_norm", "final_layer_norm"), ("attn_q", "layer.0.SelfAttention.q"),
             ("attn_k", "layer.0.SelfAttention.k"), ("attn_v", "layer.0.SelfAttention.v"),
             ("attn_o", "layer.0.SelfAttention.o"), ("attn_norm", "layer.0.layer_norm"),
             ("attn_rel_b", "layer.0.SelfAttention.relative_attention_bias"),
             ("ffn_up", "layer.1.DenseReluDense.wi_1"), ("ffn_down", "layer.1.DenseReluDense.wo"),
             ("ffn_gate", "layer.1.DenseReluDense.wi_0"), ("ffn_norm", "layer.1.layer_norm"))


class LongArray:
    """A GGUF array too long to be worth decoding here (a tokenizer's vocabulary)."""

    __slots__ = ("count", "type_name")

    def __init__(self, type_name: str, count: int):
        self.type_name, self.count = type_name, count

    def __str__(self) -> str:
        return f"<array of {self.count:,} {self.type_name}>"


class _Header:
    """A cursor over the file's bytes (a read-only map: only the pages read are touched)."""

    def __init__(self, data, size: int, path: str):
        self.data, self.size, self.path, self.pos = data, size, path, 0

    def need(self, n: int, what: str) -> int:
        at = self.pos
        if n < 0 or at + n > self.size:
            raise FormatError(f"the file is truncated: {what} needs bytes {at}..{at + n} but "
                              f"the file has {self.size}", self.path)
        if at + n > MAX_HEADER_SIZE:
            raise UnsafeFileError(f"GGUF header runs past {MAX_HEADER_SIZE // 1_000_000} MB "
                                  f"({what}; a header-size bomb, or a corrupt file)", self.path)
        self.pos = at + n
        return at

    def unpack(self, code: str, what: str):
        size = struct.calcsize("<" + code)
        return struct.unpack_from("<" + code, self.data, self.need(size, what))[0]

    def string(self, what: str, strict: bool) -> str:
        n = self.unpack("Q", what)
        at = self.need(n, what)
        raw = self.data[at:at + n]
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            if strict:
                raise FormatError(f"{what} is not valid UTF-8", self.path) from None
            return raw.decode("utf-8", "surrogateescape")

    def value(self, kind: int, what: str) -> tuple[Any, int | None]:
        """A value of GGUF type ``kind``, and for an array the type of its elements."""
        if kind in _SCALARS:
            return self.unpack(_SCALARS[kind], what), None
        if kind == _STRING:
            return self.string(what, strict=False), None
        if kind != _ARRAY:
            raise FormatError(f"{what} has unknown GGUF value type {kind}", self.path)
        item = self.unpack("I", what)
        count = self.unpack("Q", what)
        if item == _ARRAY or (item not in _SCALARS and item != _STRING):
            raise FormatError(f"{what} is an array of unknown or nested type {item}", self.path)
        if item == _STRING:
            if count * 8 > self.size - self.pos:  # each string costs at least its length
                self.need(count * 8, what)
            if count > MAX_KEPT_ARRAY:  # walked over, not decoded
                for _ in range(count):
                    self.need(self.unpack("Q", what), what)
                return LongArray("string", count), item
            return [self.string(what, strict=False) for _ in range(count)], item
        code = _SCALARS[item]
        at = self.need(count * struct.calcsize(code), what)
        if count > MAX_KEPT_ARRAY:
            return LongArray(_TYPE_NAMES[item], count), item
        return list(struct.unpack_from(f"<{count}{code}", self.data, at)), item


def open_gguf(source: Source, findings: list | None = None) -> Checkpoint:
    """Opens a GGUF file from its header; refuses one that is also a pickle naming code (read
    from its first byte, as torch.load would read a file named ``.ckpt``)."""
    path = source.path
    follow = findings is not None or path.lower().endswith(TORCH_NAMES)
    refuse_what_torch_load_runs(source, findings, "a valid GGUF file", follow=follow)
    if source.size < 24:
        raise FormatError(f"the file has {source.size} bytes, too few for a GGUF header "
                          "(truncated download?)", path)
    mapped = source.read_map()
    try:
        with paused_gc():
            return _parse(_Header(mapped, source.size, path), source)
    finally:
        mapped.close()


def _parse(h: _Header, source: Source) -> Checkpoint:
    path = h.path
    if bytes(h.data[0:4]) != MAGIC:
        raise FormatError("not a GGUF file (no GGUF magic)", path)
    h.pos = 4
    version = h.unpack("I", "the version")
    if version and version & 0xFFFF == 0:
        raise FormatError(f"GGUF version {version:#x} reads as big-endian: ckptkit reads "
                          "little-endian GGUF files only", path)
    if version not in (2, 3):
        raise FormatError(f"GGUF version {version} is not supported (only 2 and 3"
                          f"{'; version 1 is obsolete' if version == 1 else ''})", path)
    n_tensors, n_kv = h.unpack("Q", "the tensor count"), h.unpack("Q", "the key count")
    if n_tensors > MAX_TENSORS:
        raise UnsafeFileError(f"GGUF header lists {n_tensors:,} tensors, over the "
                              f"{MAX_TENSORS:,} ckptkit reads (a tensor-count bomb)", path)
    if n_kv > MAX_KV:
        raise UnsafeFileError(f"GGUF header lists {n_kv:,} metadata keys, over the "
                              f"{MAX_KV:,} ckptkit reads (a key-count bomb)", path)
    kv, kinds = {}, {}
    for i in range(n_kv):
        key = h.string(f"metadata key {i}", strict=True)
        if key in kv:
            raise UnsafeFileError(f"GGUF header names the key {key!r} twice (readers would "
                                  "disagree on which value counts)", path)
        kind = h.unpack("I", f"key {key!r}")
        kv[key], item = h.value(kind, f"key {key!r}")
        kinds[key] = (kind, item)
    alignment = _alignment(kv, kinds, path)
    infos = []
    names: set[str] = set()
    for i in range(n_tensors):
        name = h.string(f"tensor name {i}", strict=True)
        if name in names:
            raise UnsafeFileError(f"GGUF header names the tensor {name!r} twice (readers would "
                                  "disagree on which one counts)", path)
        names.add(name)
        n_dims = h.unpack("I", f"tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise FormatError(f"tensor {name!r} has {n_dims} dimensions (GGUF allows at most "
                              f"{MAX_DIMS})", path)
        dims = [h.unpack("Q", f"tensor {name!r}") for _ in range(n_dims)]
        if any(d >= 1 << 63 for d in dims):
            raise FormatError(f"tensor {name!r} has a negative dimension", path)
        type_id = h.unpack("I", f"tensor {name!r}")
        kind = BY_ID.get(type_id)
        if kind is None:
            raise FormatError(f"tensor {name!r} has unknown GGML type {type_id}", path)
        if dims and dims[0] % kind.block_size:
            raise FormatError(f"tensor {name!r}: rows of {dims[0]} values are not whole "
                              f"{kind.name} blocks of {kind.block_size}", path)
        offset = h.unpack("Q", f"tensor {name!r}")
        infos.append((name, dims, kind, offset))
    data_start = -(-h.pos // alignment) * alignment
    tensors = _tensors(infos, kv, kinds, data_start, alignment, source)
    metadata = {k: _text(v) for k, v in kv.items() if not k.startswith(ORIG_SHAPE)}
    checkpoint = Checkpoint(path=path, format="gguf", tensors=tensors, source=source,
                            metadata=metadata)
    if "general.architecture" not in kv:
        checkpoint.notes.append("no general.architecture key (a stable-diffusion.cpp or older "
                                "converter's file): the model is told from its tensors")
    _rename_t5(checkpoint, kv.get("general.architecture"))
    return checkpoint


def _alignment(kv: dict[str, Any], kinds, path: str) -> int:
    """``general.alignment``: a uint32 power of two, as ggml reads it (it reads no other type)."""
    if "general.alignment" not in kv:
        return DEFAULT_ALIGNMENT
    value = kv["general.alignment"]
    if kinds["general.alignment"][0] != _UINT32:
        raise FormatError("general.alignment is not a uint32", path)
    if value == 0 or value & (value - 1):
        raise FormatError(f"general.alignment {value} is not a power of two", path)
    return value


def _tensors(infos, kv, kinds, data_start: int, alignment: int, source: Source
             ) -> dict[str, LazyTensor]:
    path = source.path
    architecture = kv.get("general.architecture")
    sdxl_compat = architecture is None and any(n.endswith("label_emb.0.0.weight")
                                               for n, *_ in infos)
    plain: list[LazyTensor] = []
    quantized: list[QuantizedTensor] = []
    tensors: dict[str, LazyTensor] = {}
    expected = 0
    for name, dims, kind, offset in infos:
        numel = math.prod(dims)
        nbytes = kind.nbytes(numel)
        if offset != expected:
            raise FormatError(f"tensor {name!r} starts at data byte {offset}, but GGUF puts it "
                              f"at {expected} (right after the previous tensor, padded to "
                              f"{alignment} bytes)", path)
        end = data_start + offset + nbytes
        if end > source.size:
            raise FormatError(f"the file is truncated: tensor {name!r} needs bytes up to {end} "
                              f"but the file has {source.size}", path)
        expected = offset + -(-nbytes // alignment) * alignment
        shape = _shape(name, dims, numel, kv, kinds, sdxl_compat, path)
        begin = data_start + offset
        if not kind.is_quantized:
            dtype = BY_NAME[PLAIN_DTYPES[kind.name]]
            tensor = LazyTensor(source, dtype, shape, begin, nbytes, storage_id=name)
            plain.append(tensor)
        else:
            blocks = LazyTensor(source, BY_NAME["U8"], (nbytes,), begin, nbytes,
                                storage_id=name)
            tensor = QuantizedTensor(source, BY_NAME["F16"], shape, begin, nbytes,
                                     storage_id=name, qtype=kind.name, scheme="gguf",
                                     block_size=kind.block_size, parts={"data": blocks})
            quantized.append(tensor)
        tensors[name] = tensor
    # The last tensor's padding may be left out (ggml maps the file, and reads no further
    # than the tensor); anything after it is refused, as for safetensors.
    if source.size > data_start + expected:
        after = "the last tensor's padding" if infos else "a GGUF header of no tensors"
        raise FormatError(f"{source.size - data_start - expected} bytes follow {after} "
                          "(trailing data is not allowed)", path)
    natural = majority_float(plain, "F16")
    for tensor in quantized:
        tensor.dtype = natural
    return tensors


def _shape(name: str, dims: list[int], numel: int, kv, kinds, sdxl_compat: bool,
           path: str) -> tuple[int, ...]:
    """The torch shape of a tensor, as ComfyUI-GGUF's loader gives it (see the module)."""
    key = ORIG_SHAPE + name
    if key in kv:
        value = kv[key]
        if kinds[key] != (_ARRAY, _INT32) or not isinstance(value, list) or any(
                d < 0 for d in value):
            raise FormatError(f"{key} is not an array of non-negative int32 (ComfyUI-GGUF "
                              "refuses it too)", path)
        if math.prod(value) != numel:
            raise FormatError(f"{key} is {value}, {math.prod(value):,} values, but the tensor "
                              f"holds {numel:,}", path)
        return tuple(value)
    shape = tuple(reversed(dims))
    if sdxl_compat and name.endswith((".proj_in.weight", ".proj_out.weight")):
        while len(shape) > 2 and shape[-1] == 1:
            shape = shape[:-1]
    return shape


def _rename_t5(checkpoint: Checkpoint, architecture: Any) -> None:
    """A T5 encoder's llama.cpp names read as transformers' (ComfyUI-GGUF's map)."""
    if architecture not in ("t5", "t5encoder"):
        return
    renamed = {}
    for name, tensor in checkpoint.tensors.items():
        for old, new in _T5_NAMES:
            name = name.replace(old, new)
        if name in renamed:
            raise FormatError(f"two T5 tensors read as {name!r}", checkpoint.path)
        renamed[name] = tensor
    if list(renamed) != list(checkpoint.tensors):
        checkpoint.tensors = renamed
        checkpoint.notes.append("llama.cpp's T5 tensor names read as transformers' "
                                "(as ComfyUI-GGUF does)")


def _text(value: Any) -> str:
    """A metadata value as the text a safetensors file would hold."""
    if isinstance(value, str):
        return value
    if isinstance(value, LongArray):
        return str(value)
    return json.dumps(value)
