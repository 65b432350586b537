"""fp8-scaled (ComfyUI, both generations) and bitsandbytes NF4/FP4 weights in safetensors:
read as their values (against ComfyUI's formula and bitsandbytes' own dequantization), their
scale and state tensors taken as parts of their weight, identification and conversion through
them, and broken descriptions refused in one line."""

from __future__ import annotations

import json

import bitsandbytes.functional as bnb
import pytest
import torch
from bitsandbytes.backends.default import ops as bnb_default
from helpers import run_cli
from safetensors.torch import load_file, save_file

from ckptkit import open as ckpt_open
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.formats.quantized import QuantizedTensor
from ckptkit.ops.sample import sample

E4M3 = torch.float8_e4m3fn
# bitsandbytes' portable 4-bit dequantization (the one it falls back to on CPU, flat blocks as
# its CUDA kernel computes them), without the torch.compile wrapper it is registered under.
_bnb_reference = getattr(bnb_default._dequantize_4bit_compute, "__wrapped__",
                         bnb_default._dequantize_4bit_compute)

# Tiny tensors: on a busy machine torch's thread pool costs more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


def comfyui_fp8(stored: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype):
    """ComfyUI's ``TensorCoreFP8Layout.dequantize(qdata, scale, orig_dtype)``, with the
    dtype asked for as ``orig_dtype``."""
    return torch.ops.aten._to_copy.default(stored, dtype=dtype) * scale


def fp8_scaled(weight: torch.Tensor, dtype=E4M3) -> tuple[torch.Tensor, torch.Tensor]:
    """ComfyUI's quantization: scale = amax / finfo.max (float32), stored = weight / scale."""
    scale = (weight.abs().amax().float() / torch.finfo(dtype).max).clamp(min=1e-12)
    return (weight.float() / scale).to(dtype), scale


