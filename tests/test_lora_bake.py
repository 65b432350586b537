"""``lora bake`` against diffusers: ``load_lora_weights`` + ``fuse_lora`` on tiny pipelines of
SD 1.x, SDXL and FLUX built from our diffusers-layout samples, and our bake of the same LoRA
into the monolithic (LDM/BFL) file, the ComfyUI-layout file or the diffusers-layout file of
the same seed: the same tensors within fp32 tolerance, compared after renaming ours to
diffusers' names with ckptkit's layout moves. The LoRAs are written in the key formats
diffusers reads (kohya's names, diffusers' own), with random weights.

Also: several LoRAs in one bake equal baking them one after the other; refusals write
nothing; ``--allow-unmatched``; strengths; a pickle model through the safe reader; the
output's dtype and metadata.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from helpers import run_cli  # noqa: E402
from lora_files import make_lora  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

from ckptkit.arch import diffusers_layout as DL  # noqa: E402
from ckptkit.arch.families import family  # noqa: E402
from ckptkit.arch.layouts import to_canonical  # noqa: E402
from ckptkit.engine.moves import plan_moves  # noqa: E402
from ckptkit.formats.dtypes import from_torch_tensor  # noqa: E402
from ckptkit.lora.bake import LoraSpec, NotApplied, bake, parse_spec  # noqa: E402
from ckptkit.ops.parts import split  # noqa: E402
from ckptkit.ops.sample import sample  # noqa: E402

# PEFT says when a LoRA adapts some of the layers one name stands for (FLUX's proj_out).
pytestmark = pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters")

PIPELINES = {"sd1": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline",
             "sd3-medium": "StableDiffusion3Pipeline", "flux1-dev": "FluxPipeline"}
TOL = 1e-5


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def samples(module_tmp):
    """family -> (monolithic fp32 file, diffusers folder) of the same seed, made once."""
    made = {}

    def get(fid: str):
        if fid not in made:
            folder = module_tmp(fid.replace(".", "_"))
            ldm, diff = folder / "model.safetensors", folder / "diffusers"
            sample(fid, str(ldm), tiny=True, dtype="fp32")
            sample(fid, str(diff), layout="diffusers", tiny=True, dtype="fp32")
            made[fid] = (ldm, diff)
        return made[fid]
    return get


# ---- diffusers' side ----

def pipeline(fid: str, folder):
    cls = getattr(diffusers, PIPELINES[fid])
    skip = {k: None for k in ("tokenizer", "tokenizer_2", "tokenizer_3", "safety_checker",
                              "feature_extractor",
                              "image_encoder") if k in cls._get_signature_keys(cls)[0]
            or k in getattr(cls, "_optional_components", [])}
    if "requires_safety_checker" in cls._get_signature_keys(cls)[0]:
        skip["requires_safety_checker"] = False
    return cls.from_pretrained(str(folder), **skip)


def diffusers_fused(fid: str, folder, lora, strength: float, te_strength: float | None = None
                    ) -> dict[str, dict[str, torch.Tensor]]:
    """Subfolder -> its state_dict after ``load_lora_weights`` and ``fuse_lora``."""
    pipe = pipeline(fid, folder)
    pipe.load_lora_weights(str(lora))
    denoiser = "transformer" if hasattr(pipe, "transformer") and pipe.transformer else "unet"
    encoders = [n for n in ("text_encoder", "text_encoder_2") if getattr(pipe, n, None)]
    if te_strength is None:
        pipe.fuse_lora(lora_scale=strength)
    else:
        pipe.fuse_lora(components=[denoiser], lora_scale=strength)
        pipe.fuse_lora(components=encoders, lora_scale=te_strength)
    pipe.unload_lora_weights()
    return {n: {k.removeprefix("text_model."): v.detach() for k, v in
                getattr(pipe, n).state_dict().items()} for n in [denoiser, *encoders]}


class _Held:
    """A torch tensor as ``plan_moves`` takes a file's tensor."""

    is_contiguous = False
    byte_rows = False

    def __init__(self, tensor):
        self.tensor = tensor
        self.dtype, self.shape = from_torch_tensor(tensor)

    def read(self):
        return self.tensor


