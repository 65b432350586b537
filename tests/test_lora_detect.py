"""``lora.detect.detect_lora`` on LoRA headers with the real key names of each format and family
(built in lora_headers.py from sources other than ckptkit.lora)."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import pytest
import torch
from lora_headers import (
    MMDIT_TARGETS,
    REFINER_UNET,
    SD2_UNET,
    UNET_ATTN_DIFFUSERS,
    UNET_CONV_DIFFUSERS,
    Header,
    Shape,
    bfl_control_header,
    check,
    clip_model,
    flux,
    flux_model,
    full,
    ia3,
    items,
    kohya,
    kohya_flux,
    kohya_named,
    linear_modules,
    linear_weights,
    loha,
    lokr,
    mecha,
    modules_of,
    peft,
    real,
    sd1_kohya,
    sd1_te,
    sd1_unet,
    sd3_medium,
    sd3_model,
    sdxl_kohya,
    sdxl_te,
    sdxl_unet,
    shapes_of,
    unet_model,
    values_for,
    xlabs_header,
)

from ckptkit.lora.detect import LoraInfo, detect_lora

# --------------------------------------------------------------------------- kohya / LyCORIS


def test_kohya_sd1():
    header = sd1_kohya(rank=8)
    info = check(detect_lora(header, {}, values_for(header, 4.0)), "kohya-lora", "sd1",
                 ["diffusion_model", "clip_l"], [8], [4.0])
    # kohya's SD1 network: 192 U-Net (16 transformers x 12 linears) + 72 CLIP-L modules.
    assert info.modules == 192 + 72
    assert any("768-wide context" in r for r in info.reasons)


def test_kohya_sd1_locon_conv_rank():
    paths = sd1_unet() | linear_weights(mecha("sd1-kohya")["diffuser"], "unet.",
                                        UNET_CONV_DIFFUSERS)
    header = kohya(kohya_named(paths, "lora_unet"), rank=16, conv_rank=4)
    assert any(len(s) == 4 and s[2:] == (3, 3) for s in header.values())
    info = check(detect_lora(header, {}, values_for(header, 1.0)), "kohya-lora", "sd1",
                 ["diffusion_model"], [4, 16], [1.0])
    assert any("768-wide context" in r for r in info.reasons)


def test_kohya_sd2_from_diffusers_and_transformers_models():
    unet = modules_of(unet_model(items(SD2_UNET)), {"Transformer2DModel"})
    # kohya's SD2 text encoder: a CLIPTextModel 1024 wide with 23 layers (model_util.py).
    te = modules_of(clip_model(1024, 23, 16), {"CLIPAttention", "CLIPMLP"})
    header = kohya(kohya_named(unet, "lora_unet")) | kohya(kohya_named(te, "lora_te"))
    info = check(detect_lora(header, {}, values_for(header, 2.0)), "kohya-lora", "sd2",
                 ["diffusion_model", "openclip_h"], [4], [2.0])
    assert any("1024-wide context" in r for r in info.reasons)


def test_kohya_sdxl_ldm_names():
    header = sdxl_kohya()
    info = check(detect_lora(header, {}, values_for(header, 4.0)), "kohya-lora", "sdxl",
                 ["diffusion_model", "clip_l", "clip_g"], [4], [4.0])
    assert info.modules == 722 + 72 + 192  # kohya's counts for SDXL


def test_kohya_sdxl_with_diffusers_names():
    unet = linear_weights(mecha("sdxl-kohya_but_diffusers")["diffuser"], "unet.",
                          UNET_ATTN_DIFFUSERS)
    header = kohya(kohya_named(unet, "lora_unet"), rank=32)
    check(detect_lora(header, {}, values_for(header, 16.0)), "kohya-lora", "sdxl",
          ["diffusion_model"], [32], [16.0])


def test_kohya_sdxl_refiner():
    unet = modules_of(unet_model(items(REFINER_UNET)), {"Transformer2DModel"})
    header = kohya(kohya_named(unet, "lora_unet"))
    info = check(detect_lora(header, {}, values_for(header, 4.0)), "kohya-lora",
                 "sdxl-refiner", ["diffusion_model"], [4], [4.0])
    assert any("1280-wide context" in r for r in info.reasons)


def test_kohya_sd3_medium_with_three_text_encoders():
    sd3 = sd3_medium()
    header = (kohya(kohya_named(sd3["unet"], "lora_unet"), 16)
              | kohya(kohya_named(sd3["te1"], "lora_te1"), 16)
              | kohya(kohya_named(sd3["te2"], "lora_te2"), 16)
              | kohya(kohya_named(sd3["te3"], "lora_te3"), 16))
    assert "lora_unet_joint_blocks_0_x_block_attn_qkv.lora_down.weight" in header
    assert "lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight" in header
    components = ["diffusion_model", "clip_l", "clip_g", "t5xxl"]
    # SD3 Medium and SD3.5 Medium share width and depth; without attn2 modules only the
    # metadata can tell them apart.
    info = check(detect_lora(header, {}), "kohya-lora", "sd3", components, [16], None)
    assert any("1536 wide" in r for r in info.reasons)
    for metadata in ({"ss_base_model_version": "medium"},
                     {"modelspec.architecture": "stable-diffusion-3-medium/lora"}):
        info = check(detect_lora(header, metadata), "kohya-lora", "sd3-medium", components,
                     [16], None)
        assert any("metadata" in r for r in info.reasons)


@pytest.mark.parametrize("variant", ["sd3.5-large", "sd3.5-medium"])
def test_kohya_sd35(variant):
    from ckptkit.arch.keys import mmdit

    config = {"sd3.5-large": mmdit.SD35_LARGE, "sd3.5-medium": mmdit.SD35_MEDIUM}[variant]
    unet = linear_weights(mmdit.mmdit_keys(config), "", MMDIT_TARGETS)
    assert any(".attn2." in p for p in unet) == (variant == "sd3.5-medium")
    header = kohya(kohya_named(unet, "lora_unet"))
    check(detect_lora(header, {}, values_for(header, 1.0)), "kohya-lora", variant,
          ["diffusion_model"], [4], [1.0])
    # Metadata naming another SD3 variant is reported and overruled.
    other = "5-large" if variant == "sd3.5-medium" else "medium"
    info = check(detect_lora(header, {"ss_base_model_version": other},
                             values_for(header, 1.0)),
                 "kohya-lora", variant, ["diffusion_model"], [4], [1.0])
    assert any("the weights decide" in r for r in info.reasons)


def test_kohya_flux_te1_clip_l_te3_t5():
    header = kohya_flux(rank=16)
    info = check(detect_lora(header, {"ss_base_model_version": "flux1",
                                      "modelspec.architecture": "flux-1-dev/lora"},
                             values_for(header, 16.0)),
                 "kohya-lora", "flux1", ["diffusion_model", "clip_l", "t5xxl"], [16], [16.0])
    assert info.modules == 19 * 10 + 38 * 3 + 72 + 24 * 7
    assert any("3072 wide" in r for r in info.reasons)
    assert any("metadata agrees" in r for r in info.reasons)


def test_lycoris_loha_sdxl():
    header = loha(kohya_named(sdxl_unet(), "lora_unet"), rank=8)
    check(detect_lora(header, {"ss_network_module": "lycoris.kohya",
                               "ss_network_args": json.dumps({"algo": "loha"})},
                      values_for(header, 4.0)),
          "lycoris-loha", "sdxl", ["diffusion_model"], [8], [4.0])


def test_lycoris_lokr_sd1_and_its_widths():
    paths = kohya_named(sd1_unet(), "lora_unet") | kohya_named(sd1_te(), "lora_te")
    header = lokr(paths, rank=4)
    # 320 x 768 cross-attention to_k: w1 (16, 24), w2 (20, 32) as (20, 4) @ (4, 32).
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    assert header[f"{key}.lokr_w1"] == (16, 24) and header[f"{key}.lokr_w2_b"] == (4, 32)
    check(detect_lora(header, {}, values_for(header, 1.0)), "lycoris-lokr", "sd1",
          ["diffusion_model", "clip_l"], [4], [1.0])


def test_lycoris_lokr_simpletuner_prefix_on_flux_diffusers_names():
    paths = linear_modules(flux_model(), r"^(single_)?transformer_blocks\.\d+\.attn\.to_[qkv]$")
    header = lokr({f"lycoris_{p.replace('.', '_')}": s for p, s in paths.items()}, rank=8)
    check(detect_lora(header, {}), "lycoris-lokr", "flux1", ["diffusion_model"], [8], None)


def test_lycoris_ia3_needs_a_width_or_metadata():
    header = ia3(kohya_named(sd1_unet(), "lora_unet"))
    # (IA)^3 vectors have no input width: SD1 and SD2 U-Nets have the same blocks.
    info = check(detect_lora(header, {}), "lycoris-ia3", None, ["diffusion_model"], [], None)
    assert any("left open between sd1, sd2" in r for r in info.reasons)
    check(detect_lora(header, {"ss_base_model_version": "sd_v1"}), "lycoris-ia3", "sd1",
          ["diffusion_model"], [], None)


def test_lycoris_full_diff():
    header = full(kohya_named(sdxl_unet(), "lora_unet"))
    check(detect_lora(header, {}), "lycoris-full", "sdxl", ["diffusion_model"], [], None)


def test_lycoris_glora_and_oft_variants():
    paths = kohya_named(sd1_unet(), "lora_unet")
    glora: Header = {}
    for name, (cout, cin, *k) in paths.items():
        if k:  # Linear layers only here
            continue
        glora |= {f"{name}.a1.weight": (cin, 4), f"{name}.a2.weight": (4, cin),
                  f"{name}.b1.weight": (cout, 4), f"{name}.b2.weight": (4, cin),
                  f"{name}.alpha": ()}
    check(detect_lora(glora, {}), "lycoris-glora", "sd1", ["diffusion_model"], [4], None)
    for fmt, prefix, blocks in (("lycoris-oft", "lora_unet", lambda o: (o // 8, 8, 8)),
                                ("lycoris-boft", "lora_unet", lambda o: (2, o // 8, 8, 8)),
                                ("kohya-oft", "oft_unet", lambda o: (o // 8, 8, 8))):
        header: Header = {}
        for name, (cout, *_rest) in kohya_named(sd1_unet(), prefix).items():
            header |= {f"{name}.oft_blocks": blocks(cout), f"{name}.alpha": ()}
        info = check(detect_lora(header, {}), fmt, None, ["diffusion_model"], [], None)
        assert any("sd1, sd2" in r for r in info.reasons)


def test_dora_scale_and_metadata_checks():
    header = kohya(kohya_named(sdxl_unet(), "lora_unet"), rank=8, dora=True)
    metadata = {"ss_network_module": "lycoris.kohya", "ss_network_dim": "16",
                "ss_network_alpha": "8",
                "ss_network_args": json.dumps({"algo": "locon", "dora_wd": "True"})}
    info = check(detect_lora(header, metadata, values_for(header, 4.0)), "kohya-lora", "sdxl",
                 ["diffusion_model"], [8], [4.0])
    assert info.dora
    assert any("ss_network_dim=16, but the weights have rank(s) [8]" in r for r in info.reasons)
    assert any("ss_network_alpha=8, but the .alpha tensors hold 4" in r for r in info.reasons)
    # Without the values, the alphas come from the metadata.
    info = check(detect_lora(header, metadata), "kohya-lora", "sdxl", ["diffusion_model"], [8],
                 [8.0])
    assert any("taken from metadata ss_network_alpha" in r for r in info.reasons)


def test_comfyui_lora_save_layout():
    """ComfyUI's LoraSave (comfy_extras/nodes_lora_extract.py): diffusion_model.<name> and
    text_encoders.<clip>.<keys>, lora_up/lora_down, no alpha."""
    unet = {f"diffusion_model.{p[len('unet.'):] if p.startswith('unet.') else p}": s
            for p, s in sdxl_unet().items()}
    te = {f"text_encoders.clip_g.transformer.{p}": s for p, s in sdxl_te(2).items()}
    header = kohya(unet | te, alpha=False)
    info = check(detect_lora(header, {}), "kohya-lora", "sdxl", ["diffusion_model", "clip_g"],
                 [4], None)
    assert any("alpha = rank" in r for r in info.reasons)


def test_comfyui_lora_save_with_bias_differences():
    """ComfyUI's LoraSave with bias_diff (its default now): a .diff_b beside each LoRA'd
    module, .diff and .diff_b for 1-D weights (norms, including the UNet's last, out.0), in
    sorted key order, where a .diff_b comes before its module's .lora_down."""
    unet = {f"diffusion_model.{p[len('unet.'):] if p.startswith('unet.') else p}": s
            for p, s in sdxl_unet().items()}
    header = kohya(unet, alpha=False)
    for key, shape in list(header.items()):
        if key.endswith(".lora_up.weight"):
            header[key[:-len(".lora_up.weight")] + ".diff_b"] = (shape[0],)
    for norm in ("diffusion_model.out.0", "diffusion_model.input_blocks.1.0.in_layers.0"):
        header[norm + ".diff"], header[norm + ".diff_b"] = (320,), (320,)
    info = check(detect_lora(dict(sorted(header.items())), {}), "kohya-lora", "sdxl",
                 ["diffusion_model"], [4], None)
    assert any("LyCORIS full" in r for r in info.reasons)


@pytest.mark.parametrize("header", [
    {"lora_unet_x.lokr_w1": (4,), "lora_unet_x.lokr_w2": (4, 4)},
    {"lora_unet_x.lokr_w1_a": (), "lora_unet_x.lokr_w1_b": (2, 4), "lora_unet_x.lokr_w2": (4, 4)},
    {"lora_unet_x.a1.weight": (4, 4), "lora_unet_x.a2.weight": (4,),
     "lora_unet_x.b1.weight": (4, 4), "lora_unet_x.b2.weight": (4, 4)},
])
def test_malformed_adapter_shapes_are_not_an_error(header):
    assert detect_lora(header, {}) is None


def test_alpha_reasons_follow_what_the_file_holds():
    header = kohya(kohya_named(sd1_te(), "lora_te"))
    values = values_for(header, 4.0)
    info = detect_lora(header, {}, values)
    assert not any("no .alpha tensors" in r for r in info.reasons)
    first = next(k for k in values)
    zero = detect_lora(header, {}, {**values, first: 0.0})
    assert any("alpha of 0 means alpha = rank" in r for r in zero.reasons)
    fewer = dict(header)
    del fewer[first]
    partial = detect_lora(fewer, {}, {k: v for k, v in values.items() if k != first})
    assert any("1 adapted module has no .alpha tensor" in r for r in partial.reasons)


def test_text_encoder_only():
    header = kohya(kohya_named(sd1_te(), "lora_te"))
    check(detect_lora(header, {}, values_for(header, 1.0)), "kohya-lora", "sd1", ["clip_l"],
          [4], [1.0])
    header = kohya(kohya_named(sdxl_te(1), "lora_te1")) | kohya(kohya_named(sdxl_te(2),
                                                                              "lora_te2"))
    info = check(detect_lora(header, {}), "kohya-lora", None, ["clip_l", "clip_g"], [4], None)
    assert any("left open" in r for r in info.reasons)
    check(detect_lora(header, {"ss_base_model_version": "sdxl_base_v1-0"}), "kohya-lora",
          "sdxl", ["clip_l", "clip_g"], [4], None)


def test_structure_and_width_disagreeing_is_no_family():
    # SD1 block structure (attention in down_blocks.0) with SDXL's 2048-wide context.
    header = {k: ((4, 2048) if re.search(r"attn2_to_[kv]\.lora_down", k) else s)
              for k, s in kohya(kohya_named(sd1_unet(), "lora_unet")).items()}
    info = check(detect_lora(header, {}), "kohya-lora", None, ["diffusion_model"], [4], None)
    assert any("2048-wide" in r for r in info.reasons)


def test_unknown_architecture_is_still_a_lora():
    # A Wan-style DiT LoRA: adapter tensors on blocks ckptkit has no family for.
    header = kohya({f"lora_unet_blocks_{i}_self_attn_{p}": (5120, 5120)
                    for i in range(40) for p in "qkvo"})
    info = check(detect_lora(header, {"ss_base_model_version": "sdxl_base_v1-0"}),
                 "kohya-lora", None, ["diffusion_model"], [4], None)
    assert any("no family ckptkit knows" in r for r in info.reasons)
    assert any("not taken" in r for r in info.reasons)


# --------------------------------------------------------------------------- diffusers / PEFT


@functools.cache
def diffusers_conversions(family: str) -> tuple[Header, Header]:
    """(pre-PEFT diffusers header, PEFT header): diffusers' kohya converter and its PEFT
    conversion run on a rank-2 kohya header."""
    if family == "sd1":
        header = sd1_kohya(rank=2)
    else:
        unet = linear_weights(mecha("sdxl-kohya_but_diffusers")["diffuser"], "unet.",
                              UNET_ATTN_DIFFUSERS)
        header = (kohya(kohya_named(unet, "lora_unet"), 2)
                  | kohya(kohya_named(sdxl_te(1), "lora_te1"), 2)
                  | kohya(kohya_named(sdxl_te(2), "lora_te2"), 2))
    legacy, peft_dict, alphas = to_diffusers(real(header, torch.bfloat16))
    assert set(alphas.values()) == {2.0}
    return shapes_of(legacy), shapes_of(peft_dict)


def to_diffusers(state_dict):
    """diffusers' loading path for a kohya SD LoRA: lora_state_dict's converter, then
    load_lora_into_unet's convert_unet_state_dict_to_peft for the U-Net and
    convert_state_dict_to_peft for the text encoders."""
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )

    legacy, alphas = _convert_non_diffusers_lora_to_diffusers(state_dict)
    unet = {k: v for k, v in legacy.items() if k.startswith("unet.")}
    te = {k: v for k, v in legacy.items() if not k.startswith("unet.")}
    converted = convert_unet_state_dict_to_peft(unet)
    if te:
        converted |= convert_state_dict_to_peft(te)
    return legacy, converted, alphas


