"""``ckpt quantize --type nf4|fp4``: bitsandbytes' 4-bit layout as Forge loads it.

Checked against bitsandbytes itself (a test dependency, on the CPU): the codes, absmax,
nested absmax, offset and maps ckptkit writes are the bytes ``quantize_4bit(blocksize=64,
compress_statistics=True)`` gives for the same weight, the quant state parses to the dict
``QuantState.as_dict(packed=True)`` packs, and ``QuantState.from_dict`` of the file's tensors
(what Forge's ``ForgeLoader4Bit`` calls) dequantizes, with ``dequantize_4bit``, to what
ckptkit reads. bitsandbytes' native CPU dequantizer starts a new block at every row, unlike
its quantizer and its CUDA kernels (flat blocks of 64 over the whole weight), so its values
are compared only for weights whose rows are whole blocks. And its native CPU kernel for
the 8-bit absmax codes (a binary search on a precomputed grid) sometimes takes the map value
next to the nearest (its CUDA and portable kernels take the nearest, as ckptkit does): there
the codes are compared value by value, ckptkit's being the nearer.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from ckptkit import open as ckpt_open
from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.ops import quantize as quantize_op
from ckptkit.ops.sample import sample
from ckptkit.quant import bnb4

bnb = pytest.importorskip("bitsandbytes.functional")
bnb_utils = pytest.importorskip("bitsandbytes.utils")
QuantState = bnb.QuantState

PREFIX = "model.diffusion_model."
PARTS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
# Shapes put into the tiny FLUX: rows of whole blocks (bitsandbytes' CPU dequantizer agrees),
# and one of 261,000 values whose packed bytes and absmax are not 64-byte multiples while its
# nested absmax is (16 floats): the writer puts it before its weight in the file.
SHAPES = {"double_blocks.0.img_attn.qkv.weight": (256, 128),
          "single_blocks.0.linear1.weight": (320, 192),
          "single_blocks.0.linear2.weight": (261, 1000)}


def _theirs(weight: torch.Tensor, kind: str):
    packed, state = bnb.quantize_4bit(weight, blocksize=64, quant_type=kind,
                                      compress_statistics=True)
    return packed, state


def _ours(weight: torch.Tensor, kind: str):
    x = weight.float().reshape(-1)
    packed = torch.empty((x.numel() + 1) // 2, dtype=torch.uint8)
    bnb4.encode(x, kind, packed)
    return (packed, *bnb4.compress_absmax(bnb4.block_absmax(x)))


def _awkward(count: int, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian values with blocks that are zero, constant, one spike, tiny or huge (for
    ``dtype``), and values on the decision bounds."""
    torch.manual_seed(3)
    x = torch.randn(count)
    x[:64] = 0
    x[64:128] = 2.5
    x[128:192] = 0
    x[150] = -7.0
    x[192:256] *= torch.finfo(dtype).tiny * 16
    x[256:320] *= min(1e30, torch.finfo(dtype).max / 64)
    bounds = (bnb4.table("nf4")[:-1] + bnb4.table("nf4")[1:]) / 2
    x[320:335] = bounds
    x[335] = 1.0
    return x


