"""Per-block merge weights: every key of every family in a block, the block names and presets
against their sources, and the SD1/SDXL blocks against sd-mecha 1.1.8's own conversion from
supermerger blocks to full model keys (an independent implementation of the same rules)."""

from __future__ import annotations

import re

import pytest

from ckptkit.arch.families import DIFFUSION_MODEL, VAE, families, family
from ckptkit.errors import UsageError
from ckptkit.ops.merge_blocks import (
    MBW_BLOCKS,
    PRESETS,
    block_names,
    block_of,
    describe,
    parse_weights,
    weights_for_keys,
)

UNET_FAMILIES = ("sd1", "sd2", "sdxl", "sdxl-refiner")
DIT_FAMILIES = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "flux1-dev", "flux1-schnell")

# hako-mikan/sd-webui-supermerger scripts/mergers/mergers.py (0b1c491): BLOCKID, BLOCKIDXLL
# without its trailing "VAE" (a 20-value XL list stops at OUT08), BLOCKIDFLUX.
SUPERMERGER_SD = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07",
                  "IN08", "IN09", "IN10", "IN11", "M00", "OUT00", "OUT01", "OUT02", "OUT03",
                  "OUT04", "OUT05", "OUT06", "OUT07", "OUT08", "OUT09", "OUT10", "OUT11"]
SUPERMERGER_XL = ["BASE", "IN00", "IN01", "IN02", "IN03", "IN04", "IN05", "IN06", "IN07",
                  "IN08", "M00", "OUT00", "OUT01", "OUT02", "OUT03", "OUT04", "OUT05", "OUT06",
                  "OUT07", "OUT08"]
SUPERMERGER_FLUX = (["CLIP", "T5", "IN"] + [f"D{i:02}" for i in range(19)]
                    + [f"S{i:02}" for i in range(38)] + ["OUT"])


def _keys(fid: str, layout: str = "ldm") -> list[str]:
    return [k for c in family(fid).components for k in c.keys(layout=layout)]


def test_block_names_are_the_communitys():
    assert list(MBW_BLOCKS) == SUPERMERGER_SD
    for fid in ("sd1", "sd2", "sdxl-refiner"):
        assert block_names(fid) == SUPERMERGER_SD
    assert block_names("sdxl") == SUPERMERGER_XL
    for fid in ("flux1-dev", "flux1-schnell"):
        assert block_names(fid) == SUPERMERGER_FLUX
    joints = {"sd3-medium": 24, "sd3.5-medium": 24, "sd3.5-large": 38}
    for fid, depth in joints.items():
        assert block_names(fid) == ["CLIPL", "CLIPG", "T5", "IN",
                                    *(f"J{i:02}" for i in range(depth)), "OUT"]


@pytest.mark.parametrize("fid", list(families()))
def test_every_key_has_a_block_and_every_block_keys(fid):
    names = set(block_names(fid))
    found = {}
    for comp in family(fid).components:
        for key in comp.keys(layout="ldm"):
            block = block_of(fid, key)
            assert block in names or (block is None and comp.name == VAE
                                      and fid in DIT_FAMILIES), key
            found.setdefault(block, []).append(key)
    assert names <= set(found)


@pytest.mark.parametrize("fid", list(families()))
def test_comfyui_bare_diffusion_model_keys_match_monolithic(fid):
    comp = family(fid).component(DIFFUSION_MODEL)
    for key in comp.keys(layout="comfyui"):
        assert block_of(fid, key) == block_of(fid, comp.ldm_prefix + key), key


def test_kohya_sdxl_keys_match_monolithic():
    for comp in family("sdxl").components:
        ldm, kohya = comp.keys(layout="ldm"), comp.keys(layout="kohya")
        if comp.ldm_naming == "canonical":  # same names, other prefix
            assert [block_of("sdxl", k) for k in kohya] == [block_of("sdxl", k) for k in ldm]
        else:
            assert {block_of("sdxl", k) for k in kohya} == {"BASE"}
    assert block_of("sdxl", "unet.output_blocks.8.0.skip_connection.weight") == "OUT08"