@pytest.mark.parametrize(("family", "components"), [
    ("sd1", ["diffusion_model", "clip_l"]), ("sdxl", ["diffusion_model", "clip_l", "clip_g"])])
def test_diffusers_converted_kohya(family, components):
    legacy, peft_header = diffusers_conversions(family)
    assert any(k.startswith("unet.") and k.endswith(".lora.down.weight") for k in legacy)
    assert any(k.endswith(".lora_linear_layer.down.weight") for k in legacy)
    check(detect_lora(legacy, {}), "diffusers-legacy", family, components, [2], None)
    assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in peft_header)
    info = check(detect_lora(peft_header, {}), "peft", family, components, [2], None)
    assert any("scale 1" in r for r in info.reasons)


def test_diffusers_old_attention_processor_names():
    """DIFFUSERS_OLD (state_dict_utils.py): unet ...attn1.processor.to_q_lora.down.weight."""
    header: Header = {}
    for path, (cout, cin) in linear_weights(
            mecha("sd1-kohya")["diffuser"], "unet.",
            r"transformer_blocks\.0\.attn[12]\.to_(q|k|v|out\.0)$").items():
        head, proj = path.rsplit(".to_", 1)
        proj = proj.split(".")[0]
        for part, shape in (("down", (4, cin)), ("up", (cout, 4))):
            header[f"unet.{head}.processor.to_{proj}_lora.{part}.weight"] = shape
    check(detect_lora(header, {}), "diffusers-legacy", "sd1", ["diffusion_model"], [4], None)


