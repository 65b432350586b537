"""Merge recipes: named inputs and steps, from the command line, a TOML file or the metadata
of a merged file, checked before anything is opened.

A recipe is the whole description of a merge: which files (by name, and by SHA-256 once
recorded), which steps (a method, the models it combines, its parameters; a step may use
earlier steps' results), and the options that change the output (dtype, components, missing
keys, components taken unchanged, device). The same object runs a one-step command-line
merge, a multi-step TOML recipe (all steps in one streamed pass, no intermediate files) and a
re-run from a merged file's metadata, so what is recorded is exactly what ran.

TOML form::

    dtype = "fp16"                     # optional, as on the command line
    output = "final"                   # optional: the step no other step uses
    [inputs]
    base = "sd15.safetensors"          # relative to the TOML file
    a = "a.safetensors"
    b = "b.safetensors"
    [take]
    vae = "base"                       # an input name or a file
    [[step]]
    name = "mix"
    method = "weighted-sum"
    models = ["a", "b"]
    alpha = 0.4
    [[step]]
    name = "final"
    method = "add-difference"
    models = ["mix", "b", "base"]
    alpha = "IN*=1,OUT*=0.5"           # per-block weights
"""

from __future__ import annotations

import json
import os
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import UsageError
from ..formats.dtypes import CLI_NAMES
from .merge_methods import METHODS

MISSING = ("take-a", "skip", "error")
COMPUTE_DTYPES = ("float32", "float64")
RECIPE_FORMAT = 2
_OPTIONS = ("dtype", "compute_dtype", "components", "missing", "device")


@dataclass(frozen=True)
class Step:
    name: str
    method: str
    models: tuple[str, ...]
    params: dict[str, float | str]  # a number, or per-block weights as text


@dataclass
class Recipe:
    inputs: dict[str, str]  # name -> path
    steps: list[Step]  # in an order where each step comes after the steps it uses
    output: str
    dtype: str | None = None
    compute_dtype: str = "float32"
    components: list[str] | None = None
    missing: str = "take-a"
    take: dict[str, str] = field(default_factory=dict)  # component -> input name
    device: str = "cpu"

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def base(self) -> str:
        """The input that keys outside the merge come from: the first model of the output
        step, followed back through earlier steps (model A of a one-step merge)."""
        name = self.output
        while name not in self.inputs:
            name = self.step(name).models[0]
        return name

    def used_inputs(self) -> list[str]:
        """The inputs that the output step depends on, in the order of ``inputs``."""
        used: set[str] = set()
        pending = [self.output]
        while pending:
            name = pending.pop()
            if name in self.inputs:
                used.add(name)
            elif name not in used:
                used.add(name)
                pending.extend(self.step(name).models)
        return [n for n in self.inputs if n in used]

    def needed_steps(self) -> list[Step]:
        needed = set(self.used_inputs()) | {self.output}
        for step in reversed(self.steps):
            if step.name in needed:
                needed.update(step.models)
        return [s for s in self.steps if s.name in needed]


def one_step(method: str, paths: list[str], params: dict[str, Any], **options: Any) -> Recipe:
    """The recipe of ``ckpt merge METHOD A B [C ...]``: inputs named A, B, C..."""
    names = [_letter(i) for i in range(len(paths))]
    recipe = Recipe(dict(zip(names, paths, strict=True)),
                    [Step("merge", method, tuple(names),
                          {k: v for k, v in params.items() if v is not None})],
                    "merge", **{k: v for k, v in options.items() if k != "take"})
    recipe.take = _takes(recipe, options.get("take") or {})
    return checked(recipe)


def _letter(i: int) -> str:
    return chr(ord("A") + i) if i < 26 else f"M{i}"


def _takes(recipe: Recipe, take: dict[str, str]) -> dict[str, str]:
    """``--take vae=B`` names an input; ``--take vae=file`` adds the file as an input."""
    resolved = {}
    for component, source in take.items():
        if source not in recipe.inputs:
            name = f"take.{component}"
            recipe.inputs[name] = source
            source = name
        resolved[component] = source
    return resolved


