"""The diffusers layout of the SD1/SD2/SDXL families against diffusers and transformers.

- Keys and shapes: what our moves make of each component (full size and tiny) is exactly the
  ``state_dict`` of the diffusers/transformers class built, on the meta device, from the
  config.json we write for it.
- Configs: our full-size configs build the same models as the official repositories' configs
  (written out below from the Hub files, as vendored in the GitHub repositories named next to
  each), as diffusers reads them; our schedulers and ``model_index.json`` are theirs too.
- Values: our diffusers sample holds, bit for bit, what diffusers' own single-file converters
  make of the ldm sample of the same seed; canonical -> diffusers -> canonical is the identity.
- Loading: the tiny folder loads component by component and as a pipeline, offline, with no
  missing or unexpected keys; ``ckpt inspect`` recognises what ``ckpt sample`` wrote.
- kohya's SD 1.x layout is sd-mecha's sd1-kohya table.
"""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import mecha, shapes
from safetensors.torch import load_file

from ckptkit.arch import diffusers_layout as DL
from ckptkit.arch.families import families
from ckptkit.cli.main import main
from ckptkit.engine.moves import plan_moves
from ckptkit.errors import OutputError
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.ops import sample as sample_module
from ckptkit.ops.inspect import inspect_diffusers_folder, inspect_file
from ckptkit.ops.sample import sample, sample_table

SD_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
CLIPS = [(f, c) for f in SD_FAMILIES for c in families()[f].component_names
         if c.startswith(("clip", "openclip"))] + [("sd3-medium", "clip_l"),
                                                   ("sd3-medium", "clip_g"),
                                                   ("flux1-dev", "clip_l")]
VAES = ("sd1", "sdxl", "sd3-medium", "flux1-dev")


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def _ours(fid: str, name: str, tiny: bool) -> dict[str, tuple[int, ...]]:
    fam = families()[fid]
    canonical = fam.component(name).keys(tiny=tiny)
    return DL.moved_table(DL.to_diffusers(fam, name, tiny, set(canonical)), canonical)


def _meta_model(cls, config: dict):
    with torch.device("meta"):
        return cls.from_config(config)


def _clip_class(config: dict):
    import transformers

    return getattr(transformers, config["architectures"][0])


def _clip_state(config: dict) -> dict[str, tuple[int, ...]]:
    """The text model's state_dict as files name it (``text_model.*``: transformers 5's
    CLIPTextModel drops that level in memory and puts it back when loading)."""
    from transformers import CLIPTextConfig

    with torch.device("meta"):
        model = _clip_class(config)(CLIPTextConfig.from_dict(config))
    state = shapes(model.state_dict())
    if not hasattr(model, "text_model"):
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


# --------------------------------------------------------------------------- keys and shapes


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_unet_keys_are_the_diffusers_models(fid, tiny):
    from diffusers import UNet2DConditionModel

    config = DL.component_config(families()[fid], "diffusion_model", tiny)
    model = _meta_model(UNet2DConditionModel, config)
    assert _ours(fid, "diffusion_model", tiny) == shapes(model.state_dict())


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("fid", VAES)
def test_vae_keys_are_the_diffusers_models(fid, tiny):
    from diffusers import AutoencoderKL

    model = _meta_model(AutoencoderKL, DL.component_config(families()[fid], "vae", tiny))
    assert _ours(fid, "vae", tiny) == shapes(model.state_dict())


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize(("fid", "name"), CLIPS)
def test_text_encoder_keys_are_the_transformers_models(fid, name, tiny):
    fam = families()[fid]
    ours = _ours(fid, name, tiny)
    theirs = _clip_state(DL.component_config(fam, name, tiny))
    # position_ids: a buffer old transformers saved (SD1/SDXL files carry it) and current
    # transformers keeps out of state_dict but loads without complaint (see the load test).
    assert {k: v for k, v in ours.items() if not k.endswith("position_ids")} == theirs
    position_ids = "text_model.embeddings.position_ids"
    assert (position_ids in ours) == (position_ids in fam.component(name).keys(tiny=tiny))


