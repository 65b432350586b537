"""Split, assemble and VAE bake on tiny samples of every family.

Round trips are checked bit for bit with the official safetensors reader; the renamed text
encoders are checked against diffusers' own open_clip converter run on the same input values
and loaded strictly into the transformers classes; the refusals are the pairings users get
wrong (a 16-channel VAE for a 4-channel model, a CLIP-G for SD1, parts missing).
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptkit.arch.families import families
from ckptkit.cli.main import main
from ckptkit.errors import OutputError, UsageError
from ckptkit.ops.inspect import inspect_file
from ckptkit.ops.parts import assemble, bake_vae, split
from ckptkit.ops.sample import sample

FAMILIES = list(families())


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(a[key].reshape(-1).view(torch.uint8),
                           b[key].reshape(-1).view(torch.uint8)), key


def _split_parts(written: list[str]) -> tuple[str, list[str], str | None]:
    model = next(p for p in written if "/diffusion_models/" in p)
    encoders = [p for p in written if "/text_encoders/" in p]
    vae = next((p for p in written if "/vae/" in p), None)
    return model, encoders, vae


@pytest.mark.parametrize("fid", FAMILIES)
def test_split_then_assemble_is_bit_identical(tmp_path, fid):
    src = tmp_path / "model.safetensors"
    sample(fid, str(src), tiny=True, dtype="bf16")
    written = split(str(src), str(tmp_path / "parts"))
    assert len(written) == len(families()[fid].components)
    for path in written:
        ident = inspect_file(path)["identification"]
        assert ident["layout"] == "comfyui"
        assert fid in ([ident["family"]] + ident["compatible_families"]), (path, ident)
        with safe_open(path, "pt") as f:
            meta = f.metadata()
        assert meta["ckptkit.operation"] == "split" and meta["modelspec.architecture"]
    model, encoders, vae = _split_parts(written)
    out = tmp_path / "assembled.safetensors"
    # text encoders in any order: which one is which is read from each file
    assemble(model, list(reversed(encoders)), vae, str(out))
    _same(load_file(str(src)), load_file(str(out)))
    assert inspect_file(str(out))["identification"]["family"] == fid


def test_open_clip_text_encoder_split_matches_diffusers_and_loads_in_transformers(tmp_path):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    src = tmp_path / "sdxl.safetensors"
    sample("sdxl", str(src), tiny=True, dtype="fp32")
    written = split(str(src), str(tmp_path / "parts"), ["clip_g"])
    ours = load_file(written[0])
    config = CLIPTextConfig(hidden_size=48, num_hidden_layers=32, num_attention_heads=3,
                            intermediate_size=192, projection_dim=48, hidden_act="gelu")
    model = CLIPTextModelWithProjection(config)
    theirs = convert_open_clip_checkpoint(model, load_file(str(src)),
                                          prefix="conditioner.embedders.1.model.")
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key
    model.load_state_dict(ours, strict=True)


def test_clip_l_and_t5_parts_load_strictly_in_transformers(tmp_path):
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    src = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(src), tiny=True, dtype="fp32")
    written = split(str(src), str(tmp_path / "parts"), ["clip_l", "t5xxl"])
    clip = CLIPTextModel(CLIPTextConfig(hidden_size=32, num_hidden_layers=12,
                                        num_attention_heads=2, intermediate_size=128))
    clip_state = load_file(next(p for p in written if p.endswith("_clip_l.safetensors")))
    missing, unexpected = clip.load_state_dict(
        {k.removeprefix("text_model."): v for k, v in clip_state.items()}
        if not any(k.startswith("text_model.") for k in clip.state_dict()) else clip_state,
        strict=False)
    assert not unexpected and set(missing) <= {"embeddings.position_ids",
                                               "text_model.embeddings.position_ids"}
    t5 = T5EncoderModel(T5Config(d_model=32, d_ff=64, num_layers=24, num_heads=2, d_kv=16,
                                 feed_forward_proj="gated-gelu"))
    missing, unexpected = t5.load_state_dict(
        load_file(next(p for p in written if p.endswith("_t5xxl.safetensors"))), strict=False)
    assert not unexpected and set(missing) <= {"encoder.embed_tokens.weight"}  # tied to shared


def test_vae_part_converts_to_diffusers_autoencoder(tmp_path):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, dtype="fp32", components=["vae"])
    written = split(str(src), str(tmp_path / "parts"))
    config = {"in_channels": 3, "out_channels": 3, "latent_channels": 4,
              "down_block_types": ["DownEncoderBlock2D"] * 4,
              "up_block_types": ["UpDecoderBlock2D"] * 4,
              "block_out_channels": [32, 64, 128, 128], "layers_per_block": 2}
    converted = convert_ldm_vae_checkpoint(load_file(written[0]), config)
    expected = AutoencoderKL(**config).state_dict()
    assert {k: tuple(v.shape) for k, v in converted.items()} == \
        {k: tuple(v.shape) for k, v in expected.items()}


def test_assemble_refuses_parts_that_do_not_belong_together(tmp_path):
    parts = {}
    for fid in ("sd1", "sdxl", "flux1-dev"):
        src = tmp_path / f"{fid}.safetensors"
        sample(fid, str(src), tiny=True)
        parts[fid] = _split_parts(split(str(src), str(tmp_path / fid)))
    sd1_model, sd1_te, sd1_vae = parts["sd1"]
    with pytest.raises(UsageError, match=r"16-channel VAE"):
        assemble(sd1_model, sd1_te, parts["flux1-dev"][2], str(tmp_path / "o1.safetensors"))
    clip_g = next(p for p in parts["sdxl"][1] if p.endswith("_clip_g.safetensors"))
    with pytest.raises(UsageError, match=r"clip_g, which Stable Diffusion 1\.x does not use"):
        assemble(sd1_model, [*sd1_te, clip_g], sd1_vae, str(tmp_path / "o2.safetensors"))
    with pytest.raises(UsageError, match="also needs clip_l"):
        assemble(sd1_model, [], sd1_vae, str(tmp_path / "o3.safetensors"))
    assert assemble(sd1_model, [], sd1_vae, str(tmp_path / "o4.safetensors"),
                    allow_partial=True)["missing"] == ["clip_l"]
    with pytest.raises(UsageError, match="not one component"):
        assemble(str(tmp_path / "sd1.safetensors"), sd1_te, sd1_vae,
                 str(tmp_path / "o5.safetensors"))
    with pytest.raises(OutputError, match="overwrite an input"):
        assemble(sd1_model, sd1_te, sd1_vae, sd1_vae)
    full_vae = tmp_path / "full_vae.safetensors"
    sample("sd1", str(full_vae), layout="comfyui", components=["vae"], sparse=True)
    with pytest.raises(UsageError, match="does not fit"):
        assemble(sd1_model, sd1_te, str(full_vae), str(tmp_path / "o6.safetensors"))
    assert not [n for n in os.listdir(tmp_path) if n.startswith(("o1", "o2", "o3", "o5", "o6"))]


def test_vae_bake_replaces_only_the_vae(tmp_path):
    src, other = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sample("sdxl", str(src), tiny=True)
    sample("sdxl", str(other), tiny=True, seed=7, layout="comfyui", components=["vae"])
    out = tmp_path / "baked.safetensors"
    bake_vae(str(src), str(other), str(out))
    before, after, vae = load_file(str(src)), load_file(str(out)), load_file(str(other))
    assert set(before) == set(after)
    for key in before:
        if key.startswith("first_stage_model."):
            assert torch.equal(after[key], vae[key[len("first_stage_model."):]]), key
        else:
            assert torch.equal(after[key], before[key]), key
    flux_vae = tmp_path / "flux_vae.safetensors"
    sample("flux1-dev", str(flux_vae), tiny=True, layout="comfyui", components=["vae"])
    assert main(["vae", "bake", str(src), str(flux_vae), "-o", str(tmp_path / "x.safetensors"),
                 "--quiet"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_cli_split_and_assemble(tmp_path, capsys):
    src = tmp_path / "m.safetensors"
    sample("sd3-medium", str(src), tiny=True)
    assert main(["split", str(src), "-o", str(tmp_path / "parts"), "--json", "--quiet"]) == 0
    written = json.loads(capsys.readouterr().out)["written"]
    model, encoders, vae = _split_parts(written)
    args = ["assemble", "--diffusion-model", model, "--vae", vae, "-o",
            str(tmp_path / "back.safetensors"), "--quiet"]
    for path in encoders:
        args += ["--text-encoder", path]
    assert main(args) == 0
    _same(load_file(str(src)), load_file(str(tmp_path / "back.safetensors")))
    assert main(["split", str(src), "-o", str(tmp_path / "p2"), "--components", "vae",
                 "--quiet"]) == 0
    assert os.listdir(tmp_path / "p2") == ["vae"]
    assert main(["split", model, "-o", str(tmp_path / "p3"), "--quiet"]) == 2


def test_assemble_takes_parts_in_the_original_layout_too(tmp_path):
    """A VAE saved with its monolithic prefix (first_stage_model.*) and a CLIP-L saved with
    cond_stage_model.transformer.* assemble into the same file as the ComfyUI-layout parts."""
    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True)
    model, _, _ = _split_parts(split(str(src), str(tmp_path / "parts")))
    ldm_vae, ldm_clip = tmp_path / "ldm_vae.safetensors", tmp_path / "ldm_clip.safetensors"
    sample("sd1", str(ldm_vae), tiny=True, components=["vae"])
    sample("sd1", str(ldm_clip), tiny=True, components=["clip_l"])
    out = tmp_path / "out.safetensors"
    assemble(model, [str(ldm_clip)], str(ldm_vae), str(out))
    _same(load_file(str(src)), load_file(str(out)))


def test_assemble_takes_sdxl_parts_in_kohyas_layout(tmp_path):
    """kohya sd-scripts names SDXL's parts unet.*, te1.*, te2.* (transformers names) and
    first_stage_model.*; such parts, made here by prefixing the split's ComfyUI files with
    the safetensors library, assemble into the original checkpoint (all but open_clip's
    logit_scale, which kohya's layout has no place for)."""
    from safetensors.torch import save_file

    src = tmp_path / "sdxl.safetensors"
    sample("sdxl", str(src), tiny=True)
    written = split(str(src), str(tmp_path / "parts"))
    roles = {"diffusion_models": "unet.", "_clip_l": "te1.", "_clip_g": "te2.",
             "vae": "first_stage_model."}
    kohya = {}
    for path in written:
        role = next(r for r in roles if r in path)
        kohya[role] = str(tmp_path / f"kohya{role}.safetensors")
        save_file({roles[role] + k: v for k, v in load_file(path).items()}, kohya[role])
    model, vae = kohya["diffusion_models"], kohya["vae"]
    encoders = [kohya["_clip_l"], kohya["_clip_g"]]
    out = tmp_path / "out.safetensors"
    assemble(model, encoders, vae, str(out))
    original = load_file(str(src))
    del original["conditioner.embedders.1.model.logit_scale"]
    _same(original, load_file(str(out)))


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_assemble_takes_sd1_parts_made_by_diffusers_converters(tmp_path, layout):
    """SD1 parts under diffusers names, as diffusers saves them (bare) and as kohya sd-scripts
    does (te./unet./vae. prefixes), made here by diffusers' own converters from the original
    checkpoint, assemble back into it bit for bit (all but CLIP's position_ids where the
    parts leave it out)."""
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from safetensors.torch import save_file

    from ckptkit.arch.diffusers_layout import component_config

    src = tmp_path / "sd1.safetensors"
    sample("sd1", str(src), tiny=True, dtype="fp32")
    ldm, fam = load_file(str(src)), families()["sd1"]
    parts = {"unet": convert_ldm_unet_checkpoint(
                 ldm, component_config(fam, "diffusion_model", True)),
             "te": convert_ldm_clip_checkpoint(ldm),
             "vae": convert_ldm_vae_checkpoint(ldm, component_config(fam, "vae", True))}
    paths = {}
    for name, state in parts.items():
        prefix = f"{name}." if layout == "kohya" else ""
        if layout == "kohya":
            state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        paths[name] = str(tmp_path / f"{layout}_{name}.safetensors")
        save_file({prefix + k: v.contiguous() for k, v in state.items()}, paths[name])
    out = tmp_path / "out.safetensors"
    assemble(paths["unet"], [paths["te"]], paths["vae"], str(out))
    got = load_file(str(out))
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    if ids not in got:
        del ldm[ids]
    _same(ldm, got)


def test_split_and_assemble_of_sdxl_never_import_torch(tmp_path):
    """Every SDXL tensor is copied or reordered byte for byte (CLIP-G's projection is
    transposed, its logit_scale recreated), so neither command pays torch's one-second
    import; a fresh interpreter runs both and then looks at what was imported."""
    import subprocess
    import sys

    src = tmp_path / "xl.safetensors"
    sample("sdxl", str(src), tiny=True)
    parts, out = tmp_path / "parts", tmp_path / "back.safetensors"
    te, unet = parts / "text_encoders", parts / "diffusion_models" / "xl.safetensors"
    script = (
        "import sys\nfrom ckptkit.cli.main import main\n"
        f"main(['split', {str(src)!r}, '-o', {str(parts)!r}, '--quiet'])\n"
        f"main(['assemble', '--diffusion-model', {str(unet)!r},"
        f" '--text-encoder', {str(te / 'xl_clip_l.safetensors')!r},"
        f" '--text-encoder', {str(te / 'xl_clip_g.safetensors')!r},"
        f" '--vae', {str(parts / 'vae' / 'xl.safetensors')!r}, '-o', {str(out)!r}, '--quiet'])\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'numpy')))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]"
    back, original = load_file(str(out)), load_file(str(src))
    assert back.keys() == original.keys()
    assert all(torch.equal(back[k], original[k]) for k in original)
