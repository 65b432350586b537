"""``quant.dequant`` against the gguf package's numpy dequantizers (ggml's reference layout,
code we did not write), for every GGML type, on blocks it quantized or random blocks with
valid scales; and the type table against ``gguf.constants``."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from quant_read_files import random_blocks

from ckptkit.errors import FormatError
from ckptkit.quant import dequant
from ckptkit.quant.dequant import DEQUANTIZERS, dequantize
from ckptkit.quant.ggml_types import BY_ID, BY_NAME

QUANTIZABLE = ("Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0")  # what the gguf package quantizes
COMFYUI_GGUF_TYPES = ("F32", "F16", "BF16", *QUANTIZABLE, "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                      "Q6_K", "IQ4_NL", "IQ4_XS")

# Tiny tensors: on a busy machine torch's thread pool costs more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_type_table_matches_gguf_constants():
    for kind in BY_NAME.values():
        ref = GGMLQuantizationType(kind.id)
        assert ref.name == kind.name
        assert GGML_QUANT_SIZES[ref] == (kind.block_size, kind.type_size)
    # every type the gguf package defines is known by id (read and named, if not decoded)
    assert {t.value for t in GGMLQuantizationType} <= set(BY_ID)
    assert BY_NAME["Q8_0"].bits_per_weight == 8.5
    assert BY_NAME["Q4_K"].bits_per_weight == 4.5
    assert BY_NAME["Q6_K"].bits_per_weight == 6.5625
    assert BY_NAME["Q2_K"].bits_per_weight == 2.625


@pytest.mark.parametrize("name", COMFYUI_GGUF_TYPES)
def test_dequantize_matches_gguf_package(name):
    qtype = GGMLQuantizationType[name]
    block = GGML_QUANT_SIZES[qtype][0]
    rng = np.random.default_rng(1)
    rows = 8
    if name in QUANTIZABLE or name in ("F32", "F16", "BF16"):
        values = rng.standard_normal((rows, 256)).astype(np.float32) * 3
        stored = gguf_quantize(values, qtype)
    else:
        stored = random_blocks(qtype, rows * 256 // block, seed=2).reshape(rows, -1)
    expected = gguf_dequantize(stored, qtype)
    assert expected.shape == (rows, 256) and np.isfinite(expected).all()
    raw = torch.from_numpy(np.ascontiguousarray(stored).view(np.uint8).copy())
    ours = dequantize(raw, name, (rows, 256))
    assert ours.dtype == torch.float32
    np.testing.assert_array_equal(ours.numpy(), expected)
    if name in DEQUANTIZERS:  # other dtypes: the float32 values, rounded once
        for dtype in (torch.bfloat16, torch.float16):
            out = dequantize(raw, name, (rows, 256), dtype)
            assert torch.equal(out, torch.from_numpy(expected).to(dtype))


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ1_S",
                                  "TQ1_0", "TQ2_0"])
def test_grid_types_go_through_the_gguf_package(name):
    qtype = GGMLQuantizationType[name]
    stored = random_blocks(qtype, 4, seed=3)
    ours = dequantize(torch.from_numpy(stored.copy()), name, (4, 256))
    np.testing.assert_array_equal(ours.numpy(), gguf_dequantize(stored, qtype).reshape(4, 256))


def test_big_tensors_are_done_in_slices(monkeypatch):
    """A tensor of many slices gives the values of one pass."""
    monkeypatch.setattr(dequant, "_SLICE_VALUES", 1024)
    rng = np.random.default_rng(4)
    values = rng.standard_normal((40, 512)).astype(np.float32)
    for name in ("Q8_0", "Q4_K"):
        qtype = GGMLQuantizationType[name]
        stored = (gguf_quantize(values, qtype) if name == "Q8_0"
                  else random_blocks(qtype, 80, seed=5))
        out = dequantize(torch.from_numpy(stored.copy()), name, (40, 512))
        np.testing.assert_array_equal(out.numpy(), gguf_dequantize(stored, qtype)
                                      .reshape(40, 512))


def test_wrong_byte_counts_are_refused():
    with pytest.raises(FormatError, match="cannot hold shape"):
        dequantize(torch.zeros(33, dtype=torch.uint8), "Q8_0", (32,))
    with pytest.raises(FormatError, match="whole blocks"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q8_0", (31,))
    with pytest.raises(FormatError, match="unknown GGML type"):
        dequantize(torch.zeros(34, dtype=torch.uint8), "Q9_9", (32,))