@pytest.mark.parametrize(("variant", "family"), [
    ("sd3-medium", "sd3"), ("sd3.5-medium", "sd3.5-medium"), ("sd3.5-large", "sd3.5-large")])
def test_peft_sd3_family(variant, family):
    # diffusers' SD3 DreamBooth-LoRA targets (attention projections), attn2 included.
    paths = linear_modules(sd3_model(variant), r"^transformer_blocks\.\d+\.attn2?\.")
    header = peft({f"transformer.{p}": s for p, s in paths.items()}, rank=8)
    config = {"transformer.r": 8, "transformer.lora_alpha": 8, "transformer.use_dora": False,
              "transformer.alpha_pattern": {}, "transformer.rank_pattern": {}}
    info = check(detect_lora(header, {"lora_adapter_metadata": json.dumps(config)}), "peft",
                 family, ["diffusion_model"], [8], [8.0])
    assert any("lora_adapter_metadata" in r for r in info.reasons)


def test_peft_flux_from_diffusers_model_with_text_encoder():
    paths = linear_modules(flux_model(), r"^(single_)?transformer_blocks\.")
    te = modules_of(clip_model(768, 12, 12), {"CLIPAttention", "CLIPMLP"})
    header = peft({f"transformer.{p}": s for p, s in paths.items()}, rank=16) | peft(
        {f"text_encoder.{p}": s for p, s in te.items()}, rank=16)
    info = check(detect_lora(header, {"software": json.dumps({"name": "ai-toolkit"})}), "peft",
                 "flux1", ["diffusion_model", "clip_l"], [16], None)
    assert any("ai-toolkit" in r for r in info.reasons)


