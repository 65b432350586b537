"""``lora.targets.match``: where every module of a LoRA lands in a model of each layout.

The LoRAs are headers with the module names of sources we did not write (see
lora_headers.py): sd-mecha's kohya tables (SD1, SDXL, FLUX with their text encoders),
diffusers' model classes on the meta device (SD2 and refiner U-Nets, SD3/SD3.5 and FLUX.1
transformers: the PEFT / AI-toolkit names) and transformers' CLIP, and the XLabs and BFL
control layouts diffusers' converters accept. The models are full-size sparse samples that
``ckptkit.ops.sample`` writes in every layout (monolithic ``ldm``, kohya's, ComfyUI's and
diffusers' files): headers only, written in milliseconds. Where a module lands is checked
against the layout facts diffusers' converters state (FLUX's single-block ``linear1`` is q,
k, v and the MLP input, 3072 rows each and 12288; open_clip's ``in_proj`` is q, k, v).
"""

from __future__ import annotations

import functools

import pytest
from lora_headers import (
    REFINER_UNET,
    SD2_UNET,
    UNET_ATTN_DIFFUSERS,
    UNET_CONV_DIFFUSERS,
    bfl_control_header,
    clip_model,
    flux,
    flux_model,
    ia3,
    kohya,
    kohya_flux,
    kohya_named,
    linear_modules,
    linear_weights,
    mecha,
    modules_of,
    peft,
    sd1_kohya,
    sd1_unet,
    sd3_medium,
    sd3_model,
    sdxl_kohya,
    unet_model,
    xlabs_header,
)

from ckptkit.formats import open_checkpoint
from ckptkit.formats.checkpoint import LazyTensor
from ckptkit.lora.modules import modules_of as read_header
from ckptkit.lora.targets import Target, bias_key, match
from ckptkit.ops.sample import sample


@pytest.fixture(scope="module")
def models(module_tmp):
    """family, layout[, component] -> path of a full-size sparse sample."""
    folder = module_tmp("models")
    made: dict[tuple, str] = {}

    def get(family: str, layout: str, component: str | None = None) -> str:
        key = (family, layout, component)
        if key not in made:
            path = folder / f"{family}-{layout}-{component}.safetensors"
            sample(family, str(path), layout=layout, sparse=True,
                   components=[component] if component else None)
            made[key] = str(path)
        return made[key]

    return get


def matched(header, model_path, family=None):
    lora = read_header(header)
    with open_checkpoint(model_path) as model:
        return lora, match(lora.modules, model, family or lora.analysis.info.family)


def groups(matching) -> dict[str, int]:
    return {f"{u.reason}: {u.detail}": len(u.modules) for u in matching.unmatched}


@functools.cache
def sd2_header():
    unet = linear_modules(unet_model(tuple(SD2_UNET.items())), UNET_ATTN_DIFFUSERS)
    # SD 2.x conditions on OpenCLIP-H's penultimate layer: diffusers' text encoder has 23.
    te = modules_of(clip_model(1024, 23, 16), {"CLIPAttention", "CLIPMLP"})
    # kohya's names have transformers 4's text_model level (transformers 5 dropped it)
    te = {p if p.startswith("text_model.") else "text_model." + p: s for p, s in te.items()}
    return kohya(kohya_named(unet, "lora_unet")) | kohya(kohya_named(te, "lora_te"))


def sd3_kohya():
    sd3 = sd3_medium()
    return functools.reduce(lambda a, b: a | b, (
        kohya(kohya_named(sd3[part], f"lora_{part}")) for part in ("unet", "te1", "te2", "te3")))


def sd1_locon():
    """kohya's LoCon: the U-Net's resnets and resamplers too, 3x3 convolutions included."""
    return kohya(kohya_named(sd1_unet() | linear_weights(mecha("sd1-kohya")["diffuser"], "unet.",
                                                         UNET_CONV_DIFFUSERS), "lora_unet"),
                 conv_rank=2)


def peft_transformer(model, select: str = r".") -> dict:
    return peft({f"transformer.{p}": s for p, s in linear_modules(model, select).items()})


