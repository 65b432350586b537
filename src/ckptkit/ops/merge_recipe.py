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
    alpha = "IN*=1,OUT*=0.5"           # per-block weights (or a list: one number a block)

Every recipe, written in TOML or read back from a merged file, passes one declarative schema
(``_TOML`` and ``_RECORD``, built from the same pieces) before anything else looks at it, so
a value of the wrong type is refused with its place named (``step[3].alpha``, counted from
1) instead of failing somewhere inside the merge. ``checked`` then validates the meaning
(methods, arities, parameter ranges, names, options) for all three sources, in time linear
in the number of steps and without recursion (a chain of thousands of steps is fine).
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass, field
from typing import Any

from ..errors import FormatError, UsageError
from ..formats.dtypes import CLI_NAMES
from .hashing import SHA256
from .merge_methods import METHODS, param_problem

MISSING = ("take-a", "skip", "error")
# --compute-dtype: torch's names, and the short ones --dtype uses.
COMPUTE_DTYPES = {"float32": "float32", "float64": "float64", "fp32": "float32",
                  "fp64": "float64"}
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
    output: str  # "" until ``checked``: the one step no other step uses (TOML without output)
    dtype: str | None = None
    compute_dtype: str = "float32"
    components: list[str] | None = None
    missing: str = "take-a"
    take: dict[str, str] = field(default_factory=dict)  # component -> input name
    device: str = "cpu"
    # The merged file whose metadata held this recipe: what is wrong with the recipe is
    # that file's problem (not recorded).
    recorded_in: str | None = None

    def base(self) -> str:
        """The input that keys outside the merge come from: the first model of the output
        step, followed back through earlier steps (model A of a one-step merge)."""
        by_name = {s.name: s for s in self.steps}
        name = self.output
        while name not in self.inputs:
            name = by_name[name].models[0]
        return name

    def used_inputs(self) -> list[str]:
        """The inputs that the output step depends on, in the order of ``inputs``."""
        by_name = {s.name: s for s in self.steps}
        used: set[str] = set()
        pending = [self.output]
        while pending:
            name = pending.pop()
            if name in self.inputs:
                used.add(name)
            elif name not in used:
                used.add(name)
                pending.extend(by_name[name].models)
        return [n for n in self.inputs if n in used]

    def needed_steps(self) -> list[Step]:
        needed = set(self.used_inputs()) | {self.output}
        for step in reversed(self.steps):
            if step.name in needed:
                needed.update(step.models)
        return [s for s in self.steps if s.name in needed]

    def releases(self) -> list[tuple[str, ...]]:
        """For each step (in the order of ``steps``), the inputs and results that no later
        step uses once it has run: what a key's evaluation can let go of there, so that a
        chain of any length holds only the tensors still to be used (not every step's
        result). The output is never released; a result nothing uses goes at once."""
        last = {}
        for i, step in enumerate(self.steps):
            last.update((m, i) for m in step.models)
            last.setdefault(step.name, i)
        released: list[list[str]] = [[] for _ in self.steps]
        for name, i in last.items():
            if name != self.output:
                released[i].append(name)
        return [tuple(names) for names in released]


# The schema: what each part of a recipe may be. Each piece's ``check`` walks a value along
# it and raises UsageError naming the first part that does not fit (``step[2].alpha``); it
# descends only as deep as the schema does, whatever the depth of the value.

def _kind(value: Any) -> str:
    """What a value is, in the words of a TOML or JSON user."""
    if isinstance(value, bool):
        return "true/false"
    return {int: "a number", float: "a number", str: "text", list: "a list", dict: "a table",
            type(None): "null"}.get(type(value), type(value).__name__)


@dataclass(frozen=True)
class _Value:
    what: str
    accepts: Any  # value -> bool

    def check(self, value: Any, where: str) -> None:
        if not self.accepts(value):
            raise UsageError(f"{where} must be {self.what}, got {_kind(value)}")


@dataclass(frozen=True)
class _List:
    what: str
    item: Any

    def check(self, value: Any, where: str) -> None:
        if not isinstance(value, list) or not value:
            raise UsageError(f"{where} must be {self.what}, got "
                             f"{'an empty list' if value == [] else _kind(value)}")
        for i, item in enumerate(value, 1):
            self.item.check(item, f"{where}[{i}]")


