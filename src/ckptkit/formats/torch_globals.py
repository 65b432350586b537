"""The allow-list of globals a torch checkpoint may name, each emulated, never imported.

A ``torch.save`` file names a handful of functions and classes (the tensor rebuilders, typed
storages, dtypes, OrderedDict, ``_codecs.encode`` for bytes, ``set``) plus, in Lightning
checkpoints, numpy scalars and arrays, ``argparse.Namespace`` hyper-parameters and callback
classes, and in the original textual-inversion embeddings a ``ParameterDict``: the globals
AUTOMATIC1111's restricted loader accepts. Each is mapped here to a small function that builds
a plain record from the arguments: ``_rebuild_tensor_v2`` makes a ``PickledTensor`` that says
where the tensor's bytes are, it does not make a tensor; a numpy array becomes a
``NumpyArray`` that keeps only its dtype and shape. Every other name is refused, so a file that
names one of these beside anything executable is refused as a whole.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import FormatError, UnsafeFileError
from .dtypes import BY_TORCH_NAME, STORAGE_CLASSES, DType
from .pickle_vm import Buildable, Emulated, EmulatedClass, PickledDict


@dataclass(frozen=True)
class Token:
    """A class or constant the file names but only uses as a value (a dtype, a storage type).

    ``unsupported`` names a real torch type that has no safetensors counterpart: the file is
    data (scanning it is fine), but its tensors of that type cannot be read."""

    qualname: str
    dtype: DType | None = None
    unsupported: str | None = None


@dataclass(eq=False)
class StorageHandle:
    """One storage record of the archive: ``numel`` elements of ``dtype`` (bytes if untyped)."""

    key: str
    dtype: DType | None
    numel: int
    location: str
    file_offset: int = -1  # filled in by the container reader once it knows where the bytes are

    @property
    def nbytes(self) -> int:
        return self.numel if self.dtype is None else self.dtype.nbytes(self.numel)


@dataclass(eq=False)
class PickledTensor:
    """A tensor as the pickle describes it: a strided window into a storage."""

    storage: StorageHandle
    dtype: DType
    offset: int  # in elements of dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]


@dataclass(eq=False)
class OpaqueObject:
    """An allow-listed class used as data (Lightning's ModelCheckpoint as a dict key)."""

    qualname: str


class NumpyDType(Buildable):
    """``numpy.dtype(str)`` with its byte order from the BUILD state, enough to read scalars."""

    _FORMATS: ClassVar[dict[str, str]] = {
        "f2": "e", "f4": "f", "f8": "d", "i1": "b", "i2": "h", "i4": "i", "i8": "q",
        "u1": "B", "u2": "H", "u4": "I", "u8": "Q", "b1": "?"}

    def __init__(self, spec: str):
        if spec not in self._FORMATS:
            raise FormatError(f"numpy dtype {spec!r} is not a plain number type")
        self.spec = spec
        self.order = "<"

    def build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) >= 2 and state[1] in ("<", ">", "|", "=")):
            raise FormatError("numpy dtype state is not the tuple numpy writes")
        self.order = "<" if state[1] in ("|", "=") else state[1]

    def decode(self, raw: bytes) -> int | float | bool:
        return struct.unpack(self.order + self._FORMATS[self.spec], raw)[0]

    @property
    def itemsize(self) -> int:
        return struct.calcsize(self._FORMATS[self.spec])

    def __str__(self) -> str:
        kind = {"f": "float", "i": "int", "u": "uint", "b": "bool"}[self.spec[0]]
        return "bool" if kind == "bool" else f"{kind}{8 * self.itemsize}"


