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
from collections.abc import Iterator
from json.decoder import scanstring
from operator import attrgetter
from typing import Any

from ..errors import FormatError, UnsafeFileError
from .checkpoint import Checkpoint, LazyTensor, checked_shape, paused_gc
from .dtypes import BY_NAME
from .sniff import EXTENSIONS, TORCH_LEGACY
from .source import Source
from .torch_pickle import refuse_what_torch_load_runs

MAX_HEADER_SIZE = 100_000_000
# The largest checkpoints hold a few thousand tensors (SDXL with its EMA copies: about 5,000).
# A header of more is a tensor-count bomb: each entry costs Python objects in every command,
# and 1.6 million empty ones within the 100 MB cap took minutes to convert.
MAX_TENSORS = 250_000
METADATA_KEY = "__metadata__"
TORCH_NAMES = EXTENSIONS[TORCH_LEGACY]  # what users torch.load
# A JSON escape such as \ud800 that is not half of a surrogate pair decodes, in Python, to a
# lone surrogate: text no UTF-8 writer can encode. The reference reader refuses the header.
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")  # no such escape, no surrogate: skip the walk


class _Duplicate(ValueError):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result = dict(pairs)  # in C: this hook runs once per tensor entry
    if len(result) != len(pairs):
        seen: set[str] = set()
        raise _Duplicate(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


# The punctuation of the top-level object, with JSON's whitespace around it: group 1 is the
# closing brace (and the whitespace after it), else the match ends where a name must start.
_OPENING = re.compile(r"\{[ \t\n\r]*(\}[ \t\n\r]*)?")
_COLON = re.compile(r"[ \t\n\r]*:[ \t\n\r]*")
_AFTER_VALUE = re.compile(r"[ \t\n\r]*(?:,[ \t\n\r]*|(\}[ \t\n\r]*))")


def decode_header(raw: bytes | bytearray | memoryview, path: str
                  ) -> Iterator[tuple[str, Any]]:
    """The header JSON object's (name, value) pairs in file order, each value decoded as it is
    reached, or a ``FormatError`` that says why the header is not such an object.

    One entry at a time, so that the caller can keep what an entry says and drop its decoded
    JSON: a 93 MB header of 1.6 million entries held whole took 1.3 GB before one tensor was
    made. The object itself is parsed here by JSON's grammar (``json.decoder`` reads each
    name and value, duplicates refused at every level), so it accepts exactly what
    ``json.loads`` would."""
    try:
        text = str(raw, "utf-8")
    except UnicodeDecodeError:
        raise FormatError("safetensors header is not valid UTF-8", path) from None
    del raw
    surrogates = _SURROGATE_ESCAPE.search(text) is not None
    if not text.startswith("{"):
        raise FormatError("safetensors header does not start with '{' (not a safetensors "
                          "file, or a corrupt one)", path)
    decoder = json.JSONDecoder(object_pairs_hook=_no_duplicates,
                               parse_constant=_refuse_constant)
    scan = decoder.scan_once  # one JSON value at an offset, in C
    names: set[str] = set()
    try:
        after = _OPENING.match(text)
        while after.group(1) is None:  # not the closing brace yet
            at = after.end()
            if not text.startswith('"', at):
                raise json.JSONDecodeError("Expecting property name enclosed in double quotes",
                                           text, at)
            name, at = scanstring(text, at + 1)
            colon = _COLON.match(text, at)
            if colon is None:
                raise json.JSONDecodeError("Expecting ':' delimiter", text, at)
            try:
                value, at = scan(text, colon.end())
            except StopIteration as stop:
                raise json.JSONDecodeError("Expecting value", text, stop.value) from None
            if name in names:
                raise _Duplicate(name)
            names.add(name)
            if surrogates and _holds_lone_surrogate((name, value)):
                raise FormatError("safetensors header is not valid JSON (an escaped lone "
                                  "surrogate, such as \\ud800, in a string; the safetensors "
                                  "library refuses it)", path)
            yield name, value
            after = _AFTER_VALUE.match(text, at)
            if after is None:
                raise json.JSONDecodeError("Expecting ',' delimiter", text, at)
        if after.end() != len(text):
            raise json.JSONDecodeError("Extra data", text, after.end())
    except _Duplicate as dup:
        raise UnsafeFileError(f"safetensors header names {str(dup)!r} twice (readers would "
                              "disagree on which entry counts)", path) from None
    except (ValueError, RecursionError) as exc:
        raise FormatError(f"safetensors header is not valid JSON ({exc})", path) from None


def _holds_lone_surrogate(entry: tuple[str, Any]) -> bool:
    """Whether any string of a decoded header entry (its name, or a key or a value at any
    depth) holds a lone surrogate; walked without recursion, each value once."""
    stack: list[Any] = list(entry)
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
    # Runs once per tensor: the messages (and the name's repr in them) are built only for
    # an entry that breaks a rule. JSON gives no int subclass but bool, hence ``type() is``.
    if not isinstance(info, dict):
        raise FormatError(f"tensor {name!r}: header entry is not an object", path)
    try:
        dtype_name, dims, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except KeyError:
        missing = [f for f in ("dtype", "shape", "data_offsets") if f not in info]
        raise FormatError(f"tensor {name!r}: header entry lacks {', '.join(missing)}",
                          path) from None
    dtype = BY_NAME.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise FormatError(f"tensor {name!r}: unknown dtype {dtype_name!r}", path)
    if type(dims) is list and all(type(d) is int and d >= 0 for d in dims):
        shape = tuple(dims)
    else:
        shape = checked_shape(dims, f"tensor {name!r}", path)  # says what is wrong
    if not (type(offsets) is list and len(offsets) == 2 and type(offsets[0]) is int
            and type(offsets[1]) is int and offsets[0] >= 0 and offsets[1] >= 0):
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
    head = prefix + source.read(8, n)  # read as a pickle too, then as the JSON it should be
    follow = findings is not None or path.lower().endswith(TORCH_NAMES)
    refuse_what_torch_load_runs(source, findings, "a valid safetensors file", head=head,
                                follow=follow)
    data_start = 8 + n
    data_size = source.size - data_start
    metadata: dict[str, str] = {}
    tensors: dict[str, LazyTensor] = {}
    shapes: dict[tuple[int, ...], tuple[int, ...]] = {}  # one tuple per distinct shape
    with paused_gc():  # millions of small acyclic objects: nothing for the collector to find
        for name, info in decode_header(memoryview(head)[8:], path):
            if name == METADATA_KEY:
                metadata = _metadata(info, path)
                continue
            if len(tensors) == MAX_TENSORS:
                raise UnsafeFileError(f"safetensors header lists more than {MAX_TENSORS:,} "
                                      "tensors (a tensor-count bomb: no model holds a tenth "
                                      "of that)", path)
            dtype, shape, begin, end = _entry(name, info, path)
            tensors[name] = LazyTensor(source, dtype, shapes.setdefault(shape, shape),
                                       data_start + begin, end - begin, storage_id=name)
        # By (begin, end): two stable sorts on one key each keep memory to the list itself.
        ordered = sorted(tensors.values(), key=attrgetter("storage_nbytes"))
        ordered.sort(key=attrgetter("byte_offset"))
    position = 0
    for tensor in ordered:
        name, begin = tensor.storage_id, tensor.byte_offset - data_start
        if begin > position:
            raise FormatError(f"tensor {name!r} starts at data byte {begin} but the previous "
                              f"tensor ends at {position} (a gap)", path)
        if begin < position:
            raise UnsafeFileError(f"tensor {name!r} starts at data byte {begin}, inside the "
                                  f"previous tensor (ends at {position}): overlapping tensors",
                                  path)
        position = begin + tensor.storage_nbytes
    if position != data_size:
        if position > data_size:
            raise FormatError(f"the file is truncated: tensors need {position} data bytes "
                              f"but only {data_size} are present", path)
        raise FormatError(f"{data_size - position} bytes follow the last tensor (trailing "
                          "data is not allowed)", path)
    return Checkpoint(path=path, format="safetensors", tensors=tensors, source=source,
                      metadata=metadata)
