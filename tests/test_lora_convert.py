"""``ckpt lora convert``: key names as the other tools write them, the change kept, round trips.

Sources we did not write: the module names of sd-mecha's kohya tables and of diffusers'
FLUX class (lora_headers.py), and diffusers' own converters, which are what
``load_lora_weights`` runs on a kohya file: ``_convert_non_diffusers_lora_to_diffusers`` +
``convert_unet_state_dict_to_peft`` (SD 1.x, SDXL) and ``_convert_kohya_flux_lora_to_diffusers``
(FLUX, which splits the fused qkv and linear1). Our diffusers output must have the keys they
produce and the same change per layer (up @ down times alpha/rank); our kohya output of
their result must have kohya's names back. Round trips without fusing are byte-identical.
"""

from __future__ import annotations

import functools
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import run_cli
from lora_headers import (
    flux,
    flux_model,
    kohya,
    kohya_named,
    linear_modules,
    loha,
    lokr,
    peft,
    sd1_kohya,
    sdxl_kohya,
    sdxl_unet,
)
from safetensors.torch import load_file, save_file

# First and last blocks of each kind (kohya's names, "_"-joined): SD's down/up/mid and
# input/output/middle blocks, FLUX's double and single blocks, CLIP's first and last layers.
SOME_BLOCKS = (r"_(down_blocks_[02]|up_blocks_[13]|mid_block|input_blocks_(1|4|8)|"
               r"output_blocks_(0|5|11)|middle_block|double_blocks[._](0|18)|"
               r"single_blocks[._](0|37)|encoder_layers_(0|11|31))[._]")


def random_lora(header, seed=0, alpha=None) -> dict[str, torch.Tensor]:
    """Values for a header: fp16 factors, alphas ``alpha`` (or the rank) in fp32."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key, shape in sorted(header.items()):
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(alpha if alpha is not None else 0))
        else:
            out[key] = torch.randn(shape, generator=gen).to(torch.float16)
    if alpha is None:  # alpha = rank
        for key in [k for k in out if k.endswith(".alpha")]:
            out[key] = torch.tensor(float(out[key[:-6] + ".lora_down.weight"].shape[0]))
    return out


def save(tmp_path, name, state, metadata=None) -> str:
    path = str(tmp_path / f"{name}.safetensors")
    save_file(state, path, metadata=metadata)
    return path


def convert(capsys, src, fmt, out, *extra):
    code, _, err = run_cli(capsys, "lora", "convert", src, "--to", fmt, "-o", out,
                                "--quiet", *extra)
    assert code == 0, err
    return load_file(out)


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


@functools.cache
def probe(width: int) -> torch.Tensor:
    return torch.randn(width, 3, generator=torch.Generator().manual_seed(width))


def deltas(state: dict, down: str, up: str, alpha: bool = True) -> dict[str, torch.Tensor]:
    """Module name -> its change (up @ down, times alpha/rank where alphas are stored)
    applied to three fixed random columns: equal changes give equal results, and a full-size
    FLUX's changes (a GB each in fp32) are never made."""
    out = {}
    for key in state:
        if key.endswith(down):
            name = key[: -len(down)]
            d, u = state[key].float().flatten(1), state[name + up].float().flatten(1)
            scale = 1.0
            if alpha and name + ".alpha" in state:
                scale = float(state[name + ".alpha"]) / d.shape[0]
            out[name] = (u @ (d @ probe(d.shape[1]))) * scale
    return out


def diffusers_loading(family: str, state: dict) -> tuple[dict, dict]:
    """What diffusers' SD pipelines make of a kohya LoRA: ``lora_state_dict``'s steps (SDXL's
    original block names mapped to diffusers' given the U-Net's layers per block, then
    ``_convert_non_diffusers_lora_to_diffusers``), then the PEFT names
    ``load_lora_into_unet`` / ``load_lora_into_text_encoder`` load (the pipeline classes
    themselves are not imported: seconds, for the same functions)."""
    from diffusers.loaders.lora_conversion_utils import (
        _convert_non_diffusers_lora_to_diffusers,
        _maybe_map_sgm_blocks_to_diffusers,
    )
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    if family == "sdxl":
        state = _maybe_map_sgm_blocks_to_diffusers(dict(state),
                                                   SimpleNamespace(layers_per_block=2))
    legacy, alphas = _convert_non_diffusers_lora_to_diffusers(dict(state))
    unet = {k: v for k, v in legacy.items() if k.startswith("unet.")}
    te = {k: v for k, v in legacy.items() if not k.startswith("unet.")}
    return convert_unet_state_dict_to_peft(unet) | convert_state_dict_to_peft(te), alphas


