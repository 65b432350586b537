"""The diffusers layout of the SD3/SD3.5 and FLUX.1 transformers and of T5-XXL
(``arch.diffusers_dit``) against sources we did not write.

- Configs: the official ``transformer/config.json`` / ``text_encoder_3`` / ``text_encoder_2``
  files, written out below without the keys that only record who wrote them: as vendored in
  lllyasviel/stable-diffusion-webui-forge ``backend/huggingface/`` (SD3.5 Large on its
  ``sd35`` branch; FLUX's T5 as first uploaded there, commit 2d30eeed, since forge later
  edited it). No copy of SD3.5 Medium's file was found: its values are those of diffusers'
  ``scripts/convert_sd3_to_diffusers.py`` for "sd3.5 2b" and Stability's model card (dual
  attention in the first 13 layers).
- Names and shapes: the diffusers / transformers classes built from our configs on the meta
  device; byte totals: the official ``*.safetensors.index.json`` files.
- Values: diffusers' own single-file converters, run on seeded tiny tensors, against our moves
  run by the engine (``plan_moves`` + ``write_safetensors``); and the round trip.
- Loading: a tiny diffusers folder written by us, through ``from_pretrained``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types

import pytest
import torch
from helpers import shapes
from safetensors.torch import load_file, save_file

from ckptkit.arch.diffusers_dit import diffusers_config, from_diffusers, to_diffusers
from ckptkit.arch.families import family
from ckptkit.arch.keys import KeyTable
from ckptkit.arch.keys import flux as F
from ckptkit.arch.keys.mmdit import MMDiTConfig
from ckptkit.arch.keys.t5 import T5Config
from ckptkit.engine.moves import plan_moves
from ckptkit.engine.writer import write_safetensors
from ckptkit.formats import open_checkpoint

DITS = ("sd3-medium", "sd3.5-medium", "sd3.5-large", "flux1-dev", "flux1-schnell")
MODELS = (*DITS, "t5xxl")  # the diffusion models of these families, and T5-XXL

_SD3 = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": 64, "in_channels": 16,
        "joint_attention_dim": 4096, "out_channels": 16, "patch_size": 2,
        "pooled_projection_dim": 2048, "sample_size": 128}
_FLUX = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": 128, "in_channels": 64,
         "joint_attention_dim": 4096, "num_attention_heads": 24, "num_layers": 19,
         "num_single_layers": 38, "patch_size": 1, "pooled_projection_dim": 768}
OFFICIAL = {
    "sd3-medium": {**_SD3, "caption_projection_dim": 1536, "num_attention_heads": 24,
                   "num_layers": 24, "pos_embed_max_size": 192},
    "sd3.5-medium": {**_SD3, "caption_projection_dim": 1536, "num_attention_heads": 24,
                     "num_layers": 24, "pos_embed_max_size": 384, "qk_norm": "rms_norm",
                     "dual_attention_layers": list(range(13))},
    "sd3.5-large": {**_SD3, "caption_projection_dim": 2432, "num_attention_heads": 38,
                    "num_layers": 38, "pos_embed_max_size": 192, "qk_norm": "rms_norm"},
    "flux1-dev": {**_FLUX, "guidance_embeds": True},
    "flux1-schnell": {**_FLUX, "guidance_embeds": False},
    # text_encoder_3 of SD3 Medium and text_encoder_2 of FLUX.1 dev: the same but for dtype.
    "t5xxl": {"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0, "d_ff": 10240,
              "d_kv": 64, "d_model": 4096, "decoder_start_token_id": 0,
              "dense_act_fn": "gelu_new", "dropout_rate": 0.1, "eos_token_id": 1,
              "feed_forward_proj": "gated-gelu", "initializer_factor": 1.0,
              "is_encoder_decoder": True, "is_gated_act": True, "layer_norm_epsilon": 1e-06,
              "model_type": "t5", "num_decoder_layers": 24, "num_heads": 64, "num_layers": 24,
              "output_past": True, "pad_token_id": 0, "relative_attention_max_distance": 128,
              "relative_attention_num_buckets": 32, "tie_word_embeddings": False,
              "use_cache": True, "vocab_size": 32128},
}
# metadata.total_size of the official 16-bit *.safetensors.index.json files.
INDEX_BYTES = {"flux1-dev": 23802816640, "flux1-schnell": 23782357120,
               "sd3.5-large": 16292561536, "t5xxl": 9524621312}


def _component(model: str):
    if model == "t5xxl":
        return family("sd3-medium").component("t5xxl")
    return family(model).component("diffusion_model")


def _config(model: str, tiny: bool):
    comp = _component(model)
    return comp.tiny if tiny else comp.full


def _table(model: str, tiny: bool) -> KeyTable:
    comp = _component(model)
    return comp.build(_config(model, tiny)) if tiny else comp.keys()


def _moved_shapes(moves, table: KeyTable) -> KeyTable:
    out = {}
    for move in moves:
        shape = table[move.sources[0]]
        if move.op == "rows":
            start, stop = move.row_range(shape[0])
            shape = (stop - start, *shape[1:])
        elif move.op == "concat":
            shape = (sum(table[s][0] for s in move.sources), *shape[1:])
        out[move.target] = shape
    return out


def _build_on_meta(config):
    """The diffusers / transformers model for ``config``, on the meta device."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
    from transformers import T5Config as HFT5Config
    from transformers import T5EncoderModel

    cfg = diffusers_config(config)
    with torch.device("meta"):
        if isinstance(config, T5Config):
            return T5EncoderModel(HFT5Config(**cfg))
        cls = SD3Transformer2DModel if isinstance(config, MMDiTConfig) else FluxTransformer2DModel
        return cls.from_config(cfg)


