"""Element types, named as safetensors names them, with what each reader and torch call them.

One table serves every format: the safetensors header strings, the storage classes and dtype
globals of torch pickles, and the torch dtype a tensor materialises as. It imports no torch, so
headers can be parsed and reported on a machine without it.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import FormatError


@dataclass(frozen=True)
class DType:
    """One element type. ``bits`` may be below 8 for the packed sub-byte float formats."""

    name: str  # the safetensors spelling: "F16", "BF16", "F8_E4M3", ...
    bits: int
    kind: str  # "float", "int", "uint", "bool", "complex"
    torch_name: str | None  # attribute of the torch module, None where torch has no such type
    packed: int = 1  # values per torch element: torch holds F4 as float4_e2m1fn_x2, two a byte

    @property
    def is_float(self) -> bool:
        return self.kind == "float"

    def nbytes(self, numel: int) -> int:
        """Bytes that ``numel`` elements take; -1 where they do not fill whole bytes."""
        total_bits = numel * self.bits
        return total_bits // 8 if total_bits % 8 == 0 else -1

    def torch_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape torch gives a tensor of this type whose values have ``shape``."""
        if self.packed == 1:
            return shape
        if not shape or shape[-1] % self.packed:
            raise FormatError(f"{self.name} tensors need a last dimension divisible by "
                              f"{self.packed} to be held by torch")
        return (*shape[:-1], shape[-1] // self.packed)

    def __str__(self) -> str:
        return self.name


# The ``struct`` format of each type that Python can pack and unpack itself (no bfloat16, no
# fp8): scalars are read and written without torch.
STRUCT_CODES = {"F16": "e", "F32": "f", "F64": "d", "I8": "b", "U8": "B", "I16": "h",
                "U16": "H", "I32": "i", "U32": "I", "I64": "q", "U64": "Q", "BOOL": "?"}


_TABLE = [
    DType("BOOL", 8, "bool", "bool"),
    DType("U8", 8, "uint", "uint8"),
    DType("I8", 8, "int", "int8"),
    DType("U16", 16, "uint", "uint16"),
    DType("I16", 16, "int", "int16"),
    DType("U32", 32, "uint", "uint32"),
    DType("I32", 32, "int", "int32"),
    DType("U64", 64, "uint", "uint64"),
    DType("I64", 64, "int", "int64"),
    DType("F16", 16, "float", "float16"),
    DType("BF16", 16, "float", "bfloat16"),
    DType("F32", 32, "float", "float32"),
    DType("F64", 64, "float", "float64"),
    DType("F8_E4M3", 8, "float", "float8_e4m3fn"),
    DType("F8_E5M2", 8, "float", "float8_e5m2"),
    DType("F8_E4M3FNUZ", 8, "float", "float8_e4m3fnuz"),
    DType("F8_E5M2FNUZ", 8, "float", "float8_e5m2fnuz"),
    DType("F8_E8M0", 8, "float", "float8_e8m0fnu"),
    DType("F6_E2M3", 6, "float", None),
    DType("F6_E3M2", 6, "float", None),
    DType("F4", 4, "float", "float4_e2m1fn_x2", packed=2),
    DType("C64", 64, "complex", "complex64"),
]

BY_NAME: dict[str, DType] = {d.name: d for d in _TABLE}
BY_TORCH_NAME: dict[str, DType] = {d.torch_name: d for d in _TABLE if d.torch_name}

# Legacy typed-storage classes that torch pickles name as ``torch.<Class>``.
STORAGE_CLASSES: dict[str, DType] = {
    "FloatStorage": BY_NAME["F32"],
    "DoubleStorage": BY_NAME["F64"],
    "HalfStorage": BY_NAME["F16"],
    "BFloat16Storage": BY_NAME["BF16"],
    "LongStorage": BY_NAME["I64"],
    "IntStorage": BY_NAME["I32"],
    "ShortStorage": BY_NAME["I16"],
    "CharStorage": BY_NAME["I8"],
    "ByteStorage": BY_NAME["U8"],
    "BoolStorage": BY_NAME["BOOL"],
    "ComplexFloatStorage": BY_NAME["C64"],
}

# The names the command line accepts for a target precision.
CLI_NAMES: dict[str, DType] = {
    "fp32": BY_NAME["F32"],
    "fp16": BY_NAME["F16"],
    "bf16": BY_NAME["BF16"],
    "fp8-e4m3fn": BY_NAME["F8_E4M3"],
    "fp8-e5m2": BY_NAME["F8_E5M2"],
}


def torch_dtype(dtype: DType):
    """The torch dtype for ``dtype``; imports torch, so only materialising code calls it."""
    import torch

    found = getattr(torch, dtype.torch_name, None) if dtype.torch_name else None
    if found is None:
        raise FormatError(f"torch has no type for {dtype.name} tensors (their bytes can still "
                          "be copied)")
    return found


def from_torch_tensor(tensor) -> tuple[DType, tuple[int, ...]]:
    """The DType and value shape (F4 counts two values a byte) of a torch tensor."""
    dtype = from_torch(tensor.dtype)
    shape = tuple(tensor.shape)
    if dtype.packed > 1 and shape:
        shape = (*shape[:-1], shape[-1] * dtype.packed)
    return dtype, shape


def from_torch(dtype) -> DType:
    """The DType of a torch dtype (``torch.float16`` -> F16)."""
    name = str(dtype).removeprefix("torch.")
    if name not in BY_TORCH_NAME:
        raise TypeError(f"torch dtype {name} has no safetensors equivalent")
    return BY_TORCH_NAME[name]
