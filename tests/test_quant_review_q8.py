"""Second review of ``ckpt quantize``: the faster Q8_0 rounding still gives the gguf
package's bytes at every tie, and the files quantize and convert write say where they came
from (provenance, lineage) and refuse what is not a regular file."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ckptkit.quant.encode import quantize

gguf = pytest.importorskip("gguf")


def _near_ties() -> np.ndarray:
    """Rows whose first value is 127 (so the scale is 1 and each value is its own scaled
    value): every k + 0.5 of Q8_0's range, and the float32 on either side of it, both signs,
    and the float32 just below 0.5 (where adding 0.5 and flooring rounds wrongly)."""
    halves = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    values = np.concatenate([halves, np.nextafter(halves, np.float32(np.inf)),
                             np.nextafter(halves, np.float32(-np.inf)),
                             np.float32([0.49999997, -0.49999997, 0.5, -0.5, 0.0, -0.0])])
    values = np.resize(values, -(-values.size // 31) * 31).reshape(-1, 31)
    return np.concatenate([np.full((values.shape[0], 1), 127, np.float32), values], 1)


def test_q8_0_rounds_half_away_from_zero_as_the_gguf_package_does():
    x = _near_ties()
    ours = quantize(torch.from_numpy(x), "Q8_0").numpy().tobytes()
    assert ours == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()
    codes = np.frombuffer(ours, np.uint8).reshape(-1, 34)[:, 2:].view(np.int8)
    assert codes[0, 1] == -127 and codes[0, 2] == -126  # -126.5 -> -127, -125.5 -> -126
