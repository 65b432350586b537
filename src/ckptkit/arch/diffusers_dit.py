"""The diffusers layout of the SD3/SD3.5 MMDiT and FLUX.1 transformers and of T5-XXL, as moves
to and from our canonical (BFL / SAI / ComfyUI) names, and the config.json of each.

Why: diffusers and transformers folders are what inference libraries load, and what many
fine-tunes are published as; a user pairs such a ``transformer/`` file with single-file parts,
or makes one from them. diffusers splits every fused ``qkv`` (and FLUX's single-block
``linear1``, which also holds the MLP input) into ``to_q``/``to_k``/``to_v``, renames every
module, and stores the (shift, scale) adaLN modulations of the final layer, and of SD3's last
context block, as (scale, shift). T5's names are the same in both; its files just leave out
the tied copy of the embedding.

Each model is described once, as links between one canonical tensor and the diffusers
tensor(s) holding the same numbers, derived from its config (depth, widths, q/k norms, MMDiT-X
blocks, the pre-only last context block, the guidance embedder); both directions read those
links, so that a round trip is exact by construction. The facts come from diffusers' single-file
converters (``convert_sd3_transformer_checkpoint_to_diffusers``, ``convert_flux_...``), its
model classes, and the configs in the official Hugging Face repositories.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .keys.flux import FluxConfig
from .keys.mmdit import MMDiTConfig
from .keys.t5 import T5Config, t5_keys
from .layouts import Move

# Names diffusers gives one attention stream of a joint (two-stream) block: image then text.
_IMAGE = ("to_q", "to_k", "to_v", "to_out.0", "norm_q", "norm_k", "ff", "norm1")
_TEXT = ("add_q_proj", "add_k_proj", "add_v_proj", "to_add_out", "norm_added_q",
         "norm_added_k", "ff_context", "norm1_context")
# The tied copy of T5's embedding: saved transformers files keep only shared.weight.
_T5_TIED = "encoder.embed_tokens.weight"
_FLUX_AXES = (16, 56, 56)  # diffusers' default axes_dims_rope, which the FLUX.1 configs omit
_SD3_SAMPLE_SIZE = 128  # latent side of a 1024 px image: every SD3 / SD3.5 config's sample_size


@dataclass(frozen=True)
class _Link:
    """One canonical tensor and the diffusers tensor(s) with its numbers: ``copy`` (the same
    tensor), ``split`` (row blocks of ``sizes``, in order), ``swap`` (row halves exchanged),
    ``tied`` (diffusers stores none: it is the ``diffusers[0]`` tensor again)."""

    canonical: str
    diffusers: tuple[str, ...]
    kind: str = "copy"
    sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class _Stream:
    """Canonical names of one attention stream: fused qkv, output projection, q/k norm
    weights, MLP in/out and modulation linears (``None`` where the stream has none)."""

    qkv: str
    proj: str | None
    norms: tuple[str, str] | None
    mlp: tuple[str, str] | None
    mod: str


def _linear(canonical: str, diffusers: str | tuple[str, ...], bias: bool = True,
            kind: str = "copy", sizes: tuple[int, ...] = ()) -> list[_Link]:
    names = (diffusers,) if isinstance(diffusers, str) else diffusers
    leaves = ("weight", "bias") if bias else ("weight",)
    return [_Link(f"{canonical}.{leaf}", tuple(f"{n}.{leaf}" for n in names), kind, sizes)
            for leaf in leaves]


def _mlp_embedder(canonical: str, first: str, second: str, diffusers: str) -> list[_Link]:
    return (_linear(f"{canonical}.{first}", f"{diffusers}.linear_1")
            + _linear(f"{canonical}.{second}", f"{diffusers}.linear_2"))


def _attention(s: _Stream, attn: str, names: tuple[str, ...], width: int, qkv_bias: bool
               ) -> list[_Link]:
    """The attention of stream ``s``: diffusers module ``attn``, its tensors named ``names``."""
    q, k, v, out, norm_q, norm_k = names[:6]
    links = _linear(s.qkv, tuple(f"{attn}.{n}" for n in (q, k, v)), qkv_bias, "split",
                    (width,) * 3)
    if s.norms:
        links += [_Link(s.norms[0], (f"{attn}.{norm_q}.weight",)),
                  _Link(s.norms[1], (f"{attn}.{norm_k}.weight",))]
    if s.proj:
        links += _linear(s.proj, f"{attn}.{out}")
    return links


def _joint_stream(s: _Stream, block: str, names: tuple[str, ...], width: int, qkv_bias: bool,
                  swap_mod: bool = False) -> list[_Link]:
    """One stream of a joint block (diffusers ``transformer_blocks.N``)."""
    ff, mod = names[6:]
    links = _attention(s, f"{block}.attn", names, width, qkv_bias)
    if s.mlp:
        links += (_linear(s.mlp[0], f"{block}.{ff}.net.0.proj")
                  + _linear(s.mlp[1], f"{block}.{ff}.net.2"))
    return links + _linear(s.mod, f"{block}.{mod}.linear", kind="swap" if swap_mod else "copy")


def _sd3_stream(p: str, cfg: MMDiTConfig, attn: str = "attn", pre_only: bool = False
                ) -> _Stream:
    norms = (f"{p}.{attn}.ln_q.weight", f"{p}.{attn}.ln_k.weight") if cfg.qk_norm else None
    return _Stream(f"{p}.{attn}.qkv", None if pre_only else f"{p}.{attn}.proj", norms,
                   None if pre_only else (f"{p}.mlp.fc1", f"{p}.mlp.fc2"),
                   f"{p}.adaLN_modulation.1")


def _sd3_block(i: int, cfg: MMDiTConfig) -> list[_Link]:
    p, d, h = f"joint_blocks.{i}", f"transformer_blocks.{i}", cfg.hidden_size
    # The last context block only feeds the joint attention; its modulation goes to an
    # AdaLayerNormContinuous, which diffusers splits (scale, shift).
    pre_only = cfg.pre_only_last and i == cfg.depth - 1
    links = _joint_stream(_sd3_stream(f"{p}.x_block", cfg), d, _IMAGE, h, cfg.qkv_bias)
    links += _joint_stream(_sd3_stream(f"{p}.context_block", cfg, pre_only=pre_only), d, _TEXT,
                           h, cfg.qkv_bias, swap_mod=pre_only)
    if i in cfg.x_block_attn2:  # MMDiT-X: a second image self-attention, diffusers' attn2
        links += _attention(_sd3_stream(f"{p}.x_block", cfg, attn="attn2"), f"{d}.attn2",
                            _IMAGE, h, cfg.qkv_bias)
    return links


def _mmdit_links(cfg: MMDiTConfig) -> list[_Link]:
    links = [_Link("pos_embed", ("pos_embed.pos_embed",)),
             *_linear("x_embedder.proj", "pos_embed.proj"),
             *_mlp_embedder("t_embedder.mlp", "0", "2", "time_text_embed.timestep_embedder"),
             *_mlp_embedder("y_embedder.mlp", "0", "2", "time_text_embed.text_embedder"),
             *_linear("context_embedder", "context_embedder")]
    for i in range(cfg.depth):
        links += _sd3_block(i, cfg)
    return links + _final_layer()


def _final_layer() -> list[_Link]:
    """SD3 and FLUX alike: the final adaLN is (shift, scale), diffusers' (scale, shift)."""
    return (_linear("final_layer.linear", "proj_out")
            + _linear("final_layer.adaLN_modulation.1", "norm_out.linear", kind="swap"))


