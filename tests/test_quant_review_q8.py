"""Second review of ``ckpt quantize``: the faster Q8_0 rounding still gives the gguf
package's bytes at every tie, and the files quantize and convert write say where they came
from (provenance, lineage) and refuse what is not a regular file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from ckptkit.quant.encode import quantize

gguf = pytest.importorskip("gguf")


def _near_ties() -> np.ndarray:
    """Rows whose first value is 127 (so the scale is 1 and each value is its own scaled
    value): every k + 0.5 of Q8_0's range, and the float32 on either side of it, both signs,
    and the float32 just below 0.5 (where adding 0.5 and flooring rounds wrongly)."""
    halves = np.arange(-127, 127, dtype=np.float32) + np.float32(0.5)
    values = np.concatenate([halves, np.nextafter(halves, np.float32(np.inf)),
                             np.nextafter(halves, np.float32(-np.inf)),
                             np.float32([0.49999997, -0.49999997, 0.5, -0.5, 0.0, -0.0])])
    values = np.resize(values, -(-values.size // 31) * 31).reshape(-1, 31)
    return np.concatenate([np.full((values.shape[0], 1), 127, np.float32), values], 1)


def test_q8_0_rounds_half_away_from_zero_as_the_gguf_package_does():
    x = _near_ties()
    ours = quantize(torch.from_numpy(x), "Q8_0").numpy().tobytes()
    assert ours == gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0).tobytes()
    codes = np.frombuffer(ours, np.uint8).reshape(-1, 34)[:, 2:].view(np.int8)
    assert codes[0, 1] == -127 and codes[0, 2] == -126  # -126.5 -> -127, -125.5 -> -126


@pytest.fixture(scope="module")
def flux(module_tmp):
    from ckptkit.ops.sample import sample

    folder = module_tmp("quant_review_q8")
    path = folder / "flux.safetensors"
    sample("flux1-dev", str(path), tiny=True, dtype="bf16", components=["diffusion_model"])
    return folder, path


def _fields(path) -> dict:
    reader = gguf.GGUFReader(str(path))
    return {k: f.contents() for k, f in reader.fields.items() if k.startswith("ckptkit.")}


def test_a_dequantized_file_says_convert_made_it_from_the_quantized_one(flux, capsys):
    from helpers import run_cli
    from safetensors import safe_open

    folder, src = flux
    quantized, back = folder / "q8.gguf", folder / "back.safetensors"
    assert run_cli(capsys, "quantize", src, "-o", quantized, "--type", "Q8_0", "--quiet",
                   "--hash")[0] == 0
    code, _, err = run_cli(capsys, "convert", quantized, "-o", back, "--dtype", "bf16")
    assert code == 0, err
    with safe_open(str(back), framework="pt") as f:
        meta = f.metadata()
    assert meta["ckptkit.operation"] == "convert" and "ckptkit.type" not in meta
    assert json.loads(meta["ckptkit.sources"]) == ["q8.gguf"]
    assert json.loads(meta["ckptkit.dequantized"]) == ["Q8_0"]


def test_quantize_records_the_source_sha256_as_the_other_operations_do(
        flux, capsys, file_sha256):
    from helpers import run_cli

    from ckptkit.ops import hashing

    folder, src = flux
    fresh = folder / "fresh.safetensors"  # a copy whose hash no run has remembered yet
    fresh.write_bytes(src.read_bytes())
    unknown, hashed, known = (folder / f"{n}.gguf" for n in ("unknown", "hashed", "known"))
    assert run_cli(capsys, "quantize", fresh, "-o", unknown, "--type", "Q4_0", "--quiet")[0] == 0
    assert json.loads(_fields(unknown)["ckptkit.sources_sha256"]) == [None]
    code, _, err = run_cli(capsys, "quantize", fresh, "-o", hashed, "--type", "Q4_0",
                           "--quiet", "--hash")
    assert code == 0, err
    assert json.loads(_fields(hashed)["ckptkit.sources_sha256"]) == [file_sha256(fresh)]
    assert hashing.cached_sha256(str(fresh)) == file_sha256(fresh)
    assert run_cli(capsys, "quantize", fresh, "-o", known, "--type", "Q4_0", "--quiet")[0] == 0
    assert json.loads(_fields(known)["ckptkit.sources_sha256"]) == [file_sha256(fresh)]
    # the fp8 and NF4 outputs (safetensors) carry it too
    nf4 = folder / "nf4.safetensors"
    assert run_cli(capsys, "quantize", fresh, "-o", nf4, "--type", "nf4", "--quiet")[0] == 0
    from safetensors import safe_open
    with safe_open(str(nf4), framework="pt") as f:
        assert json.loads(f.metadata()["ckptkit.sources_sha256"]) == [file_sha256(fresh)]


def test_library_lineage_finds_a_quantized_files_source_by_sha256(tmp_path, capsys):
    from helpers import run_cli

    from ckptkit.ops.sample import sample

    folder = tmp_path / "models"
    folder.mkdir()
    src = folder / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype="bf16", components=["diffusion_model"])
    renamed = folder / "renamed.gguf"  # found by hash, not by the name recorded
    assert run_cli(capsys, "quantize", src, "-o", folder / "q.gguf", "--type", "Q8_0",
                   "--quiet", "--hash")[0] == 0
    (folder / "q.gguf").rename(renamed)
    src.rename(folder / "original.safetensors")
    db = tmp_path / "lib.sqlite"
    assert run_cli(capsys, "library", "scan", "--quiet", "--db", db, folder)[0] == 0
    code, out, err = run_cli(capsys, "library", "lineage", "--json", "--db", db, renamed)
    assert code == 0, err
    (parent,) = json.loads(out)["parents"]
    assert (parent["relation"], parent["hash_kind"]) == ("source", "sha256")
    assert parent["detail"]["operation"] == "quantize"
    assert [f["name"] for f in parent["files"]] == ["original.safetensors"]
    assert parent["files"][0]["match"] == "sha256"


@pytest.mark.parametrize("name", ["fifo.gguf", "fifo.safetensors"])
def test_a_fifo_input_is_not_a_regular_file_not_an_empty_one(tmp_path, capsys, name):
    import os

    from helpers import run_cli

    fifo = tmp_path / name
    os.mkfifo(fifo)
    code, _, err = run_cli(capsys, "inspect", fifo)
    assert code == 3 and err.count("\n") == 1
    assert "is a FIFO, not a regular file" in err and "empty" not in err
