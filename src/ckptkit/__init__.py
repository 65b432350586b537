"""ckptkit: open, inspect and convert image-generation model checkpoints safely.

``ckptkit.open(path)`` returns a lazy mapping from key to tensor for any supported format
(safetensors, PyTorch zip and legacy pickles read without unpickling).
"""

from __future__ import annotations

__version__ = "0.1.0"  # before the imports: ops.provenance reads it

from .api import load_pipeline, open, save_safetensors

__all__ = ["__version__", "load_pipeline", "open", "save_safetensors"]
