"""Issue 12, parts: what identification says of one component alone, what split takes and
gives back, what vae bake takes, prune --drop, and file names that are not UTF-8.

Test files are the package's own tiny samples; what a family reads of its text encoders is
checked against the transformers CLIP classes themselves (which hidden states move when a
weight moves), not against our own declaration.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.arch.families import families
from ckptkit.cli.main import main
from ckptkit.errors import UsageError
from ckptkit.formats import open_checkpoint
from ckptkit.ops.inspect import inspect_file
from ckptkit.ops.parts import assemble, bake_vae, split
from ckptkit.ops.prune import prune
from ckptkit.ops.sample import sample

SD_VAE_FAMILIES = {"sd1", "sd2", "sdxl", "sdxl-refiner"}


def _ident(path) -> dict:
    return inspect_file(str(path))["identification"]


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
        assert torch.equal(_bytes(a[key]), _bytes(b[key])), key


def _rewrite(src, dst, keep=lambda k: True, metadata: dict | None = None) -> str:
    """``src`` less the keys ``keep`` refuses, with ``metadata`` (default: src's)."""
    with safe_open(str(src), "pt") as f:
        meta = f.metadata() if metadata is None else metadata
    tensors = {k: v for k, v in load_file(str(src)).items() if keep(k)}
    save_file(tensors, str(dst), meta)
    return str(dst)


# -- one component alone ----------------------------------------------------------------------

def test_a_vae_alone_is_a_vae_whose_family_its_metadata_names(tmp_path):
    path = tmp_path / "xl_vae.safetensors"
    sample("sdxl", str(path), tiny=True, components=["vae"])  # under first_stage_model.
    ident = _ident(path)
    assert (ident["kind"], ident["family"], ident["layout"]) == ("vae", "sdxl", "ldm")
    assert set(ident["compatible_families"]) == SD_VAE_FAMILIES
    assert ident["components"][0]["prefix"] == "first_stage_model."
    assert not any("the weights decide" in r or "sd1's" in r for r in ident["reasons"])
    # without metadata the weights cannot tell: every family it fits, none chosen
    bare = _rewrite(path, tmp_path / "bare.safetensors", metadata={})
    ident = _ident(bare)
    assert ident["family"] is None and set(ident["compatible_families"]) == SD_VAE_FAMILIES
    # ckptkit's own metadata names the family as well
    own = _rewrite(path, tmp_path / "own.safetensors", metadata={"ckptkit.family": "sd2"})
    assert _ident(own)["family"] == "sd2"
    # metadata naming a family the weights do not fit does not decide
    odd = _rewrite(path, tmp_path / "odd.safetensors",
                   metadata={"modelspec.architecture": "flux-1-dev"})
    ident = _ident(odd)
    assert ident["family"] is None and any("weights decide" in r for r in ident["reasons"])


def test_a_diffusion_model_under_its_checkpoint_prefix_is_a_diffusion_model(tmp_path):
    path = tmp_path / "unet.safetensors"
    sample("sdxl", str(path), tiny=True, components=["diffusion_model"])
    ident = _ident(path)
    assert (ident["kind"], ident["family"], ident["layout"]) == ("diffusion-model", "sdxl", "ldm")
    assert ident["components"][0]["prefix"] == "model.diffusion_model."
    # ComfyUI's diffusion-model loader strips the prefix (unet_prefix_from_state_dict):
    # split writes what it loads, the same tensors under the bare names
    written = split(str(path), str(tmp_path / "parts"))
    assert [os.path.basename(os.path.dirname(p)) for p in written] == ["diffusion_models"]
    source = load_file(str(path))
    _same({"model.diffusion_model." + k: v for k, v in load_file(written[0]).items()}, source)
    assert _ident(written[0])["kind"] == "diffusion-model"


def test_the_sdxl_base_clip_g_is_not_explained_as_the_refiners(tmp_path):
    src = tmp_path / "xl.safetensors"
    sample("sdxl", str(src), tiny=True)
    clip_g = next(p for p in split(str(src), str(tmp_path / "parts"))
                  if p.endswith("_clip_g.safetensors"))
    ident = _ident(clip_g)
    assert ident["family"] == "sdxl"
    assert {"sdxl", "sdxl-refiner"} <= set(ident["compatible_families"])
    assert not any("sdxl-refiner's" in r for r in ident["reasons"]), ident["reasons"]


@pytest.mark.parametrize("source,projection", [("sd1", False), ("sd3-medium", True)])
def test_clip_l_fits_whether_or_not_it_has_text_projection(tmp_path, source, projection):
    """inspect's compatible families and assemble agree, with ComfyUI and diffusers, that
    CLIP-L's text_projection is optional for SD3 and FLUX and harmless for the others."""
    path = tmp_path / "clip_l.safetensors"
    sample(source, str(path), tiny=True, layout="comfyui", components=["clip_l"])
    assert any(k.endswith("text_projection.weight") for k in load_file(str(path))) == projection
    compatible = set(_ident(path)["compatible_families"])
    with_clip_l = {f.id for f in families().values() if "clip_l" in f.component_names}
    assert compatible == with_clip_l
    for fid in ("sd1", "sd3-medium", "flux1-dev"):
        model = tmp_path / f"{fid}.safetensors"
        sample(fid, str(model), tiny=True, layout="comfyui", components=["diffusion_model"])
        assemble(str(model), [str(path)], None, str(tmp_path / f"{fid}_out.safetensors"),
                 allow_partial=True)


# -- split gives back what it was given -----------------------------------------------------

_XL_L = "conditioner.embedders.0.transformer.text_model."
_XL_G = "conditioner.embedders.1.model."


def _trailing(key: str) -> bool:
    """The final layers that SDXL files in the wild lack: CLIP-L's last layer, CLIP-G's
    last block, ln_final and text_projection."""
    return (key.startswith(_XL_L + "encoder.layers.11.")
            or key.startswith((_XL_G + "transformer.resblocks.31.", _XL_G + "ln_final."))
            or key == _XL_G + "text_projection")


def test_split_then_assemble_gives_back_sdxl_without_its_final_text_layers(tmp_path):
    full = tmp_path / "full.safetensors"
    sample("sdxl", str(full), tiny=True, dtype="bf16")
    src = _rewrite(full, tmp_path / "cut.safetensors", lambda k: not _trailing(k))
    written = split(src, str(tmp_path / "parts"))
    # CLIP-G's last block, ln_final and projection make SDXL's pooled embedding: their
    # absence is said; CLIP-L's last layer SDXL never reads: nothing to say
    assert len(written.warnings) == 1 and "its clip_g lacks 19" in written.warnings[0]
    model = next(p for p in written if "/diffusion_models/" in p)
    encoders = [p for p in written if "/text_encoders/" in p]
    vae = next(p for p in written if "/vae/" in p)
    out = tmp_path / "back.safetensors"
    result = assemble(model, encoders, vae, str(out))
    _same(load_file(src), load_file(str(out)))
    assert len(result["warnings"]) == 1 and "as the checkpoint it was split from did" in \
        result["warnings"][0]
    # a CLIP-G lacking them that does not say its source did is still refused
    clip_g = next(p for p in encoders if p.endswith("_clip_g.safetensors"))
    other = _rewrite(clip_g, tmp_path / "g.safetensors", metadata={})
    with pytest.raises(UsageError, match="incomplete clip_g"):
        assemble(model, [p for p in encoders if p != clip_g] + [other], vae,
                 str(tmp_path / "x.safetensors"))
    # a CLIP-L from elsewhere without its last layer and final norm is taken for SDXL,
    # which never reads them, and refused for SD1, which does
    clip_l = next(p for p in encoders if p.endswith("_clip_l.safetensors"))
    bare_l = _rewrite(clip_l, tmp_path / "l.safetensors",
                      lambda k: "final_layer_norm" not in k, metadata={})
    assemble(model, [bare_l, clip_g], vae, str(tmp_path / "y.safetensors"))
    sd1 = tmp_path / "sd1_unet.safetensors"
    sample("sd1", str(sd1), tiny=True, layout="comfyui", components=["diffusion_model"])
    with pytest.raises(UsageError, match="incomplete clip_l"):
        assemble(str(sd1), [bare_l], None, str(tmp_path / "z.safetensors"), allow_partial=True)


def _clip(hidden: int, layers: int, heads: int):
    """transformers' CLIP text model with a projection (whose state dict keeps the
    ``text_model.`` names in every transformers version)."""
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            projection_dim=hidden, hidden_act="gelu")
    torch.manual_seed(0)
    return CLIPTextModelWithProjection(config).eval()


