"""Our UNet / VAE / CLIP / T5 key tables against sources we did not write.

- sd-mecha 1.1.8's shipped key tables (YAML read directly; no sd-mecha API is called): the
  exact keys and shapes real SD1 (ldm), SDXL (sgm), SD3 (ComfyUI) and FLUX files store.
- transformers models built on the meta device from explicit configs: the text encoders.
- diffusers' own LDM -> diffusers converters fed our tables as meta tensors, compared with the
  diffusers model built on meta from the official configs, written out here.

Nothing is downloaded; every model lives on the meta device (no memory, no data).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from helpers import mecha, meta, params, shapes

from ckptkit.arch.keys import KeyTable
from ckptkit.arch.keys import clip as C
from ckptkit.arch.keys import t5 as T
from ckptkit.arch.keys import unet as U
from ckptkit.arch.keys import vae as V


def mecha_component(config: str, component: str, prefix: str):
    """(all keys, required keys) of one sd-mecha component, prefix stripped, key -> shape.

    Every key must carry the prefix: anything else has to be handled by name in the test.
    """
    entries = mecha(config)[component]
    stray = [k for k in entries if not k.startswith(prefix)]
    assert not stray, f"{config}/{component}: keys outside {prefix!r}: {stray}"
    every = {k[len(prefix):]: tuple(v["shape"]) for k, v in entries.items()}
    required = {k[len(prefix):]: tuple(v["shape"]) for k, v in entries.items()
                if not v.get("optional")}
    return every, required


def split_root(config: str, component: str, root: str, inner: str):
    """sd-mecha keys of a ComfyUI text encoder: those under ``root + inner`` (stripped) and
    those at the encoder's root outside ``inner`` (stripped of ``root``)."""
    entries = mecha(config)[component]
    assert all(k.startswith(root) for k in entries)
    assert not any(v.get("optional") or v.get("aliases") for v in entries.values())
    under = {k[len(root + inner):]: tuple(v["shape"]) for k, v in entries.items()
             if k.startswith(root + inner)}
    outside = {k[len(root):]: tuple(v["shape"]) for k, v in entries.items()
               if not k.startswith(root + inner)}
    return under, outside


def test_sd1_ldm_unet_and_vae():
    every, required = mecha_component("sd1-ldm", "diffuser", "model.diffusion_model.")
    assert every == required
    assert U.unet_keys(U.SD1_UNET) == every
    every, required = mecha_component("sd1-ldm", "vae", "first_stage_model.")
    assert every == required
    assert V.vae_keys(V.VAE_SD) == every
    # sd-mecha's other sd1-ldm components (ema, scheduler buffers) are not model components.


def test_sd1_ldm_clip_l():
    prefix = "cond_stage_model.transformer."
    every, required = mecha_component("sd1-ldm", "clip_l", prefix)
    # Optional: only position_ids (saved by transformers < 4.31, not since).
    assert set(every) - set(required) == {"text_model.embeddings.position_ids"}
    assert C.clip_keys(C.CLIP_L_SD1) == every
    assert C.clip_keys(C.CLIP_L) == required
    # Aliases: the same keys without "text_model." (files from transformers before the
    # text_model wrapper existed). A pure prefix change, which is what layouts must accept.
    for key, entry in mecha("sd1-ldm")["clip_l"].items():
        assert entry["aliases"] == [key.replace("transformer.text_model.", "transformer.")]


def test_sdxl_sgm_unet_and_vae():
    prefix = "model.diffusion_model."
    entries = mecha("sdxl-sgm")["diffuser"]
    # Four optional keys outside the UNet are empty model-type markers (v-prediction, zero
    # terminal SNR, EDM sigma range), not weights: accounted for here by name.
    markers = {k for k in entries if not k.startswith(prefix)}
    assert markers == {"v_pred", "ztsnr", "edm_vpred.sigma_max", "edm_vpred.sigma_min"}
    assert all(entries[k].get("optional") for k in markers)
    unet = {k[len(prefix):]: tuple(v["shape"]) for k, v in entries.items() if k not in markers}
    assert not any(v.get("optional") for k, v in entries.items() if k not in markers)
    assert U.unet_keys(U.SDXL_UNET) == unet
    every, required = mecha_component("sdxl-sgm", "vae", "first_stage_model.")
    assert every == required
    assert V.vae_keys(V.VAE_SD) == every