def _flux_stream(p: str) -> _Stream:
    return _Stream(f"{p}_attn.qkv", f"{p}_attn.proj",
                   (f"{p}_attn.norm.query_norm.scale", f"{p}_attn.norm.key_norm.scale"),
                   (f"{p}_mlp.0", f"{p}_mlp.2"), f"{p}_mod.lin")


def _flux_single(i: int, cfg: FluxConfig) -> list[_Link]:
    """A single-stream block: linear1 holds q, k, v and the MLP input, linear2 the fused
    attention-output and MLP-output projection."""
    p, d, h = f"single_blocks.{i}", f"single_transformer_blocks.{i}", cfg.hidden_size
    targets = (f"{d}.attn.to_q", f"{d}.attn.to_k", f"{d}.attn.to_v", f"{d}.proj_mlp")
    return [*_linear(f"{p}.linear1", targets, cfg.qkv_bias, "split", (h, h, h, cfg.mlp_hidden)),
            *_linear(f"{p}.linear2", f"{d}.proj_out"),
            _Link(f"{p}.norm.query_norm.scale", (f"{d}.attn.norm_q.weight",)),
            _Link(f"{p}.norm.key_norm.scale", (f"{d}.attn.norm_k.weight",)),
            *_linear(f"{p}.modulation.lin", f"{d}.norm.linear")]