def test_what_sdxl_never_reads_is_what_transformers_says_it_never_reads():
    """SDXL reads CLIP-L's hidden_states[-2] only, and CLIP-G's hidden_states[-2] and its
    pooled text_embeds (diffusers' StableDiffusionXLPipeline.encode_prompt). Perturbing the
    weights our declaration calls unused must leave those unchanged; perturbing CLIP-G's
    trailing weights (which it does not call unused) must change the pooled output."""
    sdxl = families()["sdxl"]
    ids = torch.randint(0, 49408, (1, 12))
    for name, read in (("clip_l", ("hidden",)), ("clip_g", ("hidden", "pooled"))):
        comp = sdxl.component(name)
        cfg = comp.tiny
        model = _clip(cfg.hidden, cfg.layers, cfg.heads)

        def outputs(m=model):
            with torch.no_grad():
                out = m(ids, output_hidden_states=True)
            return {"hidden": out.hidden_states[-2], "pooled": out.text_embeds}

        before = outputs()
        state = model.state_dict()
        unused = [k for k in state if comp.optional(k) and not k.endswith("position_ids")]
        used_tail = [k for k in state if k.startswith(
            (f"text_model.encoder.layers.{cfg.layers - 1}.", "text_model.final_layer_norm",
             "text_projection"))]
        for key in unused:
            state[key] = state[key] + 1.0
        model.load_state_dict(state)
        after = outputs()
        for what in read:
            assert torch.equal(before[what], after[what]), (name, what)
        if name == "clip_l":  # last layer, final norm, projection: never read
            assert set(unused) == set(used_tail)
        else:
            assert unused == []
            for key in used_tail:
                state[key] = state[key] + 1.0
            model.load_state_dict(state)
            assert not torch.equal(before["pooled"], outputs()["pooled"])