def test_sdxl_sgm_clip_l():
    every, required = mecha_component("sdxl-sgm", "clip_l", "conditioner.embedders.0.transformer.")
    # Optional: position_ids, and the last layer and final norm, which SDXL never uses (it
    # reads the penultimate layer), so pruned files drop them (sd-mecha fills them with zeros).
    last = {k for k in every if k.startswith(("text_model.encoder.layers.11.",
                                               "text_model.final_layer_norm."))}
    assert len(last) == 18
    assert set(every) - set(required) == {"text_model.embeddings.position_ids"} | last
    assert C.clip_keys(C.CLIP_L_SDXL) == every
    assert set(required) <= set(C.clip_keys(C.CLIP_L))
    assert "text_projection.weight" not in every


def test_sdxl_sgm_clip_g_openclip():
    every, required = mecha_component("sdxl-sgm", "clip_g", "conditioner.embedders.1.model.")
    # Optional: the unused last block and final norm (pruned files), the projection and the
    # logit scale. The official base file has them all, as does our table.
    optional = set(every) - set(required)
    assert optional == ({k for k in every if k.startswith("transformer.resblocks.31.")}
                        | {"ln_final.weight", "ln_final.bias", "text_projection", "logit_scale"})
    assert C.openclip_keys(C.CLIP_G) == every
    assert every["logit_scale"] == ()
    assert every["text_projection"] == (1280, 1280)


@pytest.mark.parametrize(("component", "config", "inner_shape"), [
    ("clip_l", C.CLIP_L_SD3, (768, 768)),
    ("clip_g", C.CLIP_G, (1280, 1280)),
])
def test_sd3_comfyui_clip(component, config, inner_shape):
    under, outside = split_root("sd3-comfyui", component, f"text_encoders.{component}.",
                                "transformer.")
    # ComfyUI's wrapper adds logit_scale at the encoder's root, outside "transformer.": not
    # part of the transformers model, so not in our table (layouts add it).
    assert outside == {"logit_scale": ()}
    assert C.clip_keys(config) == under
    assert under["text_projection.weight"] == inner_shape
    assert "text_model.embeddings.position_ids" not in under


def test_sd3_comfyui_t5xxl_and_vae():
    under, outside = split_root("sd3-comfyui", "t5xxl", "text_encoders.t5xxl.", "transformer.")
    assert outside == {"logit_scale": ()}  # as for the CLIPs: ComfyUI's wrapper
    # shared.weight only; the tied encoder.embed_tokens.weight is not stored.
    assert "encoder.embed_tokens.weight" not in under
    assert T.t5_keys(T.T5_XXL) == under
    every, required = mecha_component("sd3-comfyui", "vae", "first_stage_model.")
    assert every == required
    assert V.vae_keys(V.VAE_16) == every


def test_flux_comfyui_text_encoders_and_vae():
    every, required = mecha_component("flux-flux", "clip_l", "text_encoders.clip_l.transformer.")
    assert every == required
    assert C.clip_keys(C.CLIP_L_FLUX) == every  # no projection, no position_ids, no logit_scale
    every, required = mecha_component("flux-flux", "t5xxl", "text_encoders.t5xxl.transformer.")
    assert every == required
    assert T.t5_keys(T.T5_XXL) == every
    every, required = mecha_component("flux-flux", "vae", "vae.")
    assert every == required
    assert V.vae_keys(V.VAE_16) == every


# --------------------------------------------------------------------------- transformers


def hf_clip_config(cfg: C.CLIPTextConfig):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
        num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
        max_position_embeddings=cfg.max_positions, projection_dim=cfg.projection_dim or 512,
    )


def hf_clip(cfg: C.CLIPTextConfig):
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModel if cfg.projection_dim is None else CLIPTextModelWithProjection
    with torch.device("meta"):
        return cls(hf_clip_config(cfg))


