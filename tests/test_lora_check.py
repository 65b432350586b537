"""``ckpt lora check``: the report, the exit codes and the refusals, from the command line.

LoRA files are written by ``safetensors`` from headers with the module names of sources we
did not write (lora_headers.py: sd-mecha's kohya tables, diffusers' FLUX class); models
are full-size sparse samples. Which module lands where is test_lora_targets.py's subject;
here, what a user sees: one line per reason, exit 0 / 1 / 3, nothing written anywhere.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import run_cli
from lora_headers import (
    flux_model,
    ia3,
    kohya_flux,
    kohya_named,
    linear_modules,
    linear_weights,
    mecha,
    peft,
    sd1_kohya,
    sdxl_kohya,
)
from safetensors.torch import save_file

from ckptkit.ops.sample import sample


def write_lora(path, header, alpha=1.0, metadata=None):
    save_file({k: torch.tensor(alpha) if k.endswith(".alpha") else
               torch.zeros(s, dtype=torch.float16) for k, s in header.items()}, str(path),
              metadata=metadata)
    return str(path)


@pytest.fixture(scope="module")
def files(module_tmp):
    folder = module_tmp("check")
    out = {
        "sd1": write_lora(folder / "sd1.safetensors", sd1_kohya(rank=1)),
        "sdxl": write_lora(folder / "sdxl.safetensors", sdxl_kohya(rank=1)),
        "flux": write_lora(folder / "flux_ai_toolkit.safetensors", peft(
            {f"transformer.{p}": s for p, s in linear_modules(
                flux_model(), r"^(single_)?transformer_blocks\.").items()}, rank=1),
            metadata={"software": json.dumps({"name": "ai-toolkit"})}),
    }
    for name, family, layout, comp in (("sd1_model", "sd1", "ldm", None),
                                       ("flux_model", "flux1-dev", "comfyui",
                                        "diffusion_model")):
        out[name] = str(folder / f"{name}.safetensors")
        sample(family, out[name], layout=layout, sparse=True,
               components=[comp] if comp else None)
    return out


def listing(path) -> list[str]:
    return sorted(os.listdir(os.path.dirname(path)))


def test_a_lora_that_applies(files, capsys):
    code, out, err = run_cli(capsys, "lora", "check", files["sd1"], "--against",
                             files["sd1_model"])
    assert code == 0, err
    assert "kohya (lora_unet_/lora_te*_)" in out
    assert "family      sd1" in out and "264 (264 lora)" in out
    assert "applies     264 of 264 modules" in out and "NOT APPLIED" not in out


def test_sdxl_lora_against_sd15_one_line_exit_1(files, capsys, file_sha256):
    before = listing(files["sdxl"]), file_sha256(files["sdxl"])
    code, out, err = run_cli(capsys, "lora", "check", files["sdxl"], "--against",
                             files["sd1_model"], "--json")
    assert code == 1 and err == ""
    report = json.loads(out)
    assert report["family"] == "sdxl"
    assert report["against"]["matched"] == 0
    assert [(g["reason"], g["modules"], g["detail"]) for g in report["against"]["groups"]] == [
        ("other-family", 986, "the LoRA is for sdxl; the model is sd1")]
    assert (listing(files["sdxl"]), file_sha256(files["sdxl"])) == before
    code, out, _ = run_cli(capsys, "lora", "check", files["sdxl"], "--against",
                           files["sd1_model"], "--quiet")
    assert code == 1
    assert out.splitlines() == [f"{files['sdxl']}: 0 of 986 modules apply; not: 986 the LoRA "
                                "is for another family (the LoRA is for sdxl; the model is sd1)"]


def test_ai_toolkit_flux_lora_on_comfyui_flux(files, capsys):
    code, out, err = run_cli(capsys, "lora", "check", files["flux"], "--against",
                             files["flux_model"], "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["key_format"] == "ai-toolkit"
    assert report["against"]["unmatched"] == 0
    # diffusers' FLUX blocks: 14 Linears in a double block, 6 in a single one
    assert report["against"]["matched"] == report["modules"] == 19 * 14 + 38 * 6


def test_ia3_module_and_rank_mismatch(files, capsys, tmp_path):
    te = linear_weights(mecha("sd1-kohya")["clip_l"], "te.", r"mlp\.fc[12]$")
    header = dict(sd1_kohya(rank=1)) | ia3(kohya_named(te, "lora_te_ia3"))
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    header[f"{q}.lora_up.weight"] = (320, 2)
    path = write_lora(tmp_path / "odd.safetensors", header)
    code, out, _ = run_cli(capsys, "lora", "check", path, "--against", files["sd1_model"])
    assert code == 1
    lines = [line.strip() for line in out.splitlines() if "NOT APPLIED" in line]
    assert lines == [
        "NOT APPLIED 24 modules: the adapter type is not supported: ia3 modules are not "
        "supported (ComfyUI and diffusers do not apply them either)",
        "NOT APPLIED 1 module: the shapes do not fit: the module's own tensors do not fit "
        "together"]
    assert f"BROKEN      {q}: rank mismatch" in out
    # without a model: the broken module alone makes it fail
    code, out, _ = run_cli(capsys, "lora", "check", path, "--quiet")
    assert code == 1 and "1 module with tensors that do not fit together" in out


def test_unreadable_and_not_a_lora(files, capsys, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    code, out, err = run_cli(capsys, "lora", "check", str(junk), files["sd1_model"],
                             files["sd1"])
    assert code == 3
    assert len(err.strip().splitlines()) == 2
    assert "is not a LoRA or other adapter" in err
    assert "applies" not in out and files["sd1"] in out  # the good one is still reported


def test_text_encoders_missing_from_a_diffusion_model_file(files, capsys, tmp_path):
    path = write_lora(tmp_path / "flux_kohya.safetensors", kohya_flux(rank=1))
    code, out, _ = run_cli(capsys, "lora", "check", path, "--against", files["flux_model"],
                           "--json")
    assert code == 1
    groups = {g["detail"]: g["modules"] for g in json.loads(out)["against"]["groups"]}
    assert groups == {"the model has no clip_l": 72, "the model has no t5xxl": 168}


def test_inspect_says_what_check_says(files, capsys):
    code, out, _ = run_cli(capsys, "inspect", files["flux"])
    assert code == 0
    assert "key format diffusers" not in out  # ai-toolkit's is named as such
    assert "AI-toolkit (diffusers/PEFT names); modules: 494 lora" in out
    code, out, _ = run_cli(capsys, "inspect", files["sd1"], "--json")
    lora = json.loads(out)["identification"]["lora"]
    assert (lora["key_format"], lora["adapters"]) == ("kohya", {"lora": 264})
