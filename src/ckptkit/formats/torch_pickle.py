"""PyTorch pickle checkpoints (.ckpt/.pt/.pth/.bin), zip and legacy, read without unpickling.

Both containers hold a pickle that describes the object ``torch.save`` was given (usually a
dict with a ``state_dict`` in it) and raw storages that hold tensor bytes. The pickle is run
by ``PickleVM`` with the emulated allow-list of ``torch_globals``, which yields plain records;
this module then finds where each storage's bytes lie in the file, turns tensor records into
lazy tensors (zero-copy, with views, offsets, strides and shared storages kept as stored),
locates the weights inside wrappers (``state_dict``, Lightning's entries) and describes the
rest as extras (see ``locate_weights`` for the rule).
"""

from __future__ import annotations

import contextlib
import math
import struct
import zipfile
import zlib
from typing import Any

from ..errors import FormatError, UnsafeFileError
from .checkpoint import Checkpoint, LazyTensor
from .dtypes import DType
from .pickle_vm import (
    MAX_TEXT,
    REACHING,
    EmulatedClass,
    Finding,
    PickleVM,
    Refused,
    RefusedGlobals,
    Unknown,
    safe_repr,
)
from .source import Source
from .torch_globals import (
    NumpyArray,
    NumpyDType,
    OpaqueObject,
    PickledTensor,
    StorageHandle,
    Token,
    check_amplification,
    find_global,
)
from .torch_zip import TORCHSCRIPT_HINTS, read_torch_zip

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001
# Entries that wrap the weights, in order of preference: torch/Lightning's, then BasicSR's
# (ESRGAN and other upscalers: ``params_ema`` is what their inference loads) and ``net``, as
# the upscaler loaders (spandrel, chaiNNer) unwrap them.
_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state_dict", "params_ema",
                 "params-ema", "params", "net")


class _Storages:
    """persistent_load for one file: one handle per storage key, consistent on every use."""

    def __init__(self, path: str, legacy: bool):
        self.path = path
        self.legacy = legacy
        self.handles: dict[str, StorageHandle] = {}

    def __call__(self, pid: Any) -> StorageHandle | EmulatedClass:
        if (self.legacy and isinstance(pid, tuple) and len(pid) == 4 and pid[0] == "module"
                and isinstance(pid[1], EmulatedClass)):
            # The legacy format names a module's class (a ParameterDict) with its source code,
            # which torch.load only compares with the installed one: the class is what it gives.
            return pid[1]
        if not (isinstance(pid, tuple) and len(pid) == (6 if self.legacy else 5)
                and pid[0] == "storage"):
            raise UnsafeFileError(f"persistent id {safe_repr(pid)} is not a torch storage record")
        _, kind, key, location, numel = pid[:5]
        if self.legacy and pid[5] is not None:
            raise FormatError("storage views of torch < 0.4 files are not supported")
        if not isinstance(kind, Token) or not kind.qualname.endswith("Storage"):
            raise UnsafeFileError(f"storage type {safe_repr(kind)} is not a torch storage class")
        if kind.unsupported:
            raise FormatError(f"{kind.unsupported} tensors are not supported (no safetensors "
                              "type)")
        if not (isinstance(key, str) and isinstance(location, str) and isinstance(numel, int)
                and not isinstance(numel, bool) and numel >= 0):
            raise FormatError("a storage record has a malformed key, location or size")
        handle = StorageHandle(key, kind.dtype, numel, location)
        known = self.handles.setdefault(key, handle)
        if known.nbytes != handle.nbytes:
            raise FormatError(f"storage {key} is declared with two different sizes")
        return known


def _run(data: bytes | memoryview, start: int, where: str, storages: _Storages | None,
         findings: list[Finding] | None = None):
    vm = PickleVM(data, start, find_global=find_global, persistent_load=storages,
                  where=where, findings=findings)
    result = vm.run()
    if findings:
        names = sorted({f.name for f in findings if f.kind == "global"})
        if not names:  # only the pickle's form is refused (protocol 4 or 5)
            raise RefusedGlobals(f"{where} is a pickle ckptkit does not load "
                                 f"({findings[0].name})")
        raise RefusedGlobals(f"{where} asks for {len(names)} global"
                              f"{'s' if len(names) > 1 else ''} outside the allow-list "
                              f"({', '.join(names[:5])}{', ...' if len(names) > 5 else ''})")
    if vm.deferred is not None:
        raise vm.deferred
    return result