@functools.cache
def flux_kohya_header(rank: int = 2):
    f = flux()
    return (kohya(kohya_named(f["unet"], "lora_unet"), rank)
            | kohya(kohya_named(f["te1"], "lora_te1"), rank))


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_kohya_comfyui_round_trip_is_byte_identical(family, tmp_path, capsys):
    header = {"sdxl": sdxl_kohya, "flux": flux_kohya_header}[family](rank=2)
    original = random_lora(header, alpha=1.0)
    src = save(tmp_path, "kohya", original)
    comfy = convert(capsys, src, "comfyui", str(tmp_path / "comfy.safetensors"))
    assert all(k.startswith(("diffusion_model.", "text_encoders.")) for k in comfy)
    back = convert(capsys, str(tmp_path / "comfy.safetensors"), "kohya",
                   str(tmp_path / "back.safetensors"))
    assert same(back, original)


@pytest.mark.parametrize("family", ["sd1", "flux"])
def test_kohya_diffusers_round_trip_is_byte_identical(family, tmp_path, capsys):
    """Without alphas (scale 1) nothing is folded; FLUX's fused qkv is split into q, k, v
    sharing its down and put back whole."""
    if family == "sd1":
        header = {k: s for k, s in sd1_kohya(rank=2).items() if not k.endswith(".alpha")}
    else:
        header = {k: s for k, s in flux_kohya_header().items() if not k.endswith(".alpha")}
    original = random_lora(header)
    src = save(tmp_path, "kohya", original)
    out = convert(capsys, src, "diffusers", str(tmp_path / "diffusers.safetensors"))
    back = convert(capsys, str(tmp_path / "diffusers.safetensors"), "kohya",
                   str(tmp_path / "back.safetensors"))
    assert same(back, original)
    if family == "flux":
        q = "transformer.transformer_blocks.0.attn.to_q"
        fused = "lora_unet_double_blocks_0_img_attn_qkv"
        assert torch.equal(out[q + ".lora_A.weight"], original[fused + ".lora_down.weight"])
        assert torch.equal(out[q + ".lora_B.weight"],
                           original[fused + ".lora_up.weight"][:3072])


# --------------------------------------------------------------------------- against diffusers


@pytest.mark.parametrize("family", [pytest.param("sd1", marks=pytest.mark.slow), "sdxl"])
def test_diffusers_output_is_what_diffusers_makes_of_kohya(family, tmp_path, capsys):
    """diffusers' loader path on the kohya file gives the same keys and, with its
    network alphas, the same change per layer as our diffusers file; our kohya file of its
    result has kohya's names (sd-mecha's tables) back."""
    header = {k: s for k, s in {"sd1": sd1_kohya, "sdxl": sdxl_kohya}[family](rank=2).items()
              if re.search(SOME_BLOCKS, k)}  # a few of each kind of block: quicker, as telling
    original = random_lora(header, alpha=1.0)  # alpha/rank = 1/2: folded into lora_A
    ours = convert(capsys, save(tmp_path, "kohya", original), "diffusers",
                   str(tmp_path / "ours.safetensors"))
    theirs, alphas = diffusers_loading(family, original)
    assert ours.keys() == theirs.keys()
    mine = deltas(ours, ".lora_A.weight", ".lora_B.weight")
    want = deltas(theirs, ".lora_A.weight", ".lora_B.weight")
    assert set(alphas.values()) == {1.0}
    for name, delta in want.items():
        torch.testing.assert_close(mine[name], delta * 0.5, rtol=2e-3, atol=1e-3)
    theirs_path = save(tmp_path, "theirs", {k: v.contiguous() for k, v in theirs.items()})
    back = convert(capsys, theirs_path, "kohya", str(tmp_path / "back.safetensors"))
    assert back.keys() == {k for k in header if not k.endswith(".alpha")}


def test_flux_diffusers_output_is_what_diffusers_makes_of_kohya(tmp_path, capsys):
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    paths = {p: s for p, s in flux()["unet"].items() if re.search(SOME_BLOCKS, "_" + p)}
    header = kohya(kohya_named(paths, "lora_unet"), rank=2)
    original = random_lora(header, alpha=4.0)  # scale 2
    ours = convert(capsys, save(tmp_path, "kohya", original), "diffusers",
                   str(tmp_path / "ours.safetensors"))
    theirs = _convert_kohya_flux_lora_to_diffusers(
        {k: v.float() if v.dim() else v for k, v in original.items()})
    assert ours.keys() == theirs.keys()
    mine = deltas(ours, ".lora_A.weight", ".lora_B.weight")
    for name, delta in deltas(theirs, ".lora_A.weight", ".lora_B.weight").items():
        torch.testing.assert_close(mine[name], delta, rtol=2e-3, atol=2e-3)