def test_sd2_text_encoder_is_cut_at_the_penultimate_layer():
    """diffusers' SD2 text_encoder has 23 of OpenCLIP-H's 24 layers and no projection."""
    fam = families()["sd2"]
    config = DL.component_config(fam, "openclip_h", tiny=False)
    assert (config["num_hidden_layers"], config["architectures"]) == (23, ["CLIPTextModel"])
    canonical = set(fam.component("openclip_h").keys())
    kept = {m.sources[0] for m in DL.to_diffusers(fam, "openclip_h", False, canonical)}
    assert {k.split(".")[3] for k in canonical - kept if "layers." in k} == {"23"}
    assert canonical - kept >= {"text_projection.weight"}


# --------------------------------------------------------------------------- official configs

# The Hub's files as published, less the keys that only record who wrote them
# (_diffusers_version, _name_or_path, transformers_version, torch_dtype). Each was read from a
# GitHub repository that vendors it, named next to it; "forge:" is
# lllyasviel/stable-diffusion-webui-forge, backend/huggingface/<org>/<repo>/<path>, branch main
# unless said. stabilityai/stable-diffusion-2-1-base (the sd2 default: 512, epsilon) and
# stabilityai/stable-diffusion-3.5-medium are vendored nowhere we found: the sd2 entries say
# what stands in for 2-1-base, and SD3.5 Medium has no entry here.
_SD_DOWN = ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
            "DownBlock2D"]
_SD_UP = ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]
_SD_UNET = dict(act_fn="silu", block_out_channels=[320, 640, 1280, 1280],
                center_input_sample=False, down_block_types=_SD_DOWN, downsample_padding=1,
                flip_sin_to_cos=True, freq_shift=0, in_channels=4, layers_per_block=2,
                mid_block_scale_factor=1, norm_eps=1e-05, norm_num_groups=32, out_channels=4,
                up_block_types=_SD_UP)
_SDXL_UNET = dict(_SD_UNET, addition_embed_type="text_time", addition_embed_type_num_heads=64,
                  addition_time_embed_dim=256, class_embed_type=None,
                  class_embeddings_concat=False, conv_in_kernel=3, conv_out_kernel=3,
                  cross_attention_norm=None, dual_cross_attention=False, encoder_hid_dim=None,
                  encoder_hid_dim_type=None, mid_block_only_cross_attention=None,
                  mid_block_type="UNetMidBlock2DCrossAttn", num_attention_heads=None,
                  num_class_embeds=None, only_cross_attention=False,
                  resnet_out_scale_factor=1.0, resnet_skip_time_act=False,
                  resnet_time_scale_shift="default", sample_size=128, time_cond_proj_dim=None,
                  time_embedding_act_fn=None, time_embedding_dim=None,
                  time_embedding_type="positional", timestep_post_act=None,
                  upcast_attention=None, use_linear_projection=True)
OFFICIAL_UNETS = {
    # forge: runwayml/stable-diffusion-v1-5/unet/config.json
    "sd1": dict(_SD_UNET, attention_head_dim=8, cross_attention_dim=768, sample_size=64),
    # forge: stabilityai/stable-diffusion-2-1/unet/config.json, the 768 v release, but for its
    # sample_size 96 and upcast_attention true: the 512 line has 64 and no upcast_attention
    # (forge: stabilityai/stable-diffusion-2-inpainting/unet/config.json: the same settings
    # but for in_channels 9). Upcasting changes no weight.
    "sd2": dict(_SD_UNET, attention_head_dim=[5, 10, 20, 20], cross_attention_dim=1024,
                dual_cross_attention=False, num_class_embeds=None, only_cross_attention=False,
                sample_size=64, use_linear_projection=True),
    # forge: stabilityai/stable-diffusion-xl-base-1.0/unet/config.json
    "sdxl": dict(_SDXL_UNET, attention_head_dim=[5, 10, 20], block_out_channels=[320, 640, 1280],
                 cross_attention_dim=2048,
                 down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                   "CrossAttnDownBlock2D"],
                 projection_class_embeddings_input_dim=2816,
                 transformer_layers_per_block=[1, 2, 10],
                 up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]),
    # forge: stabilityai/stable-diffusion-xl-refiner-1.0/unet/config.json
    "sdxl-refiner": dict(_SDXL_UNET, attention_head_dim=[6, 12, 24, 24],
                         block_out_channels=[384, 768, 1536, 1536], cross_attention_dim=1280,
                         down_block_types=["DownBlock2D", "CrossAttnDownBlock2D",
                                           "CrossAttnDownBlock2D", "DownBlock2D"],
                         projection_class_embeddings_input_dim=2560,
                         transformer_layers_per_block=4,
                         up_block_types=["UpBlock2D", "CrossAttnUpBlock2D",
                                         "CrossAttnUpBlock2D", "UpBlock2D"]),
}
_VAE = dict(act_fn="silu", block_out_channels=[128, 256, 512, 512],
            down_block_types=["DownEncoderBlock2D"] * 4, in_channels=3, latent_channels=4,
            layers_per_block=2, norm_num_groups=32, out_channels=3,
            up_block_types=["UpDecoderBlock2D"] * 4)
