"""LoRA: key formats, adapter math, check, bake, extract, resize and merge (issue 13)."""