def as_diffusers(baked, fid: str, components) -> dict[str, dict[str, torch.Tensor]]:
    """Our monolithic file's components in diffusers' names (subfolder -> state), through the
    moves ``ckpt sample`` makes its diffusers samples with."""
    fam = family(fid)
    tensors = load_file(str(baked))
    _, parts = DL.folder(fam)
    subfolder = {name: sub for sub, (name, _) in parts.items()}
    out = {}
    for name in components:
        comp = fam.component(name)
        ldm = {k: _Held(tensors[k]) for k in comp.keys(tiny=True, layout="ldm")}
        moves, _ = to_canonical(comp, set(ldm))
        canonical = {p.key: _Held(p.produce()) for p in plan_moves(moves, ldm)}
        renamed = plan_moves(DL.to_diffusers(fam, name, True, set(canonical)), canonical)
        out[subfolder[name]] = {p.key.removeprefix("text_model."): p.produce() for p in renamed}
    return out


def assert_same(ours: dict, theirs: dict, changed_at_least: int = 1, before=None):
    for sub, state in theirs.items():
        mine = ours[sub]
        assert set(state) <= set(mine), sorted(set(state) - set(mine))[:5]
        for key, value in state.items():
            err = (mine[key].float() - value.float()).abs().max().item()
            assert err <= TOL * max(1.0, value.abs().max().item()), (sub, key, err)
        if before is not None:
            changed = sum(not torch.equal(before[sub][k], v) for k, v in state.items())
            assert changed >= changed_at_least, (sub, changed)


def unbaked(fid: str, folder) -> dict[str, dict[str, torch.Tensor]]:
    """The pipeline's weights before any LoRA: its folder's files."""
    return {sub.name: {k.removeprefix("text_model."): v for f in sub.glob("*.safetensors")
                       for k, v in load_file(str(f)).items()}
            for sub in Path(folder).iterdir() if sub.is_dir() and sub.name != "vae"}


# ---- against diffusers ----

def test_sd1_kohya_lora_baked_into_the_ldm_file_is_what_diffusers_fuses(tmp_path, samples):
    ldm, folder = samples("sd1")
    lora = make_lora(tmp_path / "sd1_kohya.safetensors", "sd1", ["diffusion_model", "clip_l"],
                     "kohya", alpha=2.0, every=3)
    out = tmp_path / "baked.safetensors"
    report = bake(str(ldm), [LoraSpec(str(lora), 0.7)], str(out))
    assert report.loras[0].applied == report.loras[0].modules > 50
    theirs = diffusers_fused("sd1", folder, lora, 0.7)
    assert_same(as_diffusers(out, "sd1", ["diffusion_model", "clip_l"]), theirs,
                20, unbaked("sd1", folder))


def test_sdxl_kohya_lora_with_its_own_te_strength(tmp_path, samples):
    """SDXL's kohya names are the LDM ones (U-Net) and lora_te1_/lora_te2_; the text
    encoders get their own strength."""
    ldm, folder = samples("sdxl")
    components = ["diffusion_model", "clip_l", "clip_g"]
    lora = make_lora(tmp_path / "sdxl_kohya.safetensors", "sdxl", components, "kohya",
                     alpha=8.0, every=3)
    out = tmp_path / "baked.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.8, 0.3)], str(out))
    theirs = diffusers_fused("sdxl", folder, lora, 0.8, 0.3)
    assert_same(as_diffusers(out, "sdxl", components), theirs, 10, unbaked("sdxl", folder))


