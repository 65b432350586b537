"""Prune: EMA dropped or swapped in, leftovers removed, casts exact and clamped, SDXL's VAE
kept, components dropped; checked against torch doing the same on whole tensors, on a real
``torch.save`` training checkpoint; and peak memory that does not grow with model size."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from ckptkit.cli.main import main
from ckptkit.errors import OutputError, UsageError
from ckptkit.ops.inspect import inspect_file
from ckptkit.ops.prune import prune
from ckptkit.ops.sample import sample

UNET = "model.diffusion_model."


def _ema_name(key: str) -> str:
    """The EMA copy's name the way diffusers' single-file loader looks it up."""
    return "model_ema." + "".join(key.split(".")[1:])


@pytest.fixture
def training_ckpt(tmp_path):
    """A Lightning-style fp32 SD1 .ckpt with EMA copies, schedule buffers and a marker."""
    src = tmp_path / "base.safetensors"
    sample("sd1", str(src), tiny=True, dtype="fp32")
    state = load_file(str(src))
    for key in [k for k in state if k.startswith(UNET)]:
        state[_ema_name(key)] = state[key] * 2 + 1
    assert "model_ema.diffusion_modelinput_blocks00weight" in state  # as LDM names them
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(1000, dtype=torch.int32)
    state["alphas_cumprod"] = torch.linspace(0.99, 0.01, 1000)
    state["v_pred"] = torch.tensor([])
    state[UNET + "out.2.bias"] = torch.tensor([1e6, -1e6, 0.5, float("inf")])
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": state, "global_step": 1000,
                "optimizer_states": [{"state": {}}]}, path)
    return path, state


def test_prune_drops_ema_and_leftovers_and_casts_like_torch(training_ckpt, tmp_path):
    src, state = training_ckpt
    out = tmp_path / "pruned.safetensors"
    report = prune(str(src), str(out), dtype="fp16")
    got = load_file(str(out))
    assert not [k for k in got if k.startswith("model_ema.")]
    assert "alphas_cumprod" not in got and "v_pred" in got
    assert report.dropped == {"ema weights": sum(k.startswith("model_ema.") for k in state),
                              "training leftovers": 1}
    for key, tensor in got.items():
        want = state[key]
        if want.is_floating_point() and key != "v_pred":
            expected = want.clamp(-65504, 65504).half() if key == UNET + "out.2.bias" \
                else want.half()
            assert torch.equal(tensor, expected), key
        else:
            assert tensor.dtype == want.dtype and torch.equal(tensor, want), key
    assert report.clamped == {UNET + "out.2.bias": 3}  # 1e6, -1e6 and inf
    assert got[UNET + "out.2.bias"].tolist()[:2] == [65504.0, -65504.0]
    ident = inspect_file(str(out))["identification"]
    assert ident["family"] == "sd1" and "v-prediction" in ident["variants"]


def test_prune_can_use_the_ema_weights(training_ckpt, tmp_path):
    src, state = training_ckpt
    out = tmp_path / "ema.safetensors"
    assert prune(str(src), str(out), ema="use").ema == "used"
    got = load_file(str(out))
    for key in [k for k in state if k.startswith(UNET)]:
        assert torch.equal(got[key], state[_ema_name(key)])
    assert not [k for k in got if k.startswith("model_ema.")]
    plain = tmp_path / "plain.safetensors"
    sample("sd1", str(plain), tiny=True)
    with pytest.raises(UsageError, match="EMA copy"):
        prune(str(plain), str(tmp_path / "x.safetensors"), ema="use")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("dtype,limit", [("fp8-e4m3fn", 448.0), ("fp8-e5m2", 57344.0)])
def test_fp8_casts_clamp(tmp_path, dtype, limit):
    from safetensors.torch import save_file

    src = tmp_path / "m.safetensors"
    sample("flux1-schnell", str(src), tiny=True, layout="comfyui", dtype="fp32")
    state = load_file(str(src))
    state["img_in.bias"] = torch.full_like(state["img_in.bias"], 1e5)
    save_file(state, str(src))
    out = tmp_path / "f8.safetensors"
    report = prune(str(src), str(out), dtype=dtype)
    got = load_file(str(out))
    target = {"fp8-e4m3fn": torch.float8_e4m3fn, "fp8-e5m2": torch.float8_e5m2}[dtype]
    assert report.clamped["img_in.bias"] == state["img_in.bias"].numel()
    assert got["img_in.bias"].float().max().item() == limit
    for key in state:
        assert torch.equal(got[key].float(), state[key].clamp(-limit, limit).to(target).float())


@pytest.mark.parametrize("family", ["sdxl", "sdxl-refiner"])  # the refiner has SDXL's VAE
def test_sdxl_vae_stays_fp32_unless_asked(tmp_path, family):
    src = tmp_path / "xl.safetensors"
    sample(family, str(src), tiny=True, dtype="fp32")
    kept = tmp_path / "kept.safetensors"
    report = prune(str(src), str(kept), dtype="fp16")
    assert report.notes and "VAE" in report.notes[0]
    got = load_file(str(kept))
    assert {v.dtype for k, v in got.items() if k.startswith("first_stage_model.")} == \
        {torch.float32}
    assert got["model.diffusion_model.out.2.weight"].dtype == torch.float16
    cast = tmp_path / "cast.safetensors"
    prune(str(src), str(cast), dtype="fp16", vae_dtype="bf16")
    assert {v.dtype for k, v in load_file(str(cast)).items()
            if k.startswith("first_stage_model.")} == {torch.bfloat16}


def test_clamp_warning_names_the_vae_dtype(tmp_path, capsys):
    src = tmp_path / "xl.safetensors"
    sample("sdxl", str(src), tiny=True, dtype="fp32")
    state = load_file(str(src))
    state["first_stage_model.decoder.conv_in.bias"][0] = 1e6
    save_file(state, str(src))
    capsys.readouterr()
    assert main(["prune", str(src), "-o", str(tmp_path / "o.safetensors"), "--vae-dtype",
                 "fp16", "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "1 value in 1 tensor was beyond fp16's range" in err and "None" not in err


def test_drop_components_and_refusals(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    sample("sd3-medium", str(src), tiny=True)
    out = tmp_path / "no_t5.safetensors"
    assert main(["prune", str(src), "-o", str(out), "--drop", "t5xxl", "--json", "--quiet"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dropped"]["component t5xxl"] > 0
    assert not [k for k in load_file(str(out)) if k.startswith("text_encoders.t5xxl.")]
    assert inspect_file(str(out))["identification"]["missing"] == ["t5xxl"]
    with pytest.raises(OutputError):
        prune(str(src), str(src))
    assert main(["prune", str(src), "-o", str(tmp_path / "x.safetensors"), "--drop", "clip_h",
                 "--quiet"]) == 2
    assert "no openclip_h component" in capsys.readouterr().err


_PEAK = """
import resource, sys
from ckptkit.ops.prune import prune
prune(sys.argv[1], sys.argv[2], dtype="bf16")
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
"""


@pytest.mark.slow  # writes a 2.1 GB output: 20 s and most of the suite's disk traffic
def test_prune_peak_memory_does_not_grow_with_model_size(tmp_path):
    """A tiny SD1 and a full-size one (2.1 GB, sparse so that the test writes little): the
    full one's peak RSS stays within a few of its largest tensors of the tiny one's."""
    peaks = {}
    for name, tiny in (("tiny", True), ("full", False)):
        src = tmp_path / f"{name}.safetensors"
        sample("sd1", str(src), tiny=tiny, sparse=not tiny)
        run = subprocess.run([sys.executable, "-c", _PEAK, str(src),
                              str(tmp_path / f"{name}_out.safetensors")],
                             capture_output=True, text=True, check=True)
        peaks[name] = int(run.stdout.strip())
        size = os.path.getsize(src)
    assert size > 2e9
    largest = 49408 * 768 * 2  # the token embedding, fp16
    assert peaks["full"] - peaks["tiny"] < 8 * largest, peaks  # ~600 MB for a 2.1 GB model


def test_no_fsync_writes_the_same_file(tmp_path):
    from ckptkit.cli.main import main
    from ckptkit.ops.sample import sample

    src = tmp_path / "model.safetensors"
    sample("sd1", str(src), tiny=True)
    synced, unsynced = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert main(["prune", str(src), "-o", str(synced), "--dtype", "bf16", "--quiet"]) == 0
    assert main(["prune", str(src), "-o", str(unsynced), "--dtype", "bf16", "--quiet",
                 "--no-fsync"]) == 0
    assert synced.read_bytes() == unsynced.read_bytes()


@pytest.mark.parametrize("source_dtype", [torch.float32, torch.bfloat16])
def test_clamping_is_counted_in_every_slice_even_beside_nan(tmp_path, monkeypatch,
                                                            source_dtype):
    """Slices whose extremes are in range skip the counting pass; one holding NaN cannot
    tell by its extremes, so it is counted too, and torch does the same cast the slow way."""
    from safetensors.torch import save_file

    import ckptkit.engine.slices

    monkeypatch.setattr(ckptkit.engine.slices, "SLICE_ELEMENTS", 64)
    values = torch.randn(40, 16) * 100
    values[3, 2], values[3, 5] = float("nan"), 1e6  # one slice: NaN beside an overflow
    values[30, 0], values[31, 1] = -7e4, float("-inf")  # another slice: two overflows
    src = tmp_path / "m.safetensors"
    save_file({"w": values.to(source_dtype)}, str(src))
    out = tmp_path / "o.safetensors"
    report = prune(str(src), str(out), dtype="fp16")
    assert report.clamped == {"w": 3}
    expected = values.to(source_dtype).float().clamp(-65504, 65504).half()
    assert torch.equal(load_file(str(out))["w"].isnan(), expected.isnan())
    got = load_file(str(out))["w"].nan_to_num(0.0)
    assert torch.equal(got, expected.nan_to_num(0.0))