def test_bare_keys_outside_the_diffusion_model():
    # A UNet family puts everything that is not UNet in BASE; FLUX/SD3 leave unknown keys.
    assert block_of("sd1", "decoder.conv_in.weight") == "BASE"
    assert block_of("sdxl", "model_ema.decay") == "BASE"
    assert block_of("flux1-dev", "decoder.conv_in.weight") is None


def test_base_covers_text_encoders_and_vae_in_sd():
    for fid in UNET_FAMILIES:
        for comp in family(fid).components:
            if comp.name != DIFFUSION_MODEL:
                assert {block_of(fid, k) for k in comp.keys(layout="ldm")} == {"BASE"}
    assert block_of("sd1", "model.diffusion_model.time_embed.0.weight") == "IN00"
    assert block_of("sdxl", "model.diffusion_model.label_emb.0.0.weight") == "IN00"
    assert block_of("sd1", "model.diffusion_model.out.2.weight") == "OUT11"
    assert block_of("sdxl", "model.diffusion_model.out.2.weight") == "OUT08"
    assert block_of("sdxl", "model.diffusion_model.input_blocks.4.1.proj_in.weight") == "IN04"


# supermerger's FLUX rules (blockfromkey), restated as substring tests on the full key.
def _supermerger_flux(key: str) -> str | None:
    if "vae" in key:
        return None
    if "t5xxl" in key:
        return "T5"
    if "text_encoders.clip" in key:
        return "CLIP"
    number = re.search(r"\.(\d+)\.", key)
    if "double_blocks" in key:
        return f"D{int(number.group(1)):02}"
    if "single_blocks" in key:
        return f"S{int(number.group(1)):02}"
    if "_in" in key:
        return "IN"
    return "OUT" if "final_layer" in key else None


@pytest.mark.parametrize("fid", ["flux1-dev", "flux1-schnell"])
def test_flux_blocks_follow_supermerger(fid):
    for key in _keys(fid):
        assert block_of(fid, key) == _supermerger_flux(key), key


def test_sd3_blocks():
    fid = "sd3.5-large"
    assert block_of(fid, "model.diffusion_model.joint_blocks.37.x_block.attn.qkv.weight") == "J37"
    assert block_of(fid, "model.diffusion_model.pos_embed") == "IN"
    assert block_of(fid, "model.diffusion_model.final_layer.linear.weight") == "OUT"
    assert block_of(fid, "text_encoders.clip_g.transformer.text_model.final_layer_norm.weight"
                    ) == "CLIPG"
    assert block_of(fid, "text_encoders.t5xxl.logit_scale") == "T5"
    assert block_of(fid, "first_stage_model.decoder.conv_in.weight") is None


# sd-mecha's answers -------------------------------------------------------------------------

def _mecha_blocks(fid: str) -> dict[str, str]:
    from sd_mecha.extensions import merge_methods, model_configs

    conversion, blocks, full = {
        "sd1": ("convert_sd1_blocks_to_ldm", "sd1-supermerger_blocks", "sd1-ldm"),
        "sdxl": ("convert_sdxl_blocks_to_sgm", "sdxl-supermerger_blocks", "sdxl-sgm"),
    }[fid]
    key_map = merge_methods.resolve(conversion).build_key_map(
        [model_configs.resolve(blocks)], {}, model_configs.resolve(full))
    return {k: key_map[k].clauses[0].by_param["blocks"][0] for k in _keys(fid)}


@pytest.mark.parametrize("fid", ["sd1", "sdxl"])
def test_blocks_match_sd_mecha_but_where_the_tools_differ(fid):
    """Equal for every key but two documented cases: sd-mecha puts time_embed/label_emb in
    BASE (Merge Block Weighted, meh and supermerger: IN00) and SDXL's VAE in its own VAE block
    (supermerger: BASE, which takes base alpha)."""
    theirs = _mecha_blocks(fid)
    differ = {k for k, b in theirs.items() if block_of(fid, k) != b}
    embeddings = {k for k in theirs if ".time_embed." in k or ".label_emb." in k}
    vae = {k for k in theirs if k.startswith("first_stage_model.")} if fid == "sdxl" else set()
    assert differ == embeddings | vae
    assert {theirs[k] for k in embeddings} == {"BASE"}
    assert {block_of(fid, k) for k in embeddings} == {"IN00"}
    assert {theirs[k] for k in vae} <= {"VAE"}
    bare = family(fid).component(DIFFUSION_MODEL)
    for key in bare.keys(layout="comfyui"):
        if key not in {k.removeprefix(bare.ldm_prefix) for k in embeddings}:
            assert block_of(fid, key) == theirs[bare.ldm_prefix + key], key


