"""ckptkit: open, inspect and convert image-generation model checkpoints safely.

``ckptkit.open(path)`` returns a lazy mapping from key to tensor for any supported format
(safetensors, PyTorch zip and legacy pickles read without unpickling).
"""

from __future__ import annotations

from .api import open, save_safetensors

__version__ = "0.1.0"
__all__ = ["__version__", "open", "save_safetensors"]