def from_toml(path: str, **overrides: Any) -> Recipe:
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{path} is not valid TOML ({exc})") from None
    return _from_dict(data, os.path.dirname(os.path.abspath(path)), path, overrides)


def _from_dict(data: dict[str, Any], folder: str, where: str, overrides: dict) -> Recipe:
    unknown = set(data) - {"inputs", "step", "output", "take", *_OPTIONS}
    if unknown:
        raise UsageError(f"{where}: unknown setting {sorted(unknown)[0]!r}")
    inputs = data.get("inputs")
    if not isinstance(inputs, dict) or not inputs:
        raise UsageError(f"{where} names no [inputs]")
    steps_data = data.get("step")
    if not isinstance(steps_data, list) or not steps_data:
        raise UsageError(f"{where} has no [[step]]")
    steps = [_step(s, i, where) for i, s in enumerate(steps_data)]
    options = {k: data[k] for k in _OPTIONS if k in data}
    options.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe({str(k): _path(v, folder, where, k) for k, v in inputs.items()}, steps,
                    str(data.get("output") or _final_step(steps, where)), **options)
    take = data.get("take", {})
    if not isinstance(take, dict):
        raise UsageError(f"{where}: [take] must map components to inputs or files")
    recipe.take = _takes(recipe, {str(k): v if v in recipe.inputs else _path(v, folder, where, k)
                                  for k, v in take.items()})
    return checked(recipe)


def _final_step(steps: list[Step], where: str) -> str:
    """The one step no other step uses; a recipe with several such names its output."""
    used = {m for s in steps for m in s.models}
    finals = [s.name for s in steps if s.name not in used]
    if len(finals) != 1:
        raise UsageError(f"{where}: say which step is the result with output = \"...\" "
                         f"(steps no other step uses: {', '.join(finals) or 'none'})")
    return finals[0]


def _path(value: Any, folder: str, where: str, name: str) -> str:
    if not isinstance(value, str):
        raise UsageError(f"{where}: {name} must be a file path")
    return value if os.path.isabs(value) else os.path.join(folder, value)


def _step(data: Any, index: int, where: str) -> Step:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: step {index + 1} is not a table")
    name = data.get("name", f"step{index + 1}")
    method, models = data.get("method"), data.get("models")
    if not isinstance(method, str):
        raise UsageError(f"{where}: step {name!r} names no method")
    if not (isinstance(models, list) and all(isinstance(m, str) for m in models)):
        raise UsageError(f"{where}: step {name!r} needs models = [names]")
    params = {k: v for k, v in data.items() if k not in ("name", "method", "models")}
    bad = [k for k, v in params.items() if isinstance(v, bool)
           or not isinstance(v, int | float | str)]
    if bad:
        raise UsageError(f"{where}: step {name!r}: {bad[0]} must be a number or block weights")
    return Step(str(name), method, tuple(models), params)


def checked(recipe: Recipe) -> Recipe:
    """Validates names, methods, arities, parameters and options, and orders the steps so
    that each comes after the steps it uses; refuses cycles and unknown names."""
    names = list(recipe.inputs) + [s.name for s in recipe.steps]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise UsageError(f"the recipe names {duplicate!r} twice")
    for step in recipe.steps:
        _check_step(step, set(names))
    if recipe.output not in {s.name for s in recipe.steps}:
        raise UsageError(f"the recipe's output {recipe.output!r} is not one of its steps")
    recipe.steps = _ordered(recipe)
    if recipe.dtype is not None and recipe.dtype not in CLI_NAMES:
        raise UsageError(f"dtype must be one of {', '.join(CLI_NAMES)}, not {recipe.dtype!r}")
    if recipe.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}")
    if recipe.missing not in MISSING:
        raise UsageError(f"missing must be one of {', '.join(MISSING)}")
    if isinstance(recipe.components, str):
        recipe.components = [recipe.components]
    return recipe


