"""Split, assemble and VAE bake on the files users actually have: incomplete parts, VAEs with
training leftovers, sources whose metadata describes themselves, older SD1 text encoders.

Each part is made here from a tiny sample with the safetensors library (keys removed, added
or renamed), so the file under test is exactly what a user would have downloaded.
"""

from __future__ import annotations

import pytest
import torch
from failing_writes import fill_the_disk
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.cli.main import main
from ckptkit.errors import UsageError
from ckptkit.ops.inspect import inspect_file
from ckptkit.ops.parts import assemble, bake_vae, split
from ckptkit.ops.sample import sample

_JUNK = {"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7),
         "loss.logvar": torch.tensor(0.0), "loss.discriminator.main.0.weight": torch.ones(2, 3)}


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def _same(a: dict, b: dict) -> None:
    assert set(a) == set(b), set(a) ^ set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _rewritten(src, dst, change, metadata=None) -> str:
    """``src`` saved as ``dst`` with ``change`` applied to its tensors (a dict to edit)."""
    tensors = load_file(str(src))
    change(tensors)
    save_file(tensors, str(dst), metadata=metadata)
    return str(dst)


def _split_sample(folder, fid: str) -> list[str]:
    """A tiny sample of ``fid`` and its split parts, made once per module: the tests only read
    them (each writes what it changes to its own folder)."""
    src = folder / f"{fid}.safetensors"
    with pytest.MonkeyPatch.context() as patch:  # no hash cache of the user's
        patch.setenv("CKPTKIT_CACHE_DIR", str(folder / "cache"))
        sample(fid, str(src), tiny=True, seed=0)
        return [str(src), *split(str(src), str(folder / "parts"))]


@pytest.fixture(scope="module")
def sd1(module_tmp):
    """A tiny SD1 checkpoint and its split parts: (source, diffusion model, clip_l, vae)."""
    return _split_sample(module_tmp("sd1"), "sd1")


@pytest.fixture(scope="module")
def sdxl(module_tmp):
    """A tiny SDXL checkpoint and its parts: (source, diffusion model, clip_l, clip_g, vae)."""
    return _split_sample(module_tmp("sdxl"), "sdxl")


def test_a_vae_without_its_encoder_is_refused_and_nothing_is_written(tmp_path, sd1):
    src, _, _, vae = sd1
    decoder = _rewritten(vae, tmp_path / "decoder_only.safetensors",
                         lambda t: [t.pop(k) for k in list(t) if k.startswith("encoder.")])
    out = tmp_path / "baked.safetensors"
    with pytest.raises(UsageError, match=r"decoder_only\.safetensors is an incomplete vae: it "
                                         r"lacks \d+ of the \d+ keys .* e\.g\. encoder\."):
        bake_vae(src, decoder, str(out))
    assert main(["vae", "bake", src, decoder, "-o", str(out), "--quiet"]) == 2
    assert not out.exists()


def test_a_text_encoder_missing_a_layer_is_refused(tmp_path, sd1):
    _, model, clip, vae = sd1
    holey = _rewritten(clip, tmp_path / "holey.safetensors",
                       lambda t: [t.pop(k) for k in list(t) if ".layers.5." in k])
    out = tmp_path / "out.safetensors"
    with pytest.raises(UsageError, match=r"holey\.safetensors is an incomplete clip_l: it lacks "
                                         r"16 of the \d+ keys .* e\.g\. text_model\.encoder\."
                                         r"layers\.5\."):
        assemble(model, [holey], vae, str(out))
    assert main(["assemble", "--diffusion-model", model, "--text-encoder", holey, "--vae", vae,
                 "-o", str(out), "--quiet"]) == 2
    assert not out.exists()
    unet = _rewritten(model, tmp_path / "unet.safetensors",
                      lambda t: t.pop("out.2.weight"))
    with pytest.raises(UsageError, match=r"unet\.safetensors is an incomplete diffusion_model: "
                                         r"it lacks 1 of .* e\.g\. out\.2\.weight"):
        assemble(unet, [clip], vae, str(out))


def test_keys_files_may_lack_stay_optional(tmp_path, sd1, sdxl):
    """CLIP's position_ids, open_clip's logit_scale (without the scalars a split records) and
    CLIP-L's text_projection (SD3 with a FLUX CLIP-L) are not asked for."""
    src, model, clip, vae = sd1
    no_ids = _rewritten(clip, tmp_path / "no_ids.safetensors",
                        lambda t: t.pop("text_model.embeddings.position_ids"))
    out = tmp_path / "out.safetensors"
    assemble(model, [no_ids], vae, str(out))
    expected = load_file(src)
    del expected["cond_stage_model.transformer.text_model.embeddings.position_ids"]
    _same(expected, load_file(str(out)))

    _, xl_model, xl_l, xl_g, xl_vae = sdxl
    bare_g = _rewritten(xl_g, tmp_path / "bare_g.safetensors", lambda t: None)  # no metadata
    result = assemble(xl_model, [xl_l, bare_g], xl_vae, str(tmp_path / "xl_out.safetensors"))
    assert result["missing"] == [] and result["left_out"] == {}

    sd3, flux = tmp_path / "sd3.safetensors", tmp_path / "flux.safetensors"
    sample("sd3-medium", str(sd3), tiny=True)
    sample("flux1-dev", str(flux), tiny=True)
    sd3_model, _, sd3_g, sd3_t5, sd3_vae = split(str(sd3), str(tmp_path / "sd3"))
    flux_l = split(str(flux), str(tmp_path / "flux"), ["clip_l"])[0]
    assert "text_projection.weight" not in load_file(flux_l)
    assemble(sd3_model, [flux_l, sd3_g, sd3_t5], sd3_vae, str(tmp_path / "sd3_out.safetensors"))