def test_flux_guidance_embedder_is_noted_as_dev_only():
    header = kohya(kohya_named(flux()["unet"], "lora_unet")) | kohya(
        {"lora_unet_guidance_in_in_layer": (3072, 256), "lora_unet_img_in": (3072, 64)})
    info = check(detect_lora(header, {}), "kohya-lora", "flux1", ["diffusion_model"], [4], None)
    assert any("FLUX.1 dev has and schnell has not" in r for r in info.reasons)


def test_kohya_flux_converted_by_diffusers_is_peft_flux():
    from diffusers.loaders.lora_conversion_utils import _convert_kohya_flux_lora_to_diffusers

    header = kohya(kohya_named(flux()["unet"], "lora_unet"), rank=1)
    converted = shapes_of(_convert_kohya_flux_lora_to_diffusers(real(header, torch.bfloat16)))
    assert "transformer.single_transformer_blocks.0.proj_mlp.lora_A.weight" in converted
    check(detect_lora(converted, {}), "peft", "flux1", ["diffusion_model"], [1], None)


def test_peft_dora_magnitude_vector():
    header = kohya(kohya_named(sd1_unet(), "lora_unet"), rank=2, dora=True)
    legacy, peft_dict, _ = to_diffusers(real(header))
    legacy, converted = shapes_of(legacy), shapes_of(peft_dict)
    assert any("lora_magnitude_vector" in k for k in converted)
    info = check(detect_lora(legacy, {}), "diffusers-legacy", "sd1", ["diffusion_model"], [2],
                 None)
    assert info.dora
    info = check(detect_lora(converted, {}), "peft", "sd1", ["diffusion_model"], [2], None)
    assert info.dora


