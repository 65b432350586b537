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
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.ops.sample import sample


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


# --- item 4: SDXL's VAE keeps its precision, and convert says so ---------------------------


def _vae_dtypes(path: Path) -> set[torch.dtype]:
    return {v.dtype for k, v in load_file(str(path)).items()
            if k.startswith("first_stage_model.")}


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])
def test_convert_keeps_the_sdxl_vae_precision_and_says_so(family: str, tmp_path: Path,
                                                          capsys):
    src = tmp_path / "xl.safetensors"
    sample(family, str(src), tiny=True, dtype="fp32")
    out = tmp_path / "half.safetensors"
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "fp16")
    assert code == 0, err
    assert "note: the SDXL VAE keeps its precision (it overflows in fp16)" in stdout
    assert _vae_dtypes(out) == {torch.float32}
    floats = {v.dtype for k, v in load_file(str(out)).items()
              if not k.startswith("first_stage_model.") and v.is_floating_point()}
    assert floats == {torch.float16}
    code, stdout, err = run_cli(capsys, "convert", src, "-o", tmp_path / "bf.safetensors",
                                "--dtype", "fp16", "--vae-dtype", "bf16")
    assert code == 0, err
    assert "VAE" not in stdout
    assert _vae_dtypes(tmp_path / "bf.safetensors") == {torch.bfloat16}


def test_convert_casts_other_families_vae(tmp_path: Path, capsys):
    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, dtype="fp32")
    out = tmp_path / "half.safetensors"
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "fp16")
    assert code == 0, err
    assert "VAE" not in stdout and _vae_dtypes(out) == {torch.float16}


# --- item 5: the source's metadata is kept --------------------------------------------------


def test_lora_training_tags_and_modelspec_are_kept(tmp_path: Path, capsys):
    metadata = {"ss_network_dim": "16", "ss_tag_frequency": '{"style": {"a": 3}}',
                "modelspec.architecture": "stable-diffusion-v1/lora", "format": "pt"}
    src = tmp_path / "lora.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.ones(16, 8),
               "lora_unet_x.lora_up.weight": torch.ones(8, 16)}, str(src), metadata=metadata)
    for flags, expected in (([], metadata), (["--keep-metadata"], metadata),
                            (["--drop-metadata"], {"format": "pt"})):
        out = tmp_path / "out.safetensors"
        code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "bf16", *flags)
        assert code == 0, err
        with safe_open(str(out), framework="pt") as f:
            assert f.metadata() == expected, flags
        out.unlink()
    code, _, err = run_cli(capsys, "convert", src, "-o", tmp_path / "x.safetensors",
                           "--drop-metadata", "--keep-metadata")
    assert code == 2 and "not allowed with" in err


# --- item 6: fp8 targets, clamped and counted as prune does --------------------------------


@pytest.mark.parametrize("name,dtype,limit", [("fp8-e4m3fn", torch.float8_e4m3fn, 448.0),
                                              ("fp8-e5m2", torch.float8_e5m2, 57344.0)])
def test_convert_to_fp8_clamps_and_counts(name: str, dtype: torch.dtype, limit: float,
                                          tmp_path: Path, capsys):
    gen = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(64, 32, generator=gen) * 100, "b": torch.randn(32),
             "ids": torch.arange(5)}
    state["w"][3, :5] = torch.tensor([1e6, -1e6, float("inf"), 600.0, -70000.0])
    src = tmp_path / "in.pt"
    torch.save(state, src)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", name)
    assert code == 0, err
    got = load_file(str(out))
    assert got["ids"].dtype == torch.int64 and torch.equal(got["ids"], state["ids"])
    for key in ("w", "b"):
        assert got[key].dtype == dtype
        assert torch.equal(got[key].float(), state[key].clamp(-limit, limit).to(dtype).float())
    outside = int((state["w"].abs() > limit).sum())
    assert outside >= 3
    assert (f"warning: {outside} values in 1 tensor were beyond {name}'s range and clamped"
            in err), err
    code, stdout, _ = run_cli(capsys, "convert", src, "-o", tmp_path / "j.safetensors",
                              "--dtype", name, "--json")
    assert json.loads(stdout)["clamped"] == {"w": outside}


# --- item 7: text from the file is escaped; counts in words --------------------------------


def test_names_from_the_file_are_escaped_in_every_line(tmp_path: Path, capsys):
    evil = "\x1b[2A\x1b[J\u202eSAFE"
    src = tmp_path / f"m{evil}.pt"
    torch.save({"state_dict": {"w": torch.ones(2), f"nested{evil}": {"x": torch.ones(1)}},
                f"opt{evil}": [torch.ones(3)], f"note{evil}": [1, 2]}, src)
    code, stdout, err = run_cli(capsys, "convert", src, "-o", tmp_path / f"o{evil}.sft")
    assert code == 0, err
    for text in (stdout, err):
        assert "\x1b" not in text and "\u202e" not in text
    assert "\\x1b[2A\\x1b[J\\u202eSAFE" in stdout
    lines = stdout.splitlines()
    assert lines[0].startswith("wrote ") and "\\x1b" in lines[0]
    assert any(ln.startswith("note: the tensors nested in 1 entry") and "\\x1b" in ln
               for ln in lines)
    assert "note: dropped 2 entries that are not weights: " in stdout
    assert "note: 1 of the dropped entries holds 1 tensor, not written: opt\\x1b" in stdout


