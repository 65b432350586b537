"""``merge``: models combined key by key on the streaming engine, checked before anything is
read, with a recipe in the output's metadata that reproduces it.

Every input is identified first: models of different families, or keys whose shapes differ,
are refused before a tensor is read (an SDXL + SD 1.5 merge stops in milliseconds instead of
allocating hundreds of GB). Integer and marker tensors (CLIP ``position_ids``, ``v_pred``)
are copied from the base model (A), never interpolated; an inpainting (9-channel) or
pix2pix (8-channel) input convolution merges the channels the models share and takes the
extra ones from the model that has them, as AUTOMATIC1111 does. Each output tensor reads the
same key of every input once and runs every step of the recipe on it (a multi-step recipe
needs no intermediate files), computing in fp32 and casting to the output dtype. The inputs
are hashed while they are read, and the recipe names them by SHA-256, so ``from_metadata``
can find and check them to make the same file again. The output's metadata describes the
merge, not model A: of A's own it keeps only what says which kind of model it is (ModelSpec
architecture, prediction type); the recipes found in the inputs go into a lineage key.
"""

from __future__ import annotations

import json
import os
import zlib
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from .. import __version__
from ..arch.detect import INPUT_CHANNEL_VARIANTS, MARKERS, Identification
from ..arch.families import Family, component_name, families
from ..engine.moves import copy_range
from ..engine.slices import by_rows
from ..engine.writer import Deferred, Planned, Progress, write_safetensors
from ..errors import FormatError, UsageError, a_or_an
from ..formats import Checkpoint, LazyTensor, open_checkpoint
from ..formats.dtypes import CLI_NAMES, DType, torch_dtype
from .hashing import BackgroundSha256, sha256
from .inspect import identify_checkpoint
from .merge_blocks import (
    MBW_BLOCKS,
    PRESETS,
    block_names,
    describe,
    parse_weights,
    weights_for_keys,
)
from .merge_methods import METHODS, Method, param_problem
from .merge_recipe import (
    MISSING,
    Recipe,
    Step,
    from_record,
    one_step,
    read_record,
    to_record,
    with_defaults,
)
from .parts import component_from
from .provenance import provenance, source_hashes

RECIPE_KEY = "ckptkit.merge_recipe"
_LINEAGE_KEYS = (RECIPE_KEY, "sd_merge_recipe", "sd_merge_models", "mecha_recipe")
_MODEL_TYPE_KEYS = {f"modelspec.{k}" for k in ("sai_model_spec", "architecture", "implementation",
                                              "prediction_type", "predict_key", "resolution")}
__all__ = ["MISSING", "RECIPE_KEY", "MergeReport", "from_metadata", "list_blocks", "merge",
           "run_recipe"]


@dataclass
class MergeReport:
    family: str | None
    merged: int = 0
    copied: int = 0
    taken: int = 0  # tensors of components taken unchanged (--take)
    skipped: int = 0
    ignored: int = 0  # keys only the other models have
    notes: list[str] = field(default_factory=list)
    # Keys of the --take files not taken (EMA copies, training leftovers...), by why.
    take_left_out: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _StepPlan:
    """One step of the recipe for one key: parameters resolved (per-block weights), and the
    tensors to let go of once it has run (``Recipe.releases``)."""

    name: str
    method: Method
    models: tuple[str, ...]
    params: dict[str, Any]
    release: tuple[str, ...]


@dataclass(frozen=True)
class _KeyPlan:
    key: str
    leaves: dict[str, LazyTensor]  # input name -> its tensor of this key
    steps: tuple[_StepPlan, ...]
    output: str
    out_dtype: DType
    compute: str
    device: str


def merge(method_name: str, paths: list[str], out: str, *, params: dict[str, Any],
          dtype: str | None = None, compute_dtype: str = "float32",
          components: list[str] | None = None, missing: str = "take-a",
          take: dict[str, str] | None = None, device: str = "cpu",
          progress: Progress | None = None) -> MergeReport:
    """``ckpt merge METHOD A B [C ...]``: a one-step recipe."""
    recipe = one_step(method_name, paths, params, dtype=dtype, compute_dtype=compute_dtype,
                      components=components, missing=missing, take=take, device=device)
    return run_recipe(recipe, out, progress)


