"""Where a pickle's weights are: wrappers, nested dicts, and nothing dropped unlisted.

The rule (``formats.torch_pickle.locate_weights``): wrappers are followed while a dict holds
no tensor itself (``state_dict``, ``model``, ..., BasicSR's ``params_ema``/``params``,
``net``: the first that holds tensors; else a dict's only entry); in the dict reached, every
tensor reachable through string-keyed dicts is a weight named by its dotted path. Expected
tensors come from ``torch.load(weights_only=True)``, walked here independently.
"""

from __future__ import annotations

import sys

import pytest
import torch

from ckptkit.errors import FormatError
from ckptkit.formats import open_checkpoint


def _dotted(node: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor reachable from ``node`` through string-keyed dicts, by dotted path."""
    out: dict[str, torch.Tensor] = {}
    for key, value in node.items():
        if not isinstance(key, str):
            continue
        if isinstance(value, torch.Tensor):
            out.setdefault(prefix + key, value)
        elif isinstance(value, dict):
            for name, tensor in _dotted(value, f"{prefix}{key}.").items():
                out.setdefault(name, tensor)
    return out


def _check(path, expected: dict[str, torch.Tensor], weights_at: str = "") -> dict:
    with open_checkpoint(str(path)) as ck:
        assert ck.weights_at == weights_at
        assert list(ck) == list(expected)
        for key, tensor in expected.items():
            got = ck[key].load()
            assert got.dtype == tensor.dtype and got.shape == tensor.shape, key
            assert torch.equal(got, tensor), key
        return dict(ck.extras), list(ck.notes)


def _sd(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"conv_first.weight": torch.randn(4, 3, 3, 3, generator=gen),
            "conv_first.bias": torch.randn(4, generator=gen)}


@pytest.fixture(params=["zip", "legacy"])
def container(request) -> str:
    return request.param


def _save(obj, path, container: str):
    torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    return path


def test_textual_inversion_embedding(tmp_path, container):
    """AUTOMATIC1111's embedding.pt: the vectors sit in string_to_param['*']."""
    obj = {"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(2, 768)},
           "name": "my-style", "step": 1500, "sd_checkpoint": "abcd1234",
           "sd_checkpoint_name": "v1-5"}
    path = _save(obj, tmp_path / "embedding.pt", container)
    ref = torch.load(path, weights_only=True)
    extras, notes = _check(path, {"string_to_param.*": ref["string_to_param"]["*"]})
    assert extras["string_to_token"] == {"*": 265}
    assert extras["name"] == "my-style" and extras["step"] == 1500
    assert "string_to_param" not in extras
    assert any("string_to_param.*" in n for n in notes)


@pytest.mark.parametrize("first", ["params", "params_ema"])
def test_basicsr_params_ema_is_the_weights_and_params_is_listed(tmp_path, container, first):
    """ESRGAN/BasicSR saves {"params": sd, "params_ema": sd}; inference (and spandrel) load
    params_ema; params is listed with the tensors it holds."""
    sds = {"params": _sd(1), "params_ema": _sd(2)}
    other = "params" if first == "params_ema" else "params_ema"
    path = _save({first: sds[first], other: sds[other]}, tmp_path / "esrgan.pth", container)
    ref = torch.load(path, weights_only=True)
    extras, _ = _check(path, ref["params_ema"], weights_at="params_ema")
    assert set(extras) == {"params"}
    assert extras["params"].tensors == 2 and "holding 2 tensors" in extras["params"]


def test_params_alone_and_net(tmp_path, container):
    path = _save({"params": _sd()}, tmp_path / "p.pth", container)
    _check(path, torch.load(path, weights_only=True)["params"], weights_at="params")
    path = _save({"net": _sd(), "epoch": 1}, tmp_path / "n.pth", container)
    extras, _ = _check(path, torch.load(path, weights_only=True)["net"], weights_at="net")
    assert extras == {"epoch": 1}


def test_a_wrapper_without_tensors_does_not_hide_one_with_them(tmp_path, container):
    path = _save({"model": {"name": "x"}, "params": _sd()}, tmp_path / "w.pth", container)
    extras, _ = _check(path, torch.load(path, weights_only=True)["params"], weights_at="params")
    assert extras == {"model": {"name": "x"}}


def test_state_dict_beside_top_level_tensors_is_kept(tmp_path, container):
    """A root with a tensor of its own and a state_dict: both are weights (never dropped)."""
    obj = {"w": torch.ones(2), "state_dict": _sd(), "step": 4}
    path = _save(obj, tmp_path / "mixed.ckpt", container)
    ref = torch.load(path, weights_only=True)
    extras, notes = _check(path, _dotted(ref))
    assert list(_dotted(ref)) == ["w", "state_dict.conv_first.weight",
                                  "state_dict.conv_first.bias"]
    assert extras == {"step": 4}
    assert any("state_dict.*" in n for n in notes)


def test_deeper_nesting_lists_and_odd_keys(tmp_path, container):
    """Dicts nest to any depth; lists and non-string keys are extras that count their
    tensors; a dotted name already taken leaves the second tensor listed, not lost."""
    obj = {"a": {"b": {"c": torch.ones(1)}, "n": 3, 7: torch.ones(2)},
           "a.b.c": torch.zeros(1),
           "hyper": [torch.ones(3), torch.ones(3)],
           "": torch.full((2,), 5.0), "x.y": {"": torch.ones(4)}, 3: {"w": torch.ones(1)}}
    path = _save(obj, tmp_path / "odd.pt", container)
    ref = torch.load(path, weights_only=True)
    extras, notes = _check(path, {"a.b.c": ref["a"]["b"]["c"], "": ref[""],
                                  "x.y.": ref["x.y"][""]})
    assert any("2 entries of the top level" in n and "a.*, x.y.*" in n for n in notes)
    assert extras["3"].tensors == 1
    assert extras["a.n"] == 3
    assert extras["a.7"].tensors == 1
    assert extras["a.b.c"].tensors == 1  # the top-level "a.b.c", whose name was taken
    assert extras["hyper"].tensors == 2 and "list of 2 holding 2 tensors" in extras["hyper"]


def test_non_dict_roots_are_named_in_words(tmp_path, container):
    for obj, words in ((torch.ones(2), "a single tensor"), ([torch.ones(2)], "a list"),
                       ((1, 2), "a tuple")):
        path = _save(obj, tmp_path / "root.pt", container)
        with pytest.raises(FormatError) as info:
            open_checkpoint(str(path))
        assert words in str(info.value)
        assert "Pickled" not in str(info.value) and "Handle" not in str(info.value)


def test_shared_and_cyclic_dicts_are_walked_once(tmp_path, container):
    """A pickle's memo can share one dict at many paths (2**40 paths here) or put a dict in
    itself: each dict is expanded once, later meetings are listed as extras."""
    shared = {"t": torch.ones(1)}
    for _ in range(40):
        shared = {"a": shared, "b": shared}
    looped = {"t": torch.zeros(2)}
    looped["self"] = looped
    obj = {"w": torch.ones(3), "x": shared, "loop": looped}
    path = _save(obj, tmp_path / "dag.pt", container)
    ref = torch.load(path, weights_only=True)
    first = "x." + "a." * 40 + "t"
    extras, _ = _check(path, {"w": ref["w"], first: torch.ones(1), "loop.t": ref["loop"]["t"]})
    assert extras["loop.self"].tensors == 1
    assert len(extras) == 41 and all(v.tensors == 1 for v in extras.values())


def test_hostile_nesting_and_sharing_open_quickly(tmp_path):
    """A chain of 3,000 dicts under one long key (names that grow with the square of the
    depth) and 10,000 entries sharing one list of 10,000 (counted once each, not walked anew):
    both opened in seconds, with the tensors still accounted for."""
    from helpers import time_limit

    deep: dict = {"w": torch.zeros(1)}
    key = "k" * 10_000
    for _ in range(3000):
        deep = {key: deep}
    wide: dict = {"t": torch.zeros(1)}
    shared = list(range(10_000))
    for i in range(10_000):
        wide[f"e{i}"] = shared
    for name, obj in (("deep", {"a": deep, "b": torch.ones(1)}), ("wide", wide)):
        path = tmp_path / f"{name}.pt"
        limit = sys.getrecursionlimit()
        sys.setrecursionlimit(50_000)  # torch.save recurses once per level
        try:
            torch.save(obj, path)
        finally:
            sys.setrecursionlimit(limit)
        with time_limit(10), open_checkpoint(str(path)) as checkpoint:
            assert len(checkpoint.tensors) >= 1
            if name == "deep":
                held = [v for v in checkpoint.extras.values() if getattr(v, "tensors", 0)]
                assert held and all(len(k) < 20_000 for k in checkpoint.extras)