def _check_step(step: Step, names: set[str]) -> None:
    method = METHODS.get(step.method)
    if method is None:
        raise UsageError(f"step {step.name!r}: unknown merge method {step.method!r}; known: "
                         f"{', '.join(METHODS)}")
    if not method.arity_ok(len(step.models)):
        raise UsageError(f"step {step.name!r}: {method.name} takes "
                         f"{method.inputs.replace('+', ' or more')} models, not "
                         f"{len(step.models)}")
    unknown = [m for m in step.models if m not in names]
    if unknown:
        raise UsageError(f"step {step.name!r} uses {unknown[0]!r}, which is neither an input "
                         "nor a step")
    extra = [k for k in step.params if k not in method.defaults]
    if extra:
        raise UsageError(f"{method.name} takes no --{extra[0]} (it takes "
                         f"{', '.join('--' + p for p in method.defaults) or 'no parameters'})")
    if isinstance(step.params.get("seed"), str):
        raise UsageError(f"step {step.name!r}: seed must be a whole number")


def _ordered(recipe: Recipe) -> list[Step]:
    by_name = {s.name: s for s in recipe.steps}
    done: list[Step] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in recipe.inputs or state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join((*path[path.index(name):], name))
            raise UsageError(f"the recipe has a cycle: {cycle}")
        state[name] = "visiting"
        for model in by_name[name].models:
            visit(model, (*path, name))
        state[name] = "done"
        done.append(by_name[name])

    for step in recipe.steps:
        visit(step.name, ())
    return done


def with_defaults(recipe: Recipe) -> Recipe:
    """Every step's parameters completed with the method's defaults (what gets recorded)."""
    steps = [Step(s.name, s.method, s.models,
                  {**METHODS[s.method].defaults, **s.params}) for s in recipe.steps]
    return Recipe(dict(recipe.inputs), steps, recipe.output, recipe.dtype,
                  recipe.compute_dtype, recipe.components, recipe.missing, dict(recipe.take),
                  recipe.device)


def to_record(recipe: Recipe, sha256: dict[str, str | None], version: str) -> dict[str, Any]:
    """The recipe as stored in a merged file: inputs by file name and SHA-256."""
    return {"format": RECIPE_FORMAT, "ckptkit": version,
            "inputs": {n: {"file": os.path.basename(p), "sha256": sha256.get(n)}
                       for n, p in recipe.inputs.items()},
            "steps": [{"name": s.name, "method": s.method, "models": list(s.models),
                       "params": s.params} for s in recipe.steps],
            "output": recipe.output, "take": recipe.take,
            **{k: getattr(recipe, k) for k in _OPTIONS}}


def from_record(text: str, where: str, paths: dict[str, str]) -> tuple[Recipe, dict[str, str]]:
    """A recorded recipe with its inputs at ``paths`` (input name -> file); returns it and
    the recorded SHA-256 of each input, for the caller to check the files against."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise UsageError(f"{where}: the recorded merge recipe is not JSON") from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise UsageError(f"{where}: the merge recipe was recorded in a form this ckptkit "
                         "cannot re-run (no input hashes)")
    try:
        steps = [Step(s["name"], s["method"], tuple(s["models"]), s["params"])
                 for s in data["steps"]]
        recipe = Recipe(dict(paths), steps, data["output"], take=dict(data.get("take") or {}),
                        **{k: data[k] for k in _OPTIONS if k in data})
        hashes = {n: i.get("sha256") for n, i in data["inputs"].items()}
    except (KeyError, TypeError, AttributeError, ValueError):
        raise UsageError(f"{where}: the recorded merge recipe is incomplete or malformed "
                         "(edited by hand?)") from None
    return checked(recipe), hashes


def recorded_inputs(text: str) -> dict[str, dict[str, Any]]:
    """Input name -> {file, sha256} of a recorded recipe (to look for the files)."""
    try:
        inputs = json.loads(text).get("inputs", {})
    except (ValueError, AttributeError, RecursionError):
        return {}
    return inputs if isinstance(inputs, dict) else {}