@dataclass(frozen=True)
class _Map:
    """A table of names (of inputs, components, parameters) to values of one kind."""

    what: str
    value: Any
    empty_ok: bool = True

    def check(self, data: Any, where: str) -> None:
        if not isinstance(data, dict) or not (data or self.empty_ok):
            raise UsageError(f"{where} must be {self.what}, got "
                             f"{'an empty table' if data == {} else _kind(data)}")
        for key, value in data.items():
            if key == "":
                raise UsageError(f"{where} has an empty name")
            self.value.check(value, f"{where}.{key}")


@dataclass(frozen=True)
class _Table:
    """A table of known fields; ``rest`` (or nothing) takes the others. ``where`` is empty
    for the recipe itself."""

    fields: dict[str, Any]
    required: tuple[str, ...] = ()
    rest: Any = None

    def check(self, data: Any, where: str) -> None:
        if not isinstance(data, dict):
            raise UsageError(f"{where or 'the recipe'} must be a table, got {_kind(data)}")
        missing = [k for k in self.required if k not in data]
        if missing:
            raise UsageError(f"{where or 'the recipe'} has no {missing[0]}")
        for key, value in data.items():
            spec = self.fields.get(key, self.rest)
            if spec is None:
                raise UsageError(f"unknown setting {key!r}" + (f" in {where}" if where else ""))
            spec.check(value, f"{where}.{key}" if where else key)


@dataclass(frozen=True)
class _Either:
    what: str
    options: tuple[Any, ...]

    def check(self, value: Any, where: str) -> None:
        for option in self.options:
            try:
                option.check(value, where)
                return
            except UsageError:
                pass
        raise UsageError(f"{where} must be {self.what}, got {_kind(value)}")


_NUMBER = _Value("a number", lambda v: isinstance(v, int | float) and not isinstance(v, bool))
_TEXT = _Value("text", lambda v: isinstance(v, str))
_NAME = _Value("a name (text, not empty)", lambda v: isinstance(v, str) and v != "")
_FILE = _Value("a file name (text, not empty)", lambda v: isinstance(v, str) and v != "")
_NULL = _Value("null", lambda v: v is None)
_HASH = _Value("a SHA-256", lambda v: isinstance(v, str) and SHA256.fullmatch(v) is not None)
_NAMES = _List("a list of names", _NAME)
_PARAM = _Either("a number, or weights per block (text, or a list of one number a block)",
                 (_NUMBER, _TEXT, _List("a list of numbers", _NUMBER)))
_SHARED = {
    "dtype": _Either("text or null", (_TEXT, _NULL)), "compute_dtype": _TEXT,
    "components": _Either("a name, a list of names or null", (_NAME, _NAMES, _NULL)),
    "missing": _TEXT, "device": _TEXT, "output": _NAME,
    "take": _Map("a table of component = input", _NAME)}
_STEP = {"name": _NAME, "method": _NAME, "models": _NAMES}
# A recipe as written in TOML: inputs by path, parameters inline in each [[step]].
_TOML = _Table({"inputs": _Map("a table of name = file", _FILE, empty_ok=False),
                "step": _List("a list of [[step]] tables",
                              _Table(_STEP, ("method", "models"), rest=_PARAM)),
                **_SHARED}, ("inputs", "step"))
# A recipe as recorded in a merged file: inputs by file name and SHA-256 (null where the
# file could not be hashed), every option and parameter written out.
_INPUT = _Table({"file": _FILE, "sha256": _Either(
    "a SHA-256 (64 lowercase hex digits) or null", (_HASH, _NULL))}, ("file", "sha256"))
_RECORD = _Table({"format": _NUMBER, "ckptkit": _TEXT,
                  "inputs": _Map("a table of name = {file, sha256}", _INPUT, empty_ok=False),
                  "steps": _List("a list of steps", _Table(
                      {**_STEP, "params": _Map("a table of parameters", _PARAM)},
                      ("name", "method", "models", "params"))),
                  **_SHARED}, ("format", "inputs", "steps", "output"))