_SDXL_VAE = dict(_VAE, force_upcast=True, sample_size=1024, scaling_factor=0.13025)
_SD3_VAE = dict(_VAE, force_upcast=True, latent_channels=16, latents_mean=None,
                latents_std=None, sample_size=1024, scaling_factor=1.5305, shift_factor=0.0609,
                use_post_quant_conv=False, use_quant_conv=False)
_FLUX_VAE = dict(_SD3_VAE, mid_block_add_attention=True, scaling_factor=0.3611,
                 shift_factor=0.1159)
OFFICIAL_VAES = {
    # forge: runwayml/stable-diffusion-v1-5/vae/config.json (no scaling_factor: diffusers'
    # default, 0.18215)
    "sd1": dict(_VAE, sample_size=512),
    # forge: stabilityai/stable-diffusion-2-inpainting/vae/config.json (512; that of
    # stable-diffusion-2-1 is the same with sample_size 768)
    "sd2": dict(_VAE, sample_size=512),
    "sdxl": _SDXL_VAE,  # forge: stabilityai/stable-diffusion-xl-base-1.0/vae/config.json
    # forge: stabilityai/stable-diffusion-xl-refiner-1.0/vae/config.json
    "sdxl-refiner": _SDXL_VAE,
    # forge: stabilityai/stable-diffusion-3-medium-diffusers/vae/config.json
    "sd3-medium": _SD3_VAE,
    # forge, branch sd35: stabilityai/stable-diffusion-3.5-large/vae/config.json
    "sd3.5-large": dict(_SD3_VAE, mid_block_add_attention=True),
    "flux1-dev": _FLUX_VAE,  # forge: black-forest-labs/FLUX.1-dev/vae/config.json
    "flux1-schnell": _FLUX_VAE,  # forge: black-forest-labs/FLUX.1-schnell/vae/config.json
}
_CLIP_L = dict(architectures=["CLIPTextModel"], attention_dropout=0.0, bos_token_id=0,
               dropout=0.0, eos_token_id=2, hidden_act="quick_gelu", hidden_size=768,
               initializer_factor=1.0, initializer_range=0.02, intermediate_size=3072,
               layer_norm_eps=1e-05, max_position_embeddings=77, model_type="clip_text_model",
               num_attention_heads=12, num_hidden_layers=12, pad_token_id=1, projection_dim=768,
               vocab_size=49408)
_BIGG = dict(_CLIP_L, architectures=["CLIPTextModelWithProjection"], hidden_act="gelu",
             hidden_size=1280, intermediate_size=5120, num_attention_heads=20,
             num_hidden_layers=32, projection_dim=1280)
