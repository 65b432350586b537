"""``load_pipeline``: a checkpoint, or any mix of parts, as a diffusers pipeline, offline and
without a second copy of the weights.

diffusers' own single-file loader needs the model's config repository from the Hub (offline it
fails, or retries online), wants a transformer-only FLUX file's other parts passed as built
models, and reads the whole state dict into memory before converting it. ckptkit already
declares every family's components, layouts and diffusers configs, so here:

1. Every file is identified from its header and each component it gives is checked against
   the family as ``assemble`` checks a part (``parts.canonical_moves``), before any weight is
   read: parts that do not belong together are refused with assemble's reasons.
2. The modules are built from ckptkit's configs with their parameters on the meta device
   (buffers, which are small and computed, stay real), and the keys the moves make are
   compared with each module's state dict, still before any weight is read.
3. The weights go in as the modules' own parameters (set as ``load_state_dict(assign=True)``
   sets them): a tensor the module takes as it
   is stored becomes a view of the memory-mapped file (no copy at all; pages are read when
   touched) where its data is 64-byte aligned (every weight of a file ckptkit wrote:
   ``engine.writer.ALIGNMENT``); one that is not (safetensors' own writer aligns to 8 bytes:
   the same weights at another offset computed another last bit), or needs a
   cast or another device, is allocated once in its final dtype and filled from the file (a
   slice of rows at a time for a cast), so the only memory a load takes is the weights' own
   and the image does not depend on where a file put a tensor. A split or fused tensor
   (SD3/FLUX q, k, v) is a view of the rows it needs.
4. LoRAs (``loras``) are matched against the files' headers as ``ckpt lora bake`` matches
   them (a module that lands nowhere refuses the load, before any weight is read, unless
   ``allow_unmatched``), and applied by the bake's own code (``lora.bake.patch_rows``) as
   each weight they change is put into its module: read once, patched in fp32 by every
   module of every LoRA in order, cast once into the module's storage.

Pickles go through ckptkit's restricted reader like any other file; nothing is fetched.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterable, Mapping, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from ..arch import diffusers_layout
from ..arch.detect import Identification
from ..arch.families import DIFFUSION_MODEL, Family, families
from ..arch.layouts import Move
from ..engine.writer import ALIGNMENT
from ..errors import FormatError, UsageError, a_or_an
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.checkpoint import paused_gc
from ..formats.dtypes import CLI_NAMES, torch_dtype
from .inspect import (
    identify_checkpoint,
    inspect_diffusers_folder,
    is_diffusers_folder,
    weight_files,
)
from .parts import canonical_moves

MISSING_EXTRA = ("ckptkit: loading a pipeline needs diffusers and transformers; install them "
                 "with: pip install 'ckptkit[generate]'")
COMPUTE_DTYPES = ("fp32", "fp16", "bf16")  # what a pipeline computes in (not fp8)
_SLICE_BYTES = 1 << 24  # how much of a tensor a cast reads at a time
# A view of the mapped file is taken only where its data is aligned as torch aligns what it
# allocates: CPU matrix kernels round the last bit differently for unaligned data, so the
# same weights at another offset (a part split from a checkpoint) gave another image.
_ALIGN = ALIGNMENT
_INPUTS = ("conv_in.weight", "x_embedder.weight")  # [out, in, ...]: the model's input width


@dataclass
class Part:
    """One component of the pipeline: where it comes from and how its keys become the
    diffusers names (``nodes``: diffusers key -> how to make that tensor)."""

    name: str  # ckptkit's component name (clip_l, vae...)
    attribute: str  # the pipeline's (text_encoder_2, unet...)
    path: str
    config: dict
    nodes: dict[str, Any]


@dataclass
class Plan:
    """What ``load_pipeline`` will build, decided from headers alone."""

    family: Family
    pipeline: str  # the diffusers class name
    parts: list[Part]
    scheduler: dict
    extras: dict
    tiny: bool
    variants: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    model_path: str = ""  # the file the diffusion model comes from
    files: dict[str, tuple[Checkpoint, Identification]] = field(default_factory=dict)
    loras: list[Any] = field(default_factory=list)  # lora.bake.LoraReport, one per LoRA
    patches: dict[LazyTensor, tuple[str, list]] = field(default_factory=dict)  # key, changes
    folder: str = ""  # the diffusers folder the parts come from, if they do
    tokenizer_folders: dict[str, str] = field(default_factory=dict)  # the folder's own


def load_pipeline(checkpoint: str | None = None, *, diffusion_model: str | None = None,
                  text_encoders: Sequence[str] = (), vae: str | None = None,
                  loras: Sequence[Any] = (), allow_unmatched: bool = False,
                  dtype: Any = None, device: str = "cpu", tokenizers: Any = None):
    """The diffusers pipeline of ``checkpoint`` (a monolithic file, a diffusion model
    alone, or a diffusers folder: its subfolders' weights, its scheduler and tokenizers)
    with any of its parts replaced or given by other files: ``diffusion_model``,
    ``text_encoders`` (files holding one text encoder each) and ``vae``. ``dtype``: a torch
    dtype or a name (fp16, bf16, fp32); by default float32 on the CPU and the diffusion
    model's own float type on another device. ``tokenizers``: a folder holding them, or
    None to look where a user's copies usually are (``ops.tokenizers``). ``loras``: each a
    path, (path, strength) or (path, strength, text encoders' strength), applied in order
    as ``ckpt lora bake`` applies them; a module that lands nowhere refuses the load
    unless ``allow_unmatched``. Offline: nothing is fetched. The plan's warnings are in
    ``pipeline.ckptkit_warnings``."""
    with ExitStack() as stack, paused_gc():  # many small objects, few cycles
        plan = plan_pipeline(checkpoint, diffusion_model=diffusion_model,
                             text_encoders=text_encoders, vae=vae, stack=stack)
        plan_loras(plan, loras, allow_unmatched=allow_unmatched, stack=stack)
        return build(plan, dtype=dtype, device=device, tokenizers=tokenizers)


def _diffusers():
    try:
        import diffusers
        import transformers
    except ImportError:
        raise UsageError(MISSING_EXTRA) from None
    return diffusers, transformers


# --------------------------------------------------------------------------- planning


def _open(path: str, stack: ExitStack) -> tuple[str, Checkpoint, Identification]:
    """A file, or a diffusers component folder (its weight files, shards together, as one
    checkpoint: each lazy tensor reads from its own file)."""
    if not os.path.isdir(path):
        checkpoint = stack.enter_context(open_checkpoint(path))
        return path, checkpoint, identify_checkpoint(checkpoint)
    files = weight_files(path)
    if not files:
        raise FormatError("holds no weights (.safetensors or .bin)", path)
    shards = [stack.enter_context(open_checkpoint(f)) for f in files]
    tensors = {k: t for shard in shards for k, t in shard.items()}
    metadata = {k: v for shard in shards for k, v in shard.metadata.items()}
    checkpoint = Checkpoint(path, shards[0].format, tensors, shards[0].source, metadata)
    return path, checkpoint, identify_checkpoint(checkpoint)


# A diffusers folder's subfolders, as the parts load_pipeline takes.
_FOLDER_ROLES = {"unet": "diffusion_model", "transformer": "diffusion_model",
                 "text_encoder": "text_encoders", "text_encoder_2": "text_encoders",
                 "text_encoder_3": "text_encoders", "vae": "vae"}


@dataclass
class _Folder:
    """A diffusers pipeline folder read as parts: its component subfolders by role, its
    scheduler's config and its tokenizer folders (by the pipeline's attribute)."""

    path: str
    parts: dict[str, Any]
    scheduler: dict | None
    tokenizers: dict[str, str]


def _read_folder(path: str) -> _Folder:
    """The parts of the diffusers folder ``path``, from its ``model_index.json`` and
    subfolders (read as data: JSON and weight files; nothing of a folder is run)."""
    import json

    described = inspect_diffusers_folder(path)  # refuses a component named as a path
    parts: dict[str, Any] = {"diffusion_model": None, "text_encoders": [], "vae": None}
    for sub in described["components"]:
        role = _FOLDER_ROLES.get(sub)
        if role == "text_encoders":
            parts[role].append(os.path.join(path, sub))
        elif role:
            parts[role] = os.path.join(path, sub)
    scheduler = None
    config = os.path.join(path, "scheduler", "scheduler_config.json")
    if os.path.isfile(config):
        try:
            with open(config, encoding="utf-8") as f:
                scheduler = json.load(f)
        except (OSError, ValueError) as exc:
            raise FormatError(f"scheduler/scheduler_config.json cannot be read ({exc})",
                              path) from None
        name = scheduler.get("_class_name") if isinstance(scheduler, dict) else None
        if not (isinstance(name, str) and name.endswith("Scheduler") and name.isidentifier()):
            raise FormatError("scheduler/scheduler_config.json names no diffusers scheduler",
                              path)
    tokenizers = {f"tokenizer{sub.removeprefix('text_encoder')}":
                  os.path.join(path, f"tokenizer{sub.removeprefix('text_encoder')}")
                  for sub in _FOLDER_ROLES if sub.startswith("text_encoder")}
    return _Folder(path, parts, scheduler,
                   {k: v for k, v in tokenizers.items() if os.path.isdir(v)})


def _one_component(path: str, ident: Identification, role: str) -> str:
    names = [c.name for c in ident.components]
    if len(names) != 1 or ident.kind == "checkpoint":
        raise UsageError(f"{path} was given as {a_or_an(role)} but is "
                         f"{a_or_an(ident.describe())}")
    return names[0]


def plan_pipeline(checkpoint: str | None = None, *, diffusion_model: str | None = None,
                  text_encoders: Iterable[str] = (), vae: str | None = None,
                  stack: ExitStack) -> Plan:
    """Identifies every file, checks the parts belong together and plans every tensor's
    moves to its diffusers name; reads no tensor data. The files stay open in ``stack``.
    ``checkpoint`` may be a diffusers folder: its subfolders are the parts, each replaced
    by the one given in its place."""
    opened: dict[str, tuple[str, Checkpoint, Identification]] = {}

    def get(path: str) -> tuple[str, Checkpoint, Identification]:
        if path not in opened:
            opened[path] = _open(path, stack)
        return opened[path]

    folder = None
    if checkpoint and os.path.isdir(checkpoint) and is_diffusers_folder(checkpoint):
        folder = _read_folder(checkpoint)
        diffusion_model = diffusion_model or folder.parts["diffusion_model"]
        replaced = {c.name for p in text_encoders for c in get(p)[2].components}
        text_encoders = [*text_encoders, *(
            p for p in folder.parts["text_encoders"]
            if not replaced & {c.name for c in get(p)[2].components})]
        vae = vae or folder.parts["vae"]
        checkpoint = None
    base = get(checkpoint) if checkpoint else None
    if base and base[2].kind != "checkpoint":
        if base[2].kind != "diffusion-model" or diffusion_model:
            raise UsageError(f"{checkpoint} is {a_or_an(base[2].describe())}, not a checkpoint "
                             "or a diffusion model")
        diffusion_model, base = checkpoint, None
    given: dict[str, tuple[str, Checkpoint, Identification]] = {}
    if diffusion_model:
        model = get(diffusion_model)
        if _one_component(diffusion_model, model[2], "diffusion model") != DIFFUSION_MODEL:
            raise UsageError(f"{diffusion_model} is {a_or_an(model[2].describe())}, not a "
                             "diffusion model")
        given[DIFFUSION_MODEL] = model
    elif base:
        model = base
    else:
        raise UsageError("give a checkpoint or a diffusion model to load")
    fam_id = model[2].family
    if not fam_id:
        raise UsageError(f"{model[0]} is {a_or_an(model[2].describe())} of no family ckptkit can "
                         "name: " + "; ".join(model[2].reasons[-1:]))
    fam = families()[fam_id]
    if base and base[2].family != fam.id:
        raise UsageError(f"{base[0]} is {a_or_an(base[2].describe())} and {model[0]} "
                         f"{a_or_an(model[2].describe())}: they are not parts of one model")
    for role, path in [*(("text encoder", p) for p in text_encoders),
                       *((["VAE", vae],) if vae else ())]:
        found = get(path)
        name = _one_component(path, found[2], role)
        if (role == "VAE") != (name == "vae"):
            raise UsageError(f"{path} was given as {a_or_an(role)} but is {a_or_an(name)}")
        if name in given:
            raise UsageError(f"{path} and {given[name][0]} are both {a_or_an(name)}")
        given[name] = found
    size = next(c.size for c in model[2].components if c.name == DIFFUSION_MODEL)
    if size == "other":
        raise UsageError(f"{model[0]}'s diffusion model has shapes of neither the released "
                         f"{fam.name} nor ckptkit's tiny sample; ckptkit has no config for it")
    tiny = size == "tiny"
    index, subfolders = diffusers_layout.folder(fam)
    sources = {name: given.get(name, base) for _, (name, _) in subfolders.items()}
    missing = [n for n, src in sources.items() if src is None or (
        src is base and n not in [c.name for c in base[2].components])]
    if missing:
        raise UsageError(f"{fam.name} also needs {', '.join(missing)}; give "
                         f"{'them' if len(missing) > 1 else 'it'} as separate files")
    unused = [n for n in given if n not in sources]
    if unused:
        raise UsageError(f"{given[unused[0]][0]} is {a_or_an(unused[0])}, which "
                         f"{fam.name}'s pipeline does not use")
    warnings: list[str] = []
    moved = {}
    for name, (path, ckpt, ident) in sources.items():
        moved[name] = (path, *canonical_moves(fam, path, ckpt, ident, name, tiny, warnings))
    variants = list(model[2].variants)
    if "v-prediction" in model[2].ambiguous:
        warnings.append(f"{model[0]}: nothing in the file says whether it is an SD 2.x 512 "
                        "model (predicting noise) or a 768-v one (predicting v); loaded as "
                        "predicting noise")
    pipeline = diffusers_layout.pipeline_class(fam, variants)
    parts = []
    for attribute, (name, _) in subfolders.items():
        path, ckpt, moves = moved[name]
        nodes = _diffusers_nodes(fam, name, tiny, ckpt, moves)
        parts.append(Part(name, attribute, path, _config(fam, name, tiny, nodes), nodes))
    extras = {k: v for k, v in index.items()
              if k not in subfolders and k not in ("_class_name", "scheduler")}
    files = {path: (ckpt, ident) for path, ckpt, ident in sources.values()}
    scheduler = folder.scheduler if folder and folder.scheduler else _scheduler(fam, variants)
    return Plan(fam, pipeline, parts, scheduler, extras, tiny, variants, warnings, model[0],
                files, folder=folder.path if folder else "",
                tokenizer_folders=folder.tokenizers if folder else {})


def lora_spec(entry: Any):
    """A ``loras`` entry as a ``lora.bake.LoraSpec``: a path, or (path, strength[, te])."""
    from ..lora.bake import LoraSpec

    if isinstance(entry, LoraSpec):
        return entry
    if isinstance(entry, (str, bytes)) or hasattr(entry, "__fspath__"):
        return LoraSpec(str(entry))
    entry = tuple(entry)
    if not 1 <= len(entry) <= 3:
        raise UsageError(f"a LoRA is a path or (path, strength[, te_strength]), not {entry!r}")
    return LoraSpec(str(entry[0]), *(float(x) for x in entry[1:]))


def plan_loras(plan: Plan, loras: Iterable[Any], *, allow_unmatched: bool = False,
               stack: ExitStack) -> None:
    """Matches each LoRA's modules against the plan's files, as ``lora bake`` does, and
    records in ``plan.patches`` the changes to each file tensor; reads no model weight. A
    module that lands nowhere refuses the load with bake's reasons (``NotApplied``)."""
    from ..lora.bake import BakeReport, _plan_lora, _refuse_unmatched

    specs = [lora_spec(entry) for entry in loras]
    if not specs:
        return
    # a VAE file holds no layer a LoRA adapts (and ``lora.targets`` takes no VAE)
    applies: dict[str, dict[str, list]] = {
        path: {} for path, (_, ident) in plan.files.items()
        if ident.kind in ("checkpoint", "diffusion-model", "text-encoder")}
    models = [(*plan.files[path], found) for path, found in applies.items()]
    report = BakeReport(plan.family.id, None)
    for spec in specs:
        lora = stack.enter_context(open_checkpoint(spec.path))
        report.loras.append(_plan_lora(spec, lora, models))
    where = plan.model_path if len(plan.files) == 1 else f"{plan.model_path} and its parts"
    _refuse_unmatched(report, where, allow_unmatched, ("loaded", "allow_unmatched loads"))
    plan.loras = report.loras
    plan.warnings.extend(report.notes)
    for path, changes in applies.items():
        checkpoint = plan.files[path][0]
        for key, found in changes.items():
            plan.patches[checkpoint[key]] = (key, found)


def _config(fam: Family, name: str, tiny: bool, nodes: Mapping[str, Any]) -> dict:
    """The component's config, its input widened for an input-channel variant (inpainting,
    pix2pix, FLUX Fill and Depth), as the weights say."""
    config = diffusers_layout.component_config(fam, name, tiny)
    if name == DIFFUSION_MODEL:
        key = next((k for k in _INPUTS if k in nodes), None)
        channels = nodes[key].shape[1] if key else None
        if channels and channels != config.get("in_channels"):
            config["out_channels"] = config.get("out_channels") or config["in_channels"]
            config["in_channels"] = channels
    return config


def _scheduler(fam: Family, variants: list[str]) -> dict:
    """The family's scheduler, predicting v where the file says the model does."""
    config = diffusers_layout.scheduler_config(fam)
    if "prediction_type" in config and "v-prediction" in variants:
        config["prediction_type"] = "v_prediction"
    return config


# --------------------------------------------------------------------------- tensor recipes


@dataclass(frozen=True)
class _Rows:
    """Rows ``start:stop`` of a file tensor, seen as ``shape``: a view of the mapped file, or
    read a slice at a time into a tensor of another dtype."""

    tensor: LazyTensor
    start: int
    stop: int
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _Op:
    """Any other move (a stack, swapped halves, a transpose) of tensors made first."""

    move: Move
    inputs: tuple[Any, ...]
    shape: tuple[int, ...]


def _leaf(tensor: LazyTensor) -> _Rows:
    rows = tensor.shape[0] if tensor.shape else 1
    return _Rows(tensor, 0, rows, tensor.shape)


def _apply(move: Move, inputs: list[Any]) -> Any:
    """The node that ``move`` makes of ``inputs``: still rows of one file tensor where it can
    be (a copy, rows of rows, a reshape), else an ``_Op``."""
    first = inputs[0] if inputs else None
    if move.op == "copy":
        return first
    if isinstance(first, _Rows) and first.shape and first.shape[0] == first.stop - first.start:
        if move.op == "rows":
            start, stop = move.row_range(first.shape[0])
            return _Rows(first.tensor, first.start + start, first.start + stop,
                         (stop - start, *first.shape[1:]))
        if move.op == "reshape":
            return _Rows(first.tensor, first.start, first.stop, tuple(move.shape))
    if move.op == "rows":
        start, stop = move.row_range(first.shape[0])
        shape = (stop - start, *first.shape[1:])
    elif move.op == "reshape":
        shape = tuple(move.shape)
    elif move.op == "concat":
        shape = (sum(i.shape[0] for i in inputs), *first.shape[1:])
    elif move.op == "transpose":
        shape = tuple(reversed(first.shape))
    elif move.op == "swap_halves":
        shape = first.shape
    else:
        raise AssertionError(f"{move.target}: no loader for a {move.op} move")
    return _Op(move, tuple(inputs), shape)


def _diffusers_nodes(fam: Family, name: str, tiny: bool, checkpoint: Checkpoint,
                     moves: list[Move]) -> dict[str, Any]:
    """Diffusers key -> how to make it, from the file's keys through the canonical names."""
    canonical = {m.target: _apply(m, [_leaf(checkpoint[s]) for s in m.sources])
                 for m in moves}
    try:
        to_diffusers = diffusers_layout.to_diffusers(fam, name, tiny, set(canonical))
    except (KeyError, ValueError) as exc:
        raise UsageError(f"{name} cannot be loaded into diffusers: {exc}") from None
    return {m.target: _apply(m, [canonical[s] for s in m.sources]) for m in to_diffusers}


class _Scratch:
    """One read buffer for every slice a load casts: a new 16 MB buffer for each slice cost
    a page fault per 4 KB page every time (an SD 1.5 load cast to fp32 took 1.45x the time
    of diffusers' until the buffer was reused). Also each file's whole memory map as one
    byte tensor, which the views of its tensors slice (``LazyTensor.load`` wraps the map
    anew for each tensor, under a warnings filter: a tenth of an SDXL load)."""

    def __init__(self):
        self.buffer = bytearray()
        self.maps: dict[int, Any] = {}

    def view(self, lazy: LazyTensor, start: int, stop: int):
        """Rows ``start:stop`` of a contiguous file tensor, viewing the mapped file."""
        import warnings

        import torch

        flat = self.maps.get(id(lazy.source))
        if flat is None:
            with warnings.catch_warnings():  # the map is copy-on-write: never written here
                warnings.simplefilter("ignore")
                flat = torch.frombuffer(lazy.source.mmap(), dtype=torch.uint8)
            self.maps[id(lazy.source)] = flat
        row = lazy.nbytes // lazy.shape[0] if lazy.shape else lazy.nbytes
        begin = lazy.data_offset + start * row
        return flat[begin:begin + (stop - start) * row].view(torch_dtype(lazy.dtype))

    def rows(self, lazy: LazyTensor, start: int, stop: int):
        """Rows ``start:stop`` of a contiguous file tensor, as a [rows, -1] view of the
        buffer (valid until the next call)."""
        import torch

        row = lazy.nbytes // lazy.shape[0]
        n = (stop - start) * row
        if len(self.buffer) < n:
            self.buffer = bytearray(n)
        lazy.source.read_into(lazy.data_offset + start * row, memoryview(self.buffer)[:n])
        flat = torch.frombuffer(self.buffer, dtype=torch.uint8, count=n)
        return flat.view(torch_dtype(lazy.dtype)).view(stop - start, -1)


def _materialise(node: Any, dtype, device, zero_copy: bool, scratch: _Scratch,
                 patches: Mapping[LazyTensor, tuple[str, list]]):
    """The tensor ``node`` describes, in ``dtype`` on ``device`` (``dtype`` None: as
    stored, or fp32 where a LoRA changes it). ``zero_copy``: a view of the mapped file where
    the stored tensor is taken as it is and its data is aligned (``_ALIGN``); unaligned, it
    is read into memory of its own."""
    import torch

    if isinstance(node, _Op):
        from ..engine.moves import _produce

        inputs = [_materialise(i, None, "cpu", False, scratch, patches) for i in node.inputs]
        made = _produce(node.move, [_Ready(t) for t in inputs], None)
        return made.to(device=device, dtype=dtype or made.dtype)
    lazy: LazyTensor = node.tensor
    if lazy in patches:
        return _patched(node, patches[lazy], dtype or torch.float32, device)
    stored = torch_dtype(lazy.dtype)
    target = dtype or stored
    as_stored = target == stored and str(device) == "cpu"
    if zero_copy and as_stored and lazy.nbytes:
        if lazy.byte_rows:
            view = scratch.view(lazy, node.start, node.stop if lazy.shape else 1)
        else:
            view = lazy.load()[node.start:node.stop] if lazy.shape else lazy.load()
        if view.data_ptr() % _ALIGN == 0:
            return view.reshape(node.shape)
    out = torch.empty(node.shape, dtype=target, device=device)
    if not lazy.shape or not out.numel():
        return out.copy_(lazy.read().reshape(node.shape))
    if as_stored and lazy.byte_rows:  # straight from the file into its own memory
        row = lazy.nbytes // lazy.shape[0]
        lazy.source.read_into(lazy.data_offset + node.start * row,
                              memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out
    rows = out.view(node.stop - node.start, -1)
    row_bytes = max(1, lazy.nbytes // lazy.shape[0])
    step = max(1, _SLICE_BYTES // row_bytes)
    for start in range(node.start, node.stop, step):
        stop = min(start + step, node.stop)
        part = (scratch.rows(lazy, start, stop) if lazy.byte_rows else
                lazy.read_rows(start, stop).reshape(stop - start, -1))
        rows[start - node.start:stop - node.start].copy_(part)
    return out


def _patched(node: _Rows, patch: tuple[str, list], dtype, device):
    """The node's rows with the LoRAs' changes, made by the bake's code straight into a
    tensor of ``dtype`` (cast once; fp16 values beyond its range clamped as a bake clamps
    them)."""
    import torch

    from ..lora.bake import patch_rows

    key, changes = patch
    out = torch.empty(node.shape, dtype=dtype)
    limit = torch.finfo(dtype).max if dtype == torch.float16 else None  # as bake: fp16 only
    rows = (node.start, node.stop) if node.tensor.shape else None
    patch_rows(key, node.tensor, changes, out, rows, limit)
    return out.to(device)


class _Ready:
    """A tensor already read, as ``engine.moves._produce`` takes its sources."""

    def __init__(self, tensor):
        self.tensor = tensor

    def read(self):
        return self.tensor


# --------------------------------------------------------------------------- building


@contextmanager
def _parameters_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random
    initialisation that counts) and their buffers real: buffers are small values computed
    at construction (CLIP's position ids) that no file needs to hold."""
    import torch

    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"),
                                                          requires_grad=False)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _no_init_weights():
    """transformers' own switch that skips initialising weights that will be loaded (its
    ``from_pretrained`` uses it): on meta parameters the initialisation computes nothing but
    still took half of an SDXL load's second. Where a version lacks it, a no-op."""
    import importlib

    for where in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            found = getattr(importlib.import_module(where), "no_init_weights", None)
        except ImportError:
            continue
        if found is not None:
            return found()
    return nullcontext()


def _module(config: dict):
    """The module of ``config``, its parameters on the meta device and not initialised
    (transformers' switch also skips torch's ``nn.init`` calls, which diffusers' layers
    make too: a third of an SDXL pipeline's construction)."""
    diffusers, transformers = _diffusers()
    with _parameters_on_meta(), _no_init_weights():
        if "_class_name" in config:
            return getattr(diffusers, config["_class_name"]).from_config(config)
        cls = getattr(transformers, config["architectures"][0])
        return cls._from_config(cls.config_class.from_dict(config))


def _slots(module) -> dict[str, tuple[Any, str, Any]]:
    """The module's state-dict entries, name -> (the submodule holding it, its attribute
    there, its tensor now), found without making the state dict (which detaches every
    tensor and runs every submodule's hooks: a tenth of an SDXL load, twice)."""
    slots = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for leaf, value in sub._parameters.items():
            if value is not None:
                slots[dot + leaf] = (sub, leaf, value)
        for leaf, value in sub._buffers.items():
            if value is not None and leaf not in sub._non_persistent_buffers_set:
                slots[dot + leaf] = (sub, leaf, value)
    return slots


def _state_names(module, nodes: Mapping[str, Any], part: Part,
                 state: Mapping[str, Any]) -> dict[str, str]:
    """The module's state-dict name (a key of ``_slots``) of each planned key: the same,
    but for a CLIP text model of transformers 5, whose ``CLIPTextModel`` has no
    ``text_model.`` level in memory; position ids (a buffer it makes itself) are left to
    it. Refuses a plan that does not fill the module exactly."""
    names = {}
    for key in nodes:
        name = key if key in state else key.removeprefix("text_model.")
        if name in state:
            names[key] = name
        elif not key.endswith("position_ids"):
            raise AssertionError(f"{part.path}: {key} has no place in {type(module).__name__}")
    tied = {t for t in (getattr(module, "_tied_weights_keys", None) or ())}
    missing = [k for k, (_, _, v) in state.items() if v.device.type == "meta"
               and k not in names.values() and k not in tied]
    if missing:
        raise UsageError(f"{part.path}: its {part.name} lacks {len(missing)} tensors "
                         f"diffusers' {type(module).__name__} needs, e.g. {missing[0]}")
    return names


def _dtype(dtype: Any, device: str, plan: Plan):
    import torch

    if dtype is None:
        if str(device).startswith("cpu"):
            return torch.float32
        model = next(p for p in plan.parts if p.name == DIFFUSION_MODEL)
        stored = {torch_dtype(n.tensor.dtype) for n in model.nodes.values()
                  if isinstance(n, _Rows) and n.tensor.dtype.is_float}
        if stored == {torch.float16} or stored == {torch.bfloat16}:
            return stored.pop()
        # fp8 weights are computed in bf16 (the FLUX releases' own dtype); mixed or fp32, fp32
        return torch.bfloat16 if stored and all(d.itemsize == 1 for d in stored) \
            else torch.float32
    if isinstance(dtype, str):
        if dtype not in COMPUTE_DTYPES:
            raise UsageError(f"dtype must be one of {', '.join(COMPUTE_DTYPES)}, not {dtype!r}")
        return torch_dtype(CLI_NAMES[dtype])
    return dtype


def _fill(module, part: Part, slots: Mapping[str, tuple[Any, str, Any]],
          names: Mapping[str, str], dtype, device, scratch: _Scratch,
          patches: Mapping[LazyTensor, tuple[str, list]]) -> None:
    """Puts the part's weights into ``module``: each tensor made becomes the parameter (or
    buffer) itself, as ``load_state_dict(assign=True)`` would make it, set in its submodule
    directly (``load_state_dict``'s per-module walk took a tenth of an SDXL load);
    parameters of modules the class keeps in float32 stay float32."""
    import torch

    keep = tuple(getattr(module, "_keep_in_fp32_modules", None) or ())
    for key, name in names.items():
        node = part.nodes[key]
        floating = isinstance(node, _Op) or node.tensor.dtype.is_float
        wanted = dtype if floating else None
        if wanted in (torch.float16, torch.bfloat16) and any(
                f".{m}." in f".{name}" for m in keep):
            wanted = torch.float32
        tensor = _materialise(node, wanted, device, True, scratch, patches)
        owner, leaf, now = slots[name]
        if tensor.shape != now.shape:
            raise AssertionError(f"{part.path}: {key} is {list(tensor.shape)}, "
                                 f"{type(module).__name__} holds {list(now.shape)}")
        if leaf in owner._parameters:
            owner._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
        else:
            owner._buffers[leaf] = tensor
    if hasattr(module, "tie_weights"):
        module.tie_weights()
    left = [n for n, p in module.named_parameters() if p.device.type == "meta"]
    if left:
        raise AssertionError(f"{part.path}: {left[0]} was not loaded")
    if str(device) != "cpu":  # on the CPU every tensor is where it belongs already
        module.to(device)
    module.eval()
    module.requires_grad_(False)


def build(plan: Plan, *, dtype: Any = None, device: str = "cpu", tokenizers: Any = None):
    """The pipeline of ``plan``: its modules built on the meta device and checked against
    the plan before any weight is read, then filled."""
    diffusers, _ = _diffusers()
    from .tokenizers import tokenizers_for

    dtype = _dtype(dtype, device, plan)
    found_tokenizers = tokenizers_for(plan, tokenizers)
    modules, slots, names = {}, {}, {}
    for part in plan.parts:
        module = modules[part.attribute] = _module(part.config)
        slots[part.attribute] = _slots(module)
        names[part.attribute] = _state_names(module, part.nodes, part, slots[part.attribute])
    scratch = _Scratch()
    for part in plan.parts:
        _fill(modules[part.attribute], part, slots[part.attribute], names[part.attribute],
              dtype, device, scratch, plan.patches)
    scheduler = getattr(diffusers, plan.scheduler["_class_name"]).from_config(plan.scheduler)
    cls = getattr(diffusers, plan.pipeline)
    params = inspect.signature(cls.__init__).parameters
    kwargs: dict[str, Any] = {"scheduler": scheduler, **modules, **found_tokenizers}
    for key, value in plan.extras.items():
        if key in params and key not in kwargs:
            kwargs[key] = None if isinstance(value, list) else value
    if "add_watermarker" in params:
        kwargs["add_watermarker"] = False
    for key, param in params.items():
        if key != "self" and key not in kwargs and param.default is inspect.Parameter.empty:
            kwargs[key] = None
    pipe = cls(**{k: v for k, v in kwargs.items() if k in params})
    pipe.ckptkit_warnings = list(plan.warnings)
    pipe.ckptkit_plan = plan
    return pipe