def _same_absmax(codes: torch.Tensor, weight: torch.Tensor, state) -> None:
    """Our absmax codes are bitsandbytes', but where its CPU kernel's is not the nearest
    map value to the centred absmax (ours is, and such places are rare) or both are as near
    (a tie: blocks of equal absmax beside a huge one)."""
    assert codes.dtype == torch.uint8 and codes.shape == state.absmax.shape
    absmax = bnb4.block_absmax(weight.float().reshape(-1))
    normed = (absmax - state.offset) / state.state2.absmax.repeat_interleave(256)[
        :absmax.numel()]
    normed = torch.nan_to_num(normed)  # a block whose absmax are all the offset: 0/0
    table = state.state2.code
    ours = (normed - table[codes.long()]).abs().double()
    theirs = (normed - table[state.absmax.long()]).abs().double()
    assert bool((ours <= theirs * (1 + 1e-5)).all())  # nearer, or as near (a tie)
    # 0.2% of the absmax of a 3072 x 3072 Gaussian weight, up to 3% in the tiny FLUX's
    assert int((ours < theirs * (1 - 1e-5)).sum()) <= max(4, codes.numel() // 20)


@pytest.mark.parametrize("kind", ["nf4", "fp4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("count", [64 * 256 * 3, 64 * 300 + 17, 4097, 3])
def test_same_bytes_as_bitsandbytes(kind, dtype, count):
    torch.manual_seed(count)
    weight = (torch.randn(count) if count < 4096 else _awkward(count, dtype)).to(dtype)
    packed, state = _theirs(weight, kind)
    ours, codes, nested, offset = _ours(weight, kind)
    assert torch.equal(ours, packed.reshape(-1))
    _same_absmax(codes, weight, state)
    assert torch.equal(nested, state.state2.absmax)
    assert offset == state.offset.item()
    assert torch.equal(bnb4.table(kind), state.code)
    assert torch.equal(bnb4.dynamic_map(), state.state2.code)


def _flux(tmp_path, dtype="bf16"):
    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype=dtype, components=["diffusion_model"])
    tensors = load_file(str(src))
    torch.manual_seed(0)
    for name, shape in SHAPES.items():
        tensors[PREFIX + name] = (torch.randn(*shape) * 0.02).to(tensors[PREFIX + name].dtype)
    save_file(tensors, str(src))
    return src, {k[len(PREFIX):]: v for k, v in tensors.items()}


def _state_of(written: dict, name: str, kind: str) -> dict:
    return {f"{name}.{k}": written[f"{name}.{k}"]
            for k in (*PARTS, f"quant_state.bitsandbytes__{kind}")}


# FP4 shares NF4's code but for its table (checked by the kernel tests): its whole-file run is
# one of the slow tests, to keep the default run short.
@pytest.mark.parametrize("kind", ["nf4", pytest.param("fp4", marks=pytest.mark.slow)])
def test_flux_file_is_bitsandbytes_layout_and_reads_back(tmp_path, capsys, kind):
    src, source = _flux(tmp_path)
    out = tmp_path / f"flux-{kind}.safetensors"
    code, stdout, stderr = run_cli(capsys, "quantize", src, "-o", out, "--type", kind,
                                   "--quiet")
    assert code == 0, stderr
    assert kind.upper() in stdout and "relative RMS error" in stdout
    written = load_file(str(out))
    quantized = [k[:-len(f".quant_state.bitsandbytes__{kind}")] for k in written
                 if k.endswith(f".quant_state.bitsandbytes__{kind}")]
    # Linear weights only; the embedders, final layer, norms and biases as they were
    expected = [k for k, v in source.items() if v.dim() == 2 and k.endswith(".weight")
                and not k.startswith(("img_in.", "txt_in.", "time_in.", "vector_in.",
                                      "guidance_in.", "final_layer."))]
    assert sorted(quantized) == sorted(expected) and len(expected) > 100
    for key, value in source.items():
        if key not in quantized:
            assert torch.equal(written[key], value), key
    with ckpt_open(out) as ck:
        ours = {name: ck[name].dequantize(BY_NAME["F32"]) for name in quantized}
        bf16 = {name: ck[name].read() for name in SHAPES}
    for name in quantized:
        weight = source[name]
        packed, state = _theirs(weight, kind)
        assert written[name].dtype == torch.uint8 and written[name].shape == packed.shape
        assert torch.equal(written[name], packed), name
        theirs = state.as_dict(packed=True)
        _same_absmax(written[f"{name}.absmax"], weight, state)
        for part in PARTS[1:]:
            assert torch.equal(written[f"{name}.{part}"], theirs[part]), (name, part)
        key = f"quant_state.bitsandbytes__{kind}"
        assert json.loads(bytes(written[f"{name}.{key}"].tolist())) == \
            bnb_utils.unpack_tensor_to_dict(theirs[key])
        # as Forge loads it: Params4bit.from_prequantized -> QuantState.from_dict
        loaded = QuantState.from_dict(_state_of(written, name, kind), device="cpu")
        assert (loaded.shape, loaded.dtype, loaded.blocksize, loaded.quant_type,
                float(loaded.offset), loaded.state2.blocksize) == (
            state.shape, torch.bfloat16, 64, kind, float(state.offset), 256)
        if weight.shape[-1] % 64 == 0:
            assert torch.equal(bnb.dequantize_4bit(written[name], loaded), bf16.get(
                name, ours[name].to(torch.bfloat16))), name
            loaded.dtype = torch.float32
            assert torch.equal(bnb.dequantize_4bit(written[name], loaded), ours[name]), name
        error = float((ours[name] - weight.float()).norm() / weight.float().norm())
        assert error <= quantize_op.ERROR_BOUNDS[kind.upper()], name


def test_tiny_flux_nf4_is_identified_and_dequantized(tmp_path, capsys):
    src, source = _flux(tmp_path, dtype="fp16")
    out = tmp_path / "flux-nf4.safetensors"
    code, stdout, stderr = run_cli(capsys, "quantize", src, "-o", out, "--type", "nf4",
                                   "--json", "--quiet")
    assert code == 0, stderr
    report = json.loads(stdout)
    assert report["types"]["NF4"]["bound"] == quantize_op.ERROR_BOUNDS["NF4"]
    assert 0.05 < report["types"]["NF4"]["max_error"] <= report["types"]["NF4"]["bound"]
    code, stdout, stderr = run_cli(capsys, "inspect", out, "--json")
    assert code == 0, stderr
    inspected = json.loads(stdout)
    assert inspected["identification"]["family"] == "flux1-dev"
    assert inspected["quantization"]["types"]["NF4"]["share"] > 0.9
    back = tmp_path / "back.safetensors"
    code, _, stderr = run_cli(capsys, "convert", out, "-o", back)
    assert code == 0, stderr
    values = load_file(str(back))
    assert sorted(values) == sorted(source)
    with ckpt_open(out) as ck:
        assert ck["single_blocks.0.linear1.weight"].dtype == BY_NAME["F16"]  # the source's
        for name in ("single_blocks.0.linear1.weight", "double_blocks.0.img_mlp.0.weight"):
            assert torch.equal(values[name], ck[name].read())
            x = source[name].float()
            assert float((values[name].float() - x).norm() / x.norm()) <= 0.184


def _only(folder, *names) -> bool:
    return sorted(os.listdir(folder)) == sorted(names)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused_and_nothing_is_left(tmp_path, capsys, bad):
    src, _ = _flux(tmp_path)
    tensors = load_file(str(src))
    tensors[PREFIX + "double_blocks.0.img_attn.qkv.weight"][3, 5] = bad
    save_file(tensors, str(src))
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.safetensors",
                              "--type", "nf4")
    assert code == 3 and "NaN or infinite" in stderr
    assert "double_blocks.0.img_attn.qkv.weight" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert _only(tmp_path, "flux.safetensors")


def test_an_error_over_the_bound_stops_the_run(tmp_path, monkeypatch, capsys):
    src, _ = _flux(tmp_path)
    monkeypatch.setitem(quantize_op.ERROR_BOUNDS, "NF4", 0.05)
    with pytest.raises(FormatError, match=r"over the 0\.05 that NF4 gives"):
        quantize_op.quantize(str(src), str(tmp_path / "x.safetensors"), "nf4")
    assert _only(tmp_path, "flux.safetensors")
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type",
                              "nf4")
    assert code == 2 and "*.safetensors" in stderr
    assert _only(tmp_path, "flux.safetensors")


def test_same_bytes_where_the_output_cannot_be_mapped(tmp_path, monkeypatch):
    import errno

    from ckptkit.engine import writer

    src, _ = _flux(tmp_path)
    quantize_op.quantize(str(src), str(tmp_path / "mapped.safetensors"), "nf4")

    def no_reserve(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_reserve)
    quantize_op.quantize(str(src), str(tmp_path / "plain.safetensors"), "nf4")
    mapped, plain = (load_file(str(tmp_path / n)) for n in ("mapped.safetensors",
                                                            "plain.safetensors"))
    assert mapped.keys() == plain.keys()
    assert all(torch.equal(mapped[k], plain[k]) for k in mapped)
