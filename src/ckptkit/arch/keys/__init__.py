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


def linear(t: KeyTable, p: str, cin: int, cout: int, bias: bool = True) -> None:
    """A ``Linear(cin, cout)`` at ``p``: weight [cout, cin] and, if any, bias [cout]."""
    t[f"{p}.weight"] = (cout, cin)
    if bias:
        t[f"{p}.bias"] = (cout,)


def conv(t: KeyTable, p: str, cin: int, cout: int, k: int) -> None:
    """A ``Conv2d(cin, cout, k)`` at ``p``: weight [cout, cin, k, k] and bias [cout]."""
    t[f"{p}.weight"] = (cout, cin, k, k)
    t[f"{p}.bias"] = (cout,)


def norm(t: KeyTable, p: str, c: int) -> None:
    """An affine norm over ``c`` channels at ``p`` (GroupNorm, LayerNorm): weight and bias."""
    t[f"{p}.weight"] = (c,)
    t[f"{p}.bias"] = (c,)


class TransformerWidths:
    """What the FLUX and MMDiT configs share: heads splitting ``hidden_size`` and an MLP of
    ``mlp_ratio`` times its width. A mixin for their frozen dataclasses (it adds no fields)."""

    hidden_size: int
    num_heads: int
    mlp_ratio: float

    def check_widths(self, numbers: tuple[int, ...]) -> None:
        name = type(self).__name__
        if min(numbers) <= 0 or self.mlp_ratio <= 0:
            raise ValueError(f"{name}: sizes and counts must be positive")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"{name}: hidden_size must be a multiple of num_heads")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)