def refuse_what_torch_load_runs(source: Source, findings: list[Finding] | None, what: str,
                                refused: bool = False, head: bytes | None = None,
                                follow: bool = True) -> None:
    """Raises ``UnsafeFileError`` if torch.load or pickle.load would meet code in the file
    (``what`` says what ckptkit made of it; ``head``, ``follow``: see ``torch_load_findings``).
    The findings go to ``findings``, after those of ckptkit's own reading (the same opcode is
    not named twice); a file ckptkit already ``refused`` as unsafe is only searched further,
    for a scan to name everything in it."""
    _refuse(source, torch_load_findings(source, head, follow), findings, refused,
            f"{what}, but read from its first byte as torch.load and pickle.load read a "
            "file that is not a ZIP, it")


def refuse_what_torch_zip_runs(source: Source, findings: list[Finding] | None,
                               what: str) -> None:
    """For a ZIP ckptkit refused to read (``what``: why), raises ``UnsafeFileError`` if
    torch.load would still meet code in it: torch's own ZIP reader is laxer than ckptkit's
    (it inflates compressed members, so a re-zipped checkpoint loads). Every ``.pkl``
    member that Python's zipfile can read is read as torch.load reads data.pkl, and a
    TorchScript member (which torch.load hands to torch.jit.load) is a finding of its own;
    the findings go to ``findings``."""
    found = torch_zip_findings(source)
    _refuse(source, found, findings, False,
            f"{what}, but torch.load's own ZIP reader would read it, and it")


def torch_zip_findings(source: Source) -> list[Finding]:
    """The findings of reading each pickle of a ZIP as torch.load does (see above)."""
    found: list[Finding] = []
    try:
        with open(source.path, "rb") as f, zipfile.ZipFile(f) as archive:
            for info in archive.infolist():
                if any(hint in info.filename for hint in TORCHSCRIPT_HINTS):
                    found.append(Finding("call", "torch.jit.load", info.filename, 0,
                                         "a TorchScript member: torch.load runs its code"))
                if not info.filename.endswith(".pkl"):
                    continue
                with archive.open(info) as member:
                    data = member.read(MAX_ZIPPED_PICKLE + 1)
                if len(data) > MAX_ZIPPED_PICKLE:
                    found.append(Finding("limit", f"a pickle of more than {MAX_ZIPPED_PICKLE} "
                                         "bytes", info.filename, 0, "not read: not verified"))
                    continue
                vm = PickleVM(data, 0, find_global=_find_importable,
                              persistent_load=_any_storage, where=info.filename,
                              findings=found)
                with contextlib.suppress(FormatError, UnsafeFileError):
                    vm.run()
    except (OSError, ValueError, EOFError, NotImplementedError, RuntimeError,
            zipfile.BadZipFile, zlib.error):
        pass  # what Python cannot read, torch's reader is taken not to read either
    return found


def _refuse(source: Source, found: list[Finding], findings: list[Finding] | None,
            refused: bool, said: str) -> None:
    reaching = [f for f in found if f.kind in REACHING]
    if not reaching:
        return
    if findings is not None:
        known = {(f.kind, f.name, f.where, f.offset) for f in findings}
        findings.extend(f for f in found if (f.kind, f.name, f.where, f.offset) not in known)
    if refused:
        return
    names = sorted({f.name for f in reaching if f.kind != "limit"})
    limits = [f.name for f in reaching if f.kind == "limit"]
    parts = []
    if names:
        shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
        parts.append(f"names {shown}: loading it that way would run code")
    if limits:
        parts.append(f"goes where this reader does not follow ({limits[0]}): not verified")
    raise UnsafeFileError(f"{said} {'; and '.join(parts)}", source.path)


_WINDOW = 1 << 16
MAX_ZIPPED_PICKLE = 1 << 28