# Presets ------------------------------------------------------------------------------------

def test_presets_against_their_source():
    # Names and values read in supermerger scripts/mbwpresets_master.txt (0b1c491).
    assert len(PRESETS) == 38
    assert list(PRESETS)[:4] == ["GRAD_V", "GRAD_A", "FLAT_25", "FLAT_75"]
    assert list(PRESETS)[-2:] == ["ALL_A", "ALL_B"]
    assert all(len(values) == 26 for values in PRESETS.values())
    assert PRESETS["GRAD_V"][:3] == (0, 1, 0.9166666667) and PRESETS["GRAD_V"][13] == 0
    assert PRESETS["SMOOTHSTEP"][7] == 0.15625
    assert PRESETS["REVERSE-SMOOTHSTEP"][22] == 0.0429687499999996
    assert PRESETS["R_SMOOTHSTEP/4"][7] == 0.0
    assert PRESETS["COSINE"][2] == 0.995722430686905
    assert PRESETS["TRUE_CUBIC_HERMITE"][-2] == 0.842634789737655
    assert PRESETS["RING10_3"] == (0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0, 0, 0,
                                   1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0)
    assert set(PRESETS["ALL_B"]) == {1} and set(PRESETS["ALL_A"]) == {0}
    # Merge Block Weighted's presets are the same 25 values without BASE.
    assert all(values[0] == 0 for name, values in PRESETS.items() if name != "ALL_B")


def test_presets_on_sdxl_drop_the_blocks_sdxl_lacks():
    values = PRESETS["SMOOTHSTEP*2"]
    # supermerger's weighttoxl on the 25 after BASE: weight[:9] + weight[12:22].
    expected = [values[0], *values[1:][:9], *values[1:][12:22]]
    assert list(parse_weights("smoothstep*2", "sdxl").values()) == expected
    assert list(parse_weights("SMOOTHSTEP*2", "sd1").values()) == list(values)


# Parsing ------------------------------------------------------------------------------------

def test_one_number_and_full_lists():
    assert parse_weights("0.4", "sdxl") == dict.fromkeys(SUPERMERGER_XL, 0.4)
    numbers = [i / 100 for i in range(26)]
    spec = ",".join(map(str, numbers))
    assert parse_weights(spec, "sd1") == dict(zip(SUPERMERGER_SD, numbers, strict=True))
    assert parse_weights(" , ".join(map(str, numbers[1:])), "sd2") == dict(
        zip(SUPERMERGER_SD[1:], numbers[1:], strict=True))  # MBW's 25: BASE is the default
    assert parse_weights(",".join(map(str, numbers[:20])), "sdxl") == dict(
        zip(SUPERMERGER_XL, numbers[:20], strict=True))
    assert "BASE" not in parse_weights(",".join(["1"] * 19), "sdxl")
    xl = parse_weights(spec, "sdxl")  # an SD1 list: IN09-IN11, OUT09-OUT11 dropped
    assert list(xl) == SUPERMERGER_XL and xl["M00"] == numbers[13] and xl["OUT08"] == 0.22
    assert parse_weights(",".join(["0.5"] * 61), "flux1-dev") == dict.fromkeys(
        SUPERMERGER_FLUX, 0.5)