def test_training_leftovers_of_a_vae_stay_out_of_bake_and_assemble(tmp_path, sd1):
    """A1111's VAE loader ignores ``loss*`` and ``model_ema.decay``/``num_updates``; so do
    bake and assemble, and they say what they left out."""
    src, model, clip, vae = sd1
    junk = _rewritten(vae, tmp_path / "junk_vae.safetensors", lambda t: t.update(_JUNK))
    counts = {"ema weights": 2, "training leftovers": 2}
    out = tmp_path / "baked.safetensors"
    result = bake_vae(src, junk, str(out))
    _same(load_file(src), load_file(str(out)))
    assert result["left_out"] == counts
    out = tmp_path / "assembled.safetensors"
    result = assemble(model, [clip], junk, str(out))
    _same(load_file(src), load_file(str(out)))
    assert result["left_out"] == {junk: counts}
    # the same keys inside another checkpoint's VAE
    other = _rewritten(src, tmp_path / "other.safetensors", lambda t: t.update(
        {"first_stage_model." + k: v for k, v in _JUNK.items()}))
    out = tmp_path / "from_other.safetensors"
    result = bake_vae(src, other, str(out))
    _same(load_file(src), load_file(str(out)))
    assert result["left_out"] == counts


def test_split_puts_only_component_keys_into_parts_and_reports_the_rest(tmp_path, sd1):
    src, *clean = sd1
    extra = {"first_stage_model.loss.logvar": torch.tensor(0.0),
             "first_stage_model.model_ema.decay": torch.tensor(0.9),
             "model_ema.decay": torch.tensor(0.9), "betas": torch.zeros(10),
             "v_pred": torch.zeros(0), "model.diffusion_model.bogus.weight": torch.zeros(2),
             "cond_stage_model.foo": torch.zeros(1),
             # scaled-fp8 scales belong to their weights: kept
             "model.diffusion_model.out.2.scale_weight": torch.ones(1),
             "model.diffusion_model.scaled_fp8": torch.zeros(0)}
    dirty = _rewritten(src, tmp_path / "dirty.safetensors", lambda t: t.update(extra))
    written = split(dirty, str(tmp_path / "dirty"))
    for part, reference in zip(written, clean, strict=True):
        got, want = load_file(part), load_file(reference)
        if "/diffusion_models/" in part:
            want.update({"out.2.scale_weight": torch.ones(1), "scaled_fp8": torch.zeros(0)})
        _same(want, got)
    assert written.left_out == {"training leftovers": 2, "ema weights": 2, "markers": 1,
                                "unexplained keys": 2}


def test_outputs_do_not_carry_metadata_about_another_file(tmp_path, sd1):
    """The source's SHA-256 (ModelSpec's, kohya's) describes its bytes, a part's component and
    title that part: neither is true of what is made from them. The rest, and the provenance
    of each operation, stays."""
    src, *_ = sd1
    own = {"modelspec.hash_sha256": "0x" + "ab" * 32, "sshs_model_hash": "cd" * 32,
           "sshs_legacy_hash": "12345678", "ckptkit.components": '["diffusion_model"]'}
    kept = {"modelspec.author": "someone", "modelspec.description": "a fine-tune"}
    tagged = _rewritten(src, tmp_path / "tagged.safetensors", lambda t: None,
                        {**_metadata(src), **own, **kept})
    written = split(tagged, str(tmp_path / "parts"))
    for part in written:
        meta = _metadata(part)
        assert not set(own) & set(meta), part
        assert meta.items() >= kept.items() and meta["ckptkit.operation"] == "split"
    model, clip, vae = written
    assert _metadata(model)["ckptkit.component"] == "diffusion_model"
    out = tmp_path / "whole.safetensors"
    assemble(model, [clip], vae, str(out))
    meta = _metadata(out)
    assert not {"ckptkit.component", "modelspec.hash_sha256", "sshs_model_hash"} & set(meta)
    assert meta["modelspec.title"] == "whole" and meta.items() >= kept.items()
    assert meta["ckptkit.operation"] == "assemble"
    assert meta["ckptkit.components"] == '["diffusion_model", "clip_l", "vae"]'
    baked = tmp_path / "baked.safetensors"
    bake_vae(tagged, vae, str(baked))
    meta = _metadata(baked)
    assert not set(own) & set(meta) and meta.items() >= kept.items()
    assert meta["ckptkit.operation"] == "vae bake"