def test_flux_diffusers_lora_lands_on_rows_of_fused_weights(tmp_path, samples):
    """diffusers names FLUX's q, k, v (and a single block's MLP input) as separate layers;
    the BFL file (split into ComfyUI's standalone diffusion model) fuses them: each module
    lands on its rows."""
    ldm, folder = samples("flux1-dev")
    lora = make_lora(tmp_path / "flux_diffusers.safetensors", "flux1-dev",
                     ["diffusion_model", "clip_l"], "diffusers", every=4)
    parts = split(str(ldm), str(tmp_path / "parts"), components=["diffusion_model", "clip_l"])
    standalone = next(p for p in parts if "diffusion_models" in p)
    out = tmp_path / "baked.safetensors"
    report = bake(standalone, [LoraSpec(str(lora), 0.9)], str(out),
                  allow_unmatched=True)  # the text encoder modules: no CLIP in this file
    assert report.loras[0].unmatched[0]["reason"] == "missing-component"
    theirs = diffusers_fused("flux1-dev", folder, lora, 0.9)
    # ours in BFL names under no prefix; renamed as the monolithic file's would be
    renamed = {"model.diffusion_model." + k: v for k, v in load_file(str(out)).items()}
    monolithic = tmp_path / "as_monolithic.safetensors"
    save_file(renamed, str(monolithic))
    ours = as_diffusers(monolithic, "flux1-dev", ["diffusion_model"])
    assert_same(ours, {"transformer": theirs["transformer"]}, 20,
                {"transformer": unbaked("flux1-dev", folder)["transformer"]})
    fused_rows = [k for k in theirs["transformer"] if k.endswith("attn.to_k.weight")]
    assert fused_rows  # a to_k module changed rows of a fused qkv


@pytest.mark.slow  # 10 s: the SD3 pipeline with its three text encoders
def test_sd3_diffusers_lora_baked_into_the_sai_file(tmp_path, samples):
    """SD3: diffusers' separate q, k, v of the joint blocks land on rows of SAI's fused qkv;
    the CLIP-L modules on the checkpoint's text encoder."""
    ldm, folder = samples("sd3-medium")
    lora = make_lora(tmp_path / "sd3.safetensors", "sd3-medium", ["diffusion_model", "clip_l"],
                     "diffusers", every=3)
    out = tmp_path / "baked.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.6)], str(out))
    theirs = diffusers_fused("sd3-medium", folder, lora, 0.6)
    ours = as_diffusers(out, "sd3-medium", ["diffusion_model", "clip_l"])
    before = unbaked("sd3-medium", folder)
    assert_same(ours, {n: theirs[n] for n in ours}, 5, before)


def test_flux_kohya_fused_qkv_lands_on_separate_diffusers_weights(tmp_path, samples):
    """kohya's FLUX modules are BFL's fused layers; the diffusers-layout transformer file
    stores q, k, v apart: each takes its rows of the module's change. (diffusers' own kohya
    FLUX reader assumes full-size widths, so diffusers fuses the same changes written in its
    names: up rows split, as its converter splits them.)"""
    _, folder = samples("flux1-dev")
    lora = make_lora(tmp_path / "flux_kohya.safetensors", "flux1-dev", ["diffusion_model"],
                     "kohya", alpha=2.0, every=3, twin=tmp_path / "twin.safetensors")
    model = folder / "transformer" / "diffusion_pytorch_model.safetensors"
    out = tmp_path / "baked.safetensors"
    bake(str(model), [LoraSpec(str(lora), 0.75)], str(out))
    theirs = diffusers_fused("flux1-dev", folder, tmp_path / "twin.safetensors", 0.75)
    fused = [k for k in load_file(str(lora)) if k.endswith(("qkv.alpha", "linear1.alpha"))]
    assert len(fused) > 5  # fused modules, each landing on three or four diffusers weights
    assert_same({"transformer": load_file(str(out))}, {"transformer": theirs["transformer"]},
                20, {"transformer": unbaked("flux1-dev", folder)["transformer"]})


def test_a_peft_dora_lora_at_strength_1(tmp_path, samples):
    """diffusers/PEFT DoRA: the magnitude is per output channel, (1, out, 1, 1) on a conv."""
    ldm, folder = samples("sd1")
    lora = make_lora(tmp_path / "dora.safetensors", "sd1", ["diffusion_model"], "diffusers",
                     every=4)
    tensors = load_file(str(lora))
    gen = torch.Generator().manual_seed(7)
    for key in [k for k in tensors if k.endswith(".lora_B.weight")]:
        out = tensors[key].shape[0]
        shape = (1, out, 1, 1) if tensors[key].dim() == 4 else (out,)
        magnitude = 1 + 0.1 * torch.randn(shape, generator=gen)
        tensors[key.replace(".lora_B.weight", ".lora_magnitude_vector")] = magnitude
    save_file(tensors, str(lora))
    out = tmp_path / "baked.safetensors"
    bake(str(ldm), [LoraSpec(str(lora))], str(out))
    theirs = diffusers_fused("sd1", folder, lora, 1.0)
    assert_same(as_diffusers(out, "sd1", ["diffusion_model"]), {"unet": theirs["unet"]}, 10,
                unbaked("sd1", folder))