# (LoRA, family, layouts with every component, layouts of the diffusion model alone)
CASES = {
    "sd1-kohya": (sd1_kohya, "sd1", ("ldm", "kohya"), ("comfyui", "diffusers")),
    "sd1-locon": (sd1_locon, "sd1", ("ldm",), ("diffusers",)),
    "sdxl-kohya": (sdxl_kohya, "sdxl", ("ldm", "kohya"), ("comfyui", "diffusers")),
    "sd2-kohya": (sd2_header, "sd2", ("ldm",), ("comfyui", "diffusers")),
    "refiner-peft": (lambda: peft({f"unet.{p}": s for p, s in linear_modules(
        unet_model(tuple(REFINER_UNET.items())), UNET_ATTN_DIFFUSERS).items()}),
        "sdxl-refiner", ("ldm",), ("comfyui", "diffusers")),
    "sd3-kohya": (sd3_kohya, "sd3-medium", ("ldm",), ("comfyui",)),
    "sd3-peft": (lambda: peft_transformer(sd3_model("sd3-medium")), "sd3-medium", ("ldm",),
                 ("comfyui", "diffusers")),
    "sd35m-peft": (lambda: peft_transformer(sd3_model("sd3.5-medium")), "sd3.5-medium",
                   (), ("comfyui", "diffusers")),
    "flux-kohya": (kohya_flux, "flux1-dev", ("ldm",), ("comfyui", "diffusers")),
    "flux-ai-toolkit": (lambda: peft_transformer(flux_model()), "flux1-dev", ("ldm",),
                        ("comfyui", "diffusers")),
    "flux-xlabs": (xlabs_header, "flux1-dev", (), ("comfyui", "diffusers")),
}


@pytest.mark.parametrize("case", CASES)
def test_every_module_lands_in_every_layout(case, models):
    build, family, whole, alone = CASES[case]
    header = build()
    for layout in whole:
        lora, m = matched(header, models(family, layout))
        assert m.unmatched == [], (layout, groups(m))
        assert len(m.targets) == len(lora.modules)
    for layout in alone:
        lora, m = matched(header, models(family, layout, "diffusion_model"))
        dm = [x.name for x in lora.modules if x.component == "diffusion_model"]
        assert sorted(m.targets) == sorted(dm), (layout, groups(m))
        assert all(u.reason == "missing-component" for u in m.unmatched), groups(m)


def test_flux_ai_toolkit_lora_on_a_comfyui_flux_file(models):
    """The issue's case: an AI-toolkit (diffusers-named) FLUX LoRA against a ComfyUI-layout
    FLUX file: every module lands, the single blocks' q, k, v and MLP-in modules in their
    rows of the fused linear1 (diffusers' converter: 3072, 3072, 3072, 12288)."""
    header = peft_transformer(flux_model())
    _, m = matched(header, models("flux1-dev", "comfyui", "diffusion_model"))
    assert m.unmatched == []
    block = "transformer.single_transformer_blocks.0"
    assert [m.targets[f"{block}.{n}"] for n in ("attn.to_q", "attn.to_k", "attn.to_v",
                                                 "proj_mlp")] == [
        (Target("single_blocks.0.linear1.weight", (0, 3072)),),
        (Target("single_blocks.0.linear1.weight", (3072, 6144)),),
        (Target("single_blocks.0.linear1.weight", (6144, 9216)),),
        (Target("single_blocks.0.linear1.weight", (9216, 21504)),)]
    # diffusers stores the final adaLN as (scale, shift), BFL as (shift, scale)
    assert m.targets["transformer.norm_out.linear"] == (
        Target("final_layer.adaLN_modulation.1.weight", (0, 3072), (3072, 6144)),
        Target("final_layer.adaLN_modulation.1.weight", (3072, 6144), (0, 3072)))


def test_fused_kohya_qkv_on_a_diffusers_flux_file(models):
    _, m = matched(kohya_flux(), models("flux1-dev", "diffusers", "diffusion_model"))
    assert m.targets["lora_unet_double_blocks_0_txt_attn_qkv"] == tuple(
        Target(f"transformer_blocks.0.attn.add_{p}_proj.weight", None, (i * 3072, (i + 1) * 3072))
        for i, p in enumerate("qkv"))
    assert m.targets["lora_unet_single_blocks_3_linear1"] == (
        *(Target(f"single_transformer_blocks.3.attn.to_{p}.weight", None,
                 (i * 3072, (i + 1) * 3072)) for i, p in enumerate("qkv")),
        Target("single_transformer_blocks.3.proj_mlp.weight", None, (9216, 21504)))


def test_xlabs_single_block_qkv_is_the_head_of_linear1(models):
    header = {"single_blocks.1.processor.qkv_lora.down.weight": (16, 3072),
              "single_blocks.1.processor.qkv_lora.up.weight": (3 * 3072, 16),
              "double_blocks.0.processor.proj_lora2.down.weight": (16, 3072),
              "double_blocks.0.processor.proj_lora2.up.weight": (3072, 16)}
    _, m = matched(header, models("flux1-dev", "comfyui", "diffusion_model"), "flux1")
    assert m.targets == {
        "single_blocks.1.processor.qkv_lora": (Target("single_blocks.1.linear1.weight",
                                                      (0, 9216)),),
        "double_blocks.0.processor.proj_lora2": (Target("double_blocks.0.txt_attn.proj.weight"),)}