def test_counts_are_singular_when_one(tmp_path: Path, capsys):
    src = tmp_path / "m.pt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "optimizer": [torch.ones(3)]}, src)
    code, stdout, err = run_cli(capsys, "convert", src, "-o", tmp_path / "o.safetensors")
    assert code == 0, err
    assert ": 1 tensor, 8 B" in stdout.splitlines()[0]
    assert "note: dropped 1 entry that is not a weight: optimizer" in stdout
    assert "note: 1 of the dropped entries holds 1 tensor, not written: optimizer" in stdout


# --- item 2: a textual-inversion embedding is an embedding ---------------------------------


def _embedding_files(folder: Path) -> dict[str, tuple[Path, dict]]:
    """name -> (a file as the tool that makes it writes it, what inspect must say)."""
    gen = torch.Generator().manual_seed(4)
    sd1, sd2 = torch.randn(4, 768, generator=gen), torch.randn(2, 1024, generator=gen)
    files = {
        "a1111.pt": (_embedding_a1111(sd1), ["sd1"],
                     {"format": "textual-inversion", "token": "*", "vectors": 4,
                      "widths": {"clip_l": 768}}),
        "original.pt": (_embedding_original(sd2), ["sd2"],
                        {"format": "textual-inversion", "token": "*", "vectors": 2,
                         "widths": {"openclip_h": 1024}}),
        "learned_embeds.bin": ({"<cat-toy>": sd1[0]}, ["sd1"],
                               {"format": "diffusers", "token": "<cat-toy>", "vectors": 1,
                                "widths": {"clip_l": 768}}),
        "emb.safetensors": ({"emb_params": sd2}, ["sd2"],
                            {"format": "safetensors", "token": None, "vectors": 2,
                             "widths": {"openclip_h": 1024}}),
        "xl.safetensors": ({"clip_l": torch.randn(3, 768), "clip_g": torch.randn(3, 1280)},
                           ["sdxl"], {"format": "sdxl", "token": None, "vectors": 3,
                                      "widths": {"clip_l": 768, "clip_g": 1280}}),
    }
    out = {}
    for name, (obj, fits, expected) in files.items():
        path = folder / name
        if name.endswith(".safetensors"):
            save_file(obj, str(path))
        else:
            torch.save(obj, path)
        out[name] = (path, {"compatible_families": fits, "embedding": expected})
    return out


def test_embeddings_are_identified_with_their_text_encoder(tmp_path: Path, capsys):
    for name, (path, expected) in _embedding_files(tmp_path).items():
        code, out, err = run_cli(capsys, "inspect", path, "--json")
        assert code == 0, err
        ident = json.loads(out)["identification"]
        assert ident["kind"] == "embedding", (name, ident)
        assert ident["compatible_families"] == expected["compatible_families"], name
        assert ident["embedding"] == expected["embedding"], name
        code, out, _ = run_cli(capsys, "inspect", path)
        assert "  is         embedding\n" in out and "textual-inversion embedding for" in out
    src, _ = _embedding_files(tmp_path)["a1111.pt"]
    converted = tmp_path / "a1111.safetensors"
    assert run_cli(capsys, "convert", src, "-o", converted)[0] == 0
    code, out, _ = run_cli(capsys, "inspect", converted, "--json")
    assert json.loads(out)["identification"]["compatible_families"] == ["sd1"]


@pytest.mark.parametrize("tensors", [
    {"emb_params": torch.zeros(4, 3)},                        # no text encoder is 3 wide
    {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(3, 1280)},  # counts differ
    {"weight": torch.zeros(768)},                             # a key that names no token
    {"emb_params": torch.zeros(2, 2, 768)},                   # not a list of vectors
])
def test_lookalikes_are_not_embeddings(tensors: dict, tmp_path: Path, capsys):
    path = tmp_path / "x.safetensors"
    save_file(tensors, str(path))
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    assert json.loads(out)["identification"]["kind"] != "embedding"


@pytest.mark.parametrize("record", ["tensor", "numpy"])
def test_shapes_of_thousands_of_huge_dimensions_are_refused_at_once(record: str):
    """Their product took 23 s for 10,000 dimensions of 2**500 (a 660 KB pickle)."""
    from helpers import time_limit

    from ckptkit.errors import FormatError
    from ckptkit.formats.dtypes import BY_NAME
    from ckptkit.formats.torch_globals import NumpyArray, NumpyDType, StorageHandle, find_global

    for shape in ((1 << 500,) * 10_000, (2,) * 65, (1 << 63, 1)):
        with time_limit(2), pytest.raises(FormatError, match=r"dimensions|64-bit"):
            if record == "tensor":
                storage = StorageHandle("0", BY_NAME["F32"], 1, "cpu")
                find_global("torch._utils", "_rebuild_tensor_v2").call(
                    (storage, 0, shape, (0,) * len(shape), False, None))
            else:
                NumpyArray().build((1, shape, NumpyDType("f4"), False, b""))


@pytest.mark.parametrize("command", ["convert", "prune"])
def test_hashes_of_the_source_bytes_are_not_carried_over(command: str, tmp_path: Path, capsys):
    """ModelSpec's and kohya's hashes describe the bytes of the file they are in: an output
    with other bytes (here cast) that repeated them would name a file it is not."""
    hashes = {"modelspec.hash_sha256": "0x" + "ab" * 32, "sshs_model_hash": "cd" * 32,
              "sshs_legacy_hash": "ef" * 4}
    src = tmp_path / "model.safetensors"
    save_file({"model.diffusion_model.x.weight": torch.ones(4, 4)}, str(src),
              metadata={**hashes, "modelspec.title": "mine"})
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, command, src, "-o", out, "--dtype", "bf16")
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        kept = f.metadata()
    assert kept["modelspec.title"] == "mine"
    assert not set(hashes) & set(kept)
