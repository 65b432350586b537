"""``ckpt quantize``: tiny samples of every family to GGUF (read back by the gguf package's
reader, as ComfyUI-GGUF reads them) and to ComfyUI's per-layer fp8; ComfyUI-GGUF's per-family
rules on real shapes; the refusals, which leave nothing behind."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from helpers import run_cli

from ckptkit import open as ckpt_open
from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import BY_NAME as DTYPES
from ckptkit.formats.quantized import QuantizedTensor
from ckptkit.ops import quantize as quantize_op
from ckptkit.ops.gguf_rules import Rules
from ckptkit.ops.inspect import identify_checkpoint
from ckptkit.ops.quantize import ERROR_BOUNDS
from ckptkit.ops.sample import sample
from ckptkit.quant.ggml_types import BY_NAME

gguf = pytest.importorskip("gguf")

FAMILIES = ["sd1", "sd2", "sdxl", "sdxl-refiner", "sd3-medium", "sd3.5-medium", "sd3.5-large",
            "flux1-dev", "flux1-schnell"]
ARCH = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl", "sdxl-refiner": "sdxl", "flux1-dev": "flux",
        "flux1-schnell": "flux"}


def _source_values(path) -> dict[str, torch.Tensor]:
    with ckpt_open(path) as ck:
        prefix = "model.diffusion_model."
        return {k[len(prefix):] if k.startswith(prefix) else k: t.read().float()
                for k, t in ck.items()
                if k.startswith(prefix) or not any(k.startswith(p) for p in (
                    "cond_stage_model.", "first_stage_model.", "conditioner.",
                    "text_encoders.", "vae."))}


def _field(reader, key):
    field = reader.get_field(key)
    return None if field is None else field


def _relative_rms(back: torch.Tensor, x: torch.Tensor) -> float:
    total = float(x.pow(2).sum())
    return float((back - x).pow(2).sum() / total) ** 0.5 if total else 0.0


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_samples_quantize_identify_and_dequantize(family, tmp_path, capsys):
    src = tmp_path / "model.safetensors"
    sample(family, str(src), tiny=True, dtype="bf16" if "flux" in family else "fp16",
           components=["diffusion_model"])
    out = tmp_path / "model-Q8_0.gguf"
    code, stdout, stderr = run_cli(capsys, "quantize", src, "-o", out, "--type", "Q8_0",
                                   "--quiet")
    assert code == 0, stderr
    assert "Q8_0" in stdout and "relative RMS error" in stdout

    reader = gguf.GGUFReader(str(out))
    arch = ARCH.get(family, "sd3")
    assert _field(reader, "general.architecture").contents() == arch
    assert _field(reader, "general.file_type").contents() == 7  # LLAMA_FTYPE_MOSTLY_Q8_0
    assert _field(reader, "general.quantization_version").contents() == 2
    source = _source_values(src)
    assert [t.name for t in reader.tensors] == list(source)
    assert all(t.data_offset % 32 == 0 for t in reader.tensors)
    compared = reader.tensors[::max(1, len(reader.tensors) // 60)]  # ours against gguf's
    with ckpt_open(out) as ck:
        assert identify_checkpoint(ck).family == family
        ours = {t.name: ck[t.name].dequantize(DTYPES["F32"])
                if isinstance(ck[t.name], QuantizedTensor) else ck[t.name].read().float()
                for t in compared}
    for t in reader.tensors:
        field = _field(reader, f"comfy.gguf.orig_shape.{t.name}")
        shape = source[t.name].shape
        if field is not None:  # reshaped: ComfyUI-GGUF reads an array of int32 only
            assert arch in ("sd1", "sdxl") and field.types == [
                gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
            assert tuple(field.contents()) == tuple(shape)
        values = torch.from_numpy(np.array(gguf.quants.dequantize(t.data, t.tensor_type)))
        values = values.float().reshape(shape)
        assert t.name not in ours or torch.equal(ours[t.name], values), t.name
        bound = ERROR_BOUNDS[t.tensor_type.name]
        assert _relative_rms(values, source[t.name]) <= bound, t.name
    if family in ("sd1", "sdxl"):
        assert any(k.startswith("comfy.gguf.orig_shape.") for k in reader.fields)


_SLOW = pytest.mark.slow  # each K type's kernel is tested on its own by test_quant_write_kernels


@pytest.mark.parametrize("qtype", ["Q4_K_M", "Q5_1", "BF16", *(
    pytest.param(t, marks=_SLOW) for t in ("Q5_K_S", "Q3_K_M", "Q2_K", "Q6_K", "Q4_0", "F16"))])
def test_every_type_writes_a_file_gguf_reads(qtype, tmp_path, capsys):
    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, components=["diffusion_model"])
    out = tmp_path / "sd1.gguf"
    code, stdout, stderr = run_cli(capsys, "quantize", src, "-o", out, "--type", qtype,
                                   "--json")
    assert code == 0, stderr
    report = json.loads(stdout)
    reader = gguf.GGUFReader(str(out))
    stored = {t.name: t.tensor_type.name for t in reader.tensors}
    counts = {name: sum(v == name for v in stored.values()) for name in set(stored.values())}
    assert {k: v["tensors"] for k, v in report["types"].items()} == counts
    assert report["family"] == "sd1" and report["architecture"] == "sd1"
    written = os.path.getsize(out)
    assert report["bytes"] < written  # the data, less header and padding
    for t in reader.tensors:
        assert report["errors"][t.name] <= ERROR_BOUNDS[t.tensor_type.name]


@pytest.mark.parametrize(("qtype", "name", "shape", "expected"), [
    # FLUX: fused qkv upgraded in the _M mixes; embedders and final layer kept (bf16 here)
    ("Q4_K_M", "double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q5_K"),
    ("Q5_K_M", "double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q6_K"),
    ("Q4_K_M", "double_blocks.0.img_mlp.2.weight", (3072, 12288), "Q4_K"),
    ("Q4_K_M", "single_blocks.3.linear1.weight", (21504, 3072), "Q4_K"),
    ("Q4_K_M", "img_in.weight", (3072, 64), "BF16"),
    ("Q8_0", "txt_in.weight", (3072, 4096), "BF16"),
    ("Q8_0", "final_layer.linear.weight", (64, 3072), "BF16"),
    ("Q8_0", "double_blocks.0.img_attn.norm.query_norm.scale", (128,), "F32"),
    ("Q8_0", "double_blocks.0.img_mod.lin.bias", (18432,), "F32"),
    ("Q4_K_S", "double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q4_K"),
    ("Q2_K", "double_blocks.0.img_attn.qkv.weight", (9216, 3072), "Q2_K"),
])
def test_flux_rules(qtype, name, shape, expected):
    assert Rules("flux", qtype).choose(name, shape, "BF16",
                                       lambda t: BY_NAME[t].block_size).qtype == expected


def _block_size(name: str) -> int:
    return BY_NAME[name].block_size


def test_sd_rules_reshape_upgrade_and_keep():
    rules = Rules("sdxl", "Q4_K_M")
    conv = rules.choose("output_blocks.2.1.conv.weight", (640, 640, 3, 3), "F16", _block_size)
    assert (conv.qtype, conv.shape, conv.orig_shape) == ("Q4_K", (14400, 256), (640, 640, 3, 3))
    first = rules.choose("input_blocks.0.0.weight", (320, 4, 3, 3), "F16", _block_size)
    assert (first.qtype, first.shape) == ("F16", (45, 256))  # reshaped, but kept
    value = "input_blocks.4.1.transformer_blocks.0.attn1.to_v.weight"
    assert rules.choose(value, (640, 640), "F16", _block_size).qtype == "Q6_K"
    ffn = "input_blocks.4.1.transformer_blocks.0.ff.net.2.weight"
    assert rules.choose(ffn, (640, 2560), "F16", _block_size).qtype == "Q6_K"
    assert rules.choose("time_embed.0.weight", (1280, 320), "F16", _block_size).qtype == "F16"
    assert rules.choose("label_emb.0.0.weight", (1280, 2816), "F16", _block_size).qtype == "F16"
    assert rules.choose("input_blocks.1.0.in_layers.0.weight", (320,), "F32",
                        _block_size).qtype == "F32"
    assert Rules("sd1", "Q4_0").choose(ffn, (640, 2560), "F16", _block_size).qtype == "Q4_1"
    assert Rules("sd1", "Q5_0").choose(ffn, (640, 2560), "F16", _block_size).qtype == "Q5_1"
    # llama-quantize counts value projections in file order for these two mixes
    q3 = Rules("sd1", "Q3_K_M")
    assert [q3.choose(value, (640, 640), "F16", _block_size).qtype for _ in range(3)] == [
        "Q5_K", "Q5_K", "Q4_K"]
    q4s = Rules("sd1", "Q4_K_S")
    assert [q4s.choose(value, (640, 640), "F16", _block_size).qtype for _ in range(5)] == [
        "Q5_K"] * 4 + ["Q4_K"]


def test_sd3_rules_and_fallback_to_f16():
    rules = Rules("sd3", "Q4_K_M")
    assert rules.choose("joint_blocks.0.x_block.attn.qkv.weight", (4608, 1536), "F16",
                        _block_size).qtype == "Q5_K"
    assert rules.choose("pos_embed", (1, 36864, 1536), "F16", _block_size).qtype == "F16"
    assert rules.choose("x_embedder.proj.weight", (1536, 16, 2, 2), "F16",
                        _block_size).qtype == "F16"
    odd = rules.choose("joint_blocks.0.x_block.mlp.fc2.weight", (1536, 6000), "F16",
                       _block_size)
    assert odd.qtype == "F16" and "256" in odd.note  # rows not whole K blocks


def test_fp8_scaled_is_comfyuis_per_layer_layout(tmp_path, capsys):
    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype="bf16", components=["diffusion_model"])
    for fmt, dtype, name in (("e4m3fn", torch.float8_e4m3fn, "float8_e4m3fn"),
                             ("e5m2", torch.float8_e5m2, "float8_e5m2")):
        out = tmp_path / f"flux-{fmt}.safetensors"
        code, _, stderr = run_cli(capsys, "quantize", src, "-o", out, "--type", "fp8-scaled",
                                  "--fp8", fmt, "--quiet")
        assert code == 0, stderr
        from safetensors.torch import load_file
        written = load_file(str(out))
        source = _source_values(src)
        layers = [k[:-len(".comfy_quant")] for k in written if k.endswith(".comfy_quant")]
        assert layers
        assert "img_in.weight" in written and written["img_in.weight"].dtype == torch.bfloat16
        for layer in layers:
            marker = bytes(written[f"{layer}.comfy_quant"].tolist())
            assert json.loads(marker) == {"format": name}
            assert marker == json.dumps({"format": name}).encode()  # as ComfyUI writes it
            scale = written[f"{layer}.weight_scale"]
            assert scale.dtype == torch.float32 and scale.shape == ()
            weight = written[f"{layer}.weight"]
            assert weight.dtype == dtype
            back = weight.float() * scale  # ComfyUI: W = stored x weight_scale
            assert _relative_rms(back, source[f"{layer}.weight"]) <= ERROR_BOUNDS[
                "F8_E4M3" if fmt == "e4m3fn" else "F8_E5M2"]
            assert float(weight.float().abs().max()) <= (448 if fmt == "e4m3fn" else 57344)
        with ckpt_open(out) as ck:
            assert identify_checkpoint(ck).family == "flux1-dev"
            read = ck[f"{layers[0]}.weight"].read().float()
            expected = written[f"{layers[0]}.weight"].float() * written[
                f"{layers[0]}.weight_scale"]
            assert torch.allclose(read, expected, rtol=1e-2, atol=0)


def _only(folder, *names) -> bool:
    return sorted(os.listdir(folder)) == sorted(names)


def test_diffusers_flux_is_refused_with_the_way_out(tmp_path, capsys):
    src = tmp_path / "flux-diffusers.safetensors"
    sample("flux1-dev", str(src), tiny=True, layout="diffusers", components=["diffusion_model"])
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type",
                              "Q8_0")
    assert code == 2
    assert "diffusers layout" in stderr and "ckpt assemble --diffusion-model" in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert _only(tmp_path, "flux-diffusers.safetensors")
    original = tmp_path / "original.safetensors"  # the way out it names works
    assert run_cli(capsys, "assemble", "--diffusion-model", src, "--allow-partial", "-o",
                   original)[0] == 0
    assert run_cli(capsys, "quantize", original, "-o", tmp_path / "x.gguf", "--type",
                   "Q8_0")[0] == 0


def _flux_with(tmp_path, key: str, value: torch.Tensor):
    from safetensors.torch import load_file, save_file

    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, components=["diffusion_model"])
    tensors = load_file(str(src))
    tensors[key] = value
    save_file(tensors, str(src))
    return src


def test_nan_weights_are_refused_and_nothing_is_left(tmp_path, capsys):
    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, components=["diffusion_model"])
    from safetensors.torch import load_file, save_file
    tensors = load_file(str(src))
    key = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    tensors[key][3, 5] = float("nan")
    save_file(tensors, str(src))
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type",
                              "Q8_0")
    assert code == 3 and "NaN" in stderr and "double_blocks.0.img_attn.qkv.weight" in stderr
    assert _only(tmp_path, "flux.safetensors")


def test_five_dimensional_and_long_named_tensors_are_refused(tmp_path, capsys):
    src = _flux_with(tmp_path, "model.diffusion_model.extra.weight", torch.zeros(1, 2, 2, 2, 2))
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type",
                              "Q8_0")
    assert code == 2 and "5 dimensions" in stderr
    long_name = "model.diffusion_model." + "x" * 128 + ".weight"
    src = _flux_with(tmp_path, long_name, torch.zeros(4, 4))
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type",
                              "Q8_0")
    assert code == 2 and "127" in stderr
    assert _only(tmp_path, "flux.safetensors")


def test_an_error_over_the_bound_stops_the_run(tmp_path, monkeypatch):
    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, components=["diffusion_model"])
    monkeypatch.setitem(quantize_op.ERROR_BOUNDS, "Q8_0", 1e-4)
    with pytest.raises(FormatError, match=r"over the 0\.0001 that Q8_0 gives"):
        quantize_op.quantize(str(src), str(tmp_path / "x.gguf"), "Q8_0")
    assert _only(tmp_path, "sd1.safetensors")


def test_usage_errors(tmp_path, capsys):
    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, components=["diffusion_model"])
    code, _, stderr = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.safetensors",
                              "--type", "Q8_0")
    assert code == 2 and "*.gguf" in stderr
    code, _, _ = run_cli(capsys, "quantize", src, "-o", tmp_path / "x.gguf", "--type", "Q7")
    assert code == 2
    vae = tmp_path / "vae.safetensors"
    sample("sd1", str(vae), tiny=True, components=["vae"])
    code, stdout, stderr = run_cli(capsys, "quantize", vae, "-o", tmp_path / "v.gguf",
                                   "--type", "Q8_0", "--json")
    assert code == 2 and "no diffusion model" in json.loads(stdout)["error"]
    assert _only(tmp_path, "sd1.safetensors", "vae.safetensors")


def test_fp8_is_the_same_where_the_output_cannot_be_mapped(tmp_path, monkeypatch):
    """A file system that cannot reserve blocks gets tensors written from memory instead of
    produced into the mapped file: the same bytes."""
    import errno

    from safetensors.torch import load_file

    from ckptkit.engine import writer

    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype="bf16", components=["diffusion_model"])
    quantize_op.quantize(str(src), str(tmp_path / "mapped.safetensors"), "fp8-scaled")

    def no_reserve(fd, offset, size):
        raise OSError(errno.EOPNOTSUPP, "not supported")

    monkeypatch.setattr(writer.os, "posix_fallocate", no_reserve)
    quantize_op.quantize(str(src), str(tmp_path / "plain.safetensors"), "fp8-scaled")
    mapped, plain = (load_file(str(tmp_path / n)) for n in ("mapped.safetensors",
                                                            "plain.safetensors"))
    assert mapped.keys() == plain.keys()
    assert all(torch.equal(mapped[k].view(torch.uint8), plain[k].view(torch.uint8))
               if mapped[k].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
               else torch.equal(mapped[k], plain[k]) for k in mapped)