CLIPS = {"CLIP_L": C.CLIP_L, "CLIP_L_SD3": C.CLIP_L_SD3, "CLIP_G": C.CLIP_G,
         "OPENCLIP_H": C.OPENCLIP_H, "CLIP_L_TINY": C.CLIP_L_TINY,
         "CLIP_L_SD3_TINY": C.CLIP_L_SD3_TINY, "CLIP_G_TINY": C.CLIP_G_TINY,
         "OPENCLIP_H_TINY": C.OPENCLIP_H_TINY,
         # A projection narrower than the width, so that a transposed one cannot pass.
         "CLIP_G_TINY_P24": dataclasses.replace(C.CLIP_G_TINY, projection_dim=24)}


@pytest.mark.parametrize("name", list(CLIPS))
def test_clip_matches_transformers(name):
    cfg = CLIPS[name]
    model = hf_clip(dataclasses.replace(cfg, position_ids=False))
    # Same keys, shapes and order (position_ids is a non-persistent buffer: not listed).
    ours = C.clip_keys(dataclasses.replace(cfg, position_ids=False))
    assert list(hf_clip_state(model).items()) == list(ours.items())
    # Old transformers saved position_ids: make it persistent again to see where it goes.
    emb = getattr(model, "text_model", model).embeddings
    emb.register_buffer("position_ids", emb.position_ids, persistent=True)
    ours = C.clip_keys(dataclasses.replace(cfg, position_ids=True))
    assert list(hf_clip_state(model).items()) == list(ours.items())


def hf_clip_state(model) -> KeyTable:
    """A transformers CLIP text model's state_dict in the ``text_model.*`` naming of files.

    Since transformers 5, ``CLIPTextModel`` *is* the text transformer (no ``text_model``
    attribute): its state_dict, and what its save_pretrained writes, lack the ``text_model.``
    prefix (loading strips the prefix from older files). CLIPTextModelWithProjection keeps it.
    """
    state = shapes(model.state_dict())
    if not hasattr(model, "text_model"):
        assert not any(k.startswith("text_model.") for k in state)
        state = {f"text_model.{k}": v for k, v in state.items()}
    return state


@pytest.mark.parametrize("name", ["CLIP_G", "OPENCLIP_H", "CLIP_G_TINY", "OPENCLIP_H_TINY",
                                  "CLIP_G_TINY_P24"])