_SD3_CLIP_L = dict(_CLIP_L, architectures=["CLIPTextModelWithProjection"])
OFFICIAL_TEXT = {
    ("sd1", "clip_l"): _CLIP_L,  # forge: runwayml/stable-diffusion-v1-5/text_encoder/config.json
    # forge: stabilityai/stable-diffusion-2-1/text_encoder/config.json (the same in
    # stabilityai/stable-diffusion-2-inpainting)
    ("sd2", "openclip_h"): dict(_CLIP_L, hidden_act="gelu", hidden_size=1024,
                                intermediate_size=4096, num_attention_heads=16,
                                num_hidden_layers=23, projection_dim=512),
    # forge: stabilityai/stable-diffusion-xl-base-1.0/text_encoder/config.json and
    # text_encoder_2/config.json
    ("sdxl", "clip_l"): _CLIP_L,
    ("sdxl", "clip_g"): _BIGG,
    # forge: stabilityai/stable-diffusion-xl-refiner-1.0/text_encoder_2/config.json
    ("sdxl-refiner", "clip_g"): _BIGG,
    # forge: stabilityai/stable-diffusion-3-medium-diffusers/text_encoder/config.json and
    # text_encoder_2/config.json
    ("sd3-medium", "clip_l"): _SD3_CLIP_L,
    ("sd3-medium", "clip_g"): _BIGG,
    # forge, branch sd35: stabilityai/stable-diffusion-3.5-large/text_encoder/config.json and
    # text_encoder_2/config.json
    ("sd3.5-large", "clip_l"): _SD3_CLIP_L,
    ("sd3.5-large", "clip_g"): _BIGG,
    # forge: black-forest-labs/FLUX.1-dev/text_encoder/config.json
    ("flux1-dev", "clip_l"): _CLIP_L,
    # forge: black-forest-labs/FLUX.1-schnell/text_encoder/config.json
    ("flux1-schnell", "clip_l"): _CLIP_L,
}
_SD_BETAS = dict(beta_end=0.012, beta_schedule="scaled_linear", beta_start=0.00085,
                 clip_sample=False, num_train_timesteps=1000, set_alpha_to_one=False,
                 skip_prk_steps=True, steps_offset=1, trained_betas=None)
_EULER = dict(_SD_BETAS, _class_name="EulerDiscreteScheduler", interpolation_type="linear",
              prediction_type="epsilon", sample_max_value=1.0, timestep_spacing="leading",
              use_karras_sigmas=False)
_SD3_FLOW = dict(_class_name="FlowMatchEulerDiscreteScheduler", num_train_timesteps=1000,
                 shift=3.0)
_FLUX = dict(_class_name="FlowMatchEulerDiscreteScheduler", base_image_seq_len=256,
             base_shift=0.5, max_image_seq_len=4096, max_shift=1.15, num_train_timesteps=1000)
OFFICIAL_SCHEDULERS = {
    # forge: runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json
    "sd1": dict(_SD_BETAS, _class_name="PNDMScheduler"),
    # forge: stabilityai/stable-diffusion-2-inpainting/scheduler/scheduler_config.json, the 512
    # epsilon line (no prediction_type: epsilon, the default), as the 2-1-base model card has
    # it ("the default PNDM/PLMS scheduler"). stable-diffusion-2-1, the 768 release, has
    # DDIMScheduler and v_prediction
    # (forge: stabilityai/stable-diffusion-2-1/scheduler/scheduler_config.json).
    "sd2": dict(_SD_BETAS, _class_name="PNDMScheduler"),
    # forge: stabilityai/stable-diffusion-xl-base-1.0/scheduler/scheduler_config.json
    "sdxl": _EULER,
    # forge: stabilityai/stable-diffusion-xl-refiner-1.0/scheduler/scheduler_config.json
    "sdxl-refiner": _EULER,
    # forge: stabilityai/stable-diffusion-3-medium-diffusers/scheduler/scheduler_config.json
    "sd3-medium": _SD3_FLOW,
    # forge, branch sd35: stabilityai/stable-diffusion-3.5-large/scheduler/scheduler_config.json
    "sd3.5-large": _SD3_FLOW,
    # forge: black-forest-labs/FLUX.1-dev/scheduler/scheduler_config.json
    "flux1-dev": dict(_FLUX, shift=3.0, use_dynamic_shifting=True),
    # forge: black-forest-labs/FLUX.1-schnell/scheduler/scheduler_config.json
    "flux1-schnell": dict(_FLUX, shift=1.0, use_dynamic_shifting=False),
}
_LIB = {"unet": "diffusers", "vae": "diffusers", "scheduler": "diffusers",
        "transformer": "diffusers", "safety_checker": "stable_diffusion"}


def _index(cls: str, **parts) -> dict:
    """A model_index.json: ``_class_name`` and entries; a class name becomes [library, class],
    None stays null and a bool a pipeline flag."""
    out: dict = {"_class_name": cls}
    for sub, value in parts.items():
        if isinstance(value, str):
            value = [_LIB.get(sub, "transformers"), value]
        out[sub] = value
    return out