def test_diffusers_adapter_config_disagreeing_with_the_weights():
    paths = linear_modules(sd3_model("sd3.5-large"), r"^transformer_blocks\.0\.attn\.")
    header = peft({f"transformer.{p}": s for p, s in paths.items()}, rank=8)
    config = {"transformer.r": 16, "transformer.lora_alpha": 16, "transformer.use_dora": True,
              "transformer.use_rslora": True}
    info = check(detect_lora(header, {"lora_adapter_metadata": json.dumps(config)}), "peft",
                 "sd3.5-large", ["diffusion_model"], [8], [16.0])
    assert not info.dora
    assert any("says rank(s) [16], but the weights have [8]" in r for r in info.reasons)
    assert any("use_dora=True, but the tensors hold no" in r for r in info.reasons)
    assert any("rsLoRA" in r for r in info.reasons)
    info = check(detect_lora(header, {"lora_adapter_metadata": "{not json"}), "peft",
                 "sd3.5-large", ["diffusion_model"], [8], None)
    assert any("not valid JSON" in r for r in info.reasons)


def test_alphas_partly_read():
    header = kohya(kohya_named(sdxl_unet(), "lora_unet"), rank=8)
    alpha_keys = sorted(k for k in header if k.endswith(".alpha"))
    values = {k: (1.0 if i % 2 else 8.0) for i, k in enumerate(alpha_keys[:10])}
    info = check(detect_lora(header, {}, values), "kohya-lora", "sdxl", ["diffusion_model"],
                 [8], [1.0, 8.0])
    assert any(f"from 10 of {len(alpha_keys)} .alpha tensors" in r for r in info.reasons)