def torch_load_findings(source: Source, head: bytes | None = None,
                        follow: bool = True) -> list[Finding]:
    """What ``torch.load(weights_only=False)`` and ``pickle.load`` would meet in a file that is
    not a ZIP (torch.load reads ZIPs as ZIPs, and an old tar archive as a tar, which
    ``detect_format`` refuses): the pickles they read from its first byte, each read as they
    read it, whatever format ckptkit found there (a safetensors file can be a pickle too).

    ``pickle.load`` reads one pickle. ``torch.load`` reads the same one and compares its value
    with the legacy magic number (its value, however it is spelt), then the protocol version
    (it must be 1001), then the system info, the object (whose persistent ids it resolves)
    and the storage keys; it stops at the first pickle that stops it, as this does. A pickle
    whose STOP lies inside a FRAME leaves the file after STOP or at the frame's end, as the
    file object buffers: both are followed. The findings of kinds in ``REACHING`` are what
    those loads could run.

    The bytes are read from ``head`` (the file's first bytes, already read) or a first window,
    and from the whole file only if a pickle goes past them and ``follow`` is true: a real
    file stops within its first bytes, and headers-first commands read nothing more."""
    if source.size == 0:
        return []
    window = head if head is not None else source.read(0, min(source.size, _WINDOW))
    findings: list[Finding] = []
    if not _follow(memoryview(window), 0, 0, findings, set()) or len(window) >= source.size:
        return findings
    if not follow:
        return findings
    findings = []
    whole = source.read_map()
    try:
        _follow(memoryview(whole), 0, 0, findings, set())
    finally:
        with contextlib.suppress(BufferError):  # a view outlived the parse: it goes with it
            whole.close()
    return findings


_STEPS = (("file", LEGACY_MAGIC), ("protocol-version pickle", LEGACY_PROTOCOL),
          ("sys-info pickle", None), ("data pickle", None), ("storage-keys pickle", None))


def _follow(data: memoryview, step: int, pos: int, findings: list[Finding],
            seen: set[tuple[int, int]]) -> bool:
    """Reads the pickles of torch.load's sequence from ``step`` on; True if one of them ran
    off the end of ``data`` (the rest of the file may say more)."""
    if step == len(_STEPS) or (step, pos) in seen:
        return False
    seen.add((step, pos))
    where, expected = _STEPS[step]
    vm = PickleVM(data, pos, find_global=_find_importable,
                  persistent_load=_any_storage if where == "data pickle" else None,
                  where=where, findings=findings, max_text=MAX_TEXT)
    try:
        value, end = vm.run()
    except (FormatError, UnsafeFileError):
        return vm.exhausted  # torch.load stops here too (or a cap did: a finding of its own)
    if expected is not None and not _may_equal(value, expected):
        return False
    ran_off = [_follow(data, step + 1, after, findings, seen)
               for after in {end, max(end, vm.frame_end)}]
    return any(ran_off)


def _find_importable(module: str, name: str) -> Any:
    """``find_global``, where a name that is not dotted identifiers stops the parse, as
    ``find_class`` stops pickle.load: a text file that opens with ``c`` (``comfyui:`` in
    ComfyUI's ``extra_model_paths.yaml``) reads as a GLOBAL of a module ``omfyui:``, which no
    import can find. (In a checkpoint's own pickles every name outside the allow-list is a
    finding, found or not.)"""
    if not all(part.isidentifier() for part in f"{module}.{name}".split(".")):
        raise FormatError(f"the pickle names {safe_repr(f'{module}.{name}')}, which no import "
                          "can find (pickle.load stops here too)")
    return find_global(module, name)


def _any_storage(pid: Any) -> Any:
    return Unknown("storage")  # torch.load's resolves any storage record the file names


def _may_equal(value: Any, expected: int) -> bool:
    """``value == expected`` as torch.load compares them, where a value the scan did not
    compute (what a refused call returns) might be anything."""
    if isinstance(value, (Refused, Unknown)):
        return True
    return isinstance(value, (int, float)) and value == expected


def open_torch_zip(source: Source, findings: list[Finding] | None = None) -> Checkpoint:
    archive = read_torch_zip(source)
    pkl = archive.members["data.pkl"]
    storages = _Storages(source.path, legacy=False)
    root, end = _run(source.read(pkl.data_offset, pkl.size), 0, "data.pkl", storages,
                     findings)
    if end != pkl.size:
        raise UnsafeFileError(f"data.pkl has {pkl.size - end} bytes after its STOP opcode "
                              "(a second, hidden pickle?)", source.path)
    for key, handle in storages.handles.items():
        member = archive.storage(key)
        if member is None:
            raise UnsafeFileError(f"the pickle references storage {key}, which the archive "
                                  "lacks", source.path)
        if member.size != handle.nbytes:
            raise UnsafeFileError(f"storage {key} holds {member.size} bytes but its record "
                                  f"declares {handle.nbytes}", source.path)
        handle.file_offset = member.data_offset
    checkpoint = _checkpoint(source, "torch-zip", root)
    checkpoint.container = archive
    return checkpoint