def _saved_shapes(model) -> KeyTable:
    """What ``save_pretrained`` writes: the state dict without tied copies."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return {k: v for k, v in shapes(model.state_dict()).items() if k not in tied}


@pytest.mark.parametrize("model", MODELS)
def test_full_configs_are_the_official_ones(model):
    assert diffusers_config(_config(model, tiny=False)) == OFFICIAL[model]


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("model", MODELS)
def test_names_and_shapes_are_those_of_the_diffusers_class(model, tiny):
    config, table = _config(model, tiny), _table(model, tiny)
    ours = _moved_shapes(to_diffusers(config, set(table)), table)
    assert ours == _saved_shapes(_build_on_meta(config))
    assert _moved_shapes(from_diffusers(config, set(ours)), ours) == table


@pytest.mark.parametrize("model", list(INDEX_BYTES))
def test_sizes_are_those_of_the_official_files(model):
    table = _table(model, tiny=False)
    ours = _moved_shapes(to_diffusers(_config(model, tiny=False), set(table)), table)
    assert 2 * sum(math.prod(s) for s in ours.values()) == INDEX_BYTES[model]


@pytest.mark.parametrize("config", [F.FLUX_FILL_DEV, F.FLUX_DEPTH_DEV], ids=["fill", "depth"])
def test_flux_fill_and_depth_are_those_of_the_diffusers_class(config):
    table = F.flux_keys(config)
    assert diffusers_config(config)["out_channels"] == 64
    ours = _moved_shapes(to_diffusers(config, set(table)), table)
    assert ours == _saved_shapes(_build_on_meta(config))


# ------------------------------------------------------------------------------ values


def _random(table: KeyTable, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(s, generator=gen).to(torch.bfloat16) for k, s in table.items()}


def _run(tmp_path, tensors: dict[str, torch.Tensor], moves, name: str
         ) -> dict[str, torch.Tensor]:
    """``moves`` on ``tensors`` as the engine runs them: file in, streamed file out."""
    source, target = tmp_path / f"{name}-in.safetensors", tmp_path / f"{name}.safetensors"
    save_file(tensors, str(source))
    with open_checkpoint(str(source)) as ck:
        write_safetensors(str(target), plan_moves(moves, ck), {})
    return load_file(str(target))


def _diffusers_converter(config):
    """diffusers' own converter for ``config``. The FLUX one has FLUX.1's width (3072) written
    in, so a tiny copy is made with the tiny width in its place (MLP ratio 4 holds already)."""
    from diffusers.loaders import single_file_utils as sfu

    if isinstance(config, MMDiTConfig):
        return sfu.convert_sd3_transformer_checkpoint_to_diffusers
    fn = sfu.convert_flux_transformer_checkpoint_to_diffusers
    consts = fn.__code__.co_consts
    assert consts.count(3072) == 1 and consts.count(4.0) == 1
    code = fn.__code__.replace(co_consts=tuple(
        config.hidden_size if c == 3072 else c for c in consts))
    return types.FunctionType(code, fn.__globals__, fn.__name__)


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


@pytest.mark.parametrize("model", DITS)
def test_values_are_those_of_diffusers_converters(tmp_path, model):
    config = _config(model, tiny=True)
    canonical = _random(_table(model, tiny=True))
    left = {"model.diffusion_model." + k: v for k, v in canonical.items()}
    reference = _diffusers_converter(config)(left)
    assert not left  # diffusers used every canonical tensor
    _same(_run(tmp_path, canonical, to_diffusers(config, set(canonical)), "diffusers"),
          reference)


@pytest.mark.parametrize("model", MODELS)
def test_round_trip_is_bit_identical(tmp_path, model):
    comp = _component(model)  # the tiny config as it is: the moves need no more
    canonical = _random(comp.keys(tiny=True), seed=1)
    there = _run(tmp_path, canonical, to_diffusers(comp.tiny, set(canonical)), "there")
    _same(_run(tmp_path, there, from_diffusers(comp.tiny, set(there)), "back"), canonical)


def test_t5_tied_embedding_is_left_out_and_put_back(tmp_path):
    config = dataclasses.replace(_config("t5xxl", tiny=True), embed_tokens=True)
    canonical = _random(_component("t5xxl").build(config))
    moves = to_diffusers(config, set(canonical))
    assert "encoder.embed_tokens.weight" not in {m.target for m in moves}
    there = _run(tmp_path, canonical, moves, "there")
    back = _run(tmp_path, there, from_diffusers(config, set(there)), "back")
    assert torch.equal(back["encoder.embed_tokens.weight"], canonical["shared.weight"])
    plain = dataclasses.replace(config, embed_tokens=False)  # a file that holds the copy
    assert "encoder.embed_tokens.weight" not in {
        m.target for m in from_diffusers(plain, set(canonical))}


def _folder(tmp_path, model: str, weights: str) -> dict[str, torch.Tensor]:
    """A tiny diffusers / transformers folder of ``model`` written by our moves."""
    config = _config(model, tiny=True)
    canonical = _random(_table(model, tiny=True))
    tensors = _run(tmp_path, canonical, to_diffusers(config, set(canonical)), "weights")
    (tmp_path / "model").mkdir()
    save_file(tensors, str(tmp_path / "model" / weights))
    (tmp_path / "model" / "config.json").write_text(json.dumps(diffusers_config(config)))
    return tensors


@pytest.mark.parametrize("model", ["sd3.5-medium", "sd3.5-large", "flux1-dev"])
def test_a_tiny_transformer_loads_with_from_pretrained(tmp_path, monkeypatch, model):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tensors = _folder(tmp_path, model, "diffusion_pytorch_model.safetensors")
    cls = SD3Transformer2DModel if model.startswith("sd3") else FluxTransformer2DModel
    loaded, info = cls.from_pretrained(str(tmp_path / "model"), output_loading_info=True,
                                       torch_dtype=torch.bfloat16)
    assert not any(info.values()), info
    # diffusers keeps pos_embed in float32: an exact widening of our bfloat16
    _same({k: v.to(tensors[k].dtype) for k, v in loaded.state_dict().items()}, tensors)


def test_a_tiny_t5_loads_with_from_pretrained(tmp_path, monkeypatch):
    from transformers import T5EncoderModel

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tensors = _folder(tmp_path, "t5xxl", "model.safetensors")
    loaded, info = T5EncoderModel.from_pretrained(str(tmp_path / "model"),
                                                  output_loading_info=True, dtype=torch.bfloat16)
    assert not any(info.values()), info
    state = loaded.state_dict()
    assert torch.equal(state["encoder.embed_tokens.weight"], tensors["shared.weight"])
    _same({k: state[k] for k in tensors}, tensors)


# ------------------------------------------------------------------------------ refusals


def test_refusals():
    tiny = _component("flux1-dev").tiny
    with pytest.raises(ValueError, match=r"MLP ratio is 2\.0"):
        diffusers_config(dataclasses.replace(tiny, mlp_ratio=2.0))
    with pytest.raises(KeyError, match="not a canonical key"):
        to_diffusers(tiny, {"img_in.weight", "model.diffusion_model.img_in.weight"})
    with pytest.raises(KeyError, match="not a diffusers key"):
        from_diffusers(tiny, {"img_in.weight"})
    with pytest.raises(KeyError, match=r"needs single_transformer_blocks\.0\.proj_mlp\.weight"):
        from_diffusers(tiny, {f"single_transformer_blocks.0.attn.to_{p}.weight" for p in "qkv"})
    with pytest.raises(TypeError, match="no diffusers layout"):
        to_diffusers(object(), set())
