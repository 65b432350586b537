"""Merge hardening (issue 12): recipes of the wrong shape refused by one schema with the field
named (exit 2 for a TOML the user wrote, 3 for a recipe in a merged file's metadata), checks
linear and without recursion, parameter values out of range refused, unverified inputs
refused unless asked for, a hash cache that cannot be fooled or broken, JSON on error, and
key names escaped in --list-blocks."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import time
import weakref
from dataclasses import replace

import pytest
import torch
from helpers import time_limit
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.cli.main import main
from ckptkit.engine.writer import PREFETCH
from ckptkit.errors import UsageError
from ckptkit.ops import hashing
from ckptkit.ops.merge import _StepPlan, merge, run_recipe
from ckptkit.ops.merge_methods import METHODS
from ckptkit.ops.merge_recipe import Recipe, Step, checked, from_toml
from ckptkit.ops.sample import sample

RECIPE_KEY = "ckptkit.merge_recipe"


@pytest.fixture(scope="module")
def models(module_tmp):
    folder = module_tmp("hardening_merge")
    for seed, name in enumerate(("a", "b", "c")):
        sample("sd1", str(folder / f"{name}.safetensors"), tiny=True, dtype="fp32", seed=seed)
    return folder


def _merged(models, folder) -> str:
    """A weighted sum of a and b, made in ``folder`` with copies of its inputs beside it."""
    for name in ("a", "b"):
        shutil.copy(models / f"{name}.safetensors", folder)
    out = folder / "merged.safetensors"
    merge("weighted-sum", [str(folder / "a.safetensors"), str(folder / "b.safetensors")],
          str(out), params={"alpha": 0.4})
    return str(out)


def _with_recipe(path: str, recipe: dict | str) -> None:
    """Rewrites ``path`` with another recorded recipe (as a hand edit would)."""
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    text = recipe if isinstance(recipe, str) else json.dumps(recipe)
    save_file(load_file(path), path, metadata={**metadata, RECIPE_KEY: text})


def _recipe_of(path: str) -> dict:
    with safe_open(path, "pt") as f:
        return json.loads(f.metadata()[RECIPE_KEY])


def _error(capsys) -> str:
    return capsys.readouterr().err


# --- recipes of the wrong shape -------------------------------------------------------------

def _toml(models, top: str = "", step: str = "") -> str:
    return (f'{top}\n[inputs]\na = "{models}/a.safetensors"\nb = "{models}/b.safetensors"\n'
            f'[[step]]\nname = "mix"\nmethod = "weighted-sum"\nmodels = ["a", "b"]\n{step}\n')


TOML_CASES = [
    ('inputs = "a.safetensors"\n[[step]]\nmethod = "n-average"\nmodels = ["a", "a"]',
     "inputs must be a table of name = file, got text"),
    ('[[step]]\nmethod = "n-average"\nmodels = ["a", "a"]', "the recipe has no inputs"),
    ('step = 1\n[inputs]\na = "a.safetensors"', "step must be a list of [[step]] tables, "
     "got a number"),
    ('device = 3', "device must be text, got a number"),
    ('components = 5', "components must be a name, a list of names or null, got a number"),
    ('dtype = 16', "dtype must be text or null, got a number"),
    ('output = ["mix"]', "output must be a name (text, not empty), got a list"),
    ('colour = "red"', "unknown setting 'colour'"),
    ('take = { vae = 3 }', "take.vae must be a name (text, not empty), got a number"),
    ('take = "vae"', "take must be a table of component = input, got text"),
    ('inputs = { a = "" }\n[[step]]\nmethod = "n-average"\nmodels = ["a", "a"]',
     "inputs.a must be a file name (text, not empty), got text"),
]
STEP_CASES = [
    ("alpha = { x = 1 }", "step[1].alpha must be a number, or weights per block (text, or a "
                          "list of one number a block), got a table"),
    ("alpha = [[0.5]]", "step[1].alpha must be a number, or weights per block"),
    ("alpha = true", "step[1].alpha must be a number, or weights per block"),
    ("alpha = nan", "step 'mix': alpha must be a finite number, not nan"),
    ("alpha = -inf", "step 'mix': alpha must be a finite number, not -inf"),
    ('method = 1', "step[1].method must be a name"),  # a key given twice is a TOML error
]


@pytest.mark.parametrize(("top", "message"), TOML_CASES)
def test_toml_settings_of_the_wrong_type_are_named(models, tmp_path, capsys, top, message):
    path = tmp_path / "r.toml"
    path.write_text(_toml(models, top=top) if "[inputs]" not in top
                    and "[[step]]" not in top else top)
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--recipe", str(path), "-o", str(out), "--quiet"]) == 2
    err = _error(capsys)
    assert f"r.toml: {message}" in err and "internal" not in err
    assert not out.exists()


@pytest.mark.parametrize(("step", "message"), STEP_CASES)
def test_toml_step_values_of_the_wrong_type_are_named(models, tmp_path, capsys, step,
                                                        message):
    text = _toml(models, step=step)
    if step.startswith("method"):
        text = text.replace('method = "weighted-sum"\n', "")
    path = tmp_path / "r.toml"
    path.write_text(text)
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--recipe", str(path), "-o", str(out), "--quiet"]) == 2
    assert message in _error(capsys) and not out.exists()


def test_toml_shapes_of_whole_recipes(models, tmp_path):
    bad = tmp_path / "latin1.toml"
    bad.write_bytes(_toml(models).encode() + b'# caf\xe9\n')
    with pytest.raises(UsageError, match=r"latin1\.toml is not valid TOML \(not UTF-8"):
        from_toml(str(bad))
    deep = tmp_path / "deep.toml"
    deep.write_text("a = " + "[" * 50_000 + "]" * 50_000)
    with pytest.raises(UsageError, match=r"deep\.toml is not valid TOML"):
        from_toml(str(deep))
    seed = tmp_path / "seed.toml"
    seed.write_text(_toml(models, step="seed = 1208925819614629174706176")
                    .replace("weighted-sum", "dare"))
    with pytest.raises(UsageError, match="seed must be a whole number from 0 to 4294967295"):
        from_toml(str(seed))


def test_a_list_of_numbers_is_per_block_weights(models, tmp_path):
    """alpha = [26 numbers] in TOML is the same as the comma list on the command line."""
    weights = [0.0] * 13 + [1.0] * 13
    path = tmp_path / "r.toml"
    path.write_text(_toml(models, step=f"alpha = {weights}"))
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--recipe", str(path), "-o", str(out), "--quiet"]) == 0
    text = tmp_path / "text.safetensors"
    assert main(["merge", "weighted-sum", str(models / "a.safetensors"),
                 str(models / "b.safetensors"), "--alpha", ",".join(map(str, weights)),
                 "-o", str(text), "--quiet"]) == 0
    got, want = load_file(str(out)), load_file(str(text))
    assert all(got[k].equal(want[k]) for k in want)
    a, b = load_file(str(models / "a.safetensors")), load_file(str(models / "b.safetensors"))
    key = "model.diffusion_model.out.2.weight"  # OUT11: weight 1, all of b
    assert got[key].equal(b[key]) and not got[key].equal(a[key])


RECORD_CASES = [
    (lambda r: r.update(inputs="a.safetensors"),
     "inputs must be a table of name = {file, sha256}, got text"),
    (lambda r: r["inputs"]["A"].update(sha256=5),
     "inputs.A.sha256 must be a SHA-256 (64 lowercase hex digits) or null, got a number"),
    (lambda r: r["inputs"]["A"].update(sha256="ABC"), "inputs.A.sha256 must be a SHA-256"),
    (lambda r: r["steps"][0]["params"].update(alpha={"x": 1}),
     "steps[1].params.alpha must be a number, or weights per block"),
    (lambda r: r["steps"][0]["params"].update(alpha=[[0.5]]),
     "steps[1].params.alpha must be a number, or weights per block"),
    (lambda r: r["steps"][0]["params"].update(alpha=float("nan")),
     "alpha must be a finite number, not nan"),
    (lambda r: r["steps"][0]["params"].update(alpha=10**400),
     "alpha must be a finite number"),
    (lambda r: r["steps"][0].update(models="AB"), "steps[1].models must be a list of names"),
    (lambda r: r.update(device=1), "device must be text, got a number"),
    (lambda r: r.update(device="cuda:x"), "device must be cpu or cuda[:N], not 'cuda:x'"),
    (lambda r: r.update(components=7), "components must be a name, a list of names or null"),
    (lambda r: r.update(take={"vae": "Z"}), "take.vae names 'Z', which is not an input"),
    (lambda r: r.update(output=None), "output must be a name"),
    (lambda r: r.update(colour="red"), "unknown setting 'colour'"),
    (lambda r: r["steps"].append(dict(r["steps"][0])), "step 'merge' is defined twice"),
    (lambda r: r["steps"][0].update(method="dare", params={"seed": 2**80}),
     "seed must be a whole number from 0 to 4294967295"),
    (lambda r: r["steps"][0].update(params={"alpha": 0.5, "drop": 0.5}),
     "weighted-sum takes no --drop"),
    (lambda r: r["steps"][0]["params"].update(alpha="IN00=7x"), "'7x' is not a number"),
    (lambda r: r["steps"][0].update(method="ties", params={"density": "IN00=7"}),
     "step 'merge', block IN00: density must be a fraction"),
]


@pytest.mark.parametrize(("edit", "message"), RECORD_CASES)
def test_recorded_recipes_of_the_wrong_shape_are_the_files_problem(models, tmp_path, capsys,
                                                                    edit, message):
    merged = _merged(models, tmp_path)
    recipe = _recipe_of(merged)
    edit(recipe)
    _with_recipe(merged, recipe)
    out = tmp_path / "again.safetensors"
    assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet"]) == 3
    err = _error(capsys)
    assert f"{merged}: the recorded merge recipe" in err and message in err, err
    assert "internal" not in err and not out.exists()


def test_recorded_recipes_that_are_not_recipes(models, tmp_path, capsys):
    merged = _merged(models, tmp_path)
    out = tmp_path / "again.safetensors"
    for text in ("[" * 100_000, '"a recipe"', '{"format": 1}', "{" + '"a":' * 50_000):
        _with_recipe(merged, text)
        assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet"]) == 3
        err = _error(capsys)
        assert merged in err and "merge recipe" in err and "internal" not in err
    assert not out.exists()


# --- checks linear in the number of steps, without recursion -------------------------------

def _chain(n: int) -> list[Step]:
    """s1 = a + b, s2 = s1 + b, ... listed last first: every step before the one it uses."""
    steps = [Step(f"s{i}", "weighted-sum", ("a" if i == 1 else f"s{i - 1}", "b"), {})
             for i in range(1, n + 1)]
    return steps[::-1]


def test_long_recipes_are_checked_in_linear_time_without_recursion(tmp_path):
    with time_limit(10):
        recipe = checked(Recipe({"a": "a", "b": "b"}, _chain(20_000), "s20000"))
        assert [s.name for s in recipe.steps[:2]] == ["s1", "s2"]
        assert recipe.base() == "a" and recipe.used_inputs() == ["a", "b"]
        assert len(recipe.needed_steps()) == 20_000
    lines = ['[inputs]\na = "a.safetensors"\nb = "b.safetensors"']
    for step in _chain(3_000):
        lines.append(f'[[step]]\nname = "{step.name}"\nmethod = "weighted-sum"\n'
                     f'models = {json.dumps(list(step.models))}')
    path = tmp_path / "long.toml"
    path.write_text("\n".join(lines))
    with time_limit(10):
        assert from_toml(str(path)).output == "s3000"


def test_cycles_and_duplicates_are_named():
    steps = _chain(3_000)
    looped = [Step("s1", "weighted-sum", ("s3000", "b"), {}) if s.name == "s1" else s
              for s in steps]
    with time_limit(10), pytest.raises(UsageError, match=r"steps s3000 -> s2999 -> .* -> s1 "
                                                         r"-> s3000 form a cycle"):
        checked(Recipe({"a": "a", "b": "b"}, looped, "s3000"))
    with pytest.raises(UsageError, match="steps x -> x form a cycle"):
        checked(Recipe({"a": "a"}, [Step("x", "n-average", ("x", "a"), {})], "x"))
    with pytest.raises(UsageError, match="step 's2' is defined twice"):
        checked(Recipe({"a": "a", "b": "b"}, [*steps[-3:], steps[-2]], "s3"))
    with pytest.raises(UsageError, match="'a' is the name of an input and of a step"):
        checked(Recipe({"a": "a", "b": "b"}, [Step("a", "n-average", ("b", "b"), {})], "a"))


# --- memory of a chain: each step's result released once no later step uses it ------------

def _live_results_at_peak(monkeypatch, models, tmp_path, method: str, n: int
                          ) -> tuple[int, int]:
    """Runs a chain of ``n`` steps of ``method`` on the tiny models and returns the most
    results of earlier steps still alive when a step starts (any key, any slice of rows),
    and how many plans of a step for a key exist once all keys are planned."""
    live: weakref.WeakSet = weakref.WeakSet()
    peak = plans = 0
    func = METHODS[method].func

    def counted(tensors, **kwargs):
        nonlocal peak, plans
        peak = max(peak, len(live))
        plans = plans or sum(type(o) is _StepPlan for o in gc.get_objects())
        result = func(tensors, **kwargs)
        live.add(result)
        return result

    paths = {n: str(models / f"{n}.safetensors") for n in ("a", "b")}
    steps = [replace(s, method=method) for s in _chain(n)]
    recipe = checked(Recipe(paths, steps, f"s{n}"))
    with monkeypatch.context() as patch:
        patch.setitem(METHODS, method, replace(METHODS[method], func=counted))
        run_recipe(recipe, str(tmp_path / f"{method}-{n}.safetensors"), fsync=False)
    return peak, plans


@pytest.mark.parametrize("method", ["weighted-sum", "slerp"])  # by slices of rows; whole
def test_a_chain_holds_no_more_results_as_it_grows(models, tmp_path, monkeypatch, method):
    """A step's result is dropped as soon as its last user has run, so a chain of 50 steps
    holds as many intermediate tensors at its peak as a chain of 5 (it held all 49): the
    previous step's result, and the outputs of the keys the writer holds (produced ahead,
    or being written) where a whole-tensor method's result is the output itself. Keys with
    the same weights share one plan of the steps (there was one per key: 1,000 keys x 50
    steps). How many of the writer's tensors are alive at the peak depends on how far its
    prefetching thread has run ahead, so the two chains are held to the same bound rather
    than to the same count."""
    short, short_plans = _live_results_at_peak(monkeypatch, models, tmp_path, method, 5)
    long, long_plans = _live_results_at_peak(monkeypatch, models, tmp_path, method, 50)
    assert short <= 2 + PREFETCH and long <= 2 + PREFETCH
    assert (short_plans, long_plans) == (5, 50)


@pytest.mark.parametrize(("steps", "message"), [
    ('name = "x"\nmethod = "n-average"\nmodels = ["y", "a"]\n[[step]]\nname = "y"\n'
     'method = "n-average"\nmodels = ["x", "b"]', "steps x -> y -> x form a cycle"),
    ('name = "x"\nmethod = "n-average"\nmodels = ["a", "b"]\n[[step]]\nname = "x"\n'
     'method = "n-average"\nmodels = ["b", "a"]', "step 'x' is defined twice"),
    ('name = "x"\nmethod = "n-average"\nmodels = ["a", "b"]\n[[step]]\nname = "y"\n'
     'method = "n-average"\nmodels = ["b", "a"]', 'say which step is the result with '
     'output = "..." (steps no other step uses: x, y)'),
])
def test_cycles_and_duplicates_are_named_when_no_output_is_given(tmp_path, capsys, steps,
                                                                 message):
    """Without ``output`` the result is the step no other uses; a cycle or a duplicate is
    named as such, not reported as no such step ("none") or as one named twice ("x, x")."""
    toml = tmp_path / "r.toml"
    toml.write_text(f'[inputs]\na = "a.safetensors"\nb = "b.safetensors"\n[[step]]\n{steps}\n')
    with pytest.raises(UsageError, match=re.escape(message)):
        from_toml(str(toml))
    assert main(["merge", "--recipe", str(toml), "-o", str(tmp_path / "o.safetensors"),
                 "--quiet"]) == 2
    assert f"{toml}: {message}" in _error(capsys)


# --- values out of range --------------------------------------------------------------------

@pytest.mark.parametrize(("method", "models_used", "option", "value", "message"), [
    ("weighted-sum", "ab", "--alpha", "nan", "alpha must be a finite number, not nan"),
    ("weighted-sum", "ab", "--alpha", "inf", "alpha must be a finite number, not inf"),
    ("weighted-sum", "ab", "--alpha", "1e999", "alpha must be a finite number, not inf"),
    ("triple-sum", "abc", "--beta", "-inf", "beta must be a finite number"),
    ("dare", "abc", "--drop", "1.5", "drop must be a fraction of the entries dropped, at "
                                     "least 0 and below 1, not 1.5"),
    ("dare", "abc", "--drop", "1", "below 1, not 1.0"),
    ("dare-ties", "abc", "--drop", "-0.1", "drop must be a fraction"),
    ("ties", "abc", "--density", "7", "density must be a fraction of the entries kept, above "
                                      "0 and at most 1, not 7.0"),
    ("ties", "abc", "--density", "0", "density must be a fraction"),
    ("dare", "abc", "--seed", "-1", "seed must be a whole number from 0 to 4294967295"),
    ("dare", "abc", "--seed", str(2**80), "seed must be a whole number from 0 to"),
    ("ties", "abc", "--density", "IN00=7", "block IN00: density must be a fraction"),
    ("weighted-sum", "ab", "--alpha", "IN*=inf", "'inf' is not a number"),
])
def test_values_out_of_range_are_refused(models, tmp_path, capsys, method, models_used, option,
                                         value, message):
    out = tmp_path / "out.safetensors"
    paths = [str(models / f"{m}.safetensors") for m in models_used]
    assert main(["merge", method, *paths, f"{option}={value}", "-o", str(out), "--quiet"]) == 2
    assert message in _error(capsys) and not out.exists()


def test_weights_outside_0_1_extrapolate(models, tmp_path):
    """A weighted sum at 1.5 or -0.5 is used on purpose: only non-finite weights are refused."""
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["merge", "weighted-sum", a, b, "--alpha", "1.5", "-o", str(out),
                 "--quiet"]) == 0
    key = "model.diffusion_model.out.2.weight"
    wa, wb = load_file(a)[key], load_file(b)[key]
    assert load_file(str(out))[key].allclose(wa + 1.5 * (wb - wa), atol=1e-6)


# --- inputs without a recorded hash ---------------------------------------------------------

def test_an_input_recorded_without_hash_is_refused_unless_allowed(models, tmp_path, capsys):
    merged = _merged(models, tmp_path)
    recipe = _recipe_of(merged)
    recipe["inputs"]["B"]["sha256"] = None
    _with_recipe(merged, recipe)
    out = tmp_path / "again.safetensors"
    assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet"]) == 2
    err = _error(capsys)
    assert "records no SHA-256 for its input B" in err and "--allow-unverified" in err
    assert not out.exists()
    assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet",
                 "--allow-unverified"]) == 0
    assert "note: input B (" in capsys.readouterr().out
    got, want = load_file(str(out)), load_file(merged)
    assert all(got[k].equal(want[k]) for k in want)
    assert _recipe_of(str(out))["inputs"]["B"]["sha256"] is not None  # hashed this time


def test_inputs_given_by_name_must_exist_and_be_in_the_recipe(models, tmp_path, capsys):
    merged = _merged(models, tmp_path)
    out = tmp_path / "again.safetensors"
    assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet", "--input",
                 f"Z={models / 'c.safetensors'}"]) == 2
    assert "--input Z: the recipe of" in _error(capsys)
    assert main(["merge", "--from-metadata", merged, "-o", str(out), "--quiet", "--input",
                 f"B={tmp_path / 'nope.safetensors'}"]) == 2
    assert "no such file" in _error(capsys) and not out.exists()


# --- the hash cache -------------------------------------------------------------------------

def _rewrite_keeping_mtime(path: str, data: bytes) -> None:
    """Replaces the bytes in place (same size, same inode) and puts the times back."""
    before = os.stat(path)
    assert len(data) == before.st_size
    time.sleep(0.05)  # past the kernel's coarse clock tick, as a real edit later would be
    with open(path, "r+b") as f:
        f.write(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = os.stat(path)
    assert (after.st_size, after.st_mtime_ns, after.st_ino) == (
        before.st_size, before.st_mtime_ns, before.st_ino)


def test_a_file_rewritten_in_place_with_its_mtime_restored_is_hashed_again(models, tmp_path,
                                                                           file_sha256):
    merged = _merged(models, tmp_path)
    b = str(tmp_path / "b.safetensors")
    assert hashing.cached_sha256(b) == file_sha256(b)  # the merge remembered it
    other = (models / "c.safetensors").read_bytes()
    _rewrite_keeping_mtime(b, other)
    assert hashing.cached_sha256(b) is None
    assert hashing.sha256(b) == file_sha256(b)
    out = tmp_path / "again.safetensors"
    with pytest.raises(UsageError, match=r"is not the B that merged\.safetensors was made from"):
        from ckptkit.ops.merge import from_metadata

        from_metadata(merged, str(out))
    assert not out.exists()


def _cache_file() -> str:
    return os.path.join(hashing.cache_dir(), "sha256.json")


@pytest.mark.parametrize("content", [
    b"\xff\xfe not json", b"[1, 2]", b'"text"', b"[" * 200_000 + b"]" * 200_000,
    b'{"x": ' + b"[" * 200_000 + b"]" * 200_000 + b"}", b'{"x": {"stat": "s"}}'])
def test_a_broken_cache_is_ignored_and_rebuilt(models, tmp_path, file_sha256, content):
    os.makedirs(hashing.cache_dir(), exist_ok=True)
    with open(_cache_file(), "wb") as f:
        f.write(content)
    a = str(models / "a.safetensors")
    assert hashing.cached_sha256(a) is None
    assert hashing.sha256(a) == file_sha256(a)
    with open(_cache_file(), encoding="utf-8") as f:
        assert list(json.load(f).values()) == [{"stat": hashing._identity(a)[1],
                                                "sha256": file_sha256(a)}]


@pytest.mark.parametrize("bad", ["\x1b[2Jevil", "0" * 63, "A" * 64, 12, None, ["0" * 64]])
def test_a_malformed_cached_hash_never_reaches_an_output(models, tmp_path, file_sha256, bad):
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    os.makedirs(hashing.cache_dir(), exist_ok=True)
    name, stat = hashing._identity(a)
    with open(_cache_file(), "w", encoding="utf-8") as f:
        json.dump({name: {"stat": stat, "sha256": bad}}, f)
    assert hashing.cached_sha256(a) is None
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [a, b], str(out), params={})
    assert _recipe_of(str(out))["inputs"]["A"]["sha256"] == file_sha256(a)
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["ckptkit.sources_sha256"])[0] == file_sha256(a)


# --- the command line -----------------------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["weighted-sum", "{a}", "{b}", "--alpha", "nan", "-o", "{out}"],
    ["weighted-sum", "{a}", "{missing}", "-o", "{out}"],
    ["weighted-sum", "{a}", "{b}", "-o", "{a}"],
    ["blend", "{a}", "{b}", "-o", "{out}"],
    ["--from-metadata", "{a}", "-o", "{out}"],
    ["--recipe", "{missing}", "-o", "{out}"],
    ["--list-blocks", "{missing}"],
])
def test_json_on_every_error(models, tmp_path, capsys, args):
    names = {"a": models / "a.safetensors", "b": models / "b.safetensors",
             "missing": tmp_path / "missing.safetensors", "out": tmp_path / "out.safetensors"}
    code = main(["merge", *(a.format(**names) for a in args), "--json", "--quiet"])
    assert code in (2, 3, 5)
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["error"] and report["error"] in captured.err
    assert not (tmp_path / "out.safetensors").exists()


def test_list_blocks_escapes_key_names(models, tmp_path, capsys):
    tensors = load_file(str(models / "a.safetensors"))
    tensors["\x1b[2J\x1b[1;1Hevil.weight"] = tensors["model.diffusion_model.out.2.bias"].clone()
    odd = tmp_path / "odd.safetensors"
    save_file(tensors, str(odd))
    assert main(["merge", "--list-blocks", str(odd)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2J\\x1b[1;1Hevil" in out
    assert main(["merge", "--list-blocks", str(odd), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)  # JSON escapes it, and keeps the text
    assert any("\x1b[2J\x1b[1;1Hevil" in b["covers"] for b in listing["blocks"])


def test_devices_are_checked_before_anything_is_read(models, tmp_path, capsys):
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    out = tmp_path / "out.safetensors"
    for device in ("tpu", "cuda:x", "cuda:", "cpu "):
        assert main(["merge", "weighted-sum", a, b, "--device", device, "-o", str(out),
                     "--quiet"]) == 2
        assert f"device must be cpu or cuda[:N], not {device!r}" in _error(capsys)
    if not torch.cuda.is_available():
        for device in ("cuda", "cuda:1"):  # well formed: asked of torch when run
            assert main(["merge", "weighted-sum", a, b, "--device", device, "-o", str(out),
                         "--quiet"]) == 2
            assert "torch finds no CUDA device" in _error(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("given", "recorded"), [("fp32", "float32"), ("fp64", "float64"),
                                                 ("float64", "float64")])
def test_compute_dtype_takes_the_names_dtype_takes(models, tmp_path, given, recorded):
    out = tmp_path / "out.safetensors"
    assert main(["merge", "weighted-sum", str(models / "a.safetensors"),
                 str(models / "b.safetensors"), "--compute-dtype", given, "-o", str(out),
                 "--quiet"]) == 0
    assert _recipe_of(str(out))["compute_dtype"] == recorded
    toml = tmp_path / "r.toml"
    toml.write_text(_toml(models, top=f'compute_dtype = "{given}"'))
    assert from_toml(str(toml)).compute_dtype == recorded