def run_recipe(recipe: Recipe, out: str, progress: Progress | None = None,
               fsync: bool = True) -> MergeReport:
    recipe = with_defaults(recipe)
    recipe.steps = recipe.needed_steps()  # a step the result does not use is not run
    _check_device(recipe.device)
    merged_names = recipe.used_inputs()
    names = merged_names + [n for n in recipe.take.values() if n not in merged_names]
    with ExitStack() as stack:
        checkpoints = {n: stack.enter_context(open_checkpoint(recipe.inputs[n]))
                       for n in names}
        idents = _identify_all(recipe, merged_names, checkpoints)
        first = idents[recipe.base()]
        fam = families().get(first.family) if first.family else None
        report = MergeReport(first.family)
        taken = _taken(recipe, fam, idents, checkpoints, report)
        planned = _plan(recipe, fam, first, checkpoints, taken, report)
        paths = [recipe.inputs[n] for n in names]
        hashing = BackgroundSha256(paths)
        base = checkpoints[recipe.base()]
        metadata: dict[str, Any] = {
            **_model_type(base.metadata),
            **provenance("merge", paths, source_hashes(paths, True, hashing)),
            RECIPE_KEY: _recorded(recipe, names, hashing)}
        lineage = _lineage(recipe, merged_names, checkpoints)
        if lineage:
            metadata["ckptkit.merge_lineage"] = json.dumps(lineage)
        write_safetensors(out, planned, metadata, inputs=tuple(paths), progress=progress,
                          fsync=fsync)
    return report


def _check_device(device: str) -> None:
    """The recipe's check allowed cpu and cuda[:N]; whether this machine has it is asked
    here, when the merge is run."""
    if device == "cpu":
        return
    import torch

    if not torch.cuda.is_available():
        raise UsageError(f"--device {device}: torch finds no CUDA device on this machine")


def _identify_all(recipe: Recipe, names: list[str], checkpoints: dict[str, Checkpoint]
                  ) -> dict[str, Identification]:
    """Identifies every merged input, refuses any that is not a model of the base model's
    family; returns each one's identification."""
    idents = {n: identify_checkpoint(checkpoints[n]) for n in names}
    for name, ident in idents.items():
        if ident.kind in ("lora", "unknown"):
            raise UsageError(f"{recipe.inputs[name]} is {a_or_an(ident.kind)}, not a model to "
                             "merge")
    base = recipe.base()
    first = idents[base]
    for name, ident in idents.items():
        if not ident.same_model(first):
            raise UsageError(f"cannot merge {os.path.basename(recipe.inputs[base])} "
                             f"({first.describe()}) with "
                             f"{os.path.basename(recipe.inputs[name])} ({ident.describe()}): "
                             "different models")
    return idents


def _taken(recipe: Recipe, fam: Family | None, idents: dict[str, Identification],
           checkpoints: dict[str, Checkpoint], report: MergeReport) -> dict[str, list[Planned]]:
    """Component -> its tensors taken unchanged from the named input (``--take``)."""
    if not recipe.take:
        return {}
    first = idents[recipe.base()]
    if fam is None or first.kind != "checkpoint" or first.layout != "ldm":
        raise UsageError("--take puts a component into a monolithic checkpoint in the "
                         f"original layout; these models are {first.kind}s in the "
                         f"{first.layout} layout")
    tiny = first.components[0].size == "tiny"
    taken = {}
    for given, name in recipe.take.items():
        component = component_name(given)
        if component not in fam.component_names:
            raise UsageError(f"--take {component}: {fam.name} has no such component; it has "
                             f"{', '.join(fam.component_names)}")
        taken[component] = component_from(fam, recipe.inputs[name], checkpoints[name],
                                          component, tiny, idents.get(name),
                                          left_out=report.take_left_out)
        report.taken += len(taken[component])
    return taken


def _prefixes(fam: Family | None, first: Identification, names: list[str] | None
              ) -> tuple[str, ...] | None:
    if not names:
        return None
    prefixes = {c.name: c.prefix for c in first.components}
    names = [component_name(c) for c in names]
    unknown = [c for c in names if c not in prefixes]
    if unknown:
        raise UsageError(f"the models have no {unknown[0]} component; they have "
                         f"{', '.join(prefixes)}")
    return tuple(prefixes[c] for c in names)


def _is_data(tensor: LazyTensor, key: str) -> bool:
    """Whether a key holds weights to interpolate: not integers, markers or empty, and not
    the text encoders' ``position_ids`` (indexes, even where a file stores them as floats;
    AUTOMATIC1111 skips them by name too)."""
    return (tensor.dtype.is_float and tensor.dtype.bits >= 8 and key not in MARKERS
            and not key.endswith("position_ids") and tensor.numel > 0)


