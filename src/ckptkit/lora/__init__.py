"""LoRAs and other adapters: their key formats, their math, and what ckpt does with them."""
