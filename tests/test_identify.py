"""Identification from headers: every family in every layout, the confusable pairs, parts
alone, LoRAs and lookalikes, variants and what only metadata can say.

Samples come from the registry (``ckpt sample``); the facts checked against them come from
elsewhere where they can: parameter counts are summed in the test from the file as the
official safetensors library reads it, and diffusers-layout headers are the state dicts of
the diffusers model classes themselves, built on the meta device.
"""

from __future__ import annotations

import json
import math
import os
from functools import partial

import pytest
import torch
from safetensors import safe_open

from ckptkit.arch.families import families
from ckptkit.arch.releases import RELEASES
from ckptkit.cli.main import main
from ckptkit.ops.inspect import inspect_diffusers_folder, inspect_file
from ckptkit.ops.sample import sample

FAMILIES = list(families())


def _ident(path, **kw):
    return inspect_file(str(path), **kw)["identification"]


def _prefix_params(path, prefix: str) -> int:
    with safe_open(str(path), "pt") as f:
        keys = list(f.keys())  # safe_open handles are not iterable
        return sum(math.prod(f.get_slice(k).get_shape()) for k in keys if k.startswith(prefix))


@pytest.fixture(scope="module")
def tiny_ldm(module_tmp):
    folder = module_tmp("tiny_ldm")
    paths = {}
    for fid in FAMILIES:
        paths[fid] = folder / f"{fid}.safetensors"
        sample(fid, str(paths[fid]), tiny=True)
    return paths


@pytest.mark.parametrize("fid", FAMILIES)
def test_tiny_monolithic_sample_is_identified_with_its_components(tiny_ldm, fid):
    ident = _ident(tiny_ldm[fid])
    fam = families()[fid]
    assert ident["kind"] == "checkpoint"
    assert ident["family"] == fid, ident["reasons"]
    assert ident["layout"] == "ldm"
    assert [c["name"] for c in ident["components"]] == list(fam.component_names)
    assert ident["missing"] == []
    for comp in ident["components"]:
        assert comp["prefix"] == fam.component(comp["name"]).ldm_prefix
        assert comp["size"] == "tiny"
        assert comp["parameters"] == _prefix_params(tiny_ldm[fid], comp["prefix"])
    assert ident["reasons"]


@pytest.mark.parametrize("fid", FAMILIES)
def test_every_component_alone_in_comfyui_layout(tmp_path, fid):
    fam = families()[fid]
    for comp in fam.component_names:
        path = tmp_path / f"{comp}.safetensors"
        sample(fid, str(path), tiny=True, layout="comfyui", components=[comp])
        ident = _ident(path)
        assert ident["layout"] == "comfyui"
        assert [c["name"] for c in ident["components"]] == [comp], (comp, ident["reasons"])
        if comp == "diffusion_model":
            assert ident["kind"] == "diffusion-model"
            assert ident["family"] == fid
            assert set(ident["missing"]) == set(fam.component_names) - {comp}
        else:
            assert ident["kind"] in ("text-encoder", "vae")
            # the weights of a part alone fit several families; the sample's ModelSpec names
            # the one it is of
            assert ident["family"] == fid
            assert fid in ident["compatible_families"]


@pytest.mark.parametrize("fid", FAMILIES)
def test_full_size_sparse_samples_are_full_size(tmp_path, fid):
    path = tmp_path / f"{fid}.safetensors"
    sample(fid, str(path), sparse=True)
    ident = _ident(path)
    assert ident["family"] == fid
    assert {c["size"] for c in ident["components"]} == {"full"}


@pytest.mark.parametrize("a,b", [("sd3-medium", "sd3.5-medium"), ("flux1-dev", "flux1-schnell"),
                                 ("sdxl", "sdxl-refiner"), ("sd1", "sd2"),
                                 ("sd3.5-medium", "sd3.5-large")])
def test_confusable_diffusion_models_alone(tmp_path, a, b):
    for fid in (a, b):
        for tiny in (True, False):
            path = tmp_path / f"{fid}-{tiny}.safetensors"
            sample(fid, str(path), tiny=tiny, sparse=not tiny, layout="comfyui",
                   components=["diffusion_model"])
            ident = _ident(path)
            assert ident["family"] == fid, (fid, tiny, ident["reasons"])


def test_vae_alone_names_the_families_it_fits(tmp_path):
    sd_vae, flux_vae = tmp_path / "sd.safetensors", tmp_path / "flux.safetensors"
    sample("sdxl", str(sd_vae), layout="comfyui", components=["vae"], sparse=True)
    sample("flux1-dev", str(flux_vae), layout="comfyui", components=["vae"], sparse=True)
    sd, flux = _ident(sd_vae), _ident(flux_vae)
    assert sd["kind"] == flux["kind"] == "vae"
    assert {"sd1", "sd2", "sdxl"} <= set(sd["compatible_families"])
    assert not {"sd3-medium", "flux1-dev"} & set(sd["compatible_families"])
    assert {"sd3-medium", "flux1-dev"} <= set(flux["compatible_families"])


