"""Failures a review of ``ckpt lora`` found, each pinned by the case that showed it.

The expected values are computed here with plain torch (a LoRA's change is
up @ down x alpha/rank), not with ckptkit's adapter code.
"""

from __future__ import annotations

import os

import pytest

torch = pytest.importorskip("torch")

from helpers import run_cli  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ckptkit.ops.sample import sample  # noqa: E402

WIDTH = 48  # the tiny FLUX sample's hidden size (full size: 3072)


@pytest.fixture(scope="module")
def tiny_flux(module_tmp):
    """The tiny FLUX.1 diffusion model alone, in ComfyUI's layout (BFL names, fused qkv)."""
    path = module_tmp("flux") / "flux.safetensors"
    sample("flux1-dev", str(path), layout="comfyui", components=["diffusion_model"],
           tiny=True, dtype="fp32")
    return str(path)


def peft_qkv(path, rows: int = WIDTH) -> dict[str, torch.Tensor]:
    """AI-toolkit's way: q, k, v of double block 0's image attention as separate PEFT
    modules, rank 2, no alphas (scale 1)."""
    gen = torch.Generator().manual_seed(0)
    state = {}
    for p in ("to_q", "to_k", "to_v"):
        name = f"transformer.transformer_blocks.0.attn.{p}"
        state[name + ".lora_A.weight"] = torch.randn(2, WIDTH, generator=gen)
        state[name + ".lora_B.weight"] = torch.randn(rows, 2, generator=gen)
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("fmt", ["kohya", "comfyui"])
def test_tiny_flux_q_k_v_fuse_into_the_tiny_qkv(tmp_path, capsys, tiny_flux, fmt):
    """Converting q/k/v modules of a FLUX narrower than the full-size one used to place
    them in the full model's 3 x 3072 rows (an internal error); they fuse into 3 x 48."""
    parts = peft_qkv(tmp_path / "peft.safetensors")
    out = tmp_path / "fused.safetensors"
    code, _, err = run_cli(capsys, "lora", "convert", tmp_path / "peft.safetensors",
                           "--to", fmt, "-o", out, "--quiet", "--family", "flux1-dev")
    assert code == 0, err  # (--family: diffusers' names of q, k, v are SD3's too)
    fused = load_file(str(out))
    name = {"kohya": "lora_unet_double_blocks_0_img_attn_qkv",
            "comfyui": "diffusion_model.double_blocks.0.img_attn.qkv"}[fmt]
    up, down = fused[name + ".lora_up.weight"], fused[name + ".lora_down.weight"]
    scale = fused[name + ".alpha"].item() / down.shape[0] if name + ".alpha" in fused else 1.0
    expected = torch.cat([parts[f"transformer.transformer_blocks.0.attn.{p}.lora_B.weight"]
                          @ parts[f"transformer.transformer_blocks.0.attn.{p}.lora_A.weight"]
                          for p in ("to_q", "to_k", "to_v")])
    torch.testing.assert_close(up @ down * scale, expected)
    # and it bakes into the ComfyUI-layout file as the unconverted LoRA does
    baked = []
    for i, lora in enumerate((tmp_path / "peft.safetensors", out)):
        target = tmp_path / f"baked{i}.safetensors"
        code, _, err = run_cli(capsys, "lora", "bake", tiny_flux, lora, "-o", target,
                               "--quiet")
        assert code == 0, err
        baked.append(load_file(str(target)))
    key = "double_blocks.0.img_attn.qkv.weight"
    torch.testing.assert_close(baked[0][key], baked[1][key])
    torch.testing.assert_close(baked[0][key] - load_file(tiny_flux)[key], expected)


def test_a_module_of_a_width_no_flux_has_is_refused(tmp_path, capsys):
    """q/k/v modules 40 rows tall fit neither FLUX's full-size nor its tiny qkv: a usage
    error naming the file and the module, nothing written."""
    peft_qkv(tmp_path / "odd.safetensors", rows=40)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "lora", "convert", tmp_path / "odd.safetensors",
                           "--to", "kohya", "-o", out, "--quiet", "--family", "flux1-dev")
    assert code == 2, err
    assert "odd.safetensors" in err and "40 rows" in err and "Traceback" not in err
    assert not os.path.exists(out)


def tiny_kohya_lora(path) -> None:
    """One kohya module on a layer every SD 1.x model has (rank 2, alpha 1)."""
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    gen = torch.Generator().manual_seed(1)
    save_file({name + ".lora_down.weight": torch.randn(2, 32, generator=gen),
               name + ".lora_up.weight": torch.randn(32, 2, generator=gen),
               name + ".alpha": torch.tensor(1.0)}, str(path))