# ---- bakes against bakes ----

def test_several_loras_in_one_bake_are_the_sequential_bakes(tmp_path, samples, file_sha256):
    ldm, _ = samples("sd1")
    before = file_sha256(ldm)
    a = make_lora(tmp_path / "a.safetensors", "sd1", ["diffusion_model", "clip_l"], "kohya",
                  seed=1)
    b = make_lora(tmp_path / "b.safetensors", "sd1", ["diffusion_model"], "diffusers",
                  seed=2, every=2)
    both = tmp_path / "both.safetensors"
    bake(str(ldm), [LoraSpec(str(a), 0.5, 0.2), LoraSpec(str(b), -0.8)], str(both))
    first = tmp_path / "first.safetensors"
    bake(str(ldm), [LoraSpec(str(a), 0.5, 0.2)], str(first))
    second = tmp_path / "second.safetensors"
    bake(str(first), [LoraSpec(str(b), -0.8)], str(second))
    x, y = load_file(str(both)), load_file(str(second))
    assert x.keys() == y.keys()
    assert all(torch.equal(x[k], y[k]) for k in x)
    base = load_file(str(ldm))
    assert sum(not torch.equal(x[k], base[k]) for k in x) > 100
    assert file_sha256(ldm) == before


def test_a_pickle_model_bakes_as_its_safetensors_twin(tmp_path, samples):
    ldm, _ = samples("sd1")
    pickled = tmp_path / "model.ckpt"
    sample("sd1", str(pickled), tiny=True, dtype="fp32")
    lora = make_lora(tmp_path / "l.safetensors", "sd1", ["diffusion_model"], "kohya", every=5)
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.6)], str(a))
    bake(str(pickled), [LoraSpec(str(lora), 0.6)], str(b))
    x, y = load_file(str(a)), load_file(str(b))
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_strength_0_for_the_text_encoders_leaves_them(tmp_path, samples):
    ldm, _ = samples("sd1")
    lora = make_lora(tmp_path / "l.safetensors", "sd1", ["diffusion_model", "clip_l"], "kohya",
                     every=3)
    out = tmp_path / "o.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 1.0, 0.0)], str(out))
    base, baked = load_file(str(ldm)), load_file(str(out))
    te = [k for k in base if k.startswith("cond_stage_model.")]
    unet = [k for k in base if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(base[k], baked[k]) for k in te)
    assert any(not torch.equal(base[k], baked[k]) for k in unet)


def test_dtype_and_metadata(tmp_path, samples):
    ldm, _ = samples("sd1")
    lora = make_lora(tmp_path / "l.safetensors", "sd1", ["diffusion_model"], "kohya", every=5)
    wide, narrow = tmp_path / "wide.safetensors", tmp_path / "narrow.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.6)], str(wide))
    bake(str(ldm), [LoraSpec(str(lora), 0.6)], str(narrow), dtype="fp16")
    x, y = load_file(str(wide)), load_file(str(narrow))
    for key in x:
        if x[key].is_floating_point():
            assert y[key].dtype == torch.float16
            assert torch.equal(y[key], x[key].half()), key
    with safe_open(str(narrow), "pt") as f:
        meta = f.metadata()
    loras = json.loads(meta["ckptkit.loras"])
    assert loras[0]["file"] == "l.safetensors" and loras[0]["strength"] == 0.6
    assert loras[0]["sha256"] == hashlib.sha256(lora.read_bytes()).hexdigest()
    assert meta["ckptkit.operation"] == "lora bake"
    assert json.loads(meta["ckptkit.sources"]) == ["model.safetensors", "l.safetensors"]


# ---- refusals ----

def test_a_lora_of_another_family_is_refused_and_nothing_is_written(tmp_path, samples):
    ldm, _ = samples("sd1")
    lora = make_lora(tmp_path / "sdxl.safetensors", "sdxl", ["diffusion_model"], "kohya",
                     every=200, tiny=False)  # full-size widths tell the family
    out = tmp_path / "o.safetensors"
    with pytest.raises(NotApplied) as exc:
        bake(str(ldm), [LoraSpec(str(lora))], str(out))
    assert "another family" in str(exc.value)
    assert not out.exists() and os.listdir(tmp_path) == ["sdxl.safetensors"]