class NumpyArray(Buildable):
    """A numpy array of a plain number type, as ``numpy.core.multiarray._reconstruct`` and the
    BUILD after it make one: its dtype and shape are kept, its bytes (inline in the pickle,
    not in a storage) only counted, so it is described among the extras, never a weight."""

    def __init__(self) -> None:
        self.dtype: NumpyDType | None = None
        self.shape: tuple[int, ...] = ()

    def build(self, state: Any) -> None:
        if not (isinstance(state, tuple) and len(state) == 5):
            raise FormatError("numpy array state is not the tuple numpy writes")
        _version, shape, dtype, _fortran, raw = state
        shape = _check_ints(shape, "numpy array shape")
        if not isinstance(dtype, NumpyDType) or not isinstance(raw, bytes):
            raise FormatError("numpy array without a plain dtype and its bytes (an object "
                              "array holds Python objects, not numbers)")
        if len(raw) != math.prod(shape) * dtype.itemsize:
            raise FormatError(f"numpy array of shape {list(shape)} and dtype {dtype} holds "
                              f"{len(raw)} bytes")
        self.dtype, self.shape = dtype, shape

    def __str__(self) -> str:
        if self.dtype is None:
            return "numpy array without its state"
        return f"numpy array {self.dtype} {list(self.shape)}"


class PickledNamespace(PickledDict):
    """``argparse.Namespace`` (Lightning's hyper-parameters): its attributes as a dict."""

    def build(self, state: Any) -> None:
        if not (isinstance(state, dict) and all(isinstance(k, str) for k in state)):
            raise FormatError("argparse.Namespace state is not a dict of attribute names")
        self.update(state)


class PickledParameterDict(PickledDict):
    """``torch.nn.ParameterDict`` (the original textual-inversion embeddings'
    ``string_to_param``): the module's ``_parameters``, as a dict of tensors. The rest of a
    module's state (hook tables, flags) is data the pickle already built, and is left out."""

    def build(self, state: Any) -> None:
        parameters = state.get("_parameters") if isinstance(state, dict) else None
        if not isinstance(parameters, dict):
            raise FormatError("ParameterDict state has no _parameters dict")
        self.update(parameters)


# Tensors and numpy arrays have at most 64 dimensions (numpy's own limit; real checkpoints use
# up to 5) of at most 2**63 - 1 elements (torch's int64 sizes): a shape of thousands of huge
# dimensions would make their product take seconds, and its message unprintable.
MAX_DIMS = 64


def _check_ints(values: Any, what: str) -> tuple[int, ...]:
    if isinstance(values, tuple) and len(values) > MAX_DIMS:
        raise FormatError(f"{what} has {len(values)} dimensions, more than {MAX_DIMS}")
    if not isinstance(values, tuple) or not all(
            isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 1 << 63
            for v in values):
        raise FormatError(f"{what} is not a tuple of non-negative 64-bit integers")
    return values


def _tensor(storage: Any, offset: Any, size: Any, stride: Any,
            dtype: DType | None) -> PickledTensor:
    if not isinstance(storage, StorageHandle):
        raise FormatError("a tensor is rebuilt from something that is not a storage record")
    dtype = dtype or storage.dtype
    if dtype is None:
        raise FormatError("a tensor over an untyped storage has no dtype")
    shape = _check_ints(tuple(size), "tensor size")
    strides = _check_ints(tuple(stride), "tensor stride")
    if len(shape) != len(strides):
        raise FormatError("tensor size and stride have different lengths")
    if not isinstance(offset, int) or offset < 0:
        raise FormatError("tensor storage offset is not a non-negative integer")
    numel = 1
    for dim in shape:
        numel *= dim
    item = dtype.bits // 8
    if item == 0:
        raise FormatError(f"{dtype} tensors cannot be read from a torch pickle")
    if numel * item > max(storage.nbytes, MAX_REPEATED):
        raise UnsafeFileError(f"a tensor of {numel * item} bytes expands a storage of "
                              f"{storage.nbytes} bytes (repeated elements: a memory bomb)")
    if numel:
        last = offset + sum((d - 1) * s for d, s in zip(shape, strides, strict=True))
        if (last + 1) * item > storage.nbytes:
            raise UnsafeFileError(f"tensor of shape {list(shape)} reaches past the end of "
                                  f"storage {storage.key} ({storage.nbytes} bytes)")
    return PickledTensor(storage, dtype, offset, shape, strides)


# A view may repeat its storage's elements (stride 0, overlapping windows): each view up to this
# many bytes, or its storage's size if larger, and all the weights of a file together up to
# ``AMPLIFICATION`` times the file's size or ``MAX_REPEATED_TOTAL`` bytes if larger. Real files
# stay far below: their views partition their storages, and tied weights (one tensor under two
# names) at most double a part of them.
MAX_REPEATED = 1 << 24
MAX_REPEATED_TOTAL = 1 << 26
AMPLIFICATION = 4