@pytest.mark.parametrize("suffix", ["abc", "1:abc", "1:2:3", "nan", "inf", "1e999"])
def test_a_strength_that_is_no_finite_number_is_a_usage_error(tmp_path, capsys, suffix):
    """``x.safetensors:abc`` used to be read as a file named so: "no such file", exit 3."""
    lora = tmp_path / "x.safetensors"
    tiny_kohya_lora(lora)
    before = lora.read_bytes()
    out = tmp_path / "out.safetensors"
    for argv in (("lora", "bake", tmp_path / "model.safetensors", f"{lora}:{suffix}"),
                 ("lora", "merge", f"{lora}:{suffix}", lora, "--concat")):
        code, _, err = run_cli(capsys, *argv, "-o", out, "--quiet")
        assert code == 2, err
        assert err.count("\n") == 1 and "x.safetensors" in err and "no such file" not in err
        assert not os.path.exists(out)
    assert lora.read_bytes() == before


def test_colons_in_file_names_and_good_numbers_still_parse(tmp_path, monkeypatch):
    from ckptkit.lora.bake import LoraSpec, parse_spec
    from ckptkit.lora.merge import parse_input

    monkeypatch.chdir(tmp_path)
    (tmp_path / "dir:name.safetensors").write_bytes(b"")
    assert parse_spec("dir:name.safetensors:0.5:-1") == LoraSpec("dir:name.safetensors", 0.5, -1)
    assert parse_spec("dir:name.safetensors") == LoraSpec("dir:name.safetensors")
    assert parse_input("dir:name.safetensors:-0.25") == ("dir:name.safetensors", -0.25)
    assert parse_input("missing.safetensors:2") == ("missing.safetensors", 2.0)


@pytest.mark.parametrize("command", ["check", "resize", "merge", "convert"])
def test_an_empty_file_is_said_to_hold_no_tensors(tmp_path, capsys, command):
    """An empty safetensors file was said to have "too many keys in no adapter module"."""
    empty = tmp_path / "empty.safetensors"
    save_file({}, str(empty))
    out = tmp_path / "out.safetensors"
    argv = {"check": ("check", empty), "resize": ("resize", empty, "-o", out, "--rank", 1),
            "merge": ("merge", tmp_path / "lora.safetensors", empty, "--concat", "-o", out),
            "convert": ("convert", empty, "--to", "kohya", "-o", out)}[command]
    tiny_kohya_lora(tmp_path / "lora.safetensors")
    code, _, err = run_cli(capsys, "lora", *argv, "--quiet")
    assert code == 3, err
    assert "empty.safetensors" in err and "holds no tensors" in err and err.count("\n") == 1
    assert not os.path.exists(out)


def test_the_sdxl_vae_note_names_an_option_bake_has(tmp_path, capsys):
    """bake's note said "--vae-dtype casts it" while bake had no --vae-dtype: it has now,
    as prune and convert do."""
    from safetensors import safe_open

    model = tmp_path / "sdxl.safetensors"
    sample("sdxl", str(model), tiny=True, dtype="fp32", components=["diffusion_model", "vae"])
    lora = tmp_path / "lora.safetensors"
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    save_file({name + ".lora_down.weight": torch.ones(1, 64),
               name + ".lora_up.weight": torch.ones(64, 1)}, str(lora))

    def vae_dtypes(*extra):
        out = tmp_path / f"out{len(extra)}.safetensors"
        code, stdout, err = run_cli(capsys, "lora", "bake", model, lora, "-o", out,
                                    "--dtype", "fp16", "--quiet", *extra)
        assert code == 0, err
        with safe_open(str(out), "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()  # noqa: SIM118 (safe_open)
                    if k.startswith("first_stage_model.")}, stdout

    kept, said = vae_dtypes()
    assert kept == {"F32"} and "--vae-dtype casts it" in said
    cast, said = vae_dtypes("--vae-dtype", "bf16")
    assert cast == {"BF16"} and "--vae-dtype" not in said


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_lora_that_makes_weights_nan_is_refused(tmp_path, capsys, bad):
    """NaN factors (at alpha 0, so scale 0 x NaN) used to be baked in silently: a model of
    black images. Refused, naming the LoRA and the module; nothing written."""
    model = tmp_path / "unet.safetensors"
    sample("sd1", str(model), tiny=True, dtype="fp32", components=["diffusion_model"],
           layout="comfyui")
    lora = tmp_path / "broken.safetensors"
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    down = torch.zeros(2, 32)
    down[0, 3] = float(bad)
    save_file({name + ".lora_down.weight": down, name + ".lora_up.weight": torch.ones(32, 2),
               name + ".alpha": torch.tensor(0.0 if bad == "nan" else 1.0)}, str(lora))
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "lora", "bake", model, lora, "-o", out, "--quiet")
    assert code == 3, err
    assert "broken.safetensors" in err and name in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken.safetensors",
                                                          "unet.safetensors"]