_SD_PARTS = dict(feature_extractor="CLIPImageProcessor",
                 safety_checker="StableDiffusionSafetyChecker", scheduler="PNDMScheduler",
                 text_encoder="CLIPTextModel", tokenizer="CLIPTokenizer",
                 unet="UNet2DConditionModel", vae="AutoencoderKL")
_SDXL_PARTS = dict(add_watermarker=None, scheduler="EulerDiscreteScheduler",
                   text_encoder_2="CLIPTextModelWithProjection", tokenizer_2="CLIPTokenizer",
                   unet="UNet2DConditionModel", vae="AutoencoderKL")
_SD3_INDEX = _index("StableDiffusion3Pipeline", scheduler="FlowMatchEulerDiscreteScheduler",
                    text_encoder="CLIPTextModelWithProjection",
                    text_encoder_2="CLIPTextModelWithProjection",
                    text_encoder_3="T5EncoderModel", tokenizer="CLIPTokenizer",
                    tokenizer_2="CLIPTokenizer", tokenizer_3="T5TokenizerFast",
                    transformer="SD3Transformer2DModel", vae="AutoencoderKL")
_FLUX_INDEX = _index("FluxPipeline", scheduler="FlowMatchEulerDiscreteScheduler",
                     text_encoder="CLIPTextModel", text_encoder_2="T5EncoderModel",
                     tokenizer="CLIPTokenizer", tokenizer_2="T5TokenizerFast",
                     transformer="FluxTransformer2DModel", vae="AutoencoderKL")
OFFICIAL_INDEX = {
    # forge: runwayml/stable-diffusion-v1-5/model_index.json
    "sd1": _index("StableDiffusionPipeline", **_SD_PARTS),
    # forge: stabilityai/stable-diffusion-2-1/model_index.json with the 512 line's scheduler,
    # PNDMScheduler (see OFFICIAL_SCHEDULERS; 2-1's is DDIMScheduler)
    "sd2": _index("StableDiffusionPipeline",
                  **dict(_SD_PARTS, requires_safety_checker=False, safety_checker=[None, None])),
    # forge: stabilityai/stable-diffusion-xl-base-1.0/model_index.json
    "sdxl": _index("StableDiffusionXLPipeline", force_zeros_for_empty_prompt=True,
                   text_encoder="CLIPTextModel", tokenizer="CLIPTokenizer", **_SDXL_PARTS),
    # forge: stabilityai/stable-diffusion-xl-refiner-1.0/model_index.json
    "sdxl-refiner": _index("StableDiffusionXLImg2ImgPipeline", force_zeros_for_empty_prompt=False,
                           requires_aesthetics_score=True, text_encoder=[None, None],
                           tokenizer=[None, None], **_SDXL_PARTS),
    # forge: stabilityai/stable-diffusion-3-medium-diffusers/model_index.json
    "sd3-medium": _SD3_INDEX,
    # forge, branch sd35: stabilityai/stable-diffusion-3.5-large/model_index.json
    "sd3.5-large": _SD3_INDEX,
    "flux1-dev": _FLUX_INDEX,  # forge: black-forest-labs/FLUX.1-dev/model_index.json
    "flux1-schnell": _FLUX_INDEX,  # forge: black-forest-labs/FLUX.1-schnell/model_index.json
}
# What a ckptkit folder leaves empty ([null, null]): no weights of the checkpoint.
_LEFT_EMPTY = ("tokenizer", "feature_extractor", "safety_checker")

def _effective(cls, config: dict) -> dict:
    """The config as the class reads it: every setting, defaults filled in (SDXL's
    ``upcast_attention: null`` is the default off, as false is)."""
    with torch.device("meta"):
        model = cls.from_config(config)
    out = _settings(model.config)
    if out.get("upcast_attention") is None and "upcast_attention" in out:
        out["upcast_attention"] = False
    return out


@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_unet_configs_are_the_official_ones(fid):
    from diffusers import UNet2DConditionModel

    ours = DL.component_config(families()[fid], "diffusion_model", tiny=False)
    assert _effective(UNet2DConditionModel, ours) == \
        _effective(UNet2DConditionModel, OFFICIAL_UNETS[fid])