def check_amplification(tensors: Iterable[PickledTensor], file_size: int) -> None:
    """Refuses weights that, written out tensor by tensor (as every command that writes does),
    would take far more bytes than the whole file: many views repeating the same few stored
    bytes, each within the per-view cap, make a 9 KB file write a gigabyte. Checked from the
    pickle alone, before anything is read or written."""
    total = sum(t.dtype.nbytes(math.prod(t.shape)) for t in tensors)
    if total > max(AMPLIFICATION * file_size, MAX_REPEATED_TOTAL):
        raise UnsafeFileError(f"its tensors written out would take {total:,} bytes, more than "
                              f"{AMPLIFICATION} times the file's {file_size:,} (views repeating "
                              "the same stored bytes: an amplification bomb)")


def _rebuild_tensor(args: tuple) -> PickledTensor:
    storage, offset, size, stride = args
    return _tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v2(args: tuple) -> PickledTensor:
    storage, offset, size, stride, _requires_grad, _hooks, *_metadata = args
    if len(args) > 7:
        raise FormatError("too many arguments")
    return _tensor(storage, offset, size, stride, None)


def _rebuild_tensor_v3(args: tuple) -> PickledTensor:
    storage, offset, size, stride, _requires_grad, _hooks, dtype, *_metadata = args
    if len(args) > 8:
        raise FormatError("too many arguments")
    if isinstance(dtype, Token) and dtype.unsupported:
        raise FormatError(f"{dtype.unsupported} tensors are not supported (no safetensors type)")
    if not isinstance(dtype, Token) or dtype.dtype is None:
        raise FormatError("tensor dtype is not a torch dtype")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(args: tuple) -> PickledTensor:
    data, _requires_grad, _hooks, *_state = args
    if len(args) > 4 or not isinstance(data, PickledTensor):
        raise FormatError("a parameter is rebuilt from something that is not a tensor")
    return data


def _rebuild_from_type(args: tuple) -> Any:
    func, new_type, inner_args, _state = args
    if not (isinstance(func, Emulated) and isinstance(new_type, Token)
            and new_type.qualname in _TENSOR_TYPES and isinstance(inner_args, tuple)):
        raise UnsafeFileError("_rebuild_from_type_v2 with a function or type outside the "
                              "allow-list")
    return func.call(inner_args)


def _ordered_dict(args: tuple) -> PickledDict:
    if len(args) > 1:
        raise FormatError("too many arguments")
    result = PickledDict()
    for pair in args[0] if args else ():
        key, value = pair
        result[key] = value
    return result


def _pair_keys(args: tuple) -> Any:
    """The keys ``OrderedDict(pairs)`` hashes, for the interpreter to vet first."""
    return (pair[0] for pair in args[0]) if args else ()


def _items(args: tuple) -> Any:
    """The items ``set(items)`` hashes."""
    return args[0] if args and isinstance(args[0], list) else ()


def _codecs_encode(args: tuple) -> bytes:
    text, encoding = args
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise UnsafeFileError("_codecs.encode used for something other than latin-1 bytes")
    return text.encode("latin-1")


def _make_set(kind: type) -> Any:
    def build(args: tuple) -> Any:
        if len(args) > 1 or (args and not isinstance(args[0], list)):
            raise FormatError(f"{kind.__name__} built from something other than a list")
        return kind(args[0] if args else ())
    return build


def _empty_bytes(args: tuple) -> bytes:
    if args:
        raise FormatError("bytes() with arguments (protocol 2 writes only b'' this way)")
    return b""


def _numpy_dtype(args: tuple) -> NumpyDType:
    spec = args[0]
    if not isinstance(spec, str):
        raise FormatError("numpy dtype spec is not a string")
    return NumpyDType(spec)


def _numpy_scalar(args: tuple) -> int | float | bool:
    dtype, raw = args
    if not isinstance(dtype, NumpyDType) or not isinstance(raw, bytes):
        raise FormatError("numpy scalar without a plain dtype and bytes")
    return dtype.decode(raw)