def _old_sd1_names(tensors: dict) -> None:
    """The text encoder as older SD1 files store it, without transformers' text_model."""
    for key in [k for k in tensors if k.startswith("cond_stage_model.")]:
        tensors[key.replace(".text_model.", ".")] = tensors.pop(key)


def test_older_sd1_text_encoders_are_split_and_assembled_under_current_names(tmp_path, sd1):
    src, model, clip, vae = sd1
    old = _rewritten(src, tmp_path / "old.safetensors", _old_sd1_names)
    assert "cond_stage_model.transformer.encoder.layers.0.mlp.fc1.weight" in load_file(old)
    written = split(old, str(tmp_path / "old_parts"))
    old_clip = next(p for p in written if p.endswith("_clip_l.safetensors"))
    _same(load_file(clip), load_file(old_clip))
    ident = inspect_file(old_clip)["identification"]
    assert ident["kind"] == "text-encoder" and ident["layout"] == "comfyui"
    assert written.left_out == {}
    # a text encoder saved alone with those names and its monolithic prefix
    old_part = _rewritten(old, tmp_path / "old_clip.safetensors", lambda t: [
        t.pop(k) for k in list(t) if not k.startswith("cond_stage_model.")])
    out = tmp_path / "out.safetensors"
    assemble(model, [old_part], vae, str(out))
    _same(load_file(src), load_file(str(out)))


def test_the_commands_say_what_they_left_out(tmp_path, sd1, capsys):
    import json

    src = _rewritten(sd1[0], tmp_path / "ema.safetensors", lambda t: t.update(
        {"model_ema.decay": torch.tensor(0.999), "betas": torch.ones(10)}))
    capsys.readouterr()
    assert main(["split", src, "-o", str(tmp_path / "p1"), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "note: left out ema weights (1 tensor), training leftovers (1 tensor)" in out
    assert main(["split", src, "-o", str(tmp_path / "parts2"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["left_out"] == {"ema weights": 1, "training leftovers": 1}
    assert len(report["written"]) == 3


def test_a_clip_saved_by_transformers_5_assembles(tmp_path, sd1):
    """transformers 5's CLIPTextModel has no ``text_model.`` level in its state dict."""
    src, model, clip, vae = sd1
    bare = _rewritten(clip, tmp_path / "bare_clip.safetensors", lambda t: t.update(
        {k.removeprefix("text_model."): t.pop(k) for k in list(t)}))
    assert not any(k.startswith("text_model.") for k in load_file(bare))
    out = tmp_path / "out.safetensors"
    assemble(model, [bare], vae, str(out))
    _same(load_file(str(out)), load_file(src))


def test_a_failed_split_leaves_no_folders_it_made(tmp_path, sd1, monkeypatch):
    from ckptkit.errors import OutputError

    fill_the_disk(monkeypatch)
    existing = tmp_path / "models"
    existing.mkdir()
    with pytest.raises(OutputError, match="No space left"):
        split(sd1[0], str(existing / "new" / "parts"))
    assert list(existing.iterdir()) == []  # "new" and everything under it gone; "models" kept


@pytest.mark.parametrize("scalars", ["not json", '{"logit_scale": 4.6}', "[" * 5000 + "]" * 5000,
                                     '{"logit_scale": [4.6, "F99"]}'])
def test_a_part_with_broken_scalars_metadata_is_the_files_error(tmp_path, sdxl, scalars,
                                                               capsys):
    _, model, clip_l, split_g, vae = sdxl
    clip_g = _rewritten(split_g, tmp_path / "clip_g.safetensors", lambda t: None,
                        {**_metadata(split_g), "ckptkit.scalars": scalars})
    out = tmp_path / "out.safetensors"
    code = main(["assemble", "--diffusion-model", model, "--text-encoder", clip_l,
                 "--text-encoder", clip_g, "--vae", vae, "-o", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 3 and "ckptkit.scalars" in err and clip_g in err and not out.exists()


def test_a_full_size_vae_for_a_tiny_model_is_said_so(tmp_path, sd1):
    model, clip = sd1[1], sd1[2]
    full = tmp_path / "full_vae.safetensors"
    sample("sd1", str(full), sparse=True, components=["vae"])
    with pytest.raises(UsageError, match=r"a full-size part for a tiny model\)$"):
        assemble(model, [clip], str(full), str(tmp_path / "o.safetensors"))


def test_merge_take_says_what_it_left_out(tmp_path, sd1, capsys):
    src, _, _, vae = sd1
    junk = _rewritten(vae, tmp_path / "junk_vae.safetensors", lambda t: t.update(_JUNK))
    out = tmp_path / "merged.safetensors"
    assert main(["merge", "weighted-sum", src, src, "-o", str(out), "--take", f"vae={junk}",
                 "--quiet"]) == 0
    assert ("note: left out of the --take components: 2 ema weights, 2 training leftovers"
            in capsys.readouterr().out)
    _same(load_file(src), load_file(str(out)))