def _flux_links(cfg: FluxConfig) -> list[_Link]:
    embed = "time_text_embed"
    links = [*_linear("img_in", "x_embedder"),
             *_mlp_embedder("time_in", "in_layer", "out_layer", f"{embed}.timestep_embedder"),
             *_mlp_embedder("vector_in", "in_layer", "out_layer", f"{embed}.text_embedder")]
    if cfg.guidance_embed:
        links += _mlp_embedder("guidance_in", "in_layer", "out_layer",
                               f"{embed}.guidance_embedder")
    links += _linear("txt_in", "context_embedder")
    for i in range(cfg.depth):
        p, d = f"double_blocks.{i}", f"transformer_blocks.{i}"
        links += _joint_stream(_flux_stream(f"{p}.img"), d, _IMAGE, cfg.hidden_size,
                               cfg.qkv_bias)
        links += _joint_stream(_flux_stream(f"{p}.txt"), d, _TEXT, cfg.hidden_size,
                               cfg.qkv_bias)
    for i in range(cfg.depth_single):
        links += _flux_single(i, cfg)
    return links + _final_layer()


def _t5_links(cfg: T5Config) -> list[_Link]:
    links = [_Link(k, (k,)) for k in t5_keys(replace(cfg, embed_tokens=False))]
    if cfg.embed_tokens:
        links.append(_Link(_T5_TIED, ("shared.weight",), "tied"))
    return links


def _links(config: object) -> tuple[list[_Link], set[str]]:
    """The links of ``config``'s model and the names a file may also carry as a tied copy of
    another tensor (dropped by either conversion unless the target naming wants them)."""
    if isinstance(config, MMDiTConfig):
        return _mmdit_links(config), set()
    if isinstance(config, FluxConfig):
        return _flux_links(config), set()
    if isinstance(config, T5Config):
        return _t5_links(config), {_T5_TIED}
    raise TypeError(f"no diffusers layout for {type(config).__name__}")


def _refuse_unknown(present: set[str], known: set[str], naming: str) -> None:
    unknown = sorted(present - known)
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise KeyError(f"not a {naming} key of this model: {', '.join(unknown[:3])}{more}")


def to_diffusers(config: object, present: set[str]) -> list[Move]:
    """Moves from the canonical keys in ``present`` to the diffusers (or transformers) names
    of ``config``'s model."""
    links, tied = _links(config)
    _refuse_unknown(present, {link.canonical for link in links} | tied, "canonical")
    moves = []
    for link in links:
        if link.canonical not in present or link.kind == "tied":
            continue
        source = (link.canonical,)
        if link.kind == "split":
            moves += [Move(name, source, "rows", i, len(link.sizes), sizes=link.sizes)
                      for i, name in enumerate(link.diffusers)]
        else:
            moves.append(Move(link.diffusers[0], source,
                              "swap_halves" if link.kind == "swap" else "copy"))
    return moves


def from_diffusers(config: object, present: set[str]) -> list[Move]:
    """Moves from the diffusers (or transformers) keys in ``present`` to the canonical names
    of ``config``'s model."""
    links, tied = _links(config)
    _refuse_unknown(present, {n for link in links for n in link.diffusers} | tied, "diffusers")
    moves = []
    for link in links:
        found = [n for n in link.diffusers if n in present]
        if not found:
            continue
        if len(found) < len(link.diffusers):
            missing = sorted(set(link.diffusers) - set(found))
            raise KeyError(f"{link.canonical} needs {', '.join(missing)}, which are missing")
        op = {"split": "concat", "swap": "swap_halves"}.get(link.kind, "copy")
        moves.append(Move(link.canonical, link.diffusers, op))
    return moves


def _unsupported(config: object, why: str) -> ValueError:
    return ValueError(f"diffusers cannot build this {type(config).__name__}: {why}")


