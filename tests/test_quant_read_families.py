"""Tiny samples of every family turned into GGUF the way city96's converter makes them (by
the gguf package's own quantizer and writer): identified as their source is, quantization
named, and converted back to safetensors with the values the gguf package dequantizes, in
the layout the source had."""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest
import torch
from helpers import run_cli
from quant_read_files import QT, city96_gguf
from safetensors.torch import load_file, save_file

from ckptkit.arch.families import families
from ckptkit.ops.sample import sample

# city96's converter's architecture names (its detect_arch): SD2 UNets are read as sd1's.
ARCHES = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl-refiner": "sdxl",
          "sd3-medium": "sd3", "sd3.5-medium": "sd3", "sd3.5-large": "sd3",
          "flux1-dev": "flux", "flux1-schnell": "flux"}
QTYPES = {"sd1": QT.Q8_0, "sd2": QT.Q5_1, "sdxl": QT.Q4_0, "sdxl-refiner": QT.Q4_1,
          "sd3-medium": QT.Q4_1, "sd3.5-medium": QT.Q8_0, "sd3.5-large": QT.Q5_0,
          "flux1-dev": QT.Q8_0, "flux1-schnell": QT.Q4_0}

# Converted back and compared value by value: one family of each converter architecture
# (the others are identified only: the same reader and writer, for a tenth of the time).
CONVERTED = ("sd1", "sdxl", "sd3.5-medium", "flux1-dev")

# Tiny tensors: on a busy machine torch's thread pool costs more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


def test_every_family_is_covered():
    assert set(ARCHES) == set(families())


def _inspect(capsys, path) -> dict:
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    return json.loads(out)


def _check_fp8_scaled(capsys, source, path, want) -> None:
    """The same model as ComfyUI's fp8-scaled layout (marker, per-layer scales) is identified
    as its source, its scales not counted as keys of their own."""
    state = load_file(source)
    for key in [k for k, v in state.items() if v.dim() >= 2 and k.endswith(".weight")]:
        weight = state[key].float()
        scale = weight.abs().amax().clamp(min=1e-12) / 448
        state[key] = (weight / scale).to(torch.float8_e4m3fn)
        state[key.removesuffix(".weight") + ".scale_weight"] = scale
    state["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(state, path)
    report = _inspect(capsys, path)
    got = report["identification"]
    for field in ("kind", "family", "variants", "layout"):
        assert got[field] == want[field], field
    assert got["extra"] == {}
    assert report["quantization"]["scheme"] == "fp8-scaled"


def _gguf_values(path) -> dict[str, np.ndarray]:
    """Each tensor's values as the gguf package reads and dequantizes them, in the shape
    ComfyUI-GGUF gives them (the original shape where the file records it)."""
    reader = gguf.GGUFReader(str(path))
    values = {}
    for tensor in reader.tensors:
        data = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        field = reader.get_field(f"comfy.gguf.orig_shape.{tensor.name}")
        shape = ([int(field.parts[i][0]) for i in field.data] if field else
                 [int(d) for d in reversed(tensor.shape)])
        values[tensor.name] = np.asarray(data, dtype=np.float32).reshape(shape)
    return values


@pytest.mark.parametrize("family", list(ARCHES))
def test_family_as_gguf_is_identified_and_converted(tmp_path, capsys, family):
    source = tmp_path / "source.safetensors"
    sample(family, str(source), layout="comfyui", components=["diffusion_model"], tiny=True,
           dtype="fp16")
    # the files of city96's converter have general.architecture; older ones do not
    with_key = family not in ("sd1", "flux1-schnell", "sd3.5-large")
    path = city96_gguf(source, tmp_path / "model.gguf", QTYPES[family], ARCHES[family],
                       keep_arch_key=with_key)
    want = _inspect(capsys, source)["identification"]
    report = _inspect(capsys, path)
    got = report["identification"]
    for field in ("kind", "family", "variants", "layout"):
        assert got[field] == want[field], field
    assert got["extra"] == {}
    quant = report["quantization"]
    assert QTYPES[family].name in quant["types"] and quant["scheme"] == "gguf"
    assert quant["types"]["F32"]["tensors"] > 0  # 1-D and small tensors kept in F32
    assert 4 < quant["bits_per_weight"] < 32
    _check_fp8_scaled(capsys, source, tmp_path / "fp8.safetensors", want)
    if family not in CONVERTED:
        return
    out = tmp_path / "model.safetensors"
    code, _, err = run_cli(capsys, "convert", path, "-o", out, "--dtype", "fp32")
    assert code == 0, err
    written = load_file(out)
    values = _gguf_values(path)
    assert written.keys() == values.keys() == load_file(source).keys()
    for key, value in values.items():
        assert torch.equal(written[key], torch.from_numpy(value)), key
    converted = _inspect(capsys, out)["identification"]
    for field in ("kind", "family", "variants", "layout"):
        assert converted[field] == want[field], field


def test_stable_diffusion_cpp_checkpoint(tmp_path, capsys):
    """A whole SD1 checkpoint with its own prefixes and no general.architecture (as
    stable-diffusion.cpp writes them) is identified as the checkpoint it is."""
    source = tmp_path / "sd1.safetensors"
    sample("sd1", str(source), tiny=True, dtype="fp16")
    path = city96_gguf(source, tmp_path / "sd1.gguf", QT.Q8_0, "sd1", keep_arch_key=False,
                       strip=False)
    want = _inspect(capsys, source)["identification"]
    got = _inspect(capsys, path)["identification"]
    assert (got["kind"], got["family"], got["layout"]) == (want["kind"], want["family"],
                                                           want["layout"])
    assert [c["name"] for c in got["components"]] == [c["name"] for c in want["components"]]