# --------------------------------------------------------------------------- FLUX specials


def test_xlabs_flux():
    from diffusers.loaders.lora_conversion_utils import _convert_xlabs_flux_lora_to_diffusers

    header = xlabs_header()
    converted = _convert_xlabs_flux_lora_to_diffusers(real(header, torch.bfloat16))
    assert "transformer.transformer_blocks.0.attn.add_k_proj.lora_B.weight" in converted
    info = check(detect_lora(header, {}), "xlabs-flux", "flux1", ["diffusion_model"], [16],
                 None)
    assert info.modules == 19 * 4


def test_bfl_control_lora():
    from diffusers.loaders.lora_conversion_utils import (
        _convert_bfl_flux_control_lora_to_diffusers,
    )

    header = bfl_control_header()
    converted = _convert_bfl_flux_control_lora_to_diffusers(real(header, torch.bfloat16))
    assert tuple(converted["transformer.x_embedder.lora_A.weight"].shape) == (2, 128)
    info = check(detect_lora(header, {}), "bfl-control-lora", "flux1", ["diffusion_model"], [2],
                 None)
    assert any("128 input channels" in r for r in info.reasons)


def test_flux_shaped_names_of_another_width_are_not_flux1():
    # FLUX.2-style blocks (6144 wide, 3x SwiGLU MLP) reuse the BFL block names.
    header = kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * 6144, 6144),
                    "lora_unet_double_blocks_0_img_mlp_0": (2 * 3 * 6144, 6144)})
    info = check(detect_lora(header, {}), "kohya-lora", None, ["diffusion_model"], [4], None)
    assert any("6144 wide" in r for r in info.reasons)
    header = kohya({"lora_unet_double_blocks_0_img_attn_qkv": (3 * 3072, 3072),
                    "lora_unet_double_blocks_0_img_mlp_0": (2 * 3 * 3072, 3072)})
    info = check(detect_lora(header, {}), "kohya-lora", None, ["diffusion_model"], [4], None)
    assert any("18432 outputs" in r for r in info.reasons)


# --------------------------------------------------------------------------- not LoRAs


def test_full_models_and_components_are_not_loras():
    for config, component in (("sd1-ldm", "diffuser"), ("sd1-ldm", "vae"),
                              ("sdxl-sgm", "clip_g"), ("flux-flux", "diffuser")):
        assert detect_lora(mecha(config)[component], {}) is None, (config, component)
    everything = {k: s for comp in mecha("sdxl-sgm").values() for k, s in comp.items()}
    assert detect_lora(everything, {"ss_network_dim": "4"}) is None


def test_a_checkpoint_with_a_few_lora_keys_is_not_a_lora():
    checkpoint = dict(mecha("sd1-ldm")["diffuser"])
    checkpoint |= dict(list(sd1_kohya().items())[:30])
    assert detect_lora(checkpoint, {}) is None