@pytest.mark.parametrize("fid", list(OFFICIAL_VAES))
def test_vae_configs_are_the_official_ones(fid):
    from diffusers import AutoencoderKL

    ours = DL.component_config(families()[fid], "vae", tiny=False)
    assert _effective(AutoencoderKL, ours) == _effective(AutoencoderKL, OFFICIAL_VAES[fid])


@pytest.mark.parametrize(("fid", "name"), list(OFFICIAL_TEXT))
def test_text_encoder_configs_are_the_official_ones(fid, name):
    from transformers import CLIPTextConfig

    ours = DL.component_config(families()[fid], name, tiny=False)
    official = OFFICIAL_TEXT[(fid, name)]
    assert ours["architectures"] == official["architectures"]
    assert CLIPTextConfig.from_dict(ours).to_dict() == CLIPTextConfig.from_dict(official).to_dict()


@pytest.mark.parametrize("fid", list(OFFICIAL_SCHEDULERS))
def test_scheduler_configs_are_the_official_ones(fid):
    import diffusers

    ours = DL.scheduler_config(families()[fid])
    official = OFFICIAL_SCHEDULERS[fid]
    assert ours["_class_name"] == official["_class_name"]
    cls = getattr(diffusers, official["_class_name"])
    assert _settings(cls.from_config(ours).config) == _settings(cls.from_config(official).config)


@pytest.mark.parametrize("fid", list(OFFICIAL_INDEX))
def test_model_index_is_the_official_one(fid):
    """The same pipeline, classes and flags; what is no weight left empty."""
    ours, _ = DL.folder(families()[fid])
    official = OFFICIAL_INDEX[fid]
    expected = {k: [None, None] if k.startswith(_LEFT_EMPTY) else v
                for k, v in official.items() if v is not None}  # add_watermarker null: unset
    if "safety_checker" in official:  # none in the folder, so none required
        expected["requires_safety_checker"] = False
    assert ours == expected