def open_torch_legacy(source: Source, findings: list[Finding] | None = None) -> Checkpoint:
    """The pre-1.6 format: five pickles (magic, protocol, sys info, object, storage keys),
    then each storage as an 8-byte element count and its bytes, ending exactly at EOF."""
    path = source.path
    # Legacy files have no index: each pickle ends where its STOP opcode is, so they are
    # parsed in place from the copy-on-write map, which reads only the pages they touch.
    data = memoryview(source.mmap())
    magic, pos = _run(data, 0, "magic-number pickle", None, findings)
    if magic != LEGACY_MAGIC:
        raise FormatError("a pickle, but not a torch checkpoint (wrong magic number)", path)
    protocol, pos = _run(data, pos, "protocol-version pickle", None, findings)
    if protocol != LEGACY_PROTOCOL:
        raise FormatError(f"legacy torch protocol {protocol!r} is not supported", path)
    sys_info, pos = _run(data, pos, "sys-info pickle", None, findings)
    if not isinstance(sys_info, dict) or sys_info.get("little_endian") is not True:
        raise FormatError("the checkpoint was saved big-endian or without system info", path)
    storages = _Storages(path, legacy=True)
    root, pos = _run(data, pos, "data pickle", storages, findings)
    keys, pos = _run(data, pos, "storage-keys pickle", None, findings)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise FormatError("the storage key list is not a list of strings", path)
    if len(set(keys)) != len(keys) or set(keys) != set(storages.handles):
        raise FormatError("the storage key list does not match the storages the data uses",
                          path)
    for key in keys:
        handle = storages.handles[key]
        (count,) = struct.unpack("<q", source.read(pos, 8))
        if count != handle.numel:
            raise UnsafeFileError(f"storage {key} holds {count} elements but its record "
                                  f"declares {handle.numel}", path)
        handle.file_offset = pos + 8
        pos += 8 + handle.nbytes
    if pos != source.size:
        if pos > source.size:
            raise FormatError(f"the file is truncated: its storages need {pos} bytes but the "
                              f"file has {source.size}", path)
        raise UnsafeFileError(f"{source.size - pos} bytes follow the last storage (hidden data "
                              "a scanner would miss)", path)
    return _checkpoint(source, "torch-legacy", root)


def _checkpoint(source: Source, fmt: str, root: Any) -> Checkpoint:
    weights, weights_at, extras, nested = locate_weights(root)
    check_amplification(weights.values(), source.size)
    tensors = {key: _lazy(source, value) for key, value in weights.items()}
    notes = []
    if nested:
        shown = ", ".join(f"{name}.*" for name in nested[:4]) + (", ..." if nested[4:] else "")
        entries = f"{len(nested)} entr{'ies' if len(nested) > 1 else 'y'}"
        notes.append(f"the tensors nested in {entries} of {weights_at or 'the top level'} are "
                     f"kept as weights under dotted names: {shown}")
    return Checkpoint(path=source.path, format=fmt, tensors=tensors, source=source,
                      extras=extras, weights_at=weights_at, notes=notes)


def _lazy(source: Source, record: PickledTensor) -> LazyTensor:
    handle = record.storage
    return LazyTensor(source, record.dtype, record.shape, handle.file_offset, handle.nbytes,
                      storage_offset=record.offset, strides=record.stride,
                      storage_id=handle.key)


def _is_weights(node: dict) -> bool:
    return any(isinstance(v, PickledTensor) for v in node.values())


_CONTAINERS = (dict, list, tuple, set, frozenset)
# Nested weights are named by their dotted path: a hostile chain of dicts sharing one long key
# would make the names grow with the square of the depth. Deeper or longer, an entry is an
# extra (described, its tensors counted), not a weight. Real files nest two or three levels.
MAX_NAME_DEPTH = 64
MAX_NAME_LENGTH = 1024