def _param(value: float | str | list) -> float | str:
    """A list of numbers (one per block) becomes the text form the block parser reads."""
    return ",".join(str(v) for v in value) if isinstance(value, list) else value


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
    """The recipe of a TOML file; options given (not None) override the file's. Every
    problem is a UsageError naming the file."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path} is not valid TOML (not UTF-8 text)") from None
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        reason = exc if isinstance(exc, tomllib.TOMLDecodeError) else "nested too deeply"
        raise UsageError(f"{path} is not valid TOML ({reason})") from None
    try:
        return _from_dict(data, os.path.dirname(os.path.abspath(path)), overrides)
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.reason}") from None


def _from_dict(data: dict[str, Any], folder: str, overrides: dict) -> Recipe:
    _TOML.check(data, "")
    steps = [Step(s.get("name", f"step{i}"), s["method"], tuple(s["models"]),
                  {k: _param(v) for k, v in s.items() if k not in ("name", "method", "models")})
             for i, s in enumerate(data["step"], 1)]
    options = {k: data[k] for k in _OPTIONS if k in data}
    options.update({k: v for k, v in overrides.items() if v is not None})
    recipe = Recipe({k: _path(v, folder) for k, v in data["inputs"].items()}, steps,
                    data.get("output", ""), **options)
    recipe.take = _takes(recipe, {k: v if v in recipe.inputs else _path(v, folder)
                                  for k, v in data.get("take", {}).items()})
    return checked(recipe)


def _final_step(steps: list[Step]) -> str:
    """The one step no other step uses; a recipe with several such names its output. Run
    once duplicates and cycles are refused, so there is at least one, each named once."""
    used = {m for s in steps for m in s.models}
    finals = [s.name for s in steps if s.name not in used]
    if len(finals) != 1:
        raise UsageError("say which step is the result with output = \"...\" (steps no "
                         f"other step uses: {', '.join(finals) or 'none'})")
    return finals[0]


def _path(value: str, folder: str) -> str:
    return value if os.path.isabs(value) else os.path.join(folder, value)


def checked(recipe: Recipe) -> Recipe:
    """Validates names, methods, arities, parameters and options, and orders the steps so
    that each comes after the steps it uses; refuses duplicates, cycles and unknown names
    (before an output not given is looked for, so that they are what is named). Linear in
    the number of steps."""
    steps: dict[str, Step] = {}
    for step in recipe.steps:
        if step.name in steps:
            raise UsageError(f"step {step.name!r} is defined twice")
        if step.name in recipe.inputs:
            raise UsageError(f"{step.name!r} is the name of an input and of a step")
        steps[step.name] = step
    for step in recipe.steps:
        _check_step(step, recipe.inputs, steps)
    recipe.steps = _ordered(steps)
    recipe.output = recipe.output or _final_step(recipe.steps)
    if recipe.output not in steps:
        raise UsageError(f"the recipe's output {recipe.output!r} is not one of its steps")
    _check_options(recipe)
    return recipe


def _check_step(step: Step, inputs: dict[str, str], steps: dict[str, Step]) -> None:
    method = METHODS.get(step.method)
    if method is None:
        raise UsageError(f"step {step.name!r}: unknown merge method {step.method!r}; known: "
                         f"{', '.join(METHODS)}")
    if not method.arity_ok(len(step.models)):
        raise UsageError(f"step {step.name!r}: {method.name} takes "
                         f"{method.inputs.replace('+', ' or more')} models, not "
                         f"{len(step.models)}")
    unknown = [m for m in step.models if m not in inputs and m not in steps]
    if unknown:
        raise UsageError(f"step {step.name!r} uses {unknown[0]!r}, which is neither an input "
                         "nor a step")
    extra = [k for k in step.params if k not in method.defaults]
    if extra:
        raise UsageError(f"{method.name} takes no --{extra[0]} (it takes "
                         f"{', '.join('--' + p for p in method.defaults) or 'no parameters'})")
    for name, value in step.params.items():
        problem = None if isinstance(value, str) and name != "seed" else param_problem(name, value)
        if problem:
            raise UsageError(f"step {step.name!r}: {problem}")


def _ordered(steps: dict[str, Step]) -> list[Step]:
    """The steps, each after the steps it uses: depth first from each step in the order
    given, with an explicit stack (no recursion limit); a cycle is named."""
    done: list[Step] = []
    finished: set[str] = set()
    for root in steps:
        if root in finished:
            continue
        path, pending = [root], [iter(steps[root].models)]
        on_path = {root}
        while path:
            model = next(pending[-1], None)
            if model is None:
                name = path.pop()
                pending.pop()
                on_path.discard(name)
                finished.add(name)
                done.append(steps[name])
            elif model in on_path:
                cycle = " -> ".join([*path[path.index(model):], model])
                raise UsageError(f"steps {cycle} form a cycle")
            elif model in steps and model not in finished:
                path.append(model)
                pending.append(iter(steps[model].models))
                on_path.add(model)
    return done


def _check_options(recipe: Recipe) -> None:
    if recipe.dtype is not None and recipe.dtype not in CLI_NAMES:
        raise UsageError(f"dtype must be one of {', '.join(CLI_NAMES)}, not {recipe.dtype!r}")
    if recipe.compute_dtype not in COMPUTE_DTYPES:
        raise UsageError(f"compute dtype must be one of {', '.join(COMPUTE_DTYPES)}, not "
                         f"{recipe.compute_dtype!r}")
    recipe.compute_dtype = COMPUTE_DTYPES[recipe.compute_dtype]
    if recipe.missing not in MISSING:
        raise UsageError(f"missing must be one of {', '.join(MISSING)}, not "
                         f"{recipe.missing!r}")
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", recipe.device):
        raise UsageError(f"device must be cpu or cuda[:N], not {recipe.device!r}")
    if isinstance(recipe.components, str):
        recipe.components = [recipe.components]
    unknown = [(c, n) for c, n in recipe.take.items() if n not in recipe.inputs]
    if unknown:
        raise UsageError(f"take.{unknown[0][0]} names {unknown[0][1]!r}, which is not an "
                         "input")


def with_defaults(recipe: Recipe) -> Recipe:
    """Every step's parameters completed with the method's defaults (what gets recorded)."""
    steps = [Step(s.name, s.method, s.models,
                  {**METHODS[s.method].defaults, **s.params}) for s in recipe.steps]
    return Recipe(dict(recipe.inputs), steps, recipe.output, recipe.dtype,
                  recipe.compute_dtype, recipe.components, recipe.missing, dict(recipe.take),
                  recipe.device, recipe.recorded_in)


def to_record(recipe: Recipe, sha256: dict[str, str | None], version: str) -> dict[str, Any]:
    """The recipe as stored in a merged file: inputs by file name and SHA-256."""
    return {"format": RECIPE_FORMAT, "ckptkit": version,
            "inputs": {n: {"file": os.path.basename(p), "sha256": sha256.get(n)}
                       for n, p in recipe.inputs.items()},
            "steps": [{"name": s.name, "method": s.method, "models": list(s.models),
                       "params": s.params} for s in recipe.steps],
            "output": recipe.output, "take": recipe.take,
            **{k: getattr(recipe, k) for k in _OPTIONS}}


def read_record(text: str, where: str) -> dict[str, Any]:
    """A recipe recorded in ``where``'s metadata, checked against the schema. Its problems
    are ``where``'s: a FormatError (exit 3) naming the file."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError):
        raise FormatError("the recorded merge recipe is not JSON", where) from None
    if not isinstance(data, dict) or data.get("format") != RECIPE_FORMAT:
        raise FormatError("the merge recipe was recorded in a form this ckptkit cannot re-run "
                          "(no input hashes)", where)
    try:
        _RECORD.check(data, "")
    except UsageError as exc:
        raise FormatError(f"the recorded merge recipe is malformed: {exc.reason}",
                          where) from None
    return data


def from_record(data: dict[str, Any], where: str, paths: dict[str, str]) -> Recipe:
    """The recipe of a record (from ``read_record``) with its inputs at ``paths`` (input
    name -> file)."""
    steps = [Step(s["name"], s["method"], tuple(s["models"]),
                  {k: _param(v) for k, v in s["params"].items()}) for s in data["steps"]]
    try:
        return checked(Recipe(dict(paths), steps, data["output"], take=dict(data.get("take", {})),
                              recorded_in=where, **{k: data[k] for k in _OPTIONS if k in data}))
    except UsageError as exc:
        raise FormatError(f"the recorded merge recipe cannot be run: {exc.reason}",
                          where) from None