def _settings(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


# --------------------------------------------------------------------------- values


@pytest.fixture(scope="module")
def tiny_samples(module_tmp):
    """The tiny ldm sample and diffusers folder of each SD family, same seed, fp32."""
    root = module_tmp("samples")
    out = {}
    for fid in SD_FAMILIES:
        ldm, folder = root / f"{fid}.safetensors", root / fid
        sample(fid, str(ldm), tiny=True, dtype="fp32", seed=3)
        sample(fid, str(folder), layout="diffusers", tiny=True, dtype="fp32", seed=3)
        out[fid] = (ldm, folder)
    return out


def _assert_same(ours: dict, theirs: dict) -> None:
    assert set(ours) == set(theirs)
    for key, tensor in theirs.items():
        assert ours[key].dtype == tensor.dtype and torch.equal(ours[key], tensor), key


@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_values_are_those_of_diffusers_converters(fid, tiny_samples):
    from diffusers.loaders.single_file_utils import (
        convert_ldm_clip_checkpoint,
        convert_ldm_unet_checkpoint,
        convert_ldm_vae_checkpoint,
    )
    from diffusers.loaders.single_file_utils import (
        convert_open_clip_checkpoint as open_clip,
    )

    ldm_path, folder = tiny_samples[fid]
    ldm = load_file(str(ldm_path))
    config = json.loads((folder / "unet" / "config.json").read_text())
    _assert_same(load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors")),
                 convert_ldm_unet_checkpoint(ldm, config))
    config = json.loads((folder / "vae" / "config.json").read_text())
    _assert_same(load_file(str(folder / "vae" / "diffusion_pytorch_model.safetensors")),
                 convert_ldm_vae_checkpoint(ldm, config))
    te1 = folder / "text_encoder" / "model.safetensors"
    te2 = folder / "text_encoder_2" / "model.safetensors"
    if fid == "sd1":
        _assert_same(load_file(str(te1)), convert_ldm_clip_checkpoint(ldm))
    elif fid == "sd2":  # diffusers cuts OpenCLIP-H's last layer and projection for SD2 too
        _assert_same(load_file(str(te1)), open_clip(None, ldm))
    elif fid == "sdxl":
        _assert_same(load_file(str(te1)), convert_ldm_clip_checkpoint(
            ldm, "conditioner.embedders.0.transformer."))
        _assert_same(load_file(str(te2)), open_clip(None, ldm, "conditioner.embedders.1.model."))
    else:
        _assert_same(load_file(str(te2)), open_clip(None, ldm, "conditioner.embedders.0.model."))


class _InMemory:
    """A tensor ``plan_moves`` reads as it reads one of a file."""

    is_contiguous = False

    def __init__(self, tensor: torch.Tensor):
        self.tensor, self.shape = tensor, tuple(tensor.shape)
        self.dtype = BY_NAME["F32"] if tensor.is_floating_point() else BY_NAME["I64"]

    def read(self) -> torch.Tensor:
        return self.tensor


def _run(moves, tensors: dict) -> dict:
    return {p.key: p.produce() for p in plan_moves(moves, {k: _InMemory(v)
                                                            for k, v in tensors.items()})}


@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_round_trip_is_the_identity(fid):
    fam = families()[fid]
    gen = torch.Generator().manual_seed(0)
    for name in fam.component_names:
        table = fam.component(name).keys(tiny=True)
        canonical = {k: torch.randn(s, generator=gen) if not k.endswith("position_ids")
                     else torch.arange(s[-1]).expand(s).clone() for k, s in table.items()}
        there = _run(DL.to_diffusers(fam, name, True, set(canonical)), canonical)
        back = _run(DL.from_diffusers(fam, name, True, set(there)), there)
        if (fid, name) == ("sd2", "openclip_h"):  # the cut layer and projection stay behind
            canonical = {k: v for k, v in canonical.items() if k in back}
            assert len(back) == len(table) - 17
        _assert_same(back, canonical)


# --------------------------------------------------------------------------- loading


@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_tiny_folder_loads_in_diffusers_and_transformers(fid, tiny_samples):
    from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DConditionModel

    folder = tiny_samples[fid][1]
    index = json.loads((folder / "model_index.json").read_text())
    loaded = {}
    for sub, cls in (("unet", UNet2DConditionModel), ("vae", AutoencoderKL),
                     ("text_encoder", None), ("text_encoder_2", None)):
        if index.get(sub, [None])[0] is None:
            continue
        if cls is None:
            cls = _clip_class(json.loads((folder / sub / "config.json").read_text()))
        loaded[sub], info = cls.from_pretrained(str(folder / sub), output_loading_info=True)
        assert not any(info.values()), (sub, info)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent, **loaded)
    assert type(pipe).__name__ == index["_class_name"]
    assert pipe.vae.config.scaling_factor == (0.13025 if "sdxl" in fid else 0.18215)


def test_inpainting_folder_widens_the_unet_input(tmp_path):
    from diffusers import UNet2DConditionModel

    folder = tmp_path / "inpaint"
    sample("sd1", str(folder), layout="diffusers", tiny=True, variant="inpaint")
    unet, info = UNet2DConditionModel.from_pretrained(str(folder / "unet"),
                                                      output_loading_info=True)
    assert not any(info.values())
    assert (unet.config.in_channels, unet.config.out_channels) == (9, 4)


def test_one_component_is_one_file_of_diffusers_names(tmp_path):
    path = tmp_path / "unet.safetensors"
    assert main(["sample", "sdxl", "--layout", "diffusers", "--components", "diffusion_model",
                 "--tiny", "--quiet", "-o", str(path)]) == 0
    assert shapes(load_file(str(path))) == _ours("sdxl", "diffusion_model", True)


# --------------------------------------------------------------------------- inspect


@pytest.mark.parametrize("fid", SD_FAMILIES)
def test_inspect_recognises_sampled_folders_and_files(fid, tmp_path):
    folder = tmp_path / fid
    sample(fid, str(folder), layout="diffusers", sparse=True)
    report = inspect_diffusers_folder(str(folder))
    assert report["identification"]["family"] == fid, report["identification"]
    kinds = {sub: c["identification"]["kind"] for sub, c in report["components"].items()}
    assert kinds.pop("unet") == "diffusion-model" and kinds.pop("vae") == "vae"
    assert set(kinds.values()) == {"text-encoder"}
    unet = tmp_path / "unet.safetensors"
    sample(fid, str(unet), layout="diffusers", sparse=True, components=["diffusion_model"])
    ident = inspect_file(str(unet))["identification"]
    assert (ident["kind"], ident["family"], ident["layout"]) == ("diffusion-model", fid,
                                                                 "diffusers")