def _tensor_holders(root: Any) -> set[int]:
    """The ids of the containers from which a tensor can be reached, found in one pass over
    the object graph (which a pickle's memo can make cyclic, or a DAG exponentially wide if
    walked as a tree)."""
    parents: dict[int, list[int]] = {}
    holders: set[int] = set()
    stack, seen = [root], {id(root)}
    while stack:
        item = stack.pop()
        for child in item.values() if isinstance(item, dict) else item:
            if isinstance(child, PickledTensor):
                holders.add(id(item))
            elif isinstance(child, _CONTAINERS):
                parents.setdefault(id(child), []).append(id(item))
                if id(child) not in seen:
                    seen.add(id(child))
                    stack.append(child)
    todo = list(holders)
    while todo:
        for parent in parents.get(todo.pop(), ()):
            if parent not in holders:
                holders.add(parent)
                todo.append(parent)
    return holders


def _label(key: Any) -> str:
    return key if isinstance(key, str) else safe_repr(key)


def _kind(value: Any) -> str:
    """What a pickled object is, in a user's words (never one of our record classes)."""
    if isinstance(value, PickledTensor):
        return "single tensor"
    if isinstance(value, StorageHandle):
        return "bare storage"
    if isinstance(value, OpaqueObject):
        return f"{value.qualname} object"
    if isinstance(value, (NumpyArray, NumpyDType)):
        return str(value)
    if value is None:
        return "None"
    return type(value).__name__


def locate_weights(root: Any) -> tuple[dict[str, PickledTensor], str, dict[str, Any],
                                        list[str]]:
    """Finds the weights in a pickle's object; returns them by key, their path, the rest and
    the entries of the weights' node whose nested tensors were taken.

    The rule: from the root, while a dict holds no tensor itself, descend into its wrapper:
    the first of ``_WRAPPER_KEYS`` whose dict holds tensors, else its only entry if that is a
    dict. That dict is the weights' node (``weights_at`` its dotted path); its other siblings
    on the way are extras. In the weights' node, every tensor reachable through dicts with
    string keys is a weight, named by its dotted path (``string_to_param.*`` of a textual
    inversion embedding; ``state_dict.*`` beside tensors at the top level): weights are never
    dropped because of how they were nested. Everything else (scalars, lists, entries with
    non-string keys, a name taken twice, a dict met a second time) is an extra, described by
    ``describe``, which counts the tensors a container holds so that none goes unlisted.
    """
    extras: dict[str, Any] = {}
    path: list[str] = []
    node = root
    if not isinstance(node, dict):
        raise FormatError(f"the checkpoint holds a {_kind(node)}, not a dict of tensors")
    holders = _tensor_holders(root)
    counter = _Counter()
    seen = {id(node)}
    while not _is_weights(node):
        inner = next((k for k in _WRAPPER_KEYS if isinstance(node.get(k), dict)
                      and id(node[k]) in holders), None)
        if inner is None and len(node) == 1:
            only = next(iter(node))
            inner = only if isinstance(node[only], dict) else None
        if inner is None:
            break
        if len(path) >= MAX_NAME_DEPTH:
            raise FormatError(f"the weights are wrapped more than {MAX_NAME_DEPTH} levels deep")
        label = _label(inner)
        if id(node[inner]) in seen:
            raise FormatError(f"the entry {label!r} contains itself (a cyclic wrapper)")
        prefix = ".".join(path)
        for key, value in node.items():
            if key != inner:
                extras[f"{prefix + '.' if prefix else ''}{_label(key)}"] = describe(
                    value, counter=counter)
        path.append(label)
        node = node[inner]
        seen.add(id(node))
    weights_at = ".".join(path)
    outer = f"{weights_at}." if weights_at else ""
    weights: dict[str, PickledTensor] = {}
    nested: list[str] = []
    # Depth first, in the file's order. Each item: its dotted name, its value, whether its
    # key was a string (else it can only be an extra) and whether it is the node's own entry.
    # Each dict is expanded once: one met again (shared, or containing itself) is an extra.
    expanded = set(seen)
    stack: list[tuple[str, Any, bool, bool]] = [
        (_label(k), v, isinstance(k, str), True) for k, v in reversed(node.items())]
    while stack:
        name, value, named, top = stack.pop()
        if named and isinstance(value, PickledTensor) and name not in weights:
            weights[name] = value
        elif (named and isinstance(value, dict) and id(value) in holders
              and id(value) not in expanded and name.count(".") < MAX_NAME_DEPTH
              and len(name) <= MAX_NAME_LENGTH):
            expanded.add(id(value))
            if top:
                nested.append(name)
            stack.extend((f"{name}.{_label(k)}", v, isinstance(k, str), False)
                         for k, v in reversed(value.items()))
        else:
            extras[outer + name] = describe(value, counter=counter)
    return weights, weights_at, extras, nested