def test_embeddings_controlnets_and_empty_files_are_not_loras():
    assert detect_lora({}, {}) is None
    assert detect_lora({"emb_params": (4, 768)}, {}) is None
    assert detect_lora({"clip_l": (2, 768), "clip_g": (2, 1280)}, {}) is None
    assert detect_lora({"string_to_param.*": (3, 768), "string_to_token.*": ()}, {}) is None
    assert detect_lora({"lora_unet_down.alpha": ()}, {}) is None  # alphas alone
    from diffusers import ControlNetModel

    with torch.device("meta"):
        controlnet = ControlNetModel(cross_attention_dim=768)
    assert detect_lora(shapes_of(controlnet.state_dict()), {}) is None


def test_half_a_lora_is_not_a_lora():
    header = {k: s for k, s in sd1_kohya().items() if not k.endswith(".lora_up.weight")}
    assert detect_lora(header, {}) is None


def test_bundled_embeddings_are_companions():
    header = sdxl_kohya() | {"bundle_emb.myword.clip_l": (2, 768),
                             "bundle_emb.myword.clip_g": (2, 1280)}
    info = check(detect_lora(header, {}), "kohya-lora", "sdxl",
                 ["diffusion_model", "clip_l", "clip_g"], [4], None)
    assert any("bundle_emb" in r for r in info.reasons)


def test_metadata_only_family_and_chroma():
    header = kohya({"lora_prior_unet_down_blocks_0_0_attention_to_q": (64, 64)})
    info = check(detect_lora(header, {"modelspec.architecture": "stable-diffusion-v1/lora"}),
                 "kohya-lora", "sd1", [], [4], None)
    assert any("the metadata does" in r for r in info.reasons)
    info = check(detect_lora(kohya(kohya_named(flux()["unet"], "lora_unet")),
                             {"ss_base_model_version": "chroma"}),
                 "kohya-lora", "flux1", ["diffusion_model"], [4], None)
    assert any("Chroma" in r for r in info.reasons)


# --------------------------------------------------------------------------- real files


