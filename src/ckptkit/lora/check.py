"""``ckpt lora check``: what a LoRA is and, against a model, which of its modules apply.

The answer to ComfyUI's "lora key not loaded", before anything is loaded: the LoRA's key
format, its modules by adapter type, ranks and alphas, the components it adapts and the
family it was trained for (``lora.detect``, what ``ckpt inspect`` says of it too); with a
model, how many modules find their weight with the right shape and, for the others, groups
with the reason (``lora.targets.match``). Headers only: nothing but the LoRA's 0-d alphas is
read, so checking a LoRA against a 24 GB checkpoint takes as long as reading two headers.
"""

from __future__ import annotations

from typing import Any

from ..arch.detect import Identification
from ..formats import Checkpoint, open_checkpoint
from ..ops.inspect import identify_checkpoint
from .detect import KEY_FORMATS
from .modules import Module, alpha_values, delta_size, modules_of
from .targets import REASONS, Matching, match

MAX_NAMES = 5  # module names listed per group of modules that do not apply


def check_file(path: str, against: Checkpoint | None = None,
               model_ident: Identification | None = None) -> dict[str, Any]:
    """The report of one LoRA (a plain dict, the ``--json`` output), checked against the
    open model ``against`` when given (identified once by the caller: ``model_ident``).
    Raises FormatError when the file is no LoRA."""
    with open_checkpoint(path) as lora:
        values = alpha_values(lora)
        found = modules_of({k: t.shape for k, t in lora.tensors.items()}, lora.metadata,
                           values, path=path)
    info = found.analysis.info
    broken = [_broken(m, why) for m in found.modules if (why := _inconsistent(m))]
    report: dict[str, Any] = {
        "path": path, "key_format": info.key_format,
        "key_format_name": KEY_FORMATS.get(info.key_format, info.key_format),
        "tensor_format": info.format, "family": info.family, "components": info.components,
        "modules": len(found.modules), "adapters": info.adapters, "ranks": info.ranks,
        "alphas": info.alphas, "dora": info.dora, "leftover_keys": len(found.leftover),
        "broken": broken, "groups": info.groups, "reasons": info.reasons,
    }
    if against is not None:
        ident = model_ident or identify_checkpoint(against)
        matching = match(found.modules, against, info.family, ident)
        report["against"] = _against(against.path, ident, matching)
    return report


def _inconsistent(module: Module) -> str:
    try:
        delta_size(module)
    except ValueError as exc:
        return str(exc)
    except (KeyError, IndexError):
        return "its tensors have too few dimensions for their roles"
    return ""


def _broken(module: Module, why: str) -> dict[str, str]:
    return {"module": module.name, "reason": why}


def _against(path: str, ident: Identification, matching: Matching) -> dict[str, Any]:
    groups = [{"reason": u.reason, "why": REASONS[u.reason], "detail": u.detail,
               "modules": len(u.modules), "names": u.modules[:MAX_NAMES],
               "example": u.example} for u in matching.unmatched]
    return {"model": path, "kind": ident.kind, "family": matching.family,
            "layout": matching.layout, "components": matching.components,
            "matched": len(matching.targets), "unmatched": matching.unmatched_count,
            "groups": groups}


def applies(report: dict[str, Any]) -> bool:
    """Whether every module of a checked LoRA applies: none broken, and with a model, every
    one matched."""
    against = report.get("against")
    return not report["broken"] and not (against and against["unmatched"])

