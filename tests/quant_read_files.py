"""GGUF files for the quantized-reading tests, written by the ``gguf`` package's own writer
(``gguf.GGUFWriter``) and quantized by its own numpy code, the way city96's converter makes
them (``tools/convert.py`` of ComfyUI-GGUF): so that our reader is held to files we did not
write."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from ckptkit.formats import open_checkpoint

QT = GGMLQuantizationType
PREFIXES = ("model.diffusion_model.", "model.", "net.")
SD_ARCHES = ("sd1", "sdxl")


def write_gguf(path: str | Path, tensors: dict, arch: str | None = "flux",
               kv: dict | None = None, alignment: int | None = None) -> Path:
    """``tensors``: name -> a numpy array (written as its own type), or (stored array, GGML
    type). ``arch=None`` writes no ``general.architecture`` key (as older converters)."""
    writer = gguf.GGUFWriter(str(path), arch or "none")
    if arch is None:
        for section in writer.kv_data:
            section.pop("general.architecture", None)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    for key, value in (kv or {}).items():
        if isinstance(value, list):
            writer.add_array(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            writer.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def random_blocks(qtype: GGMLQuantizationType, n_blocks: int, seed: int = 0) -> np.ndarray:
    """``n_blocks`` blocks of random bytes whose float16 scales are finite (random normal):
    any bytes are valid codes, only a scale can be NaN or infinite."""
    rng = np.random.default_rng(seed)
    size = GGML_QUANT_SIZES[qtype][1]
    raw = rng.integers(0, 256, size=(n_blocks, size), dtype=np.uint8)
    for at in SCALE_FIELDS.get(qtype.name, ()):
        halves = (rng.standard_normal(n_blocks) * 0.01).astype(np.float16)
        raw[:, at:at + 2] = halves.view(np.uint8).reshape(n_blocks, 2)
    return raw


# Where each type's float16 scales are in its block (ggml-common.h's block structs).
SCALE_FIELDS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,),
                "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2),
                "Q6_K": (208,), "IQ4_NL": (0,), "IQ4_XS": (0,), "IQ2_XXS": (0,),
                "IQ2_XS": (0,), "IQ2_S": (0,), "IQ3_XXS": (0,), "IQ3_S": (0,), "IQ1_S": (0,),
                "TQ1_0": (52,), "TQ2_0": (64,)}


def city96_gguf(src: str | Path, dst: str | Path, qtype: GGMLQuantizationType,
                arch: str | None, keep_arch_key: bool = True, strip: bool = True) -> Path:
    """A diffusion model (safetensors, ComfyUI names) as city96's converter writes it: the
    prefix stripped, 1-D tensors and those of at most 1,024 values in F32, SD1/SDXL tensors
    whose last dimension is not a multiple of 256 reshaped to rows of 256 (their shape kept
    under ``comfy.gguf.orig_shape.<name>``), the rest quantized to ``qtype`` (F16 where the
    rows are not whole blocks). ``strip=False`` keeps the names whole, as
    stable-diffusion.cpp writes a whole checkpoint."""
    tensors, kv = {}, {}
    with open_checkpoint(src) as checkpoint:
        for key, lazy in checkpoint.items():
            name = next((key[len(p):] for p in PREFIXES if key.startswith(p)), key) \
                if strip else key
            data = lazy.read().float().numpy()
            if data.ndim <= 1 or data.size <= 1024:
                tensors[name] = data.astype(np.float32)
                continue
            if arch in SD_ARCHES and data.shape[-1] % 256:
                kv[f"comfy.gguf.orig_shape.{name}"] = list(data.shape)
                data = data.reshape(-1, 256) if data.size % 256 == 0 else data
            block = GGML_QUANT_SIZES[qtype][0]
            if data.shape[-1] % block or qtype == QT.F16:
                tensors[name] = data.astype(np.float16)
            else:
                tensors[name] = (gguf.quants.quantize(data, qtype), qtype)
    return write_gguf(dst, tensors, arch=arch if keep_arch_key else None, kv=kv)