def _plan(recipe: Recipe, fam: Family | None, first: Identification,
          checkpoints: dict[str, Checkpoint], taken: dict[str, list[Planned]],
          report: MergeReport) -> list[Planned]:
    base_name = recipe.base()
    base = checkpoints[base_name]
    leaves = recipe.used_inputs()
    others = [n for n in leaves if n != base_name]
    selected = _prefixes(fam, first, recipe.components)
    replaced = tuple(fam.component(c).ldm_prefix for c in taken) if fam else ()
    params = _param_tables(recipe, first.family, [k for k in base])
    releases = recipe.releases()
    # Keys with the same per-block weights share their steps' plans: one copy of the steps
    # for each set of weights, not one per key (a long recipe would fill memory with them).
    per_block = [(s.name, p) for s in recipe.steps for p, table in params[s.name].items()
                 if isinstance(table, dict)]
    shared: dict[tuple, tuple[_StepPlan, ...]] = {}
    planned: list[Planned] = []
    for key, tensor in base.items():
        if replaced and key.startswith(replaced):
            continue
        data = _is_data(tensor, key)
        out_dtype = CLI_NAMES[recipe.dtype] if recipe.dtype and data else tensor.dtype
        in_scope = selected is None or key.startswith(selected)
        absent = [n for n in others if key not in checkpoints[n]]
        if absent and in_scope and data:
            if recipe.missing == "error":
                raise UsageError(f"{recipe.inputs[absent[0]]} has no {key} (use --missing "
                                 "take-a or skip)")
            if recipe.missing == "skip":
                report.skipped += 1
                continue
        outside_blocks = any(isinstance(t, dict) and key not in t for p in params.values()
                             for t in p.values())  # block weights leave it alone (FLUX VAE)
        if not in_scope or absent or not data or outside_blocks:
            report.copied += 1
            produce = (partial(copy_range, tensor) if tensor.is_contiguous
                       and out_dtype == tensor.dtype else partial(_cast, tensor, out_dtype))
            planned.append(Planned(key, out_dtype, tensor.shape, produce))
            continue
        sources = {n: checkpoints[n][key] for n in leaves}
        shape = _merged_shape(key, sources, recipe)
        weights = tuple(params[s][p][key] for s, p in per_block)
        if weights not in shared:
            shared[weights] = tuple(
                _StepPlan(s.name, METHODS[s.method], s.models,
                          {p: table[key] if isinstance(table, dict) else table
                           for p, table in params[s.name].items()}, release)
                for s, release in zip(recipe.steps, releases, strict=True))
        plan = _KeyPlan(key, sources, shared[weights], recipe.output, out_dtype,
                        recipe.compute_dtype, recipe.device)
        planned.append(Planned(key, out_dtype, shape, partial(_evaluate, plan),
                               partial(_evaluate, plan) if _streams(plan) else None))
        report.merged += 1
    for tensors in taken.values():
        planned.extend(tensors)
    report.ignored = len({k for n in others for k in checkpoints[n]} - set(base))
    return planned


def _param_tables(recipe: Recipe, family_id: str | None, keys: list[str]
                  ) -> dict[str, dict[str, Any]]:
    """Step -> parameter -> a value, or key -> value where given per block. Per-block
    weights are read, and their values checked, here: the family says what the blocks are.
    Weights recorded in a merged file that cannot be read are that file's problem."""
    tables: dict[str, dict[str, Any]] = {}
    try:
        for step in recipe.steps:
            tables[step.name] = {n: _per_key(step, n, v, family_id, keys) if isinstance(v, str)
                                 else v for n, v in step.params.items()}
    except UsageError as exc:
        if recipe.recorded_in is None:
            raise
        raise FormatError(f"the recorded merge recipe cannot be run: {exc.reason}",
                          recipe.recorded_in) from None
    return tables


def _per_key(step: Step, name: str, spec: str, family_id: str | None, keys: list[str]
             ) -> dict[str, float]:
    if family_id is None:
        raise UsageError(f"per-block {name} needs models of a known family")
    for block, weight in parse_weights(spec, family_id).items():
        problem = param_problem(name, weight)
        if problem:
            raise UsageError(f"step {step.name!r}, block {block}: {problem}")
    return weights_for_keys(family_id, keys, spec, METHODS[step.method].defaults[name])


