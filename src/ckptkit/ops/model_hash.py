"""``ckpt hash``: a model file's hashes and the content digest of each of its components.

The file hashes (SHA-256, AutoV1/V2/V3, CRC-32, BLAKE3: ``ops.hashing``) name the file's
bytes. A component's content digest names its weights: the same UNet, text encoder or VAE
gives the same digest in a ``.ckpt`` or a ``.safetensors``, alone (ComfyUI's parts) or inside
a checkpoint, under original, kohya or diffusers key names, in any key order and with any
metadata. Each component's keys are mapped to its canonical names (ComfyUI's standalone
names: ``ops.parts.canonical_moves``, what ``load`` and ``assemble`` read parts with), each
canonical tensor's bytes are hashed with BLAKE3, and the component's digest is the BLAKE3 of
its tensors' lines ``name dtype shape digest``, sorted by name. Keys that belong to no
component (EMA copies, training leftovers) are not part of any digest. Another dtype is
other weights (an fp16 copy of an fp32 model has other digests).

The tensors' bytes are hashed from the same read as the file hashes: a tensor stored as a
byte range of the file (or row blocks of one: open_clip's stacked q/k/v) is hashed as the
read passes it. The few that a layout stores otherwise (CLIP-G's transposed projection,
a pickle's strided views) are read apart, one at a time. CLIP's ``position_ids`` (a buffer of
0..76 that files hold or not) is no weight and in no digest.

A file that is no model ckptkit knows (a LoRA, an embedding, an unknown file) has one digest
under its kind, over all its tensors by their own names; a file that cannot be opened as a
checkpoint has none, and ``notes`` says why.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import blake3

from ..arch.detect import Identification
from ..arch.families import families
from ..arch.layouts import Move
from ..engine.moves import plan_moves
from ..engine.writer import CopyRange, Planned, Progress
from ..errors import CkptError
from ..formats import Checkpoint, open_checkpoint
from .hashing import stream_digests
from .inspect import identify_checkpoint
from .parts import canonical_moves

DIGEST_VERSION = "ckptkit-content-1"  # the first line of what a component digest hashes
HASH_KEYS = ("sha256", "autov1", "autov2", "autov3", "crc32", "blake3")


def hash_file(path: str, *, digests: bool = True, progress: Progress | None = None,
              remember: bool = True) -> dict[str, Any]:
    """``{sha256, autov1, autov2, autov3, crc32, blake3, components: {name: digest},
    component_sizes: {name: {tensors, bytes}}, notes}`` of ``path``, from one read of it
    (``digests=False``: the file hashes alone). A file that cannot be opened as a checkpoint
    still gets its file hashes. ``remember``: whether the SHA-256 goes into the hash cache
    (``hashing.stream_digests``)."""
    if not digests:
        hashes, _ = stream_digests(path, progress=progress, remember=remember)
        return {**hashes, "components": {}, "component_sizes": {}, "notes": []}
    try:
        checkpoint = open_checkpoint(path)
    except CkptError as exc:
        hashes, _ = stream_digests(path, progress=progress, remember=remember)
        return {**hashes, "components": {}, "component_sizes": {},
                "notes": [f"no component digests: {exc.reason}"]}
    with checkpoint:
        return hash_checkpoint(checkpoint, identify_checkpoint(checkpoint), progress=progress,
                               remember=remember)


def hash_checkpoint(checkpoint: Checkpoint, ident: Identification,
                    progress: Progress | None = None, remember: bool = True
                    ) -> dict[str, Any]:
    """``hash_file`` of an open checkpoint whose identification the caller has."""
    notes: list[str] = []
    planned = component_tensors(checkpoint, ident, notes)
    streamed: list[tuple[str, int]] = []  # (component, index into its tensors)
    ranges: list[list[tuple[int, int]]] = []
    apart: dict[tuple[str, int], Any] = {}  # -> what its plan produced, if it was asked
    for name, tensors in planned.items():
        for i, tensor in enumerate(tensors):
            spans, made = _byte_ranges(tensor, checkpoint)
            if spans is None:
                apart[name, i] = made
            else:
                streamed.append((name, i))
                ranges.append(spans)
    hashes, found = stream_digests(checkpoint.path, ranges, progress, remember)
    tensor_digests: dict[tuple[str, int], str] = dict(zip(streamed, found, strict=True))
    for (name, i), made in apart.items():
        tensor_digests[name, i] = _digest_apart(planned[name][i] if made is None else made)
    components = {name: _component_digest(tensors, [tensor_digests[name, i]
                                                    for i in range(len(tensors))])
                  for name, tensors in planned.items()}
    sizes = {name: {"tensors": len(tensors), "bytes": sum(t.nbytes for t in tensors)}
             for name, tensors in planned.items()}
    return {**hashes, "components": components, "component_sizes": sizes, "notes": notes}


def component_tensors(checkpoint: Checkpoint, ident: Identification, notes: list[str]
                      ) -> dict[str, list[Planned]]:
    """Each component's tensors under their canonical names (planned, nothing read); a
    component whose keys cannot be mapped is left out, with a note that says why."""
    out: dict[str, list[Planned]] = {}
    if not ident.components:
        moves = [Move(k, (k,)) for k in sorted(checkpoint)]
        if moves:
            out[ident.kind] = plan_moves(moves, checkpoint)
        return out
    fam_id = ident.family or next(iter(ident.compatible_families), None)
    if fam_id is None or fam_id not in families():
        notes.append(f"no component digests: the {ident.kind}'s family is not known")
        return out
    fam = families()[fam_id]
    tiny = ident.components[0].size == "tiny"
    for found in ident.components:
        try:
            view, moves = canonical_moves(fam, checkpoint.path, checkpoint, ident, found.name,
                                          tiny, [])
            out[found.name] = plan_moves([m for m in moves if m.op != "scalar"
                                          and not m.target.endswith("position_ids")], view)
        except (CkptError, KeyError, ValueError) as exc:
            notes.append(f"no content digest for the {found.name}: {exc}")
    return out


# The plans (``engine.moves``) whose data is byte ranges of the file, found without reading.
_RANGES = ("copy_range", "tuple", "_swapped")


def _byte_ranges(tensor: Planned, checkpoint: Checkpoint
                 ) -> tuple[list[tuple[int, int]] | None, Any]:
    """The byte ranges of the file that hold ``tensor``'s canonical bytes, in order, when they
    are plain ranges of it (hashed as the read passes them), else None; and what the plan
    produced, if it was asked (a plan's ``produce`` may be called once only)."""
    produce = getattr(tensor.produce, "func", None)
    if produce is None or produce.__name__ not in _RANGES:
        return None, None
    made = tensor.produce()
    pieces = made if isinstance(made, tuple) else (made,)
    if not all(isinstance(p, CopyRange) and p.source.path == checkpoint.path for p in pieces):
        return None, made
    return [(p.offset, p.offset + p.nbytes) for p in pieces], made


def _digest_apart(tensor: Planned | Any) -> str:
    """The BLAKE3 of a tensor's canonical bytes, read on its own (from its plan, or from
    what the plan produced)."""
    made = tensor.produce() if isinstance(tensor, Planned) else tensor
    hasher = blake3.blake3()
    pieces = made if isinstance(made, tuple) else (made,)
    for piece in pieces:
        if isinstance(piece, CopyRange):
            hasher.update(piece.source.read(piece.offset, piece.nbytes))
        elif isinstance(piece, (bytes, bytearray, memoryview)):
            hasher.update(piece)
        else:  # a torch tensor of the planned dtype and shape
            import torch

            hasher.update(piece.contiguous().reshape(-1).view(torch.uint8).numpy())
    return hasher.hexdigest()


def _component_digest(tensors: Sequence[Planned], digests: Sequence[str]) -> str:
    lines = sorted(f"{t.key}\t{t.dtype.name}\t{json.dumps(list(t.shape))}\t{d}\n"
                   for t, d in zip(tensors, digests, strict=True))
    return blake3.blake3("".join([DIGEST_VERSION + "\n", *lines]).encode()).hexdigest()
