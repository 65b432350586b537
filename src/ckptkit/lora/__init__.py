"""LoRAs and other adapters: their key formats and detection, their matching against a model,
``ckpt lora check`` and ``convert`` (and the adapter math, bake, extract, resize and merge
built on these)."""