def write_and_detect(tmp_path: Path, name: str, header: Header, metadata: dict[str, str],
                     alpha: float = 2.0) -> LoraInfo | None:
    """Writes the header as a real safetensors file (tiny tensors of the listed shapes) and
    runs detect_lora on what a user's reader sees: keys and shapes from safe_open, the 0-d
    .alpha tensors decoded, the metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {k: (torch.tensor(alpha, dtype=torch.float16) if k.endswith(".alpha")
                   else torch.zeros(s, dtype=torch.float16)) for k, s in header.items()}
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, str(path), metadata=metadata or None)
    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
        values = {k: f.get_tensor(k).item() for k in keys
                  if k.endswith(".alpha") and shapes[k] == ()}
        read_metadata = f.metadata() or {}
    assert shapes == header
    return detect_lora(shapes, read_metadata, values)


def first_blocks(paths: dict[str, Shape], pattern: str) -> dict[str, Shape]:
    return {p: s for p, s in paths.items() if re.search(pattern, p)}


def test_real_files(tmp_path):
    sdxl = first_blocks(kohya_named(sdxl_unet(), "lora_unet"), r"input_blocks_4_1_")
    sdxl_te1 = first_blocks(kohya_named(sdxl_te(1), "lora_te1"), r"layers_0_")
    sdxl_te2 = first_blocks(kohya_named(sdxl_te(2), "lora_te2"), r"layers_0_")
    kohya_meta = {"ss_network_module": "networks.lora", "ss_network_dim": "4",
                  "ss_network_alpha": "2", "ss_base_model_version": "sdxl_base_v1-0",
                  "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"}
    info = check(write_and_detect(tmp_path, "kohya",
                                  kohya(sdxl) | kohya(sdxl_te1) | kohya(sdxl_te2), kohya_meta),
                 "kohya-lora", "sdxl", ["diffusion_model", "clip_l", "clip_g"], [4], [2.0])
    assert any("ss_network_dim=4 agrees" in r for r in info.reasons)

    check(write_and_detect(tmp_path, "loha", loha(sdxl, 4), {}, alpha=1.0),
          "lycoris-loha", "sdxl", ["diffusion_model"], [4], [1.0])
    check(write_and_detect(tmp_path, "lokr", lokr(sdxl, 4), {}, alpha=1.0),
          "lycoris-lokr", "sdxl", ["diffusion_model"], [4], [1.0])
    check(write_and_detect(tmp_path, "ia3", ia3(sdxl), {"ss_base_model_version":
                                                         "sdxl_base_v1-0"}),
          "lycoris-ia3", "sdxl", ["diffusion_model"], [], None)
    check(write_and_detect(tmp_path, "full", full(sdxl), {}), "lycoris-full", "sdxl",
          ["diffusion_model"], [], None)

    sd35 = linear_modules(sd3_model("sd3.5-large"), r"^transformer_blocks\.[01]\.attn\.")
    config = {"transformer.r": 4, "transformer.lora_alpha": 2}
    check(write_and_detect(tmp_path, "peft", peft({f"transformer.{p}": s
                                                   for p, s in sd35.items()}),
                           {"lora_adapter_metadata": json.dumps(config)}),
          "peft", "sd3.5-large", ["diffusion_model"], [4], [2.0])

    flux_unet = first_blocks(flux()["unet"], r"^(double|single)_blocks\.0\.")
    check(write_and_detect(tmp_path, "kohya-flux", kohya(kohya_named(flux_unet, "lora_unet")),
                           {}), "kohya-lora", "flux1", ["diffusion_model"], [4], [2.0])
    xlabs = {k: s for k, s in xlabs_header(4).items() if k.startswith("double_blocks.0.")}
    check(write_and_detect(tmp_path, "xlabs", xlabs, {}), "xlabs-flux", "flux1",
          ["diffusion_model"], [4], None)
    control = {k: s for k, s in bfl_control_header(1).items()
               if re.match(r"(img_in|(double|single)_blocks\.0\.)", k)}
    check(write_and_detect(tmp_path, "control", control, {}), "bfl-control-lora", "flux1",
          ["diffusion_model"], [1], None)


# --------------------------------------------------------------------------- unreadable metadata

_DEEP = "[" * 3000 + "]" * 3000  # parses only by recursing deeper than Python allows


@pytest.mark.parametrize(("metadata", "said"), [
    ({"lora_adapter_metadata": _DEEP}, "lora_adapter_metadata is not valid JSON"),
    ({"lora_adapter_metadata": '{"unet.r": NaN, "unet.lora_alpha": 4}'}, "numbers (unet.r)"),
    ({"lora_adapter_metadata": '{"unet.r": 1e400}'}, "numbers (unet.r)"),
    ({"lora_adapter_metadata": '{"unet.r": ' + "9" * 400 + "}"}, "numbers (unet.r)"),
    ({"lora_adapter_metadata": '{"unet.rank_pattern": {"a": Infinity}}'},
     "numbers (unet.rank_pattern)"),
    ({"lora_adapter_metadata": '{"unet.lora_alpha": -Infinity}'}, "numbers (unet.lora_alpha)"),
    ({"ss_network_args": _DEEP, "ss_network_dim": "8"}, "ss_network_dim=8 agrees"),
    ({"ss_network_dim": "nan"}, "ss_network_dim=nan is not a finite number"),
    ({"ss_network_dim": "1e400"}, "ss_network_dim=1e400 is not a finite number"),
    ({"ss_network_dim": "8", "ss_network_args": '{"conv_dim": NaN}'}, "agrees"),
    ({"ss_network_alpha": "inf"}, "ss_network_alpha=inf is not a number"),
], ids=["deep-json", "nan-rank", "1e400-rank", "huge-int-rank", "inf-pattern", "-inf-alpha",
        "deep-args", "nan-dim", "1e400-dim", "nan-conv-dim", "inf-alpha"])
def test_unreadable_metadata_is_reported_not_raised(metadata, said):
    """Values that are no finite number (or JSON too deep to parse) are not used and said so;
    the weights still decide everything."""
    header = kohya(kohya_named(sd1_unet(), "lora_unet"), rank=8)
    alpha_keys = [k for k in header if k.endswith(".alpha")]
    values = {k: 8.0 for k in alpha_keys} if "ss_network_alpha" not in metadata else {}
    info = detect_lora(header, metadata, values)
    assert info is not None and (info.format, info.family, info.ranks) == (
        "kohya-lora", "sd1", [8])
    assert any(said in r for r in info.reasons), info.reasons
    if not metadata.get("ss_network_alpha"):
        assert info.alphas == [8.0]
    else:
        assert info.alphas is None


def test_non_finite_alpha_tensors_are_kept_once_and_reported():
    header = kohya(kohya_named(sd1_unet(), "lora_unet"), rank=4)
    alpha_keys = sorted(k for k in header if k.endswith(".alpha"))
    odd = [float("nan"), float("inf"), -float("inf"), float("nan")]
    values = {k: (odd[i] if i < len(odd) else 4.0) for i, k in enumerate(alpha_keys)}
    info = detect_lora(header, {"ss_network_alpha": "4"}, values)
    assert info is not None and info.alphas[0] == 4.0
    assert [repr(a) for a in info.alphas[1:]] == ["-inf", "inf", "nan"]
    assert any("4 .alpha tensors hold -inf or inf or nan" in r for r in info.reasons)
