"""safetensors reader: the header checked by the rules of the reference implementation.

The file is an 8-byte little-endian header length, a UTF-8 JSON object mapping each tensor
name to its dtype, shape and byte range in the data section, and the data section. A header
that the reference library would refuse is refused here too, with a sentence saying what is
wrong, so that a file ckptkit accepts is one every other tool reads the same way: offsets must
tile the data section exactly (no gaps, overlaps or trailing bytes), each range must hold
exactly numel x dtype-size bytes, and ``__metadata__`` maps strings to strings.
"""

from __future__ import annotations

import json
import math
import re
import struct
from typing import Any

from ..errors import FormatError, UnsafeFileError
from .checkpoint import Checkpoint, LazyTensor, checked_shape
from .dtypes import BY_NAME
from .source import Source
from .torch_pickle import refuse_what_torch_load_runs

MAX_HEADER_SIZE = 100_000_000
METADATA_KEY = "__metadata__"
TORCH_NAMES = (".ckpt", ".pt", ".pth", ".bin")  # what users torch.load
# A JSON escape such as \ud800 that is not half of a surrogate pair decodes, in Python, to a
# lone surrogate: text no UTF-8 writer can encode. The reference reader refuses the header.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # no such escape, no surrogate: skip the walk


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _Duplicate(key)
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


def decode_header(raw: bytes, path: str) -> dict[str, Any]:
    """The header JSON as a dict, or a ``FormatError`` that says why it is not one."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FormatError("safetensors header is not valid UTF-8", path) from None
    if not text.startswith("{"):
        raise FormatError("safetensors header does not start with '{' (not a safetensors "
                          "file, or a corrupt one)", path)
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates,
                            parse_constant=_refuse_constant)
    except _Duplicate as dup:
        raise UnsafeFileError(f"safetensors header names {str(dup)!r} twice (readers would "
                              "disagree on which entry counts)", path) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"safetensors header is not valid JSON ({exc})", path) from None
    if not isinstance(header, dict):
        raise FormatError("safetensors header is not a JSON object", path)
    if _SURROGATE_ESCAPE.search(text) and _holds_lone_surrogate(header):
        raise FormatError("safetensors header is not valid JSON (an escaped lone surrogate, "
                          "such as \\ud800, in a string; the safetensors library refuses it)",
                          path)
    return header


def _holds_lone_surrogate(header: dict[str, Any]) -> bool:
    """Whether any string of the decoded header (a key or a value, at any depth) holds a
    lone surrogate; walked without recursion, each value once."""
    stack: list[Any] = [header]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if _LONE_SURROGATE.search(item):
                return True
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


def _metadata(value: Any, path: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise FormatError("safetensors __metadata__ must map strings to strings", path)
    return value


def _entry(name: str, info: Any, path: str) -> tuple[Any, tuple[int, ...], int, int]:
    if not isinstance(info, dict):
        raise FormatError(f"tensor {name!r}: header entry is not an object", path)
    missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
    if missing:
        raise FormatError(f"tensor {name!r}: header entry lacks {', '.join(missing)}", path)
    dtype = BY_NAME.get(info["dtype"]) if isinstance(info["dtype"], str) else None
    if dtype is None:
        raise FormatError(f"tensor {name!r}: unknown dtype {info['dtype']!r}", path)
    shape = checked_shape(info["shape"], f"tensor {name!r}", path)
    offsets = info["data_offsets"]
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(
            isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise FormatError(f"tensor {name!r}: data_offsets {offsets!r} are not two "
                          "non-negative integers", path)
    begin, end = offsets
    if begin > end:
        raise FormatError(f"tensor {name!r}: data_offsets end before they begin", path)
    expected = dtype.nbytes(math.prod(shape))
    if expected != end - begin:
        raise FormatError(f"tensor {name!r}: {end - begin} bytes stored but shape "
                          f"{list(shape)} of {dtype} needs {expected}", path)
    return dtype, shape, begin, end


def open_safetensors(source: Source, findings: list | None = None) -> Checkpoint:
    """Opens a safetensors file, and refuses one that is also a pickle naming code.

    The format cannot name code, but its first bytes can be a pickle's too (a polyglot): the
    low byte of the header's length is read as an opcode by torch.load, which unpickles any
    file not named ``.safetensors``, and by pickle.load. The header's bytes, already read, are
    read as a pickle too; where that pickle goes past them, the rest of the file is followed
    when scanning (``findings`` given) or when the file has a name users torch.load
    (``.ckpt``, ``.pt``...). A ``.safetensors`` file is read as safetensors by torch.load and
    every tool: reading its tensor data to follow a pickle would break headers-first for
    nothing."""
    path = source.path
    if source.size < 8:
        raise FormatError(f"the file has {source.size} bytes, too few for a safetensors header "
                          "(truncated download?)", path)
    prefix = source.read(0, 8)
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER_SIZE:
        raise UnsafeFileError(f"safetensors header claims {n} bytes, over the 100 MB limit (a "
                              "header-size bomb, or not a safetensors file)", path)
    if 8 + n > source.size:
        raise FormatError(f"the file is truncated: its header needs {8 + n} bytes but the file "
                          f"has {source.size}", path)
    raw = bytes(source.read(8, n))
    header = decode_header(raw, path)
    metadata = _metadata(header.pop(METADATA_KEY, None), path)
    data_start = 8 + n
    data_size = source.size - data_start
    entries = []
    for name, info in header.items():
        entries.append((name, *_entry(name, info, path)))
    position = 0
    for name, _dtype, _shape, begin, end in sorted(entries, key=lambda e: (e[3], e[4])):
        if begin > position:
            raise FormatError(f"tensor {name!r} starts at data byte {begin} but the previous "
                              f"tensor ends at {position} (a gap)", path)
        if begin < position:
            raise UnsafeFileError(f"tensor {name!r} starts at data byte {begin}, inside the "
                                  f"previous tensor (ends at {position}): overlapping tensors",
                                  path)
        position = end
    if position != data_size:
        if position > data_size:
            raise FormatError(f"the file is truncated: tensors need {position} data bytes "
                              f"but only {data_size} are present", path)
        raise FormatError(f"{data_size - position} bytes follow the last tensor (trailing "
                          "data is not allowed)", path)
    follow = findings is not None or path.lower().endswith(TORCH_NAMES)
    refuse_what_torch_load_runs(source, findings, "a valid safetensors file",
                                head=bytes(prefix) + raw, follow=follow)
    tensors = {
        name: LazyTensor(source, dtype, shape, data_start + begin, end - begin, storage_id=name)
        for name, dtype, shape, begin, end in entries
    }
    return Checkpoint(path=path, format="safetensors", tensors=tensors, source=source,
                      metadata=metadata)