@pytest.mark.parametrize("fid", ["sd1", "sdxl"])
def test_split_takes_kohya_checkpoints(tmp_path, fid):
    kohya = tmp_path / "kohya.safetensors"
    sample(fid, str(kohya), tiny=True, layout="kohya")
    written = split(str(kohya), str(tmp_path / "k"))
    assert len(written) == len(families()[fid].components)
    source = load_file(str(kohya))
    if fid == "sd1":
        # kohya's SD 1.x is the ldm sample's values under diffusers names: the parts are
        # the ldm split's (kohya files hold no position_ids)
        ldm = tmp_path / "ldm.safetensors"
        sample(fid, str(ldm), tiny=True)
        reference = split(str(ldm), str(tmp_path / "l"))
        for ours, theirs in zip(written, reference, strict=True):
            theirs = {k: v for k, v in load_file(theirs).items()
                      if not k.endswith("position_ids")}
            _same(load_file(ours), theirs)
    else:
        prefixes = {"diffusion_models": "unet.", "vae": "first_stage_model."}
        for path in written:
            folder = os.path.basename(os.path.dirname(path))
            prefix = prefixes.get(folder) or ("te1." if path.endswith("_clip_l.safetensors")
                                              else "te2.")
            _same({prefix + k: v for k, v in load_file(path).items()},
                  {k: v for k, v in source.items() if k.startswith(prefix)})
    model = next(p for p in written if "/diffusion_models/" in p)
    out = tmp_path / "assembled.safetensors"
    assemble(model, [p for p in written if "/text_encoders/" in p],
             next(p for p in written if "/vae/" in p), str(out))
    assert _ident(out)["family"] == fid and _ident(out)["layout"] == "ldm"


# -- vae bake -----------------------------------------------------------------------------------

