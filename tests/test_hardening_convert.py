"""Issue 12, convert's part: harmless pickles read as data, output amplification, the SDXL
VAE's precision, metadata kept, fp8 targets, escaped notes, and embeddings identified.

Every file here is made by ``torch.save`` (or numpy, or the official safetensors library)
itself, as the tools people use make them; outputs are read with the official libraries.
"""

from __future__ import annotations

import argparse
import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ckptkit.cli.main import main


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


class _Runs:
    """Pickled as a call of ``posix.system``: what a hostile file hides beside data."""

    def __reduce__(self):
        return os.system, ("true",)


def _numpy1_spelling(path: Path) -> None:
    """Rewrites a torch zip as numpy 1 pickled arrays (``numpy.core.multiarray``)."""
    with zipfile.ZipFile(path) as src:
        members = [(info.filename, src.read(info)) for info in src.infolist()]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as out:
        for name, data in members:
            if name.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            out.writestr(name, data)


def _lightning(weights: dict) -> dict:
    """A Lightning training checkpoint with numpy values and Namespace hyper-parameters."""
    return {"state_dict": weights, "epoch": 3, "global_step": np.int64(1200),
            "hyper_parameters": argparse.Namespace(lr=1e-4, base="sd15", betas=(0.9, 0.999),
                                                   mean=np.array([0.5, 0.25], np.float32)),
            "loops": {"seen": np.arange(6, dtype=np.int64).reshape(2, 3)},
            "callbacks": {"scores": np.zeros((2, 2), dtype=">f8"), "flags": np.array(True)}}


# --- item 1: pickles AUTOMATIC1111's safe loader accepts are data here too ------------------


@pytest.mark.parametrize("spelling", ["numpy2", "numpy1"])
def test_numpy_arrays_and_namespace_are_data(spelling: str, tmp_path: Path, capsys):
    weights = {"model.w": torch.randn(3, 4), "model.b": torch.arange(4)}
    src = tmp_path / "train.ckpt"
    torch.save(_lightning(weights), src)
    if spelling == "numpy1":
        _numpy1_spelling(src)
    assert isinstance(torch.load(src, weights_only=False)["loops"]["seen"],
                      np.ndarray)  # a file torch itself reads back

    code, out, err = run_cli(capsys, "scan", src)
    assert code == 0 and out.startswith("SAFE"), out + err

    code, out, err = run_cli(capsys, "inspect", src, "--json")
    assert code == 0, err
    extras = json.loads(out)["extras"]
    assert extras["callbacks"]["scores"] == "numpy array float64 [2, 2]"
    assert extras["callbacks"]["flags"] == "numpy array bool []"
    assert extras["loops"]["seen"] == "numpy array int64 [2, 3]"
    assert extras["hyper_parameters"] == {"lr": 1e-4, "base": "sd15", "betas": "tuple of 2",
                                          "mean": "numpy array float32 [2]"}
    assert extras["global_step"] == 1200

    out_path = tmp_path / "out.safetensors"
    code, out, err = run_cli(capsys, "convert", src, "-o", out_path)
    assert code == 0, err
    got = load_file(str(out_path))
    assert set(got) == set(weights)
    assert all(torch.equal(got[k], v) for k, v in weights.items())


def _embedding_a1111(vectors: torch.Tensor) -> dict:
    """AUTOMATIC1111's textual_inversion.py ``Embedding.save``."""
    return {"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
            "name": "my-style", "step": 1500, "sd_checkpoint": "e1441589a6",
            "sd_checkpoint_name": "v1-5-pruned-emaonly"}


def _embedding_original(vectors: torch.Tensor) -> dict:
    """The original textual_inversion repository's ``EmbeddingManager.save``: the token as a
    tensor, the vectors in a ``torch.nn.ParameterDict``."""
    return {"string_to_token": {"*": torch.tensor(265)},
            "string_to_param": torch.nn.ParameterDict({"*": torch.nn.Parameter(vectors)})}


@pytest.mark.parametrize("form", ["original-zip", "original-legacy", "a1111"])
def test_textual_inversion_embeddings_read_and_convert(form: str, tmp_path: Path, capsys):
    vectors = torch.randn(4, 768, generator=torch.Generator().manual_seed(0))
    src = tmp_path / "style.pt"
    obj = _embedding_a1111(vectors) if form == "a1111" else _embedding_original(vectors)
    torch.save(obj, src, _use_new_zipfile_serialization=form != "original-legacy")
    assert torch.equal(torch.load(src, weights_only=False)["string_to_param"]["*"], vectors)

    code, out, err = run_cli(capsys, "scan", src)
    assert code == 0 and out.startswith("SAFE"), out + err
    out_path = tmp_path / "style.safetensors"
    code, out, err = run_cli(capsys, "convert", src, "-o", out_path)
    assert code == 0, err
    got = load_file(str(out_path))
    assert torch.equal(got["string_to_param.*"], vectors)


