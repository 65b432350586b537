"""The GGML tensor types a GGUF file can store: id, block layout and size of each.

A GGUF tensor info names its type by number (``ggml_type`` in ggml.h, ``GGMLQuantizationType``
in the ``gguf`` package); a quantized type stores its values in blocks of ``block_size``
elements taking ``type_size`` bytes each, so a tensor of n elements takes
n / block_size x type_size bytes and n must be a multiple of the block size. The table holds
every type ggml defines, so that a file of any of them is read and named; which of them ckptkit
can turn back into numbers is ``dequant.DEQUANTIZERS``. No torch here: headers are read without it.
"""

from __future__ import annotations

from dataclasses import dataclass

QK_K = 256  # the super-block of the K-quants and most IQ types


@dataclass(frozen=True)
class GGMLType:
    """One GGML type: ``id`` as a GGUF file stores it, ``block_size`` elements in
    ``type_size`` bytes."""

    name: str
    id: int
    block_size: int
    type_size: int
    kind: str = "quant"  # "float", "int" (stored as plain elements) or "quant" (blocks)

    @property
    def bits_per_weight(self) -> float:
        return self.type_size * 8 / self.block_size

    @property
    def is_quantized(self) -> bool:
        return self.kind == "quant"

    def nbytes(self, numel: int) -> int:
        """Bytes that ``numel`` elements take; -1 where they are not whole blocks."""
        blocks, rest = divmod(numel, self.block_size)
        return -1 if rest else blocks * self.type_size

    def __str__(self) -> str:
        return self.name


_TABLE = [
    GGMLType("F32", 0, 1, 4, "float"),
    GGMLType("F16", 1, 1, 2, "float"),
    GGMLType("Q4_0", 2, 32, 2 + 16),
    GGMLType("Q4_1", 3, 32, 2 + 2 + 16),
    GGMLType("Q5_0", 6, 32, 2 + 4 + 16),
    GGMLType("Q5_1", 7, 32, 2 + 2 + 4 + 16),
    GGMLType("Q8_0", 8, 32, 2 + 32),
    GGMLType("Q8_1", 9, 32, 4 + 4 + 32),
    GGMLType("Q2_K", 10, QK_K, 2 + 2 + QK_K // 16 + QK_K // 4),
    GGMLType("Q3_K", 11, QK_K, 2 + QK_K // 4 + QK_K // 8 + 12),
    GGMLType("Q4_K", 12, QK_K, 2 + 2 + QK_K // 2 + 12),
    GGMLType("Q5_K", 13, QK_K, 2 + 2 + QK_K // 2 + QK_K // 8 + 12),
    GGMLType("Q6_K", 14, QK_K, 2 + QK_K // 2 + QK_K // 4 + QK_K // 16),
    GGMLType("Q8_K", 15, QK_K, 4 + QK_K + QK_K // 8),
    GGMLType("IQ2_XXS", 16, QK_K, 2 + QK_K // 4),
    GGMLType("IQ2_XS", 17, QK_K, 2 + QK_K // 4 + QK_K // 32),
    GGMLType("IQ3_XXS", 18, QK_K, 2 + QK_K // 4 + QK_K // 8),
    GGMLType("IQ1_S", 19, QK_K, 2 + QK_K // 8 + QK_K // 16),
    GGMLType("IQ4_NL", 20, 32, 2 + 16),
    GGMLType("IQ3_S", 21, QK_K, 2 + QK_K // 4 + QK_K // 8 + QK_K // 32 + 4),
    GGMLType("IQ2_S", 22, QK_K, 2 + QK_K // 4 + QK_K // 16),
    GGMLType("IQ4_XS", 23, QK_K, 2 + 2 + QK_K // 2 + QK_K // 64),
    GGMLType("I8", 24, 1, 1, "int"),
    GGMLType("I16", 25, 1, 2, "int"),
    GGMLType("I32", 26, 1, 4, "int"),
    GGMLType("I64", 27, 1, 8, "int"),
    GGMLType("F64", 28, 1, 8, "float"),
    GGMLType("IQ1_M", 29, QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),
    GGMLType("BF16", 30, 1, 2, "float"),
    GGMLType("TQ1_0", 34, QK_K, 2 + 4 * 13),
    GGMLType("TQ2_0", 35, QK_K, 2 + 64),
    GGMLType("MXFP4", 39, 32, 1 + 16),
    GGMLType("NVFP4", 40, 64, 4 + 32),
    GGMLType("Q1_0", 41, 128, 2 + 16),
]

BY_NAME: dict[str, GGMLType] = {t.name: t for t in _TABLE}
BY_ID: dict[int, GGMLType] = {t.id: t for t in _TABLE}

# The safetensors name of the element type a plain (not block-quantized) GGML type holds.
PLAIN_DTYPES = {"F32": "F32", "F16": "F16", "BF16": "BF16", "F64": "F64",
                "I8": "I8", "I16": "I16", "I32": "I32", "I64": "I64"}