@pytest.mark.parametrize("fid,variant", [("sd1", "inpaint"), ("sd1", "pix2pix"),
                                         ("sdxl", "inpaint"), ("flux1-dev", "fill"),
                                         ("flux1-dev", "depth")])
def test_input_channel_variants(tmp_path, fid, variant):
    path = tmp_path / "v.safetensors"
    sample(fid, str(path), tiny=True, variant=variant)
    ident = _ident(path)
    assert ident["family"] == fid
    assert variant in ident["variants"]
    assert {c["size"] for c in ident["components"]} == {"tiny"}


def test_sd2_prediction_type_is_ambiguous_unless_the_file_says(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "sd2.safetensors"
    sample("sd2", str(path), tiny=True)
    ident = _ident(path)
    assert "v-prediction" in ident["ambiguous"] and "v-prediction" not in ident["variants"]
    tensors = load_file(str(path))
    save_file(tensors, str(tmp_path / "v.safetensors"),
              metadata={"modelspec.architecture": "stable-diffusion-v2-768-v"})
    assert "v-prediction" in _ident(tmp_path / "v.safetensors")["variants"]
    tensors["v_pred"] = torch.tensor([])
    save_file(tensors, str(tmp_path / "marker.safetensors"))
    marked = _ident(tmp_path / "marker.safetensors")
    assert "v-prediction" in marked["variants"]
    assert marked["extra"].get("markers") == 1


def test_hash_of_a_known_release_settles_what_weights_cannot(tmp_path, monkeypatch):
    path = tmp_path / "turbo.safetensors"
    sample("sdxl", str(path), tiny=True)
    ident = _ident(path)
    assert "turbo" in ident["ambiguous"]
    turbo = next(h for h, r in RELEASES.items() if "turbo" in r.variants)
    monkeypatch.setattr("ckptkit.ops.inspect.file_hashes",
                        lambda p, progress=None: {"sha256": turbo, "autov2": turbo[:10],
                                                  "autov3": ""})
    report = inspect_file(str(path), hashes=True)
    assert "turbo" in report["identification"]["variants"]
    assert report["identification"]["ambiguous"] == []
    assert report["identification"]["sampling"]["steps"] <= 4


def test_real_hashes_are_computed(tmp_path):
    import hashlib

    path = tmp_path / "a.safetensors"
    sample("sd1", str(path), tiny=True, components=["vae"])
    report = inspect_file(str(path), hashes=True)
    data = path.read_bytes()
    assert report["hashes"]["sha256"] == hashlib.sha256(data).hexdigest()
    n = int.from_bytes(data[:8], "little")
    assert report["hashes"]["autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()


@pytest.mark.parametrize("chunk", [7, 4096])
def test_hashes_across_chunk_boundaries(tmp_path, monkeypatch, chunk):
    """The header's end falls inside a chunk, and the file spans many chunks (a few dozen:
    each chunk goes through the hashing threads, so a 7-byte chunk of a tiny sample's VAE,
    300 KB, took a minute to prove what a 2 KB file proves)."""
    import hashlib

    from safetensors.torch import save_file

    from ckptkit.ops import hashing

    monkeypatch.setattr(hashing, "CHUNK", chunk)
    path = tmp_path / "a.safetensors"
    gen = torch.Generator().manual_seed(0)
    save_file({f"w{i}": torch.randn(chunk * 12 // 4 // 3, generator=gen) for i in range(3)},
              str(path))
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    assert (8 + n) % chunk and len(data) > 10 * chunk
    assert hashing.cached_sha256(str(path)) is None  # so that sha256 reads the file
    assert hashing.sha256(str(path)) == hashlib.sha256(data).hexdigest()
    found = hashing.file_hashes(str(path))
    assert found["sha256"] == hashlib.sha256(data).hexdigest()
    assert found["autov3"] == hashlib.sha256(data[8 + n:]).hexdigest()


def test_training_leftovers_are_extras_not_components(tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "s.safetensors"
    sample("sd1", str(path), tiny=True)
    tensors = load_file(str(path))
    for key in [k for k in tensors if k.startswith("model.diffusion_model.")][:20]:
        tensors["model_ema." + "".join(key.split(".")[1:])] = tensors[key].clone()
    tensors["alphas_cumprod"] = torch.ones(1000)
    tensors["betas"] = torch.ones(1000)
    save_file(tensors, str(tmp_path / "ema.safetensors"))
    ident = _ident(tmp_path / "ema.safetensors")
    assert ident["family"] == "sd1"
    assert ident["extra"]["ema weights (model_ema.*)"] == 20
    assert ident["extra"]["noise schedule buffers"] == 2
    assert "unexplained keys" not in ident["extra"]


def _save_shapes(path, shapes: dict[str, tuple[int, ...]], metadata=None):
    """A sparse safetensors file with these keys and shapes (fp16)."""
    from ckptkit.engine.writer import Planned, Zeros, write_safetensors
    from ckptkit.formats.dtypes import BY_NAME

    f16 = BY_NAME["F16"]
    planned = [Planned(k, f16, tuple(s), partial(Zeros, f16.nbytes(math.prod(s))))
               for k, s in shapes.items()]
    write_safetensors(str(path), planned, metadata)


def _meta_state(cls, **config):
    with torch.device("meta"):
        model = cls(**config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_diffusers_layout_components_are_recognised(tmp_path):
    from diffusers import AutoencoderKL, FluxTransformer2DModel, UNet2DConditionModel

    sd15 = _meta_state(UNet2DConditionModel, cross_attention_dim=768)
    sdxl = _meta_state(UNet2DConditionModel, sample_size=128,
                       down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                                         "CrossAttnDownBlock2D"),
                       up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "UpBlock2D"),
                       block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
                       cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
                       use_linear_projection=True, addition_embed_type="text_time",
                       addition_time_embed_dim=256, projection_class_embeddings_input_dim=2816)
    schnell = _meta_state(FluxTransformer2DModel, guidance_embeds=False, num_layers=2,
                          num_single_layers=2)
    vae = _meta_state(AutoencoderKL, latent_channels=16, use_quant_conv=False,
                      use_post_quant_conv=False,
                      down_block_types=("DownEncoderBlock2D",) * 4,
                      up_block_types=("UpDecoderBlock2D",) * 4,
                      block_out_channels=(128, 256, 512, 512), layers_per_block=2)
    for name, shapes, kind, fid in (("sd15", sd15, "diffusion-model", "sd1"),
                                    ("sdxl", sdxl, "diffusion-model", "sdxl"),
                                    ("schnell", schnell, "diffusion-model", "flux1-schnell"),
                                    ("vae", vae, "vae", None)):
        path = tmp_path / f"{name}.safetensors"
        _save_shapes(path, shapes)
        ident = _ident(path)
        assert ident["layout"] == "diffusers", (name, ident["reasons"])
        assert ident["kind"] == kind and ident["family"] == fid, (name, ident["reasons"])
    folder = tmp_path / "pipe"
    for sub, shapes in (("unet", sdxl), ("vae", vae)):
        os.makedirs(folder / sub)
        _save_shapes(folder / sub / "diffusion_pytorch_model.safetensors", shapes)
    (folder / "model_index.json").write_text(json.dumps(
        {"_class_name": "StableDiffusionXLPipeline", "unet": ["diffusers", "x"],
         "vae": ["diffusers", "y"]}))
    report = inspect_diffusers_folder(str(folder))
    assert report["identification"]["family"] == "sdxl"
    assert set(report["components"]) == {"unet", "vae"}


def test_lookalikes_are_unknown_not_checkpoints(tmp_path):
    from safetensors.torch import save_file

    cases = {  # embeddings have a kind of their own (test_hardening_convert.py)
        "controlnet": {"control_model.input_hint_block.0.weight": torch.zeros(16, 3, 3, 3),
                       "control_model.zero_convs.0.0.weight": torch.zeros(320, 320, 1, 1)},
        "random": {"foo.bar": torch.zeros(3), "baz": torch.zeros(2)},
    }
    for name, tensors in cases.items():
        path = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path))
        ident = _ident(path)
        assert ident["kind"] == "unknown", (name, ident)
        assert ident["family"] is None and ident["reasons"]


def test_a_lora_is_a_lora(tmp_path):
    from safetensors.torch import save_file

    tensors = {}
    for block in ("input_blocks_4_1", "output_blocks_3_1"):
        base = f"lora_unet_{block}_transformer_blocks_0_attn2_to_k"
        tensors[f"{base}.lora_down.weight"] = torch.zeros(8, 2048)
        tensors[f"{base}.lora_up.weight"] = torch.zeros(640, 8)
        tensors[f"{base}.alpha"] = torch.tensor(4.0)
    path = tmp_path / "l.safetensors"
    save_file(tensors, str(path))
    ident = _ident(path)
    assert ident["kind"] == "lora"
    assert ident["lora"]["ranks"] == [8]
    assert ident["lora"]["alphas"] == [4.0]


def test_cli_sample_and_inspect_json(tmp_path, capsys):
    path = tmp_path / "f.safetensors"
    assert main(["sample", "flux1-schnell", "-o", str(path), "--tiny", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["inspect", "--json", "--quiet", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    ident = report["identification"]
    assert ident["family"] == "flux1-schnell"
    assert ident["sampling"]["steps"] == 4
    assert main(["inspect", str(path)]) == 0
    text = capsys.readouterr().out
    assert "flux1-schnell" in text and "because" in text


def test_kohya_sdxl_layout_and_old_sd1_clip_names(tmp_path):
    from safetensors.torch import load_file, save_file

    kohya = tmp_path / "kohya.safetensors"
    sample("sdxl", str(kohya), tiny=True, layout="kohya")
    with safe_open(str(kohya), "pt") as f:
        prefixes = {k.split(".")[0] for k in list(f.keys())}
    assert prefixes == {"unet", "te1", "te2", "first_stage_model"}  # sd-mecha's sdxl-kohya
    ident = _ident(kohya)
    assert (ident["family"], ident["layout"], ident["kind"]) == ("sdxl", "kohya", "checkpoint")
    assert len(ident["components"]) == 4
    old = tmp_path / "old.safetensors"
    sample("sd1", str(old), tiny=True)
    tensors = load_file(str(old))
    renamed = {k.replace("cond_stage_model.transformer.text_model.",
                         "cond_stage_model.transformer."): v for k, v in tensors.items()}
    save_file(renamed, str(tmp_path / "renamed.safetensors"))
    ident = _ident(tmp_path / "renamed.safetensors")
    assert ident["family"] == "sd1" and "clip_l" in [c["name"] for c in ident["components"]]
    assert "unexplained keys" not in ident["extra"]
    assert any("text_model." in r for r in ident["reasons"])


def test_kohya_sdxl_keys_match_sd_mecha_table(tmp_path):
    from helpers import mecha

    from ckptkit.ops.sample import sample_table

    published = mecha("sdxl-kohya")
    ours = sample_table(families()["sdxl"], layout="kohya")
    required = {k: tuple(v["shape"]) for comp in published.values() for k, v in comp.items()
                if not v.get("optional")}
    optional = {k for comp in published.values() for k, v in comp.items() if v.get("optional")}
    assert set(required) <= set(ours) <= set(required) | optional
    assert all(ours[k] == shape for k, shape in required.items())


def _clip_shapes(with_projection: bool, hidden: int, layers: int, heads: int):
    """The state dict shapes of transformers' own CLIP text model (not ours), built on the
    meta device: no weights are made."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(hidden_size=hidden, intermediate_size=4 * hidden,
                            num_hidden_layers=layers, num_attention_heads=heads,
                            max_position_embeddings=77, vocab_size=49408,
                            projection_dim=hidden, hidden_act="quick_gelu" if hidden == 768
                            else "gelu")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    with torch.device("meta"):
        model = cls(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("position_ids", [True, False])
def test_clip_l_from_transformers_fits_the_same_families_however_saved(position_ids):
    """transformers 5 saves CLIPTextModel without the ``text_model.`` level, and whether
    ``position_ids`` is written varies: neither may change what the encoder is said to fit."""
    from ckptkit.arch.detect import identify

    shapes = _clip_shapes(False, 768, 12, 12)
    bare = not any(k.startswith("text_model.") for k in shapes)
    if not bare:  # an older transformers: what transformers 5 writes, made here
        shapes = {k.removeprefix("text_model."): v for k, v in shapes.items()}
    ids = [k for k in shapes if k.endswith("position_ids")]
    if position_ids and not ids:
        shapes["embeddings.position_ids"] = (1, 77)
    for key in ids if not position_ids else ():
        del shapes[key]
    ident = identify(shapes, dict.fromkeys(shapes, "F32"), {})
    assert ident.kind == "text-encoder" and ident.components[0].name == "clip_l"
    assert {"sd1", "sdxl", "flux1-dev", "flux1-schnell"} <= set(ident.compatible_families)
    named = {"text_model." + k: v for k, v in shapes.items()}
    prefixed = identify(named, dict.fromkeys(named, "F32"), {})
    assert prefixed.compatible_families == ident.compatible_families


@pytest.mark.parametrize(("layers", "expected"), [(2, "sd1"), (1, None)])
def test_a_unet_of_other_depth_is_not_named_after_the_family(layers, expected):
    """diffusers' own UNet2DConditionModel with SD 1.x's widths: two layers per block is
    SD 1.x; one layer per block shares most key names but is another model."""
    from diffusers import UNet2DConditionModel

    from ckptkit.arch.detect import identify

    with torch.device("meta"):
        unet = UNet2DConditionModel(layers_per_block=layers, cross_attention_dim=768,
                                    attention_head_dim=8, sample_size=64)
    shapes = {k: tuple(v.shape) for k, v in unet.state_dict().items()}
    ident = identify(shapes, dict.fromkeys(shapes, "F16"), {})
    assert ident.family == expected
    if expected is None:
        assert ident.kind == "unknown" and ident.closest.startswith("sd1 diffusion_model")
    else:
        assert ident.kind == "diffusion-model"