def test_items_globs_overrides_and_presets():
    got = parse_weights("IN00=0.3, M00=0.5, OUT*=1", "sd1")
    assert got == {"IN00": 0.3, "M00": 0.5, **dict.fromkeys(SUPERMERGER_SD[14:], 1.0)}
    got = parse_weights("*=0.2,d0?=0.7,D00=0,S1*=-0.5", "flux1-dev")
    assert got["CLIP"] == 0.2 and got["D00"] == 0 and got["D09"] == 0.7
    assert got["D10"] == 0.2 and got["S10"] == -0.5 and len(got) == 61
    got = parse_weights("GRAD_V,BASE=0.5,OUT11=0", "sd1")
    assert got["BASE"] == 0.5 and got["OUT11"] == 0 and got["IN01"] == 0.9166666667
    assert parse_weights("J3?=1", "sd3.5-large") == dict.fromkeys(
        [f"J{i}" for i in range(30, 38)], 1.0)


@pytest.mark.parametrize(("spec", "fid", "message"), [
    ("IN12=0.5", "sd1", "has no block 'IN12' (its blocks: BASE, IN00-IN11, M00, OUT00-OUT11)"),
    ("IN09=0.5", "sdxl", "has no block 'IN09'"),
    ("D19=1", "flux1-dev", "its blocks: CLIP, T5, IN, D00-D18, S00-S37, OUT"),
    ("IN00=abc", "sd1", "'abc' is not a number"),
    ("M00=nan", "sd1", "'nan' is not a number"),
    ("0.1,0.2,0.3", "sd1", "3 block weights given, but Stable Diffusion 1.x takes 26 "
                           "(BASE, IN00-IN11, M00, OUT00-OUT11) or 25 (IN00-IN11"),
    (",".join(["1"] * 26), "flux1-dev", "takes 61 (CLIP, T5, IN, D00-D18, S00-S37, OUT)"),
    (",".join(["1"] * 21), "sdxl", "or 19 (IN00-IN08, M00, OUT00-OUT08) or 26"),
    ("0.5,OUT*=1", "sd1", "write *=0.5 to set every block"),
    ("IN00=1,,M00=0", "sd1", "have an empty item"),
    ("", "sd1", "are empty"),
    ("GRAD_X", "sd1", "'GRAD_X' is neither NAME=value nor a preset (GRAD_V, GRAD_A"),
    ("GRAD_V", "flux1-dev", "preset GRAD_V is for SD 1.x/2.x and SDXL blocks; FLUX.1 [dev] has"),
])
def test_errors_name_the_bad_item(spec, fid, message):
    with pytest.raises(UsageError) as err:
        parse_weights(spec, fid)
    assert message in str(err.value)


# For the merge ------------------------------------------------------------------------------

def test_weights_for_keys():
    keys = _keys("flux1-dev")
    got = weights_for_keys("flux1-dev", keys, "T5=0,D*=0.8", 0.5)
    assert not any(k.startswith("vae.") for k in got)  # left alone: keep the first model's
    assert len(got) == len([k for k in keys if not k.startswith("vae.")])
    assert got["text_encoders.t5xxl.transformer.shared.weight"] == 0
    assert got["model.diffusion_model.double_blocks.3.img_mlp.0.weight"] == 0.8
    assert got["model.diffusion_model.single_blocks.3.linear1.weight"] == 0.5
    got = weights_for_keys("sd1", ["model.diffusion_model.middle_block.1.norm.weight",
                                   "first_stage_model.encoder.conv_in.weight"], "M00=1", 0.25)
    assert got == {"model.diffusion_model.middle_block.1.norm.weight": 1.0,
                   "first_stage_model.encoder.conv_in.weight": 0.25}


def test_describe():
    lines = describe("sd1")
    assert [line.block for line in lines] == SUPERMERGER_SD
    assert lines[0].prefixes == ("cond_stage_model.transformer", "first_stage_model")
    assert lines[1].prefixes == ("model.diffusion_model.time_embed",
                                 "model.diffusion_model.input_blocks.0")
    assert lines[-1].prefixes[-1] == "model.diffusion_model.out"
    assert sum(line.n_keys for line in lines) == len(_keys("sd1"))
    flux = describe("flux1-dev")
    assert flux[-1].block is None and flux[-1].prefixes == ("vae",)
    bare = describe("sdxl", ["input_blocks.1.0.in_layers.0.weight", "model_ema.decay"])
    assert bare == [("BASE", ("model_ema",), 1), ("IN01", ("input_blocks.1",), 1)]
