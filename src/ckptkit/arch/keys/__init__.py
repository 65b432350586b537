"""Key generators: the tensor names and shapes of each model component, from its config.

Every generator returns a ``KeyTable`` (key -> shape, in the order the reference
implementation's ``state_dict`` lists them) in the component's *canonical* naming: the bare
names of ComfyUI's standalone files, which are the original (LDM/SGM/BFL) names without the
monolithic prefix for diffusion models and VAEs, and the Hugging Face transformers names for
text encoders (``text_model.*``; ``encoder.*`` and ``shared.weight`` for T5). Layouts
(``arch.layouts``) add prefixes or rename from there.

Each config is a frozen dataclass of plain numbers; the families (``arch.families``) hold a
full-size config and a ``tiny`` one (same structure and key names, narrow widths, the same
input/output channels) for tests.
"""

from __future__ import annotations

Shape = tuple[int, ...]
KeyTable = dict[str, Shape]