def test_openclip_converts_to_transformers(name):
    """diffusers' open_clip -> transformers converter maps our open_clip table onto exactly the
    keys and shapes of the transformers model (q/k/v split out of in_proj, projection
    transposed). logit_scale has no transformers counterpart: the converter skips it."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    cfg = CLIPS[name]
    model = hf_clip(cfg)
    # The SDXL prefix: with SD2's, diffusers drops block 23 (its SD2 text encoder has 23).
    prefix = "conditioner.embedders.1.model."
    table = C.openclip_keys(cfg)
    converted = convert_open_clip_checkpoint(model, meta(table, prefix), prefix=prefix)
    assert shapes(converted) == hf_clip_state(model)
    # Every key consumed: in_proj weight and bias each become three; logit_scale is dropped.
    assert len(converted) == len(table) + 4 * cfg.layers - 1


def hf_t5(cfg: T.T5Config):
    from transformers import T5Config, T5EncoderModel

    hf = T5Config(vocab_size=cfg.vocab, d_model=cfg.d_model, d_ff=cfg.d_ff, d_kv=cfg.d_kv,
                  num_layers=cfg.layers, num_heads=cfg.heads,
                  relative_attention_num_buckets=cfg.relative_attention_buckets,
                  feed_forward_proj="gated-gelu" if cfg.gated else "relu")
    with torch.device("meta"):
        return T5EncoderModel(hf)


@pytest.mark.parametrize("cfg", [T.T5_XXL, T.T5_XXL_TINY,
                                 dataclasses.replace(T.T5_XXL_TINY, gated=False)],
                         ids=["T5_XXL", "T5_XXL_TINY", "T5_TINY_RELU"])
def test_t5_matches_transformers(cfg):
    model = hf_t5(cfg)
    state = shapes(model.state_dict())
    # state_dict lists the tied embedding twice; ComfyUI files keep shared.weight only.
    assert list(state.items()) == list(T.t5_keys(dataclasses.replace(cfg, embed_tokens=True))
                                       .items())
    tied = set(getattr(model, "_tied_weights_keys", None) or {})
    assert tied == {"encoder.embed_tokens.weight"}
    assert T.t5_keys(cfg) == {k: v for k, v in state.items() if k not in tied}


# --------------------------------------------------------------------------- diffusers

_SD_DOWN = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
            "DownBlock2D")
_SD_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")

# The official UNet2DConditionModel configs (unet/config.json of each Hub repo).
UNET_CONFIGS = {
    "sd15": dict(  # runwayml/stable-diffusion-v1-5
        sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=768, attention_head_dim=8,
        norm_num_groups=32),
    "sd21": dict(  # stabilityai/stable-diffusion-2-1
        sample_size=96, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), down_block_types=_SD_DOWN,
        up_block_types=_SD_UP, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
        use_linear_projection=True, norm_num_groups=32),
    "sdxl": dict(  # stabilityai/stable-diffusion-xl-base-1.0
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
        attention_head_dim=(5, 10, 20), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816, norm_num_groups=32),
    "sdxl_refiner": dict(  # stabilityai/stable-diffusion-xl-refiner-1.0
        sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(384, 768, 1536, 1536),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                          "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=4, cross_attention_dim=1280,
        attention_head_dim=(6, 12, 24, 24), use_linear_projection=True,
        addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2560, norm_num_groups=32),
}


def _tiny_unet_config(full: dict, model_channels: int, context: int, adm: int | None) -> dict:
    mults = [c // full["block_out_channels"][0] for c in full["block_out_channels"]]
    tiny = dict(full, block_out_channels=tuple(model_channels * m for m in mults),
                cross_attention_dim=context, attention_head_dim=2)
    if adm is not None:
        tiny["projection_class_embeddings_input_dim"] = adm
    return tiny


UNET_CASES = {
    "SD1_UNET": (U.SD1_UNET, UNET_CONFIGS["sd15"]),
    "SD1_UNET_inpainting": (U.inpainting(U.SD1_UNET), dict(UNET_CONFIGS["sd15"], in_channels=9)),
    "SD1_UNET_pix2pix": (U.instruct_pix2pix(U.SD1_UNET),
                         dict(UNET_CONFIGS["sd15"], in_channels=8)),
    "SD2_UNET": (U.SD2_UNET, UNET_CONFIGS["sd21"]),
    "SDXL_UNET": (U.SDXL_UNET, UNET_CONFIGS["sdxl"]),
    "SDXL_REFINER_UNET": (U.SDXL_REFINER_UNET, UNET_CONFIGS["sdxl_refiner"]),
    # Tiny ones through the same diffusers blocks: diffusers builds GroupNorm(32, C), which
    # refuses a width that is not a multiple of 32.
    "SD1_UNET_TINY": (U.SD1_UNET_TINY, _tiny_unet_config(UNET_CONFIGS["sd15"], 32, 32, None)),
    "SD2_UNET_TINY": (U.SD2_UNET_TINY, _tiny_unet_config(UNET_CONFIGS["sd21"], 32, 40, None)),
    "SDXL_UNET_TINY": (U.SDXL_UNET_TINY,
                       _tiny_unet_config(UNET_CONFIGS["sdxl"], 32, 80, 48 + 6 * 256)),
    "SDXL_REFINER_UNET_TINY": (U.SDXL_REFINER_UNET_TINY,
                               _tiny_unet_config(UNET_CONFIGS["sdxl_refiner"], 32, 48,
                                                 48 + 5 * 256)),
}


@pytest.mark.parametrize("name", list(UNET_CASES))
def test_unet_converts_to_diffusers(name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    cfg, config = UNET_CASES[name]
    table = U.unet_keys(cfg)
    converted = convert_ldm_unet_checkpoint(meta(table, "model.diffusion_model."), dict(config))
    with torch.device("meta"):
        model = UNet2DConditionModel(**config)
    assert shapes(converted) == shapes(model.state_dict())
    assert len(converted) == len(table)  # a one-to-one renaming: every key of ours was used


VAE_CONFIG = dict(  # the AutoencoderKL of SD 1.5 / 2.1 / SDXL (vae/config.json)
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32, sample_size=512)
# SD3 / FLUX: 16 latent channels, no quant convs.
VAE16_CONFIG = dict(VAE_CONFIG, latent_channels=16, use_quant_conv=False,
                    use_post_quant_conv=False, sample_size=1024)
VAE_CASES = {
    "VAE_SD": (V.VAE_SD, VAE_CONFIG),
    "VAE_16": (V.VAE_16, VAE16_CONFIG),
    "VAE_SD_TINY": (V.VAE_SD_TINY, dict(VAE_CONFIG, block_out_channels=(32, 64, 128, 128))),
    "VAE_16_TINY": (V.VAE_16_TINY, dict(VAE16_CONFIG, block_out_channels=(32, 64, 128, 128))),
}


@pytest.mark.parametrize("name", list(VAE_CASES))
def test_vae_converts_to_diffusers(name):
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    cfg, config = VAE_CASES[name]
    table = V.vae_keys(cfg)
    converted = convert_ldm_vae_checkpoint(meta(table, "first_stage_model."), dict(config))
    with torch.device("meta"):
        model = AutoencoderKL(**config)
    assert shapes(converted) == shapes(model.state_dict())
    assert len(converted) == len(table)


def test_sd15_published_parameter_counts():
    assert params(U.unet_keys(U.SD1_UNET)) == 859_520_964
    assert params(C.clip_keys(C.CLIP_L)) == 123_060_480
    assert params(V.vae_keys(V.VAE_SD)) == 83_653_863
    # position_ids is a buffer, not a parameter: 77 int64 on top.
    assert params(C.clip_keys(C.CLIP_L_SD1)) == 123_060_480 + 77


# --------------------------------------------------------------------------- tiny tables

PAIRS = [
    ("SD1_UNET", U.unet_keys, U.SD1_UNET, U.SD1_UNET_TINY, 10e6),
    ("SD2_UNET", U.unet_keys, U.SD2_UNET, U.SD2_UNET_TINY, 10e6),
    # SDXL's 10-deep transformers at 4 x 32 channels: the largest tiny table.
    ("SDXL_UNET", U.unet_keys, U.SDXL_UNET, U.SDXL_UNET_TINY, 25e6),
    ("SDXL_REFINER_UNET", U.unet_keys, U.SDXL_REFINER_UNET, U.SDXL_REFINER_UNET_TINY, 16e6),
    ("VAE_SD", V.vae_keys, V.VAE_SD, V.VAE_SD_TINY, 6e6),
    ("VAE_16", V.vae_keys, V.VAE_16, V.VAE_16_TINY, 6e6),
    # The text encoders' size is mostly the 49408-token (32128 for T5) embedding table.
    ("CLIP_L", C.clip_keys, C.CLIP_L, C.CLIP_L_TINY, 2e6),
    ("CLIP_L_SD1", C.clip_keys, C.CLIP_L_SD1, C.CLIP_L_SD1_TINY, 2e6),
    ("CLIP_L_SDXL", C.clip_keys, C.CLIP_L_SDXL, C.CLIP_L_SDXL_TINY, 2e6),
    ("CLIP_L_SD3", C.clip_keys, C.CLIP_L_SD3, C.CLIP_L_SD3_TINY, 2e6),
    ("CLIP_L_FLUX", C.clip_keys, C.CLIP_L_FLUX, C.CLIP_L_FLUX_TINY, 2e6),
    ("CLIP_G", C.clip_keys, C.CLIP_G, C.CLIP_G_TINY, 3.5e6),
    ("CLIP_G_openclip", C.openclip_keys, C.CLIP_G, C.CLIP_G_TINY, 3.5e6),
    ("OPENCLIP_H", C.clip_keys, C.OPENCLIP_H, C.OPENCLIP_H_TINY, 3e6),
    ("OPENCLIP_H_openclip", C.openclip_keys, C.OPENCLIP_H, C.OPENCLIP_H_TINY, 3e6),
    ("T5_XXL", T.t5_keys, T.T5_XXL, T.T5_XXL_TINY, 1.5e6),
]


@pytest.mark.parametrize(("build", "full", "tiny", "budget"), [p[1:] for p in PAIRS],
                         ids=[p[0] for p in PAIRS])
def test_tiny_tables_mirror_full(build, full, tiny, budget):
    big, small = build(full), build(tiny)
    assert list(small) == list(big)  # same names, same order
    for key, shape in small.items():
        assert len(shape) == len(big[key]), key
        assert all(s <= b for s, b in zip(shape, big[key], strict=True)), key
    assert params(small) < budget
    assert params(small) * 15 < params(big)


@pytest.mark.parametrize(("full", "tiny"), [
    (U.SD1_UNET, U.SD1_UNET_TINY), (U.SD2_UNET, U.SD2_UNET_TINY),
    (U.SDXL_UNET, U.SDXL_UNET_TINY), (U.SDXL_REFINER_UNET, U.SDXL_REFINER_UNET_TINY)])
def test_tiny_unet_keeps_io_and_groupnorm(full, tiny):
    small = U.unet_keys(tiny)
    assert small["input_blocks.0.0.weight"][1] == full.in_channels
    assert small["out.2.weight"][0] == full.out_channels
    # GroupNorm(32) layers: ResBlock norms, SpatialTransformer norms, the output norm.
    norms = [k for k in small if k.endswith(("in_layers.0.weight", "out_layers.0.weight",
                                             "1.norm.weight", "out.0.weight"))]
    assert len(norms) > 20
    assert all(small[k][0] % 32 == 0 for k in norms)
    # The tiny context width is what the tiny text encoders produce.
    attn2 = small["output_blocks.5.1.transformer_blocks.0.attn2.to_k.weight"]
    assert attn2[1] == tiny.context_dim


def test_tiny_contexts_match_tiny_text_encoders():
    assert U.SD1_UNET_TINY.context_dim == C.CLIP_L_TINY.hidden
    assert U.SD2_UNET_TINY.context_dim == C.OPENCLIP_H_TINY.hidden
    assert U.SDXL_UNET_TINY.context_dim == C.CLIP_L_TINY.hidden + C.CLIP_G_TINY.hidden
    assert U.SDXL_REFINER_UNET_TINY.context_dim == C.CLIP_G_TINY.hidden
    # label_emb input: pooled CLIP-G + 256 per size/crop(/aesthetic) number, as in full size.
    assert U.SDXL_UNET.adm_in_channels == C.CLIP_G.projection_dim + 6 * 256
    assert U.SDXL_UNET_TINY.adm_in_channels == C.CLIP_G_TINY.projection_dim + 6 * 256
    assert U.SDXL_REFINER_UNET.adm_in_channels == C.CLIP_G.projection_dim + 5 * 256
    assert U.SDXL_REFINER_UNET_TINY.adm_in_channels == C.CLIP_G_TINY.projection_dim + 5 * 256


@pytest.mark.parametrize("tiny", [V.VAE_SD_TINY, V.VAE_16_TINY])
def test_tiny_vae_keeps_latent_and_groupnorm(tiny):
    small = V.vae_keys(tiny)
    full = V.VAE_SD if tiny.latent_channels == 4 else V.VAE_16
    assert small["decoder.conv_in.weight"][1] == full.latent_channels
    assert small["encoder.conv_in.weight"][1] == 3
    norms = [k for k in small if k.endswith(("norm1.weight", "norm2.weight", "norm.weight",
                                             "norm_out.weight"))]
    assert all(small[k][0] % 32 == 0 for k in norms)


def test_variants_and_validation():
    assert U.inpainting(U.SDXL_UNET).in_channels == 9
    assert U.instruct_pix2pix(U.SD1_UNET).in_channels == 8
    table = U.unet_keys(U.inpainting(U.SD1_UNET))
    assert table["input_blocks.0.0.weight"] == (320, 9, 3, 3)
    assert list(table) == list(U.unet_keys(U.SD1_UNET))
    with pytest.raises(ValueError):
        U.UNetConfig(channel_mult=(1, 2), transformer_depth=(1,))
    with pytest.raises(ValueError):
        C.CLIPTextConfig(hidden=40, heads=3)
    with pytest.raises(ValueError):
        V.VAEConfig(ch=0)
    # A middle block without attention is a single ResBlock (Segmind Vega-like).
    flat = U.unet_keys(dataclasses.replace(U.SDXL_UNET_TINY, transformer_depth_middle=0))
    assert not any(k.startswith(("middle_block.1.", "middle_block.2.")) for k in flat)