def test_fusing_ai_toolkit_flux_keeps_every_change(tmp_path, capsys):
    """diffusers-named q, k, v, MLP-in modules with different alphas fused into BFL's qkv
    and linear1: downs stacked, ups block-diagonal, each part's scale kept."""
    paths = linear_modules(flux_model(), r"^(single_)?transformer_blocks\.(0|1)\.")
    original = random_lora(peft({f"transformer.{p}": s for p, s in paths.items()}, rank=2))
    src = save(tmp_path, "peft", original)
    out = convert(capsys, src, "kohya", str(tmp_path / "kohya.safetensors"))
    fused = deltas(out, ".lora_down.weight", ".lora_up.weight")
    parts = deltas(original, ".lora_A.weight", ".lora_B.weight")
    block = "transformer.single_transformer_blocks.1"
    torch.testing.assert_close(fused["lora_unet_single_blocks_1_linear1"], torch.cat(
        [parts[f"{block}.{n}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]))
    assert out["lora_unet_single_blocks_1_linear1.lora_down.weight"].shape == (8, 3072)
    torch.testing.assert_close(fused["lora_unet_double_blocks_0_txt_attn_qkv"], torch.cat(
        [parts[f"transformer.transformer_blocks.0.attn.add_{p}_proj"] for p in "qkv"]))


def test_fusing_parts_of_different_scales(tmp_path, capsys):
    """kohya modules of q, k, v in diffusers' names (lycoris_ prefix, as SimpleTuner writes)
    with alphas 1, 2 and 4 fused into one qkv: each up takes its own alpha/rank."""
    paths = linear_modules(flux_model(), r"^transformer_blocks\.0\.attn\.to_[qkv]$")
    header = kohya({f"lycoris_{p.replace('.', '_')}": s for p, s in paths.items()}, rank=2)
    original = random_lora(header, alpha=1.0)
    for alpha, p in zip((1.0, 2.0, 4.0), "qkv", strict=True):
        original[f"lycoris_transformer_blocks_0_attn_to_{p}.alpha"] = torch.tensor(alpha)
    out = convert(capsys, save(tmp_path, "lyco", original), "comfyui",
                  str(tmp_path / "comfy.safetensors"), "--family", "flux1-dev")
    fused = deltas(out, ".lora_down.weight", ".lora_up.weight")
    parts = deltas(original, ".lora_down.weight", ".lora_up.weight")
    torch.testing.assert_close(fused["diffusion_model.double_blocks.0.img_attn.qkv"], torch.cat(
        [parts[f"lycoris_transformer_blocks_0_attn_to_{p}"] for p in "qkv"]),
        rtol=2e-3, atol=2e-3)


# --------------------------------------------------------------------------- refusals


def test_lycoris_adapters_round_trip_between_kohya_and_comfyui(tmp_path, capsys):
    """LoHa, LoKr, DoRA and full diffs keep their tensors (LyCORIS' suffixes) under the
    other naming."""
    unet = {p: s for p, s in sdxl_unet().items() if "attn2" in p}
    parts = [dict(list(kohya_named(unet, "lora_unet").items())[i::4]) for i in range(4)]
    header = (loha(parts[0]) | lokr(parts[1]) | kohya(parts[2], dora=True)
              | {f"{n}.diff": s for n, s in parts[3].items()})
    original = random_lora(header, alpha=3.0)
    comfy = convert(capsys, save(tmp_path, "lyco", original), "comfyui",
                    str(tmp_path / "comfy.safetensors"))
    first, second = list(unet)[:2]  # LoHa, LoKr: ComfyUI's dotted names, LyCORIS' suffixes
    assert f"diffusion_model.{first}.hada_w1_a" in comfy
    assert f"diffusion_model.{second}.lokr_w2_b" in comfy
    assert any(k.endswith(".dora_scale") for k in comfy)
    back = convert(capsys, str(tmp_path / "comfy.safetensors"), "kohya",
                   str(tmp_path / "back.safetensors"))
    assert same(back, original)


def test_formats_that_cannot_hold_an_adapter_refuse(tmp_path, capsys):
    header = loha(kohya_named({"down_blocks.0.attentions.0.proj_in": (320, 320, 1, 1)},
                              "lora_unet")) | sd1_kohya(rank=1)
    src = save(tmp_path, "loha", random_lora(header, alpha=1.0))
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli(capsys, "lora", "convert", src, "--to", "diffusers", "-o", out)
    assert code == 2 and stdout == ""
    assert err.count("\n") == 1 and "cannot hold a LoHa module" in err
    assert not out.exists() and len(list(tmp_path.iterdir())) == 1
    # a LoKr of q alone cannot be fused into BFL's qkv
    paths = linear_modules(flux_model(), r"^transformer_blocks\.0\.attn\.to_q$")
    src = save(tmp_path, "lokr", random_lora(
        lokr({f"lycoris_{p.replace('.', '_')}": s for p, s in paths.items()}), alpha=1.0))
    code, _, err = run_cli(capsys, "lora", "convert", src, "--to", "kohya", "-o", out,
                           "--family", "flux1-dev")
    assert code == 2 and "a LoKr module cannot be fused" in err
    assert not out.exists()


def test_peft_alphas_from_diffusers_adapter_metadata(tmp_path, capsys):
    """diffusers' save_lora_weights keeps alphas in lora_adapter_metadata (lora_alpha, and
    alpha_pattern by module path): kohya's file gets them as .alpha tensors, the change kept,
    and the metadata that would scale it a second time is left out."""
    import json

    paths = linear_modules(flux_model(), r"^transformer_blocks\.0\.attn\.(to_out\.0|add_q_proj)$")
    original = random_lora(peft({f"transformer.{p}": s for p, s in paths.items()}, rank=4))
    config = {"transformer.r": 4, "transformer.lora_alpha": 8,
              "transformer.alpha_pattern": {"attn.to_out.0": 2}}
    src = save(tmp_path, "peft", original,
               {"lora_adapter_metadata": json.dumps(config)})
    out = convert(capsys, src, "kohya", str(tmp_path / "kohya.safetensors"), "--family",
                  "flux1-dev")
    assert float(out["lora_unet_double_blocks_0_img_attn_proj.alpha"]) == 2.0
    changes = deltas(out, ".lora_down.weight", ".lora_up.weight")
    parts = deltas(original, ".lora_A.weight", ".lora_B.weight")
    torch.testing.assert_close(changes["lora_unet_double_blocks_0_img_attn_proj"],
                               parts["transformer.transformer_blocks.0.attn.to_out.0"] * 0.5)
    # the txt qkv is fused from add_q alone: rows of k and v stay zero; alpha 8 of rank 4
    qkv = changes["lora_unet_double_blocks_0_txt_attn_qkv"]
    torch.testing.assert_close(qkv[:3072], parts[
        "transformer.transformer_blocks.0.attn.add_q_proj"] * 2.0)
    assert not qkv[3072:].any()
    assert "lora_adapter_metadata" not in safe_open_metadata(tmp_path / "kohya.safetensors")


def safe_open_metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_diffusers_loads_and_fuses_our_flux_file(tmp_path, capsys):
    """diffusers' own loader (load_lora_adapter, then fuse_lora) on our diffusers file of a
    kohya FLUX LoRA, into a tiny FluxTransformer2DModel: every module is loaded, and each
    fused weight changes by its rows of the kohya module's change (q, k, v and the MLP input
    stacked in that order in BFL's qkv and linear1, as diffusers' single-file converter
    splits them)."""
    from diffusers import FluxTransformer2DModel

    from ckptkit.arch.diffusers_layout import component_config
    from ckptkit.arch.families import families

    fam = families()["flux1-dev"]
    model = FluxTransformer2DModel.from_config(
        component_config(fam, "diffusion_model", tiny=True))
    table = fam.component("diffusion_model").keys(tiny=True)
    paths = {k[:-7]: s for k, s in table.items() if k.endswith(".weight") and len(s) == 2
             and re.match(r"(double|single)_blocks\.\d+\.", k)}
    original = random_lora(kohya(kohya_named(paths, "lora_unet"), rank=2), alpha=1.0)
    ours = convert(capsys, save(tmp_path, "kohya", original), "diffusers",
                   str(tmp_path / "ours.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_lora_adapter(ours, prefix="transformer", adapter_name="ours")
    loaded = [k for k in model.state_dict() if ".lora_A.ours." in k]
    assert len(loaded) == sum(k.endswith(".lora_A.weight") for k in ours)
    model.fuse_lora(lora_scale=1.0)
    after = model.state_dict()

    def change(diffusers_path):
        return after[f"{diffusers_path}.base_layer.weight"] - before[f"{diffusers_path}.weight"]

    def kohya_change(name):
        down, up = (original[f"lora_unet_{name}.lora_{p}.weight"].float() for p in ("down", "up"))
        return up @ down * (1.0 / 2)  # alpha 1, rank 2

    torch.testing.assert_close(torch.cat([change(f"single_transformer_blocks.1.{p}") for p in (
        "attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")]),
        kohya_change("single_blocks_1_linear1"), rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(torch.cat([change(f"transformer_blocks.0.attn.add_{p}_proj")
                                          for p in "qkv"]),
                               kohya_change("double_blocks_0_txt_attn_qkv"),
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(change("transformer_blocks.0.ff_context.net.0.proj"),
                               kohya_change("double_blocks_0_txt_mlp_0"), rtol=1e-3, atol=1e-4)