def test_vae_bake_takes_any_vae_with_the_keys_and_latents_and_warns_across_families(tmp_path):
    xl = tmp_path / "xl.safetensors"
    sample("sdxl", str(xl), tiny=True)
    xl_vae = tmp_path / "xl_vae.safetensors"
    sample("sdxl", str(xl_vae), tiny=True, components=["vae"], seed=3)
    result = bake_vae(str(xl), str(xl_vae), str(tmp_path / "a.safetensors"))
    assert result["warnings"] == []
    assert load_file(str(tmp_path / "a.safetensors")).keys() == load_file(str(xl)).keys()
    sd1_vae = tmp_path / "sd1_vae.safetensors"
    sample("sd1", str(sd1_vae), tiny=True, components=["vae"])
    result = bake_vae(str(xl), str(sd1_vae), str(tmp_path / "b.safetensors"))
    assert len(result["warnings"]) == 1 and "names sd1, not sdxl" in result["warnings"][0]
    flux_vae = tmp_path / "flux_vae.safetensors"  # 16 channels, under vae.
    sample("flux1-dev", str(flux_vae), tiny=True, components=["vae"])
    with pytest.raises(UsageError, match="16-channel VAE for a 4-channel model"):
        bake_vae(str(xl), str(flux_vae), str(tmp_path / "c.safetensors"))
    # SD3's VAE (first_stage_model.) into FLUX (vae.): the same keys and latents
    flux = tmp_path / "flux.safetensors"
    sample("flux1-dev", str(flux), tiny=True)
    sd3_vae = tmp_path / "sd3_vae.safetensors"
    sample("sd3-medium", str(sd3_vae), tiny=True, components=["vae"])
    out = tmp_path / "d.safetensors"
    result = bake_vae(str(flux), str(sd3_vae), str(out))
    assert "names sd3-medium, not flux1-dev" in result["warnings"][0]
    baked, given = load_file(str(out)), load_file(str(sd3_vae))
    _same({k: v for k, v in baked.items() if k.startswith("vae.")},
          {"vae." + k[len("first_stage_model."):]: v for k, v in given.items()})
    assert main(["vae", "bake", str(xl), str(sd1_vae), "-o", str(tmp_path / "e.safetensors"),
                 "--quiet"]) == 0


# -- prune --drop -------------------------------------------------------------------------------

def test_prune_drop_leaves_the_file_name_alone_and_refuses_to_drop_everything(tmp_path, capsys):
    src = tmp_path / "xl.safetensors"
    sample("sdxl", str(src), tiny=True)
    out = tmp_path / "no_vae.safetensors"
    assert main(["prune", "--drop", "vae", str(src), "-o", str(out), "--quiet"]) == 0
    assert not [k for k in load_file(str(out)) if k.startswith("first_stage_model.")]
    assert "dropped component vae (248 tensors)" in capsys.readouterr().out
    only_vae = tmp_path / "only_vae.safetensors"
    assert main(["prune", "--drop", "diffusion_model,clip_l", "--drop", "clip_g", str(src),
                 "-o", str(only_vae), "--quiet"]) == 0
    assert _ident(only_vae)["kind"] == "vae" and _ident(only_vae)["family"] == "sdxl"
    capsys.readouterr()
    nothing = tmp_path / "nothing.safetensors"
    assert main(["prune", "--drop", "diffusion_model,clip_l,clip_g,vae", str(src), "-o",
                 str(nothing)]) == 2
    err = capsys.readouterr().err
    assert "diffusion_model, clip_l, clip_g, vae" in err and "Traceback" not in err
    assert not nothing.exists()
    with pytest.raises(UsageError, match="none of"):
        prune(str(only_vae), str(nothing), drop=["vae"])
    with pytest.raises(SystemExit) as exit_:  # argparse's own refusal
        main(["prune", "--drop", "vae,", str(src), "-o", str(nothing)])
    assert exit_.value.code == 2 and not nothing.exists()


# -- file names that are not UTF-8 ----------------------------------------------------------------

def test_split_of_a_file_whose_name_is_not_utf8(tmp_path, capfdbinary):
    name = os.fsdecode(b"bad\xff\x1b[2J.safetensors")  # a lone byte and a terminal escape
    src = os.path.join(str(tmp_path), name)
    sample("sd1", src, tiny=True)
    assert main(["split", src, "-o", str(tmp_path / "parts"), "--quiet"]) == 0
    out = capfdbinary.readouterr().out
    assert b"\x1b" not in out and b"\xff" not in out and b"bad\\xff\\x1b[2J" in out
    written = os.listdir(os.fsencode(tmp_path / "parts" / "vae"))
    assert written == [b"bad\xff\x1b[2J.safetensors"]
    with open_checkpoint(os.path.join(str(tmp_path / "parts" / "vae"), name)) as part:
        assert part.metadata["modelspec.title"] == "bad\\xff\x1b[2J vae"
    assert main(["split", src, "-o", str(tmp_path / "json"), "--json", "--quiet"]) == 0
    report = json.loads(capfdbinary.readouterr().out.decode("utf-8", "strict"))
    assert len(report["written"]) == 3