def _layers(generation: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    torch.manual_seed(0)
    sd, meta = {}, {}
    for i in range(3):
        stored, scale = fp8_scaled(torch.randn(16, 32))
        layer = f"blocks.{i}.proj"
        sd[f"{layer}.weight"] = stored
        sd[f"{layer}.bias"] = torch.randn(16).half()
        if generation == "marker":
            sd[f"{layer}.scale_weight"] = scale.reshape(())
            sd[f"{layer}.scale_input"] = torch.ones(())
        else:
            sd[f"{layer}.weight_scale"] = scale.reshape(1) if i else scale.reshape(())
            sd[f"{layer}.input_scale"] = torch.tensor(0.5)
            conf = json.dumps({"format": "float8_e4m3fn"}).encode()
            if generation == "comfy_quant":
                sd[f"{layer}.comfy_quant"] = torch.tensor(list(conf), dtype=torch.uint8)
    if generation == "marker":
        sd["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    if generation == "metadata":
        meta["_quantization_metadata"] = json.dumps(
            {"layers": {f"blocks.{i}.proj": {"format": "float8_e4m3fn"} for i in range(3)}})
    sd["plain.weight"] = torch.randn(8, 8).to(E4M3)  # fp8 without a scale: read as stored
    sd["other.weight"] = torch.randn(8, 8).to(torch.bfloat16)
    return sd, meta


@pytest.mark.parametrize("generation", ["marker", "comfy_quant", "metadata", "weight_scale"])
def test_fp8_scaled_reads_as_comfyui_computes(tmp_path, generation):
    sd, meta = _layers(generation)
    path = tmp_path / "fp8.safetensors"
    save_file(sd, path, metadata=meta or None)
    with ckpt_open(path) as ck:
        assert sorted(ck) == sorted([f"blocks.{i}.proj.{p}" for i in range(3)
                                     for p in ("weight", "bias")] +
                                    ["plain.weight", "other.weight"])
        for i in range(3):
            key = f"blocks.{i}.proj.weight"
            tensor = ck[key]
            assert isinstance(tensor, QuantizedTensor) and tensor.qtype == "F8_E4M3-scaled"
            assert tensor.dtype == BY_NAME["BF16"]  # the file's other float matrices' type
            spelling = "scale_weight" if generation == "marker" else "weight_scale"
            scale = sd[f"blocks.{i}.proj.{spelling}"]
            assert bytes(tensor.raw()) == bytes(sd[key].view(torch.uint8).flatten().tolist())
            for name, dtype in (("BF16", torch.bfloat16), ("F16", torch.float16),
                                ("F32", torch.float32)):
                assert torch.equal(tensor.dequantize(BY_NAME[name]),
                                   comfyui_fp8(sd[key], scale, dtype).to(dtype))
            assert torch.equal(tensor.read(), comfyui_fp8(sd[key], scale, torch.bfloat16)
                               .to(torch.bfloat16))
            # the scale matters: W is not the stored fp8 value
            assert not torch.equal(tensor.read().float(), sd[key].float())
        assert not isinstance(ck["plain.weight"], QuantizedTensor)
        assert any("fp8-scaled weights" in n for n in ck.notes)


def test_fp8_layers_of_other_formats_are_left_and_said(tmp_path):
    sd, _ = _layers("comfy_quant")
    sd["blocks.0.proj.comfy_quant"] = torch.tensor(list(b'{"format": "nvfp4"}'),
                                                   dtype=torch.uint8)
    save_file(sd, tmp_path / "mixed.safetensors")
    with ckpt_open(tmp_path / "mixed.safetensors") as ck:
        assert not isinstance(ck["blocks.0.proj.weight"], QuantizedTensor)
        assert isinstance(ck["blocks.1.proj.weight"], QuantizedTensor)
        assert "blocks.0.proj.weight_scale" in ck
        assert any("nvfp4" in n for n in ck.notes)


def _bnb_file(path, shape, quant_type, nested, dtype=torch.bfloat16):
    torch.manual_seed(1)
    weight = torch.randn(*shape).to(dtype)
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=quant_type,
                                      compress_statistics=nested)
    sd = {"layer.weight": packed, "layer.bias": torch.zeros(shape[0], dtype=dtype)}
    sd.update({f"layer.weight.{k}": v for k, v in state.as_dict(packed=True).items()})
    save_file(sd, path)
    return packed, state


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("shape", [(48, 128), (40, 80), (7, 9)])
def test_bnb_4bit_reads_as_bitsandbytes_dequantizes(tmp_path, quant_type, nested, shape):
    path = tmp_path / "nf4.safetensors"
    packed, state = _bnb_file(path, shape, quant_type, nested)
    # bitsandbytes' reference: its portable kernel (flat blocks of 64, what CUDA computes);
    # its native CPU kernel agrees where rows are whole blocks (it splits blocks at rows).
    absmax = (bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
              if nested else state.absmax)
    reference = _bnb_reference(packed.reshape(-1), absmax, state.code, 64, shape,
                                         torch.float32)
    if shape[-1] % 64 == 0:
        assert torch.equal(reference.to(torch.bfloat16),
                           bnb.dequantize_4bit(packed, state, quant_type=quant_type))
    with ckpt_open(path) as ck:
        assert sorted(ck) == ["layer.bias", "layer.weight"]
        tensor = ck["layer.weight"]
        assert tensor.qtype == quant_type.upper() and tensor.shape == shape
        assert tensor.dtype == BY_NAME["BF16"]  # the quant state's dtype
        assert torch.equal(tensor.dequantize(BY_NAME["F32"]), reference)
        assert torch.equal(tensor.read(), reference.to(torch.bfloat16))
        stored = sum(v.numel() * v.element_size() for k, v in load_file(path).items()
                     if k.startswith("layer.weight") and "quant_state" not in k)
        assert tensor.stored_nbytes == stored
        assert tensor.bits_per_weight == stored * 8 / (shape[0] * shape[1])


def test_broken_bnb_state_is_refused(tmp_path, capsys):
    path = tmp_path / "bad.safetensors"
    _bnb_file(path, (8, 64), "nf4", False)
    sd = load_file(path)
    sd["layer.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"),
                                                                   dtype=torch.uint8)
    save_file(sd, path)
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 3 and "does not hold valid JSON" in err and len(err.strip().splitlines()) == 1
    del sd["layer.weight.quant_state.bitsandbytes__nf4"]
    state = {"quant_type": "nf4", "blocksize": 64, "dtype": "bfloat16", "shape": [9, 64]}
    sd["layer.weight.quant_state.bitsandbytes__nf4"] = torch.tensor(
        list(json.dumps(state).encode()), dtype=torch.uint8)
    save_file(sd, path)
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 3 and "cannot hold shape" in err