def _numpy_reconstruct(args: tuple) -> NumpyArray:
    cls, shape, typecode = args
    if not (isinstance(cls, Token) and cls.qualname == "numpy.ndarray"):
        raise UnsafeFileError(f"_reconstruct of {_name(cls)}, not of numpy.ndarray")
    if shape != (0,) or not isinstance(typecode, bytes):
        raise FormatError("numpy _reconstruct with arguments numpy does not write")
    return NumpyArray()


def _name(value: Any) -> str:
    return getattr(value, "qualname", type(value).__name__)


def _new_record(kind: type) -> Any:
    def new(args: tuple) -> Any:
        if args:
            raise FormatError("created with arguments (protocol 2 writes it without)")
        return kind()
    return new


def _torch_size(args: tuple) -> tuple[int, ...]:
    (dims,) = args
    return _check_ints(tuple(dims), "torch.Size")


def _torch_device(args: tuple) -> str:
    if not all(isinstance(a, (str, int)) for a in args):
        raise FormatError("torch.device with arguments other than a name and an index")
    return ":".join(str(a) for a in args)


_TENSOR_TYPES = {"torch.Tensor", "torch.nn.parameter.Parameter"}


def _build_allowlist() -> dict[tuple[str, str], Any]:
    table: dict[tuple[str, str], Any] = {}

    def fn(module: str, name: str, call, keys=None) -> None:
        table[(module, name)] = Emulated(f"{module}.{name}", call, keys)

    fn("collections", "OrderedDict", _ordered_dict, _pair_keys)
    fn("torch._utils", "_rebuild_tensor", _rebuild_tensor)
    fn("torch._utils", "_rebuild_tensor_v2", _rebuild_tensor_v2)
    fn("torch._utils", "_rebuild_tensor_v3", _rebuild_tensor_v3)
    fn("torch._utils", "_rebuild_parameter", _rebuild_parameter)
    fn("torch._utils", "_rebuild_parameter_with_state", _rebuild_parameter)
    fn("torch._tensor", "_rebuild_from_type_v2", _rebuild_from_type)
    fn("torch", "Size", _torch_size)
    fn("torch", "device", _torch_device)
    fn("_codecs", "encode", _codecs_encode)
    for module in ("__builtin__", "builtins"):
        fn(module, "set", _make_set(set), _items)
        fn(module, "frozenset", _make_set(frozenset), _items)
        fn(module, "bytes", _empty_bytes)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        fn(module, "scalar", _numpy_scalar)
        fn(module, "_reconstruct", _numpy_reconstruct)
    fn("numpy", "dtype", _numpy_dtype)
    table[("numpy", "ndarray")] = Token("numpy.ndarray")
    for module, name, kind in (("argparse", "Namespace", PickledNamespace),
                               ("torch.nn.modules.container", "ParameterDict",
                                PickledParameterDict)):
        table[(module, name)] = EmulatedClass(f"{module}.{name}", _new_record(kind))
    for name, dtype in STORAGE_CLASSES.items():
        table[("torch", name)] = Token(f"torch.{name}", dtype)
    table[("torch.storage", "UntypedStorage")] = Token("torch.storage.UntypedStorage")
    for name, kind in (("ComplexDoubleStorage", "complex128"), ("ComplexHalfStorage", "complex32"),
                       ("complex128", "complex128"), ("complex32", "complex32"),
                       ("cdouble", "complex128"), ("chalf", "complex32")):
        table[("torch", name)] = Token(f"torch.{name}", unsupported=kind)
    for name, dtype in BY_TORCH_NAME.items():
        table[("torch", name)] = Token(f"torch.{name}", dtype)
    for qualname in _TENSOR_TYPES:
        module, _, name = qualname.rpartition(".")
        table[(module, name)] = Token(qualname)
    for module in ("pytorch_lightning.callbacks.model_checkpoint",
                   "lightning.pytorch.callbacks.model_checkpoint"):
        table[(module, "ModelCheckpoint")] = OpaqueObject(f"{module}.ModelCheckpoint")
    return table


ALLOWLIST = _build_allowlist()


def find_global(module: str, name: str) -> Any:
    """Resolves a GLOBAL opcode through the allow-list; everything else is refused."""
    found = ALLOWLIST.get((module, name))
    if found is None:
        raise UnsafeFileError(f"the pickle asks for global {module}.{name}, which is not on the "
                              "allow-list of data types a checkpoint needs")
    return found