def test_allow_unmatched_bakes_the_rest(tmp_path, samples):
    """A LoRA with text encoder modules, baked into a diffusion model alone: refused, then
    with --allow-unmatched the U-Net gets exactly what the full bake gives it."""
    ldm, _ = samples("sd1")
    lora = make_lora(tmp_path / "l.safetensors", "sd1", ["diffusion_model", "clip_l"], "kohya",
                     every=3)
    parts = split(str(ldm), str(tmp_path / "parts"), components=["diffusion_model"])
    unet = parts[0]
    out = tmp_path / "o.safetensors"
    with pytest.raises(NotApplied, match="lacks the component"):
        bake(unet, [LoraSpec(str(lora), 0.5)], str(out))
    assert not out.exists()
    report = bake(unet, [LoraSpec(str(lora), 0.5)], str(out), allow_unmatched=True)
    assert report.notes and report.loras[0].unmatched[0]["reason"] == "missing-component"
    full = tmp_path / "full.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.5)], str(full))
    whole, part = load_file(str(full)), load_file(str(out))
    assert all(torch.equal(part[k], whole["model.diffusion_model." + k]) for k in part)


def test_lora_specs():
    assert parse_spec("a.safetensors") == LoraSpec("a.safetensors")
    assert parse_spec("a.safetensors:0.5") == LoraSpec("a.safetensors", 0.5)
    assert parse_spec("a.safetensors:0.5:-1") == LoraSpec("a.safetensors", 0.5, -1.0)
    assert parse_spec("C:/x/a.safetensors:1e-1") == LoraSpec("C:/x/a.safetensors", 0.1)
    assert parse_spec("dir:name.safetensors") == LoraSpec("dir:name.safetensors")


# ---- the command ----

def test_the_command_bakes_refuses_and_reports(tmp_path, samples, capsys):
    ldm, _ = samples("sd1")
    lora = make_lora(tmp_path / "l.safetensors", "sd1", ["diffusion_model", "clip_l"], "kohya",
                     every=7)
    out = tmp_path / "o.safetensors"
    code, stdout, _ = run_cli(capsys, "lora", "bake", ldm, f"{lora}:0.5:0.25", "-o", out,
                              "--json", "--dtype", "fp16")
    assert code == 0, stdout
    report = json.loads(stdout)
    assert report["patched"] > 10 and report["loras"][0]["te_strength"] == 0.25
    api = tmp_path / "api.safetensors"
    bake(str(ldm), [LoraSpec(str(lora), 0.5, 0.25)], str(api), dtype="fp16")
    x, y = load_file(str(out)), load_file(str(api))
    assert all(torch.equal(x[k], y[k]) for k in x)

    unet = split(str(ldm), str(tmp_path / "parts"), components=["diffusion_model"])[0]
    refused = tmp_path / "refused.safetensors"
    code, stdout, err = run_cli(capsys, "lora", "bake", unet, lora, "-o", refused)
    assert code == 1 and not refused.exists()
    assert err.startswith("ckpt: error:") and err.count("\n") == 1
    assert "lacks the component" in err and "--allow-unmatched" in err
    code, stdout, _ = run_cli(capsys, "lora", "bake", unet, lora, "-o", refused, "--json")
    assert code == 1 and json.loads(stdout)["unmatched"][0]["reason"] == "missing-component"
    code, stdout, _ = run_cli(capsys, "lora", "bake", unet, lora, "-o", refused,
                              "--allow-unmatched", "--quiet")
    assert code == 0 and refused.exists() and "left out" in stdout

    code, _, err = run_cli(capsys, "lora", "bake", ldm, ldm, "-o", tmp_path / "x.safetensors")
    assert code == 3 and "LoRA" in err  # a model given as the LoRA
    code, _, _ = run_cli(capsys, "lora", "bake", ldm, lora, "-o", ldm)
    assert code == 5  # never over an input


# ---- LyCORIS files ----