def test_data_beside_code_is_still_refused(tmp_path: Path, capsys):
    """numpy arrays, a Namespace and a ParameterDict are allowed only as data: one call of
    anything else in the same pickle refuses the whole file."""
    obj = _lightning({"w": torch.ones(2)})
    obj["string_to_param"] = torch.nn.ParameterDict({"*": torch.nn.Parameter(torch.ones(2))})
    obj["hyper_parameters"].hook = _Runs()
    src = tmp_path / "mixed.ckpt"
    torch.save(obj, src)
    code, out, err = run_cli(capsys, "scan", src)
    assert code != 0 and out.startswith("UNSAFE") and "posix.system" in out, out + err
    out_path = tmp_path / "out.safetensors"
    code, out, err = run_cli(capsys, "convert", src, "-o", out_path)
    assert code == 4 and "posix.system" in err, err
    assert not out_path.exists()


@pytest.mark.parametrize("case", ["object-array", "ndarray-subclass", "reconstruct-of-dict"])
def test_numpy_values_that_are_not_plain_arrays_are_refused(case: str, tmp_path: Path,
                                                            capsys):
    src = tmp_path / "odd.ckpt"
    if case == "object-array":  # holds Python objects, not numbers
        torch.save({"w": torch.ones(2), "a": np.array([1, "x"], dtype=object)}, src)
    elif case == "ndarray-subclass":  # another class, named by its own global
        torch.save({"w": torch.ones(2), "a": np.ma.masked_array([1.0, 2.0])}, src)
    else:  # _reconstruct asked to make something that is not an ndarray
        torch.save({"w": torch.ones(2), "a": np.arange(2.0)}, src)
        with zipfile.ZipFile(src) as z:
            members = [(i.filename, z.read(i)) for i in z.infolist()]
        with zipfile.ZipFile(src, "w", zipfile.ZIP_STORED) as z:
            for name, data in members:
                z.writestr(name, data.replace(b"cnumpy\nndarray\n",
                                              b"ccollections\nOrderedDict\n"))
    code, out, err = run_cli(capsys, "scan", src)
    assert code != 0 and not out.startswith("SAFE"), out
    out_path = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out_path)
    assert code in (3, 4) and err.startswith("ckpt: error: ") and err.count("\n") == 1, err
    assert not out_path.exists()


# --- item 3: output amplification --------------------------------------------------------


def _amplifying(kind: str) -> dict[str, torch.Tensor]:
    if kind == "zero-stride":  # 64 views of one stored byte, 16 MiB each (1 GiB in all)
        one = torch.zeros(1, dtype=torch.uint8)
        return {f"v{i}": one.expand(1 << 24) for i in range(64)}
    base = torch.arange(1 << 18, dtype=torch.float32)  # 1 MiB, seen through 100 windows
    return {f"w{i}": base[i:] for i in range(100)}


@pytest.mark.parametrize("kind", ["zero-stride", "overlapping"])
def test_views_repeating_stored_bytes_are_refused_before_writing(kind: str, tmp_path: Path,
                                                                 capsys):
    src = tmp_path / "views.pt"
    torch.save(_amplifying(kind), src)
    assert src.stat().st_size < (1 << 21)
    for command in (["convert", src, "-o", tmp_path / "out.safetensors"],
                    ["prune", src, "-o", tmp_path / "out.safetensors"], ["inspect", src]):
        code, _, err = run_cli(capsys, *command)
        assert code == 4, err
        assert err.startswith(f"ckpt: error: {src}: ") and err.count("\n") == 1, err
        assert "amplification" in err
    code, out, _ = run_cli(capsys, "scan", src)
    assert code != 0 and out.startswith("UNSAFE") and "amplification" in out
    assert [p.name for p in tmp_path.iterdir()] == [src.name]


def test_tied_weights_and_views_of_real_files_pass(tmp_path: Path, capsys):
    """One tensor under several names (tied embeddings), views that partition a storage,
    and a zero-stride buffer, in a file well past the floor of the cap."""
    gen = torch.Generator().manual_seed(5)
    embed = torch.randn(6144, 1024, generator=gen)  # 24 MiB, under three names
    qkv = torch.randn(3 * 512, 512, generator=gen)
    state = {"shared.weight": embed, "encoder.embed_tokens.weight": embed,
             "decoder.embed_tokens.weight": embed,
             **{f"attn.{n}.weight": qkv[i * 512:(i + 1) * 512] for i, n in enumerate("qkv")},
             "position_ids": torch.arange(77).expand(1, -1)}
    src = tmp_path / "tied.pt"
    torch.save({"state_dict": state}, src)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out)
    assert code == 0, err
    got = load_file(str(out))
    assert all(torch.equal(got[k], v) for k, v in state.items())