# --------------------------------------------------------------------------- kohya SD 1.x


def test_kohya_sd1_keys_are_sd_mecha_table():
    published = {k: tuple(v["shape"]) for comp in mecha("sd1-kohya").values()
                 for k, v in comp.items()}
    assert sample_table(families()["sd1"], layout="kohya") == published


def test_kohya_sd1_sample_is_identified(tmp_path):
    path = tmp_path / "kohya.safetensors"
    sample("sd1", str(path), layout="kohya", tiny=True)
    ident = inspect_file(str(path))["identification"]
    assert (ident["family"], ident["layout"], ident["kind"]) == ("sd1", "kohya", "checkpoint")
    assert {c["name"]: c["prefix"] for c in ident["components"]} == {
        "diffusion_model": "unet.", "clip_l": "te.", "vae": "vae."}


# --------------------------------------------------------------------------- atomic folder


def test_a_failed_folder_leaves_nothing(tmp_path, monkeypatch):
    calls = []

    def failing(target, planned, *args, **kwargs):
        calls.append(target)
        if len(calls) == 2:
            raise OSError("disk full")
        return write(target, planned, *args, **kwargs)

    write = sample_module.write_safetensors
    monkeypatch.setattr(sample_module, "write_safetensors", failing)
    with pytest.raises(OSError):
        sample("sd1", str(tmp_path / "pipe"), layout="diffusers", tiny=True)
    assert os.listdir(tmp_path) == []
    (tmp_path / "pipe").mkdir()
    with pytest.raises(OutputError):
        sample("sd1", str(tmp_path / "pipe"), layout="diffusers", tiny=True)


@pytest.mark.parametrize("fid", ["sd3.5-medium", "flux1-dev"])
def test_tiny_sd3_and_flux_folders_load_as_pipelines(fid, tmp_path):
    """The transformer, both kinds of text encoder and the 16-channel VAE of a tiny SD3/FLUX
    folder load without missing or unexpected keys, and the folder as its pipeline."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    folder = tmp_path / fid
    sample(fid, str(folder), layout="diffusers", tiny=True, dtype="fp32")
    index = json.loads((folder / "model_index.json").read_text())
    loaded = {}
    for sub, entry in index.items():
        if sub.startswith(("_", "scheduler", "tokenizer")) or entry[1] is None:
            continue
        library, class_name = entry
        cls = getattr(diffusers if library == "diffusers" else transformers, class_name)
        loaded[sub], info = cls.from_pretrained(str(folder / sub), output_loading_info=True)
        assert not any(info.values()), (sub, info)
    assert {"transformer", "vae", "text_encoder"} <= set(loaded)
    absent = {k: None for k, v in index.items() if isinstance(v, list) and v[0] is None}
    pipe = DiffusionPipeline.from_pretrained(str(folder), **absent, **loaded)
    assert type(pipe).__name__ == index["_class_name"]
    assert pipe.vae.config.latent_channels == 16


@pytest.mark.parametrize("fid", list(families()))
def test_tiny_diffusers_samples_of_every_family_are_identified(fid, tmp_path):
    """Tiny diffusers folders and single diffusion-model files are told apart by their full
    key tables at any width (SD1 and SD2 by shapes, dev and schnell by the guidance
    embedder, SD3 and SD3.5 Medium by structure)."""
    folder = tmp_path / fid
    sample(fid, str(folder), layout="diffusers", tiny=True)
    assert inspect_diffusers_folder(str(folder))["identification"]["family"] == fid
    single = tmp_path / "model.safetensors"
    sample(fid, str(single), layout="diffusers", tiny=True, components=["diffusion_model"])
    ident = inspect_file(str(single))["identification"]
    assert (ident["kind"], ident["family"], ident["layout"]) == ("diffusion-model", fid,
                                                                 "diffusers")
    assert ident["components"][0]["size"] == "tiny"