def test_nan_the_model_already_held_is_not_the_loras_doing(tmp_path, capsys):
    """A weight with a NaN of its own still bakes (the LoRA's change lands elsewhere)."""
    model = tmp_path / "unet.safetensors"
    sample("sd1", str(model), tiny=True, dtype="fp32", components=["diffusion_model"],
           layout="comfyui")
    state = load_file(str(model))
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    state[key][0, 0] = float("nan")
    save_file(state, str(model))
    lora = tmp_path / "lora.safetensors"
    tiny_kohya_lora(lora)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "lora", "bake", model, lora, "-o", out, "--quiet")
    assert code == 0, err
    baked = load_file(str(out))[key]
    assert baked.isnan().sum() == 1 and baked[0, 0].isnan()


def test_convolutions_left_out_by_conv_rank_0_are_not_called_biases(tmp_path, capsys):
    """--conv-rank 0 leaves changed 3 x 3 convolutions out; they were counted among the
    "biases, norms, embeddings" a LoRA cannot hold. Now they are counted on their own."""
    import json

    base = tmp_path / "base.safetensors"
    sample("sd1", str(base), tiny=True, dtype="fp32", components=["diffusion_model"],
           layout="comfyui")
    state = load_file(str(base))
    state["input_blocks.1.0.in_layers.2.weight"] += 0.5  # a 3 x 3 convolution
    state["input_blocks.1.0.in_layers.2.bias"] += 0.5  # a bias
    state["input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"] += 0.5  # a linear layer
    tuned = tmp_path / "tuned.safetensors"
    save_file(state, str(tuned))
    out = tmp_path / "lora.safetensors"
    code, stdout, err = run_cli(capsys, "lora", "extract", base, tuned, "-o", out,
                                "--rank", 2, "--conv-rank", 0, "--quiet", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    assert report["modules"] == 1
    assert report["convs_left_out"] == {"diffusion_model": 1}
    assert report["not_held"] == {"diffusion_model": 1}
    code, stdout, err = run_cli(capsys, "lora", "extract", base, tuned, "-o",
                                tmp_path / "again.safetensors", "--rank", 2, "--conv-rank", 0,
                                "--quiet")
    assert "1 k x k convolution changed and left out" in stdout
    assert "1 other tensor (biases" in stdout


def test_an_old_layout_glora_on_a_square_layer_applies(tmp_path, capsys):
    """The older LyCORIS GLoRA layout (a1 (r, in), a2 (in, r), b1 (r, in), b2 (out, r)) on
    a square layer also passes the new layout's rank checks, so check and bake read b1's r
    rows as the module's output and refused it ("changes 4 rows"); the adapter math already
    told the layouts apart as ComfyUI does. Expected: ComfyUI's old-layout formula,
    W + s alpha/r (b2 b1 + W a2 a1), in plain torch."""
    model = tmp_path / "unet.safetensors"
    sample("sd1", str(model), tiny=True, dtype="fp32", components=["diffusion_model"],
           layout="comfyui")
    gen = torch.Generator().manual_seed(4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    t = {"a1": torch.randn(4, 32, generator=gen), "a2": torch.randn(32, 4, generator=gen),
         "b1": torch.randn(4, 32, generator=gen), "b2": torch.randn(32, 4, generator=gen)}
    lora = tmp_path / "glora.safetensors"
    save_file({**{f"{name}.{r}.weight": v * 0.1 for r, v in t.items()},
               name + ".alpha": torch.tensor(2.0)}, str(lora))
    code, _, err = run_cli(capsys, "lora", "check", lora, "--against", model, "--quiet")
    assert code == 0, err
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "lora", "bake", model, f"{lora}:0.5", "-o", out, "--quiet")
    assert code == 0, err
    key = "input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    w = load_file(str(model))[key]
    f = {r: v * 0.1 for r, v in t.items()}
    expected = w + 0.5 * (2.0 / 4) * (f["b2"] @ f["b1"] + w @ f["a2"] @ f["a1"])
    torch.testing.assert_close(load_file(str(out))[key], expected)