def _merged_shape(key: str, sources: dict[str, LazyTensor], recipe: Recipe
                  ) -> tuple[int, ...]:
    shapes = [s.shape for s in sources.values()]
    if len(set(shapes)) == 1:
        return shapes[0]
    channel_variant = key.endswith(tuple(INPUT_CHANNEL_VARIANTS)) and all(
        len(s) == len(shapes[0]) and s[0] == shapes[0][0] and s[2:] == shapes[0][2:]
        for s in shapes)
    if channel_variant:
        return max(shapes, key=lambda s: s[1])
    names = list(sources)
    odd = next(i for i, s in enumerate(shapes) if s != shapes[0])
    raise UsageError(f"{key} is {list(shapes[0])} in "
                     f"{os.path.basename(recipe.inputs[names[0]])} but {list(shapes[odd])} in "
                     f"{os.path.basename(recipe.inputs[names[odd]])}: these models cannot be "
                     "merged")


def _narrow(plan: _KeyPlan) -> bool:
    """One step whose method has a 16-bit kernel, on 16-bit inputs of the output's dtype."""
    step = plan.steps[0]
    return (len(plan.steps) == 1 and step.method.narrow is not None
            and plan.compute == "float32" and plan.device == "cpu"
            and plan.out_dtype.name in ("F16", "BF16")
            and all(t.dtype == plan.out_dtype for t in plan.leaves.values())
            and _same_shapes(plan))  # not extra input channels


def _streams(plan: _KeyPlan) -> bool:
    """Whether the result can be made a slice at a time (or by one kernel) into a buffer."""
    return _narrow(plan) or (all(s.method.elementwise for s in plan.steps)
                             and _same_shapes(plan))


def _same_shapes(plan: _KeyPlan) -> bool:
    return len({t.shape for t in plan.leaves.values()}) == 1


def _evaluate(plan: _KeyPlan, out=None):
    """The merged tensor of one key (written into ``out`` when given): every step run on the
    inputs' tensors, a slice of rows at a time when every step is element-wise and the
    shapes agree (memory: the output plus one slice of each input in fp32), else on whole
    tensors."""
    import torch

    wide = getattr(torch, plan.compute)
    names = list(plan.leaves)
    tensors = list(plan.leaves.values())
    if _narrow(plan):
        step = plan.steps[0]
        return step.method.narrow([t.load() for t in tensors], **step.params, out=out)
    if _streams(plan):
        def compute(parts):
            values = {n: p.to(plan.device, wide) for n, p in zip(names, parts, strict=True)}
            return _run_steps(plan, values).cpu()

        return by_rows(tensors, plan.out_dtype, compute, mapped=True, out=out)
    values = {n: t.read().to(plan.device, wide) for n, t in plan.leaves.items()}
    return _run_steps(plan, values).to("cpu", torch_dtype(plan.out_dtype))


def _run_steps(plan: _KeyPlan, values: dict[str, Any]):
    """The output of the steps on ``values`` (input name -> tensor), which it consumes: each
    tensor is dropped after the last step that uses it, so memory stays that of the tensors
    still needed, however long the recipe."""
    for step in plan.steps:
        values[step.name] = _run_step(step, [values[m] for m in step.models], plan.key)
        for name in step.release:
            del values[name]
    return values.pop(plan.output)


def _run_step(step: _StepPlan, tensors: list[Any], key: str):
    kwargs = dict(step.params)
    if "seed" in kwargs:
        kwargs["seed"] = int(kwargs["seed"])
        kwargs["key_seed"] = zlib.crc32(key.encode())
    if len({tuple(t.shape) for t in tensors}) > 1:  # extra input channels
        shared = min(t.shape[1] for t in tensors)
        widest = max(tensors, key=lambda t: t.shape[1]).clone()
        widest[:, :shared] = step.method.func([t[:, :shared] for t in tensors], **kwargs)
        return widest
    return step.method.func(tensors, **kwargs)


def _cast(tensor: LazyTensor, dtype: DType):
    return by_rows([tensor], dtype, lambda parts: parts[0])


def _recorded(recipe: Recipe, names: list[str], hashing: BackgroundSha256) -> Deferred:
    """The recipe for the metadata; the inputs' SHA-256 are filled in once hashed."""
    def render(hashes: dict[str, str | None]) -> str:
        kept = Recipe({n: recipe.inputs[n] for n in names}, recipe.steps, recipe.output,
                      recipe.dtype, recipe.compute_dtype, recipe.components, recipe.missing,
                      recipe.take, recipe.device)
        return json.dumps(to_record(kept, hashes, __version__))

    def resolve() -> str:
        found = hashing.result()
        return render({n: found.get(recipe.inputs[n]) for n in names})

    return Deferred(render({n: "0" * 64 for n in names}), resolve, hashing.cancel)