# -- what other commands make of a component alone ------------------------------------------------

def test_parts_alone_in_merge_and_split(tmp_path, capsys):
    unet, full = tmp_path / "unet.safetensors", tmp_path / "full.safetensors"
    sample("sdxl", str(unet), tiny=True, components=["diffusion_model"])
    sample("sdxl", str(full), tiny=True, seed=1)
    # a diffusion model under its checkpoint prefix merges with a checkpoint's, as before
    assert main(["merge", "weighted-sum", str(unet), str(full), "-o",
                 str(tmp_path / "m.safetensors"), "--quiet"]) == 0
    vae = tmp_path / "vae.safetensors"
    sample("sd1", str(vae), tiny=True, layout="comfyui", components=["vae"])
    bare = _rewrite(vae, tmp_path / "bare_vae.safetensors", metadata={})
    capsys.readouterr()
    assert main(["merge", "weighted-sum", bare, str(full), "-o",
                 str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "None" not in err and "(vae (fits sd1, sd2, sdxl, sdxl-refiner))" in err
    assert "(sdxl checkpoint)" in err
    # a VAE alone under first_stage_model. splits when its family is known, and says why
    # not when nothing says which family's it is
    prefixed = tmp_path / "prefixed.safetensors"
    sample("sdxl", str(prefixed), tiny=True, components=["vae"])
    written = split(str(prefixed), str(tmp_path / "p"))
    _same({"first_stage_model." + k: v for k, v in load_file(written[0]).items()},
          load_file(str(prefixed)))
    anonymous = _rewrite(prefixed, tmp_path / "anonymous.safetensors", metadata={})
    with pytest.raises(UsageError, match="fits sd1, sd2, sdxl, sdxl-refiner"):
        split(anonymous, str(tmp_path / "q"))


def test_split_takes_a_diffusers_named_sd1_checkpoint_in_one_file(tmp_path):
    """SD 1.x's three diffusers components do not share a key name, so one file can hold
    them all (bare diffusers names): identified as such and split as the ldm one is."""
    folder = tmp_path / "pipe"
    sample("sd1", str(folder), tiny=True, layout="diffusers")
    tensors = {}
    for sub in ("unet", "text_encoder", "vae"):
        (weights,) = [f for f in os.listdir(folder / sub) if f.endswith(".safetensors")]
        tensors.update(load_file(str(folder / sub / weights)))
    single = tmp_path / "single.safetensors"
    save_file(tensors, str(single))
    ident = _ident(single)
    assert (ident["kind"], ident["family"], ident["layout"]) == ("checkpoint", "sd1", "diffusers")
    ldm = tmp_path / "ldm.safetensors"
    sample("sd1", str(ldm), tiny=True)
    for ours, theirs in zip(split(str(single), str(tmp_path / "a")),
                            split(str(ldm), str(tmp_path / "b")), strict=True):
        _same(load_file(ours), load_file(theirs))


def test_refusals_read_as_sentences(tmp_path):
    odd = tmp_path / "odd.safetensors"
    save_file({"foo.weight": torch.zeros(2)}, str(odd))
    with pytest.raises(UsageError, match=r"odd.safetensors is an unknown, not a checkpoint"):
        split(str(odd), str(tmp_path / "p"))
    model = tmp_path / "m.safetensors"
    sample("sd1", str(model), tiny=True, layout="comfyui", components=["diffusion_model"])
    clip_h = tmp_path / "h.safetensors"
    sample("sd2", str(clip_h), tiny=True, layout="comfyui", components=["openclip_h"])
    with pytest.raises(UsageError, match=r"is an openclip_h, which Stable Diffusion 1.x"):
        assemble(str(model), [str(clip_h)], None, str(tmp_path / "o.safetensors"),
                 allow_partial=True)
