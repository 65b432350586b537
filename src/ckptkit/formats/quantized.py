"""Tensors stored quantized: what is stored (type, block layout, bytes) and, on request, values.

A ``QuantizedTensor`` is a ``LazyTensor`` whose ``shape`` is the weight's and whose ``dtype`` is
the float type its values read as (the precision of the model the file was made from, where the
file says it), so that every command reads it like any other tensor: ``read`` and ``load``
return the dequantized values, and it calls itself not contiguous, so that nothing copies its
stored bytes as if they were elements. What is stored is its own: ``qtype`` (``Q8_0``,
``F8_E4M3-scaled``, ``NF4``...), ``block_size`` (values sharing one scale), ``parts`` (the
stored tensors: codes, scales, quantization state) and ``stored_nbytes``; ``raw`` returns the
stored codes. ``dequantize(dtype)`` gives the values in any float type directly, rounded once.

The decoding itself (``quant.decode``) needs torch and is imported only when values are asked
for, so that headers are read without it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError
from .checkpoint import LazyTensor, _about
from .dtypes import BY_NAME, DType, torch_dtype


@dataclass(eq=False, slots=True)
class QuantizedTensor(LazyTensor):
    """A weight stored as ``parts`` under ``scheme`` (``gguf``, ``fp8-scaled``, ``bnb-4bit``)."""

    qtype: str = ""
    scheme: str = ""
    block_size: int = 1
    parts: dict[str, LazyTensor] = field(default_factory=dict)
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def is_contiguous(self) -> bool:
        # Its bytes are codes and scales, not elements of ``dtype``: every reader decodes.
        return False

    @property
    def stored_nbytes(self) -> int:
        return sum(max(p.nbytes, 0) for p in self.parts.values())

    @property
    def bits_per_weight(self) -> float:
        return self.stored_nbytes * 8 / self.numel if self.numel else 0.0

    def raw(self) -> bytearray:
        """The stored codes (GGUF blocks, fp8 values, packed 4-bit codes), as in the file."""
        return self.parts["data"].raw()

    def read(self):
        return self.dequantize(self.dtype)

    def load(self):
        return self.dequantize(self.dtype)

    def scalar(self) -> float:
        if self.numel != 1:
            raise FormatError(f"a tensor of shape {list(self.shape)} is not a scalar",
                              self.source.path)
        return float(self.read().reshape(-1)[0])

    def read_rows(self, start: int, stop: int):
        """Rows ``start:stop`` as values; only their stored bytes are decoded where the rows
        are whole blocks (a GGUF matrix, an fp8 weight), else the whole tensor is."""
        from ..quant.decode import decode_rows

        if not self.shape:
            raise FormatError("a 0-d tensor has no rows", self.source.path)
        stop = min(stop, self.shape[0])
        with _about(self.source.path):
            return decode_rows(self, start, stop, torch_dtype(self.dtype))

    def dequantize(self, dtype: DType | None = None):
        """The values as a new torch tensor of ``dtype`` (default: ``self.dtype``), computed
        as the reference loader of the format computes them."""
        from ..quant.decode import decode

        with _about(self.source.path):
            return decode(self, torch_dtype(dtype or self.dtype))


def stored_type(tensor: LazyTensor) -> str:
    """What a tensor is stored as: its quantization type, else its dtype's name."""
    return tensor.qtype if isinstance(tensor, QuantizedTensor) else tensor.dtype.name


def stored_nbytes(tensor: LazyTensor) -> int:
    """The bytes a tensor takes in its file (codes and scales, for a quantized one)."""
    if isinstance(tensor, QuantizedTensor):
        return tensor.stored_nbytes
    return max(tensor.nbytes, 0)


def majority_float(tensors: list[LazyTensor], default: str) -> DType:
    """The 16-bit float type (F16 or BF16) that most parameters of ``tensors`` (the file's
    tensors kept unquantized) are stored in; ``default`` where none is: what the quantized
    weights of the same file read as. float32 tensors say nothing: converters keep small
    tensors and scales in float32 whatever the model's precision."""
    counts = {"F16": 0, "BF16": 0}
    for tensor in tensors:
        if tensor.dtype.name in counts:
            counts[tensor.dtype.name] += tensor.numel
    if not any(counts.values()):
        return BY_NAME[default]
    return BY_NAME[max(counts, key=counts.get)]
