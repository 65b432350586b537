"""``ckpt lora extract`` through the CLI, on tiny SD 1.x samples: TUNED is BASE plus known
low-rank changes (written with safetensors' own ``save_file``), the output is read with
``load_file`` and its changes applied back with torch. At a rank at least the change's the
change comes back; below it, the error is the discarded singular values' share
(Eckart-Young, from ``torch.linalg.svd`` of the true change)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import run_cli
from lora_changes import CHANGED, TE_CHANGED, UNET, delta, tuned, write_base
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.ops.sample import sample


@pytest.fixture(scope="module")
def base(module_tmp):
    return write_base(module_tmp("extract"))


def _comfy(key: str) -> str:
    return "diffusion_model." + key[len(UNET):-len(".weight")]


def test_a_low_rank_change_comes_back(base, tmp_path, capsys):
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    changes = tuned(base, tuned_path, list(CHANGED), rank=3)
    code, text, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out,
                              "--rank", "4", "--format", "comfyui", "--dtype", "fp32",
                              "--device", "cpu", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["modules"] == len(CHANGED) and report["family"] == "sd1"
    assert report["retained"]["diffusion_model"] == pytest.approx(1.0, abs=1e-6)
    assert report["left_out"] == {"clip_l": "unchanged"}
    got = load_file(str(out))
    assert len(got) == 3 * len(CHANGED)  # down, up, alpha of the changed layers only
    for key, change in changes.items():
        ours = delta(got, _comfy(key), change.shape)
        assert float((ours - change).abs().max()) <= 1e-5 * float(change.abs().max()), key
    conv = got[_comfy(UNET + "input_blocks.1.0.in_layers.2.weight") + ".lora_down.weight"]
    assert conv.dim() == 4 and conv.shape[2:] == (3, 3)  # LoCon


def test_below_the_changes_rank_the_error_is_eckart_youngs(base, tmp_path, capsys):
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    changes = tuned(base, tuned_path, list(CHANGED), rank=6)
    code, text, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out,
                              "--rank", "2", "--format", "comfyui", "--dtype", "fp32", "--json")
    assert code == 0, err
    got = load_file(str(out))
    kept = total = 0.0
    for key, change in changes.items():
        s = torch.linalg.svdvals(change.reshape(change.shape[0], -1).double())
        optimal = math.sqrt(float(s[2:].pow(2).sum()))  # the discarded values
        error = float((delta(got, _comfy(key), change.shape) - change).norm())
        assert optimal <= error * (1 + 1e-6) and error <= 1.01 * optimal, key
        kept += float(s[:2].pow(2).sum())
        total += float(s.pow(2).sum())
    assert json.loads(text)["retained"]["diffusion_model"] == pytest.approx(
        math.sqrt(kept / total), rel=1e-4)


def test_kohya_names_metadata_and_a_changed_text_encoder(base, tmp_path, capsys):
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    changes = tuned(base, tuned_path, [*CHANGED, *TE_CHANGED], rank=2)
    code, text, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out,
                              "--rank", "4")
    assert code == 0, err
    assert "6 modules of sd1, rank 4, kohya names" in text
    assert "of the clip_l's" in text
    got = load_file(str(out))
    assert all(t.dtype == torch.float16 for t in got.values())  # fp16 by default
    for key, name in {**CHANGED, **TE_CHANGED}.items():
        ours = delta({k: v.float() for k, v in got.items()}, name, changes[key].shape)
        assert float((ours - changes[key]).abs().max()) <= 2e-3 * float(
            changes[key].abs().max()), name
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert {k: meta[k] for k in ("ss_network_module", "ss_network_dim", "ss_network_alpha",
                                 "ss_base_model_version", "ss_v2")} == {
        "ss_network_module": "networks.lora", "ss_network_dim": "4",
        "ss_network_alpha": "4.0", "ss_base_model_version": "sd_v1", "ss_v2": "False"}
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "4", "conv_alpha": "4.0"}
    assert meta["ckptkit.operation"] == "lora extract"
    assert json.loads(meta["ckptkit.sources"]) == ["base.safetensors", "tuned.safetensors"]
    assert set(json.loads(meta["ckptkit.retained"])) == {"diffusion_model", "clip_l"}
    code, _, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out, "--rank",
                           "4", "--components", "clip_l")
    assert code == 0, err
    assert {k.split(".")[0] for k in load_file(str(out))} == set(TE_CHANGED.values())


def test_a_text_encoder_that_barely_moved_is_left_out(base, tmp_path, capsys):
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    state = load_file(str(base))
    for key in TE_CHANGED:
        state[key] = state[key] + 0.004  # below kohya's min_diff of 0.01
    save_file(state, str(tuned_path))
    tuned(tuned_path, tuned_path, list(CHANGED)[:2], rank=2)
    code, text, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out,
                              "--rank", "4")
    assert code == 0, err
    assert "note: clip_l left out: unchanged (no weight moved by more than 0.01)" in text
    assert not any(k.startswith("lora_te") for k in load_file(str(out)))


def test_any_layout_and_a_dynamic_rank(base, tmp_path, capsys):
    """TUNED as a ComfyUI diffusion model alone, BASE a checkpoint; --dynamic fro keeps the
    fewest singular values that hold 90% of the Frobenius norm (kohya's sv_fro)."""
    tuned_path, comfy, out = (tmp_path / n for n in ("t.safetensors", "c.safetensors",
                                                     "lora.safetensors"))
    changes = tuned(base, tuned_path, list(CHANGED), rank=6)
    state = load_file(str(tuned_path))
    save_file({k[len(UNET):]: v for k, v in state.items() if k.startswith(UNET)}, str(comfy))
    code, text, err = run_cli(capsys, "lora", "extract", base, comfy, "-o", out, "--rank", "5",
                              "--dynamic", "fro", "--value", "0.9", "--format", "comfyui",
                              "--dtype", "fp32")
    assert code == 0, err
    assert "note: clip_l left out: only in" in text
    got = load_file(str(out))
    for key, change in changes.items():
        s = torch.linalg.svdvals(change.reshape(change.shape[0], -1).double()).tolist()
        total, running, want = sum(x * x for x in s), 0.0, len(s)
        for i, x in enumerate(s):
            running += x * x
            if running / total >= 0.81:
                want = i + 1
                break
        assert got[_comfy(key) + ".lora_down.weight"].shape[0] == min(want, 5), key
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_refusals(base, tmp_path, capsys):
    out = tmp_path / "lora.safetensors"
    sdxl = tmp_path / "sdxl.safetensors"
    sample("sdxl", str(sdxl), layout="comfyui", tiny=True, dtype="fp16")
    code, _, err = run_cli(capsys, "lora", "extract", base, sdxl, "-o", out, "--rank", "4")
    assert code == 2 and "a LoRA is the difference of two models of one family" in err
    assert err.count("\n") == 1
    code, _, err = run_cli(capsys, "lora", "extract", base, base, "-o", out, "--rank", "4")
    assert code == 2 and "nothing to extract" in err
    code, _, err = run_cli(capsys, "lora", "extract", base, base, "-o", out, "--rank", "4",
                           "--dynamic", "ratio")
    assert code == 2 and "needs --value" in err
    if not torch.cuda.is_available():
        code, _, err = run_cli(capsys, "lora", "extract", base, base, "-o", out, "--rank", "4",
                               "--device", "cuda")
        assert code == 2 and "no CUDA device" in err
    code, text, err = run_cli(capsys, "lora", "extract", base, base, "-o", out, "--rank", "4",
                              "--json")
    assert code == 2 and "nothing to extract" in json.loads(text)["error"]
    assert not out.exists() and not list(tmp_path.glob(".*"))


def test_diffusers_reads_the_kohya_names(base, tmp_path, capsys):
    """diffusers' own converter of kohya LoRAs (what ``load_lora_weights`` runs on them)
    takes every module and puts each change on the layer it was extracted from."""
    convert = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    tuned_path, out = tmp_path / "tuned.safetensors", tmp_path / "lora.safetensors"
    tuned(base, tuned_path, [*CHANGED, *TE_CHANGED], rank=2)
    code, _, err = run_cli(capsys, "lora", "extract", base, tuned_path, "-o", out,
                           "--rank", "2")
    assert code == 0, err
    converted, alphas = convert._convert_non_diffusers_lora_to_diffusers(load_file(str(out)))
    downs = [k for k in converted if k.endswith("down.weight")]
    assert len(downs) == len(CHANGED) + len(TE_CHANGED) == len(alphas)
    for layer, leaf in (("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.", "to_q"),
                        ("unet.down_blocks.0.resnets.0.conv1.", ""),
                        ("unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.", "to_v"),
                        ("text_encoder.text_model.encoder.layers.0.self_attn.", "to_q")):
        assert any(k.startswith(layer) and leaf in k for k in downs), layer