class Summary(str):
    """A description standing in for an entry too big or too odd to show as it is;
    ``tensors`` and ``tensor_bytes`` count the tensors the entry holds (0 for most)."""

    tensors: int = 0
    tensor_bytes: int = 0


def _holding(text: str, count: int, nbytes: int) -> Summary:
    summary = Summary(text)
    summary.tensors, summary.tensor_bytes = count, nbytes
    return summary


def describe(value: Any, depth: int = 0, counter: _Counter | None = None) -> Any:
    """A JSON-friendly summary of a non-weight entry: scalars as they are, containers counted
    (``counter``: shared by the entries of one file)."""
    counter = counter or _Counter()
    if isinstance(value, PickledTensor):
        return _holding(f"tensor {value.dtype} {list(value.shape)}", 1,
                        _nbytes(value.dtype, value.shape))
    if isinstance(value, float) and not math.isfinite(value):
        return Summary(repr(value))  # JSON has no inf or nan
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if isinstance(value, str):
        return value if len(value) <= 200 else Summary(value[:197] + "...")
    if isinstance(value, bytes):
        return Summary(f"{len(value)} bytes")
    if isinstance(value, OpaqueObject):
        return Summary(f"<{value.qualname}>")
    if isinstance(value, StorageHandle):
        return Summary(f"storage of {value.nbytes} bytes")
    if isinstance(value, NumpyArray):
        return Summary(str(value))
    if isinstance(value, NumpyDType):
        return Summary(f"numpy dtype {value}")
    if isinstance(value, _CONTAINERS):
        count, nbytes, complete = counter.count(value)
        kind = type(value).__name__ if not isinstance(value, dict) else "dict"
        text = f"{kind} of {len(value)}"
        if count:
            text += (f" holding {'at least ' if not complete else ''}{count} "
                     f"tensor{'s' if count > 1 else ''} ({nbytes} bytes)")
        if not complete:
            text += " (too entangled to count all its tensors)"
        if depth == 0 and isinstance(value, (list, tuple)) and not count and len(value) <= 8:
            return [describe(v, depth + 1, counter) for v in value]
        if depth == 0 and isinstance(value, dict) and not count and len(value) <= 16:
            return {str(k): describe(v, depth + 1, counter) for k, v in value.items()}
        return _holding(text, count, nbytes)
    return Summary(f"<{type(value).__name__}>")


class _Counter:
    """Counts the tensors each described entry holds, within one budget of items walked for
    the whole file: a hostile pickle can point thousands of entries at one big container,
    and walking it anew for each would take their product (10,000 entries sharing a list of
    10,000 took 20 s). An entry met again is counted from memory; past the budget, counts
    stop and the description says so."""

    BUDGET = 1 << 21

    def __init__(self) -> None:
        self.left = self.BUDGET
        self.known: dict[int, tuple[int, int, bool]] = {}

    def count(self, value: Any) -> tuple[int, int, bool]:
        """(tensors, their bytes, whether every item was walked)."""
        if id(value) not in self.known:
            self.known[id(value)] = _count_tensors(value, self)
        return self.known[id(value)]


def _count_tensors(value: Any, counter: _Counter) -> tuple[int, int, bool]:
    count, nbytes, stack, seen = 0, 0, [value], set()
    while stack:
        if counter.left <= 0:
            return count, nbytes, False
        counter.left -= 1
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, PickledTensor):
            count += 1
            nbytes += _nbytes(item.dtype, item.shape)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
    return count, nbytes, True


def _nbytes(dtype: DType, shape: tuple[int, ...]) -> int:
    numel = 1
    for dim in shape:
        numel *= dim
    return max(dtype.nbytes(numel), 0)