def _model_type(metadata: dict[str, str]) -> dict[str, str]:
    """What the base model's metadata says about the kind of model, which the merge shares
    (loaders read the architecture and prediction type); not its title, hashes, training
    settings or merge recipe, which describe that file and not the merge (the recipes go
    into ``ckptkit.merge_lineage``)."""
    return {k: v for k, v in metadata.items() if k in _MODEL_TYPE_KEYS}


def _lineage(recipe: Recipe, names: list[str], checkpoints: dict[str, Checkpoint]
             ) -> dict[str, Any]:
    """The merge recipes recorded in the inputs (merges of merges keep their history)."""
    lineage = {}
    for name in names:
        found = {k: checkpoints[name].metadata[k] for k in _LINEAGE_KEYS
                 if k in checkpoints[name].metadata}
        if found:
            lineage[os.path.basename(recipe.inputs[name])] = found
    return lineage


def from_metadata(merged: str, out: str, *, search: list[str] | None = None,
                  given: dict[str, str] | None = None, progress: Progress | None = None,
                  fsync: bool = True, allow_unverified: bool = False) -> MergeReport:
    """Re-runs the recipe recorded in ``merged``: each input is looked for by file name
    beside ``merged``, in the working folder and in ``search`` (or given by name), and must
    have the recorded SHA-256. An input recorded without one (it could not be hashed when
    the merge was made) is refused unless ``allow_unverified``, and then named in the
    report's notes."""
    with open_checkpoint(merged) as checkpoint:
        text = checkpoint.metadata.get(RECIPE_KEY)
    if text is None:
        raise UsageError(f"{merged} holds no ckptkit merge recipe in its metadata")
    record = read_record(text, merged)
    inputs = record["inputs"]
    strays = [n for n in given or {} if n not in inputs]
    if strays:
        raise UsageError(f"--input {strays[0]}: the recipe of {merged} has no input of that "
                         f"name; it has {', '.join(inputs)}")
    folders = [os.path.dirname(os.path.abspath(merged)), os.getcwd(), *(search or [])]
    paths = {}
    for name, info in inputs.items():
        if given and name in given:
            if not os.path.isfile(given[name]):
                raise UsageError(f"--input {name}={given[name]}: no such file")
            paths[name] = given[name]
            continue
        file = os.path.basename(info["file"])
        found = next((os.path.join(f, file) for f in folders
                      if file and os.path.isfile(os.path.join(f, file))), None)
        if found is None:
            raise UsageError(f"input {name} ({file}) of {merged} is not in "
                             f"{', '.join(dict.fromkeys(folders))}; give it with "
                             f"--input {name}=PATH")
        paths[name] = found
    recipe = from_record(record, merged, paths)
    notes = []
    for name, path in paths.items():
        recorded = inputs[name]["sha256"]
        if recorded is None:
            if not allow_unverified:
                raise UsageError(f"{merged} records no SHA-256 for its input {name}, so "
                                 f"nothing shows that {path} is that file; "
                                 "--allow-unverified uses it anyway")
            notes.append(f"input {name} ({path}) was not verified: {os.path.basename(merged)} "
                         "records no SHA-256 for it")
        elif sha256(path) != recorded:
            raise UsageError(f"{path} is not the {name} that {os.path.basename(merged)} was "
                             f"made from: its SHA-256 differs from the recorded "
                             f"{recorded[:12]}...")
    report = run_recipe(recipe, out, progress, fsync)
    report.notes[:0] = notes
    return report


def list_blocks(path: str) -> dict[str, Any]:
    """The block names of ``path``'s family, in the order a list of weights follows, with
    what each covers in this file; the keys no block covers (``unblocked``: taken from model
    A when weights are given per block), or None; and the presets that apply."""
    with open_checkpoint(path) as checkpoint:
        ident = identify_checkpoint(checkpoint)
        keys = list(checkpoint)
    if ident.family is None or ident.kind in ("lora", "unknown"):
        raise UsageError(f"{path} is {a_or_an(ident.kind)}, not a model of a known family")
    blocks = [{"name": b.block, "tensors": b.n_keys,
               "covers": ", ".join(b.prefixes[:3]) + (" ..." if len(b.prefixes) > 3 else "")}
              for b in describe(ident.family, keys)]
    unblocked = next((b for b in blocks if b["name"] is None), None)
    if unblocked:
        del unblocked["name"]
    presets = list(PRESETS) if set(block_names(ident.family)) <= set(MBW_BLOCKS) else []
    return {"family": ident.family, "blocks": [b for b in blocks if "name" in b],
            "unblocked": unblocked, "presets": presets}
