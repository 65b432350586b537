"""Which GGML type each tensor of a diffusion model gets: ComfyUI-GGUF's conversion rules.

city96's ComfyUI-GGUF makes a quantized file in two steps, and this module is the two steps'
rules as one function (``choose``), read from its ``tools/convert.py`` and ``tools/lcpp.patch``
(the patch to llama.cpp's ``llama-quantize``, at ComfyUI-GGUF 795e451):

1. ``convert.py`` writes every tensor as BF16 (a bf16 source) or F16 (any other), except
   that 1-D tensors, tensors of at most 1,024 values and the family's "high precision" keys
   stay F32 when the source is fp32 or bf16; for SD 1.x/SDXL, a tensor of at least 512 values
   whose last dimension is not a multiple of 256 (convolutions: 3x3 kernels) is stored
   reshaped to (n/256, 256), its shape kept in ``comfy.gguf.orig_shape.<name>``.
2. ``llama-quantize`` then quantizes a tensor only if its name ends in ``weight``, it has
   exactly two dimensions as ggml counts them (trailing 1s dropped), its name has no
   ``_norm.weight``, and the family's list does not keep it (the embedders and the final
   layer); the type is the one asked for, upgraded for value projections, fused qkv and
   feed-forward outputs in the ``_M``/``_S`` mixes, and F16 where a row is not whole blocks.

Names are the source's without its checkpoint prefix (``model.diffusion_model.``), which is
how ComfyUI-GGUF's loader finds them; it refuses names over 127 characters (ggml's
``GGML_MAX_NAME`` of 128, patched) and tensors of more than 4 dimensions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

QUANTIZATION_THRESHOLD = 1024  # convert.py: at most this many values stay F32
REARRANGE_THRESHOLD = 512  # convert.py: SD tensors of fewer values are not reshaped
MAX_NAME_LENGTH = 127
MAX_DIMS = 4

# --type -> (the GGML type most tensors get, llama.cpp's file type number for
# general.file_type: LLAMA_FTYPE_MOSTLY_*, as gguf.LlamaFileType numbers them)
TYPES = {
    "Q8_0": ("Q8_0", 7), "Q6_K": ("Q6_K", 18), "Q5_K_M": ("Q5_K", 17), "Q5_K_S": ("Q5_K", 16),
    "Q5_1": ("Q5_1", 9), "Q5_0": ("Q5_0", 8), "Q4_K_M": ("Q4_K", 15), "Q4_K_S": ("Q4_K", 14),
    "Q4_1": ("Q4_1", 3), "Q4_0": ("Q4_0", 2), "Q3_K_M": ("Q3_K", 12), "Q2_K": ("Q2_K", 10),
    "F16": ("F16", 1), "BF16": ("BF16", 32),
}
K_TYPES = ("Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")

# ckptkit family -> ComfyUI-GGUF's architecture name (general.architecture). SD 2.x has SD
# 1.x's keys (convert.py's detection calls it sd1); the SDXL refiner has SDXL's label_emb.
ARCHITECTURES = {
    "sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl-refiner": "sdxl",
    "sd3-medium": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3",
    "flux1-dev": "flux", "flux1-schnell": "flux",
}
RESHAPED = ("sd1", "sdxl")  # convert.py's shape_fix

# lcpp.patch: never quantized (substrings, or whole names after "=")
_KEEP = {
    "flux": ("txt_in.", "img_in.", "time_in.", "vector_in.", "guidance_in.", "final_layer."),
    "sd1": ("class_embedding.", "time_embedding.", "add_embedding.", "time_embed.",
            "label_emb.", "conv_in.", "conv_out.", "=input_blocks.0.0.weight",
            "=out.2.weight"),
    "sd3": ("final_layer.", "time_text_embed.", "context_embedder.", "t_embedder.",
            "y_embedder.", "x_embedder.", "=proj_out.weight", "=pos_embed"),
}
_KEEP["sdxl"] = _KEEP["sd1"]

_VALUE = (".to_v.weight", "attn_v.weight", ".v.weight", ".attn.w1v.weight",
          ".attn.w2v.weight", "_attn.v_proj.weight")
_QKV = ("attn_qkv.weight", "attn.qkv.weight", "attention.qkv.weight")
_FFN_DOWN = ("ffn_down", ".ffn.2.weight", ".ff.net.2.weight", ".mlp.layer2.weight",
             ".adaln_modulation_mlp.2.weight", ".feed_forward.w2.weight")

# lcpp.patch's img_tensor_get_type: (--type, tensor kind) -> type; value projections in
# Q3_K_M and Q4_K_S depend on how many came before (counted in file order)
_UPGRADES = {
    ("Q2_K", "value"): "Q3_K", ("Q4_K_M", "value"): "Q6_K", ("Q5_K_M", "value"): "Q6_K",
    ("Q3_K_M", "qkv"): "Q4_K", ("Q4_K_M", "qkv"): "Q5_K", ("Q5_K_M", "qkv"): "Q6_K",
    ("Q3_K_M", "ffn_down"): "Q4_K", ("Q4_K_S", "ffn_down"): "Q5_K",
    ("Q4_K_M", "ffn_down"): "Q6_K", ("Q5_K_M", "ffn_down"): "Q6_K",
    ("Q4_0", "ffn_down"): "Q4_1", ("Q5_0", "ffn_down"): "Q5_1",
}

@dataclass
class Choice:
    """What is written for one tensor: its type and stored shape, and the original shape
    where it was reshaped (None otherwise)."""

    qtype: str
    shape: tuple[int, ...]
    orig_shape: tuple[int, ...] | None = None
    note: str = ""


@dataclass
class Rules:
    """The rules for one file: its architecture and --type, and the count of value
    projections seen so far (llama-quantize's ``i_attention_wv``)."""

    arch: str
    target: str
    values_seen: int = field(default=0)

    def choose(self, name: str, shape: tuple[int, ...], dtype: str,
               block_size: int) -> Choice:
        """The type and shape of tensor ``name`` (``shape``, source dtype name ``dtype``;
        ``block_size`` of a GGML type: a function of the type's name)."""
        base = self._converted(name, shape, dtype)
        stored, orig = self._reshaped(shape)
        if self.target in ("F16", "BF16") or not self._quantizable(name, stored):
            return Choice(base, stored, orig)
        qtype = self._mixed(name)
        if stored[-1] % block_size(qtype):
            why = "256" if qtype in K_TYPES else str(block_size(qtype))
            return Choice("F16", stored, orig, f"rows of {stored[-1]} are not a multiple of "
                          f"{why}: F16 (as llama-quantize falls back)")
        return Choice(qtype, stored, orig)

    def _converted(self, name: str, shape: tuple[int, ...], dtype: str) -> str:
        """Step 1 (convert.py): BF16 for bf16 sources, F16 for others; F32 kept for small,
        1-D tensors of fp32 or bf16 sources. With --type F16 or BF16, that type."""
        if dtype in ("F32", "BF16") and (len(shape) <= 1
                                         or math.prod(shape) <= QUANTIZATION_THRESHOLD):
            return "F32"
        if self.target in ("F16", "BF16"):
            return self.target
        return "BF16" if dtype == "BF16" else "F16"

    def _reshaped(self, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple | None]:
        count = math.prod(shape)
        if (self.arch in RESHAPED and len(shape) > 1 and count >= REARRANGE_THRESHOLD
                and count % 256 == 0 and shape[-1] % 256):
            return (count // 256, 256), shape
        return shape, None

    def _quantizable(self, name: str, shape: tuple[int, ...]) -> bool:
        dims = list(shape)
        while len(dims) > 1 and dims[0] == 1:  # ggml drops trailing 1s of ne (leading here)
            dims.pop(0)
        return (name.endswith("weight") and len(dims) == 2 and "_norm.weight" not in name
                and not kept(self.arch, name))

    def _mixed(self, name: str) -> str:
        default = TYPES[self.target][0]
        if any(p in name for p in _VALUE):
            seen, self.values_seen = self.values_seen, self.values_seen + 1
            if self.target == "Q3_K_M":
                return "Q5_K" if seen < 2 else "Q4_K"
            if self.target == "Q4_K_S" and seen < 4:
                return "Q5_K"
            return _UPGRADES.get((self.target, "value"), default)
        if any(p in name for p in _QKV):
            return _UPGRADES.get((self.target, "qkv"), default)
        if any(p in name for p in _FFN_DOWN) or (".w2.weight" in name and "experts." in name):
            return _UPGRADES.get((self.target, "ffn_down"), default)
        return default


def kept(arch: str | None, name: str) -> bool:
    """Whether ComfyUI-GGUF's rules keep tensor ``name`` of ``arch`` unquantized (the
    embedders and final layer; fp8 output keeps the same ones)."""
    return any(name == k[1:] if k.startswith("=") else k in name
               for k in _KEEP.get(arch or "", ()))


def check_name(name: str, shape: tuple[int, ...]) -> str | None:
    """Why ComfyUI-GGUF could not load tensor ``name`` (None: it can)."""
    if len(name) > MAX_NAME_LENGTH:
        return f"its name is {len(name)} characters long, over the {MAX_NAME_LENGTH} GGUF allows"
    if len(shape) > MAX_DIMS:
        return (f"it has {len(shape)} dimensions, over the {MAX_DIMS} ggml handles "
                "(ComfyUI-GGUF's fix_5d_tensors.py adds such tensors back by hand)")
    return None
