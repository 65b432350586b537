"""Multi-step TOML recipes (one pass, same bytes as the steps run one by one), re-running a
merge from its metadata (same bytes), taking components unchanged, and the refusals."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ckptkit.cli.main import main
from ckptkit.errors import UsageError
from ckptkit.ops.merge import from_metadata, merge
from ckptkit.ops.merge_recipe import from_toml
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample

UNET = "model.diffusion_model.out.2.weight"
VAE = "first_stage_model.decoder.conv_in.weight"


@pytest.fixture(scope="module")
def models(module_tmp):
    folder = module_tmp("recipes")
    for seed, name in enumerate(("base", "a", "b", "c")):
        sample("sd1", str(folder / f"{name}.safetensors"), tiny=True, dtype="fp32", seed=seed)
    return folder


def _toml(path, text: str):
    path.write_text(text)
    return str(path)


CHAIN = """
[inputs]
base = "{m}/base.safetensors"
a = "{m}/a.safetensors"
b = "{m}/b.safetensors"

[[step]]
name = "final"
method = "add-difference"
models = ["mix", "b", "base"]
alpha = 0.5

[[step]]
name = "mix"
method = "weighted-sum"
models = ["a", "b"]
alpha = 0.3
"""


def test_a_two_step_recipe_in_one_pass_equals_the_steps_run_one_by_one(models, tmp_path):
    recipe = _toml(tmp_path / "r.toml", CHAIN.format(m=models))
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--recipe", recipe, "-o", str(out), "--quiet"]) == 0
    mix = tmp_path / "mix.safetensors"
    merge("weighted-sum", [str(models / "a.safetensors"), str(models / "b.safetensors")],
          str(mix), params={"alpha": 0.3})
    chained = tmp_path / "chained.safetensors"
    merge("add-difference", [str(mix), str(models / "b.safetensors"),
                             str(models / "base.safetensors")], str(chained),
          params={"alpha": 0.5})
    got, want = load_file(str(out)), load_file(str(chained))
    assert got.keys() == want.keys()
    assert all(torch.equal(got[k], want[k]) for k in got)
    a, b, base = (load_file(str(models / f"{n}.safetensors")) for n in ("a", "b", "base"))
    reference = 0.7 * a[UNET] + 0.3 * b[UNET] + 0.5 * (b[UNET] - base[UNET])
    assert torch.allclose(got[UNET], reference, atol=1e-6)
    ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert torch.equal(got[ids], a[ids])  # integers come from the base model: a


def test_recipe_refusals(models, tmp_path):
    cycle = 'output = "final"\n' + CHAIN.format(m=models).replace('models = ["a", "b"]',
                                                                   'models = ["final", "b"]')
    with pytest.raises(UsageError, match="steps final -> mix -> final form a cycle"):
        from_toml(_toml(tmp_path / "c.toml", cycle))
    unknown = CHAIN.format(m=models).replace('"b", "base"]', '"nope", "base"]')
    with pytest.raises(UsageError, match="uses 'nope', which is neither an input nor a step"):
        from_toml(_toml(tmp_path / "u.toml", unknown))
    bad_method = CHAIN.format(m=models).replace('"weighted-sum"', '"blend"')
    with pytest.raises(UsageError, match="unknown merge method 'blend'"):
        from_toml(_toml(tmp_path / "m.toml", bad_method))
    with pytest.raises(UsageError, match="is not valid TOML"):
        from_toml(_toml(tmp_path / "t.toml", "[inputs\n"))
    with pytest.raises(UsageError, match=r"e\.toml: the recipe has no inputs"):
        from_toml(_toml(tmp_path / "e.toml", "[[step]]\nmethod = 'n-average'\n"))
    assert main(["merge", "--recipe", str(tmp_path / "c.toml"), "-o",
                 str(tmp_path / "x.safetensors"), "--quiet"]) == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_rerun_from_metadata_gives_the_same_bytes(models, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("a", "b", "base"):
        shutil.copy(models / f"{name}.safetensors", work)
    first = work / "merged.safetensors"
    merge("dare", [str(work / "base.safetensors"), str(work / "a.safetensors"),
                   str(work / "b.safetensors")], str(first),
          params={"drop": 0.5, "seed": 7, "alpha": 0.8}, dtype="fp16")
    again = tmp_path / "again.safetensors"
    assert main(["merge", "--from-metadata", str(first), "-o", str(again), "--quiet"]) == 0
    assert again.read_bytes() == first.read_bytes()
    with safe_open(str(first), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert recipe["steps"][0]["params"] == {"alpha": 0.8, "drop": 0.5, "seed": 7}


@pytest.mark.parametrize("edit", [lambda r: r.pop("steps"), lambda r: r.update(steps=[1]),
                                  lambda r: r.update(inputs=[])])
def test_a_recipe_edited_into_nonsense_is_refused(models, tmp_path, capsys, edit):
    merged = tmp_path / "merged.safetensors"
    merge("weighted-sum", [str(models / "a.safetensors"), str(models / "b.safetensors")],
          str(merged), params={})
    with safe_open(str(merged), "pt") as f:
        metadata = f.metadata()
    recipe = json.loads(metadata["ckptkit.merge_recipe"])
    edit(recipe)
    from safetensors.torch import save_file

    save_file(load_file(str(merged)), str(merged),
              metadata={**metadata, "ckptkit.merge_recipe": json.dumps(recipe)})
    out = tmp_path / "again.safetensors"
    assert main(["merge", "--from-metadata", str(merged), "-o", str(out), "--quiet",
                 "--input", f"A={models / 'a.safetensors'}",
                 "--input", f"B={models / 'b.safetensors'}"]) == 3  # the file's problem
    assert "merge recipe" in capsys.readouterr().err and not out.exists()


def test_rerun_finds_moved_inputs_and_refuses_different_ones(models, tmp_path):
    first = tmp_path / "merged.safetensors"
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    merge("weighted-sum", [a, b], str(first), params={"alpha": 0.4})
    elsewhere = tmp_path / "moved"
    elsewhere.mkdir()
    with pytest.raises(UsageError, match=r"input A \(a.safetensors\) .* --input A=PATH"):
        from_metadata(str(first), str(tmp_path / "x.safetensors"))
    shutil.copy(a, elsewhere)
    shutil.copy(b, elsewhere)
    again = tmp_path / "again.safetensors"
    from_metadata(str(first), str(again), search=[str(elsewhere)])
    assert again.read_bytes() == first.read_bytes()
    with pytest.raises(UsageError, match=r"is not the B that merged\.safetensors was made from"):
        from_metadata(str(first), str(tmp_path / "y.safetensors"), search=[str(elsewhere)],
                      given={"B": str(models / "c.safetensors")})
    assert not (tmp_path / "y.safetensors").exists()


def test_take_a_component_from_a_model_or_a_standalone_file(models, tmp_path):
    a, b, c = (str(models / f"{n}.safetensors") for n in ("a", "b", "c"))
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [a, b], str(out), params={"alpha": 0.5}, take={"vae": "B"})
    got, wa, wb = load_file(str(out)), load_file(a), load_file(b)
    assert torch.equal(got[VAE], wb[VAE])
    assert torch.allclose(got[UNET], (wa[UNET] + wb[UNET]) / 2)
    parts = split(c, str(tmp_path / "parts"), components=["vae"])
    baked = tmp_path / "baked.safetensors"
    assert main(["merge", "weighted-sum", a, b, "-o", str(baked), "--take",
                 f"vae={parts[0]}", "--quiet"]) == 0
    got, wc = load_file(str(baked)), load_file(c)
    assert got.keys() == wa.keys()
    assert torch.equal(got[VAE], wc[VAE])
    with safe_open(str(baked), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert recipe["take"] == {"vae": "take.vae"}
    assert recipe["inputs"]["take.vae"]["file"] == "c.safetensors"


def test_take_the_text_encoder_from_b(models, tmp_path):
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    out = tmp_path / "out.safetensors"
    assert main(["merge", "weighted-sum", a, b, "-o", str(out), "--take", "clip_l=B",
                 "--alpha", "0.5", "--quiet"]) == 0
    got, wa, wb = load_file(str(out)), load_file(a), load_file(b)
    clip = [k for k in wa if k.startswith("cond_stage_model.")]
    assert len(clip) > 100 and got.keys() == wa.keys()
    assert all(torch.equal(got[k], wb[k]) for k in clip)
    assert torch.allclose(got[UNET], (wa[UNET] + wb[UNET]) / 2)
    assert torch.allclose(got[VAE], (wa[VAE] + wb[VAE]) / 2)


def test_take_refuses_what_does_not_fit(models, tmp_path):
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    flux_vae = tmp_path / "flux_vae.safetensors"
    sample("flux1-schnell", str(flux_vae), tiny=True, layout="comfyui", components=["vae"])
    with pytest.raises(UsageError, match="does not fit"):
        merge("weighted-sum", [a, b], str(tmp_path / "o.safetensors"), params={},
              take={"vae": str(flux_vae)})
    with pytest.raises(UsageError, match="has no such component"):
        merge("weighted-sum", [a, b], str(tmp_path / "o.safetensors"), params={},
              take={"t5xxl": "A"})
    assert main(["merge", "weighted-sum", a, b, "-o", str(tmp_path / "o.safetensors"),
                 "--take", "vae"]) == 2


def test_device_cuda_without_a_gpu_is_a_clear_refusal(models, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    assert main(["merge", "weighted-sum", a, b, "-o", str(tmp_path / "o.safetensors"),
                 "--device", "cuda"]) == 2
    assert "finds no CUDA device" in capsys.readouterr().err
    assert main(["merge", "weighted-sum", a, b, "-o", str(tmp_path / "o.safetensors"),
                 "--device", "tpu"]) == 2


def test_block_weights_reach_the_keys_of_their_blocks(models, tmp_path):
    a, b = str(models / "a.safetensors"), str(models / "b.safetensors")
    out = tmp_path / "blocks.safetensors"
    spec = "IN00=0.3,OUT*=1"
    assert main(["merge", "weighted-sum", a, b, "-o", str(out), "--alpha", spec,
                 "--quiet"]) == 0
    got, wa, wb = load_file(str(out)), load_file(a), load_file(b)
    for key, alpha in (("model.diffusion_model.input_blocks.0.0.weight", 0.3),
                       ("model.diffusion_model.time_embed.0.weight", 0.3),  # IN00 too
                       ("model.diffusion_model.output_blocks.3.0.in_layers.0.weight", 1.0),
                       (UNET, 1.0),  # out. belongs to the last OUT block
                       ("model.diffusion_model.middle_block.0.in_layers.0.weight", 0.5),
                       (VAE, 0.5)):  # BASE, not named: the method's default
        assert torch.allclose(got[key], torch.lerp(wa[key], wb[key], alpha)), key
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert recipe["steps"][0]["params"] == {"alpha": spec}
    again = tmp_path / "again.safetensors"
    from_metadata(str(out), str(again), search=[str(models)])
    assert again.read_bytes() == out.read_bytes()


def test_flux_block_weights_leave_the_vae_to_the_first_model(tmp_path):
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    sample("flux1-schnell", str(a), tiny=True, dtype="fp32", seed=0)
    sample("flux1-schnell", str(b), tiny=True, dtype="fp32", seed=1)
    out = tmp_path / "out.safetensors"
    merge("weighted-sum", [str(a), str(b)], str(out), params={"alpha": "D*=1,S*=0"})
    got, wa, wb = load_file(str(out)), load_file(str(a)), load_file(str(b))
    double = "model.diffusion_model.double_blocks.0.img_attn.qkv.weight"
    single = "model.diffusion_model.single_blocks.0.linear1.weight"
    vae = "vae.decoder.conv_in.weight"
    assert torch.equal(got[double], wb[double]) and torch.equal(got[single], wa[single])
    assert torch.equal(got[vae], wa[vae])


def test_list_blocks(models, capsys):
    assert main(["merge", "--list-blocks", str(models / "a.safetensors"), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    names = [b["name"] for b in listing["blocks"]]
    assert listing["family"] == "sd1" and len(names) == 26 and names[0] == "BASE"
    assert sum(b["tensors"] for b in listing["blocks"]) == 1131
    assert "GRAD_V" in listing["presets"] and listing["unblocked"] is None


def test_list_blocks_counts_only_blocks(tmp_path, capsys):
    """FLUX's VAE has no block: listed apart, so the count is what a list of weights needs."""
    from ckptkit.ops.merge_blocks import block_names

    flux = tmp_path / "flux.safetensors"
    sample("flux1-schnell", str(flux), sparse=True)
    assert main(["merge", "--list-blocks", str(flux), "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert [b["name"] for b in listing["blocks"]] == block_names("flux1-schnell")
    assert sum(n.startswith("D") for n in block_names("flux1-schnell")) == 19
    assert sum(n.startswith("S") for n in block_names("flux1-schnell")) == 38
    assert "vae" in listing["unblocked"]["covers"] and listing["unblocked"]["tensors"] > 200
    assert main(["merge", "--list-blocks", str(flux)]) == 0
    text = capsys.readouterr().out
    assert f"{len(listing['blocks'])} blocks" in text and "not merged by blocks" in text


def test_a_step_the_result_does_not_use_is_not_run(models, tmp_path):
    extra = CHAIN.format(m=models) + '''
[[step]]
name = "unused"
method = "weighted-sum"
models = ["c", "a"]
'''
    extra = extra.replace("[inputs]\n",
                          f'output = "final"\n[inputs]\nc = "{models}/c.safetensors"\n')
    out = tmp_path / "out.safetensors"
    assert main(["merge", "--recipe", _toml(tmp_path / "r.toml", extra), "-o", str(out),
                 "--quiet"]) == 0
    with safe_open(str(out), "pt") as f:
        recipe = json.loads(f.metadata()["ckptkit.merge_recipe"])
    assert [s["name"] for s in recipe["steps"]] == ["mix", "final"]
    assert set(recipe["inputs"]) == {"a", "b", "base"}
