"""``inspect``: what a checkpoint holds, from its header (or pickle) alone.

The report is a plain dict (the ``--json`` output): format, sizes, counts, dtypes, the key
prefixes that group the tensors, decoded metadata and, for pickles, the non-weight entries.
No tensor data is read, so a 24 GB file is inspected in the time it takes to read its header.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ..formats import Checkpoint, open_checkpoint

_CONTAINERS = {"text_encoders", "embedders"}  # their children are separate components


def inspect_file(path: str) -> dict[str, Any]:
    with open_checkpoint(path) as checkpoint:
        return describe_checkpoint(checkpoint)


def describe_checkpoint(checkpoint: Checkpoint) -> dict[str, Any]:
    dtypes: dict[str, dict[str, int]] = {}
    for tensor in checkpoint.values():
        entry = dtypes.setdefault(tensor.dtype.name, {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += tensor.numel
    report: dict[str, Any] = {
        "path": checkpoint.path,
        "format": checkpoint.format,
        "file_size": os.path.getsize(checkpoint.path),
        "tensor_count": len(checkpoint),
        "parameter_count": sum(t.numel for t in checkpoint.values()),
        "tensor_bytes": sum(max(t.nbytes, 0) for t in checkpoint.values()),
        "dtypes": dict(sorted(dtypes.items(), key=lambda kv: -kv[1]["parameters"])),
        "prefixes": key_prefixes({k: t.numel for k, t in checkpoint.items()}),
        "metadata": {k: decode_metadata_value(v) for k, v in checkpoint.metadata.items()},
    }
    if checkpoint.format != "safetensors":
        report["weights_at"] = checkpoint.weights_at
        report["extras"] = checkpoint.extras
    report["notes"] = list(checkpoint.notes)
    return report


def decode_metadata_value(value: str) -> Any:
    """Metadata values that hold JSON (kohya's tag frequencies, recipes) decoded; else as is."""
    text = value.strip()
    if text[:1] in ("{", "["):
        try:
            return json.loads(text, parse_constant=_no_constants)
        except ValueError:
            pass
    return value


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not JSON")  # NaN/Infinity would make --json output invalid


def key_prefixes(sizes: dict[str, int]) -> list[dict[str, Any]]:
    """Groups keys by their leading components: ``model.diffusion_model``, ``first_stage_model``,
    ``conditioner.embedders.0``... Single-child chains are followed and the children of
    component folders (``text_encoders``, ``embedders``) split, so that each group is one part
    of the model."""
    children: dict[str, set[str]] = {}
    for key in sizes:
        parts = key.split(".")
        for depth in range(1, len(parts)):
            children.setdefault(".".join(parts[:depth]), set()).add(parts[depth])
    groups: dict[str, list[int]] = {}
    for key, numel in sizes.items():
        parts = key.split(".")
        depth = 1
        while depth < len(parts) - 1 and (
                len(children[".".join(parts[:depth])]) == 1 or parts[depth - 1] in _CONTAINERS):
            depth += 1
        prefix = ".".join(parts[:depth]) if len(parts) > 1 else "(top level)"
        entry = groups.setdefault(prefix, [0, 0])
        entry[0] += 1
        entry[1] += numel
    return [{"prefix": p, "tensors": n, "parameters": numel}
            for p, (n, numel) in sorted(groups.items(), key=lambda kv: -kv[1][1])]