# -- a tiny FLUX model quantized both ways: identified and converted through ----------------

@pytest.fixture(scope="module")
def flux(module_tmp):
    path = module_tmp("flux") / "flux.safetensors"
    sample("flux1-dev", str(path), layout="comfyui", components=["diffusion_model"],
           tiny=True, dtype="bf16")
    return path


def _identify(capsys, path) -> dict:
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    return json.loads(out)


@pytest.mark.parametrize("scheme", ["fp8", "nf4"])
def test_quantized_flux_is_identified_and_converted(tmp_path, capsys, flux, scheme):
    source = load_file(flux)
    sd, expected = {}, {}
    for key, weight in source.items():
        if weight.dim() != 2 or weight.numel() < 4096:  # small ones kept, as converters do
            sd[key] = expected[key] = weight
        elif scheme == "fp8":
            stored, scale = fp8_scaled(weight)
            layer = key.removesuffix(".weight")
            sd[key], sd[f"{layer}.scale_weight"] = stored, scale
            expected[key] = comfyui_fp8(stored, scale, torch.bfloat16)
        else:
            packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type="nf4",
                                              compress_statistics=True)
            sd[key] = packed
            sd.update({f"{key}.{k}": v for k, v in state.as_dict(packed=True).items()})
            absmax = bnb.dequantize_blockwise(state.absmax, state.state2) + state.offset
            expected[key] = _bnb_reference(
                packed.reshape(-1), absmax, state.code, 64, weight.shape,
                torch.float32).to(torch.bfloat16)
    if scheme == "fp8":
        sd["scaled_fp8"] = torch.empty(0, dtype=E4M3)
    path = tmp_path / f"flux-{scheme}.safetensors"
    save_file(sd, path)
    report = _identify(capsys, path)
    ident = report["identification"]
    want = _identify(capsys, flux)["identification"]
    assert (ident["kind"], ident["family"], ident["variants"]) == (
        want["kind"], want["family"], want["variants"])
    assert "unexplained keys" not in ident["extra"]  # scales and states belong to weights
    assert ident["components"][0]["tensors"] == want["components"][0]["tensors"]
    quant = report["quantization"]
    kind = "F8_E4M3-scaled" if scheme == "fp8" else "NF4"
    assert quant["types"][kind]["share"] > 0.5
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", path, "-o", out, "--dtype", "bf16")
    assert code == 0, err
    written = load_file(out)
    assert sorted(written) == sorted(source)
    for key, value in expected.items():
        assert torch.equal(written[key], value.to(torch.bfloat16)), key
    ident_out = _identify(capsys, out)["identification"]
    assert (ident_out["family"], ident_out["layout"]) == (want["family"], want["layout"])


def test_rows_read_alone_are_the_rows_of_the_whole(tmp_path):
    sd, _ = _layers("comfy_quant")
    save_file(sd, tmp_path / "fp8.safetensors")
    _bnb_file(tmp_path / "nf4.safetensors", (40, 80), "nf4", True)
    with ckpt_open(tmp_path / "fp8.safetensors") as fp8, \
            ckpt_open(tmp_path / "nf4.safetensors") as nf4:
        for tensor in (fp8["blocks.0.proj.weight"], fp8["blocks.1.proj.weight"],
                       nf4["layer.weight"]):
            whole = tensor.read()
            for start, stop in ((0, 1), (3, 7), (10, 99)):
                assert torch.equal(tensor.read_rows(start, stop), whole[start:stop])