def _check_mlp_and_time(config: MMDiTConfig | FluxConfig) -> None:
    """What diffusers' SD3 and FLUX classes hard-code rather than read from their config."""
    if config.mlp_ratio != 4.0:
        raise _unsupported(config, f"its MLP ratio is {config.mlp_ratio}, diffusers' is 4")
    if config.time_embed_dim != 256:
        raise _unsupported(config, "its timestep features are not 256 wide")
    if not config.qkv_bias:
        raise _unsupported(config, "its qkv has no bias")


def _sd3_config(cfg: MMDiTConfig) -> dict:
    _check_mlp_and_time(cfg)
    if not cfg.pre_only_last:
        raise _unsupported(cfg, "its last context block is a full one")
    out = {"_class_name": "SD3Transformer2DModel", "attention_head_dim": cfg.head_dim,
           "caption_projection_dim": cfg.hidden_size, "in_channels": cfg.in_channels,
           "joint_attention_dim": cfg.context_dim, "num_attention_heads": cfg.num_heads,
           "num_layers": cfg.depth, "out_channels": cfg.out_channels,
           "patch_size": cfg.patch_size, "pooled_projection_dim": cfg.pooled_dim,
           "pos_embed_max_size": cfg.pos_embed_max_size,
           # a tiny positional table covers fewer latent pixels than the released 128
           "sample_size": min(_SD3_SAMPLE_SIZE, cfg.pos_embed_max_size * cfg.patch_size)}
    if cfg.qk_norm:
        out["qk_norm"] = "rms_norm"
    if cfg.x_block_attn2:
        out["dual_attention_layers"] = list(cfg.x_block_attn2)
    return out


def _flux_config(cfg: FluxConfig) -> dict:
    _check_mlp_and_time(cfg)
    if cfg.theta != 10_000:
        raise _unsupported(cfg, f"its rotary theta is {cfg.theta}, diffusers' is 10000")
    out = {"_class_name": "FluxTransformer2DModel", "attention_head_dim": cfg.head_dim,
           "guidance_embeds": cfg.guidance_embed, "in_channels": cfg.in_channels,
           "joint_attention_dim": cfg.context_in_dim, "num_attention_heads": cfg.num_heads,
           "num_layers": cfg.depth, "num_single_layers": cfg.depth_single, "patch_size": 1,
           "pooled_projection_dim": cfg.vec_in_dim}
    if cfg.out_channels != cfg.in_channels:  # Fill, Depth: diffusers defaults to in_channels
        out["out_channels"] = cfg.out_channels
    if tuple(cfg.axes_dim) != _FLUX_AXES:
        out["axes_dims_rope"] = list(cfg.axes_dim)
    return out


def _t5_config(cfg: T5Config) -> dict:
    return {"architectures": ["T5EncoderModel"], "classifier_dropout": 0.0,
            "d_ff": cfg.d_ff, "d_kv": cfg.d_kv, "d_model": cfg.d_model,
            "decoder_start_token_id": 0, "dense_act_fn": "gelu_new" if cfg.gated else "relu",
            "dropout_rate": 0.1, "eos_token_id": 1,
            "feed_forward_proj": "gated-gelu" if cfg.gated else "relu",
            "initializer_factor": 1.0, "is_encoder_decoder": True, "is_gated_act": cfg.gated,
            "layer_norm_epsilon": 1e-06, "model_type": "t5", "num_decoder_layers": cfg.layers,
            "num_heads": cfg.heads, "num_layers": cfg.layers, "output_past": True,
            "pad_token_id": 0, "relative_attention_max_distance": 128,
            "relative_attention_num_buckets": cfg.relative_attention_buckets,
            "tie_word_embeddings": False, "use_cache": True, "vocab_size": cfg.vocab}


def diffusers_config(config: object) -> dict:
    """The config.json of the diffusers (transformers for T5) class for ``config``: the
    official one for a released model, without the keys that only record who wrote the file
    (``_diffusers_version``, ``_name_or_path``, ``torch_dtype``, ``transformers_version``).
    Raises ValueError for a config the diffusers class cannot express."""
    if isinstance(config, MMDiTConfig):
        return _sd3_config(config)
    if isinstance(config, FluxConfig):
        return _flux_config(config)
    if isinstance(config, T5Config):
        return _t5_config(config)
    raise TypeError(f"no diffusers config for {type(config).__name__}")