def test_lycoris_modules_in_a_file_bake_as_lycoris_merges_them(tmp_path, samples):
    """LoHa, LoKr, diag-OFT, DoRA and full (with a bias) modules written as LyCORIS saves
    them (kohya names), each on a weight of the tiny SD 1.x U-Net: the baked weights are
    lycoris-lora's own merged weights (alpha = rank where its get_merged_weight applies
    alpha/rank twice)."""
    lycoris = pytest.importorskip("lycoris.modules")
    ldm, _ = samples("sd1")
    base = load_file(str(ldm))
    prefix = "model.diffusion_model."
    chosen = {
        "input_blocks.1.1.transformer_blocks.0.attn1.to_q": (
            lycoris.LohaModule, {"lora_dim": 4, "alpha": 4}),
        "input_blocks.1.1.transformer_blocks.0.ff.net.2": (
            lycoris.LokrModule, {"lora_dim": 2, "alpha": 2, "factor": 4}),
        "input_blocks.1.1.transformer_blocks.0.attn1.to_v": (
            lycoris.DiagOFTModule, {"lora_dim": 4, "constraint": 1e-3, "rescaled": True}),
        "output_blocks.9.1.transformer_blocks.0.attn2.to_out.0": (
            lycoris.LoConModule, {"lora_dim": 4, "alpha": 2, "weight_decompose": True}),
        "output_blocks.9.1.transformer_blocks.0.attn1.to_out.0": (lycoris.FullModule, {}),
    }
    tensors, expected = {}, {}
    for i, (path, (cls, kwargs)) in enumerate(chosen.items()):
        weight, bias = base[prefix + path + ".weight"], base.get(prefix + path + ".bias")
        layer = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        module = cls("x", layer, multiplier=1.0, **kwargs)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in module.parameters():
                p.normal_(0, 0.1)
        name = "lora_unet_" + path.replace(".", "_")
        if cls is lycoris.FullModule:  # its parameters are the diffs until applied
            saved = {"diff": module.weight, "diff_b": module.bias}
        else:
            saved = module.state_dict()
        tensors.update({f"{name}.{k}": v.detach().clone().contiguous()
                        for k, v in saved.items()})
        merged, merged_bias = module.get_merged_weight(1.0)
        expected[prefix + path + ".weight"] = merged.detach()
        if merged_bias is not None:
            expected[prefix + path + ".bias"] = merged_bias.detach()
    lora = tmp_path / "lycoris.safetensors"
    save_file(tensors, str(lora))
    out = tmp_path / "o.safetensors"
    report = bake(str(ldm), [LoraSpec(str(lora))], str(out))
    assert report.loras[0].applied == len(chosen)
    baked = load_file(str(out))
    for key, value in expected.items():
        assert (baked[key] - value).abs().max() < TOL, key


def test_blocks_of_rows_patch_as_the_whole_weight(tmp_path, samples, monkeypatch):
    """Weights patched a few rows at a time (blocks far smaller than any weight, cutting
    through the q, k, v rows of fused weights and through modules' rows) give what one pass
    over each weight gives."""
    import ckptkit.lora.bake as bake_module

    ldm, folder = samples("flux1-dev")
    cases = [
        (ldm, make_lora(tmp_path / "d.safetensors", "flux1-dev", ["diffusion_model"],
                        "diffusers", every=5)),
        (folder / "transformer" / "diffusion_pytorch_model.safetensors",
         make_lora(tmp_path / "k.safetensors", "flux1-dev", ["diffusion_model"], "kohya",
                   every=5, seed=3)),
    ]
    for i, (model, lora) in enumerate(cases):
        whole, blocks = tmp_path / f"whole{i}.safetensors", tmp_path / f"blocks{i}.safetensors"
        monkeypatch.setattr(bake_module, "CHUNK", 1 << 30)
        bake(str(model), [LoraSpec(str(lora), 0.7)], str(whole))
        monkeypatch.setattr(bake_module, "CHUNK", 1000)  # 1000 // width: a few rows
        bake(str(model), [LoraSpec(str(lora), 0.7)], str(blocks))
        x, y = load_file(str(whole)), load_file(str(blocks))
        for key in x:
            assert torch.allclose(x[key], y[key], rtol=1e-6, atol=1e-7), key