def test_openclip_in_proj_rows_and_bias(models):
    """SD2's monolithic file keeps OpenCLIP-H's q, k, v stacked in in_proj_weight."""
    _, m = matched(sd2_header(), models("sd2", "ldm"))
    prefix = "cond_stage_model.model.transformer.resblocks.5.attn."
    assert m.targets["lora_te_text_model_encoder_layers_5_self_attn_v_proj"] == (
        Target(prefix + "in_proj_weight", (2048, 3072)),)
    assert bias_key(Target(prefix + "in_proj_weight", (2048, 3072))) == prefix + "in_proj_bias"
    assert bias_key(Target("a.b.weight")) == "a.b.bias"
    # transformers 5 names CLIP's layers without text_model.: read as if it were there
    bare = kohya({"lora_te_encoder_layers_5_self_attn_v_proj": (1024, 1024)})
    _, m = matched(bare | sd2_header(), models("sd2", "ldm"))
    assert m.targets["lora_te_encoder_layers_5_self_attn_v_proj"] == (
        Target(prefix + "in_proj_weight", (2048, 3072)),)
    assert bias_key(Target("double_blocks.0.img_attn.norm.query_norm.scale")) is None


def test_bfl_control_lora_on_flux_dev(models):
    """A Canny/Depth control LoRA widens img_in to 128 inputs: on FLUX.1 dev that one module
    does not fit (its shape), the rest land, the norm scales as weights replaced."""
    header = bfl_control_header()
    lora, m = matched(header, models("flux1-dev", "comfyui", "diffusion_model"))
    assert [(u.reason, u.modules) for u in m.unmatched] == [("shape", ["img_in"])]
    assert "128" in m.unmatched[0].example and "img_in.weight" in m.unmatched[0].example
    scale = "double_blocks.0.img_attn.norm.query_norm"
    assert m.targets[scale] == (Target(scale + ".scale"),)
    assert len(m.targets) == len(lora.modules) - 1


# --------------------------------------------------------------------------- refusals


def test_sdxl_lora_against_sd15_is_one_group(models):
    lora, m = matched(sdxl_kohya(), models("sd1", "ldm"))
    assert m.targets == {}
    assert [(u.reason, len(u.modules)) for u in m.unmatched] == [
        ("other-family", len(lora.modules))]
    assert m.unmatched[0].detail == "the LoRA is for sdxl; the model is sd1"


def test_text_encoders_a_diffusion_model_file_lacks(models):
    _, m = matched(kohya_flux(), models("flux1-dev", "comfyui", "diffusion_model"))
    assert groups(m) == {"missing-component: the model has no clip_l": 72,
                         "missing-component: the model has no t5xxl": 24 * 7}


def test_ia3_modules_are_not_supported(models):
    te = linear_weights(mecha("sd1-kohya")["clip_l"], "te.", r"mlp\.fc[12]$")
    header = sd1_kohya() | ia3(kohya_named(te, "lora_te_ia3"))
    lora, m = matched(header, models("sd1", "ldm"), "sd1")
    assert groups(m) == {"unsupported-adapter: ia3 modules are not supported (ComfyUI and "
                         "diffusers do not apply them either)": 24}
    assert len(m.targets) == len(lora.modules) - 24


def test_rank_and_width_mismatches_are_shape_groups(models):
    header = dict(sd1_kohya())
    q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    header[f"{q}.lora_up.weight"] = (320, 8)  # its down is rank 4
    k = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    header[f"{k}.lora_down.weight"] = (4, 1024)  # SD1's context is 768 wide
    _, m = matched(header, models("sd1", "ldm"), "sd1")
    by_module = {name: u for u in m.unmatched for name in u.modules}
    assert set(by_module) == {q, k}
    assert by_module[q].reason == by_module[k].reason == "shape"
    assert "rank mismatch" in by_module[q].example
    assert "[320, 768]" in by_module[k].example and "1024" in by_module[k].example


def test_a_lora_of_no_known_layer(models):
    header = kohya({"lora_unet_input_blocks_1_1_nonexistent_layer": (320, 320)}) | sd1_kohya()
    _, m = matched(header, models("sd1", "ldm"), "sd1")
    assert [(u.reason, u.modules) for u in m.unmatched] == [
        ("unknown-module", ["lora_unet_input_blocks_1_1_nonexistent_layer"])]


def test_matching_reads_no_tensor_data(models, monkeypatch):
    model = models("flux1-dev", "diffusers", "diffusion_model")

    def refuse(*args, **kwargs):
        raise AssertionError("tensor data was read")

    for name in ("read", "raw", "load", "read_rows", "scalar"):
        monkeypatch.setattr(LazyTensor, name, refuse)
    _, m = matched(kohya_flux(), model)
    assert len(m.targets) == 19 * 10 + 38 * 3
    assert flux()["unet"]  # the table the header came from
