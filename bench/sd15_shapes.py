"""The keys and shapes of a Stable Diffusion 1.5 checkpoint in its original (LDM) layout.

Written out from the architecture (UNet channel multipliers 1,2,4,4 x 320 with attention on
the first three levels, CLIP ViT-L/14 text model, the KL-f8 VAE) for the benchmarks, which
need a full-size file of the real shape without downloading one. Totals: UNet 859.5 M,
CLIP 123.1 M, VAE 83.7 M parameters (the published sizes of SD 1.5).
"""

from __future__ import annotations

Shape = tuple[int, ...]


def _resblock(p: str, cin: int, cout: int, emb: int | None) -> dict[str, Shape]:
    out = {}
    if emb is None:  # VAE ResnetBlock
        out.update({f"{p}norm1.weight": (cin,), f"{p}norm1.bias": (cin,),
                    f"{p}conv1.weight": (cout, cin, 3, 3), f"{p}conv1.bias": (cout,),
                    f"{p}norm2.weight": (cout,), f"{p}norm2.bias": (cout,),
                    f"{p}conv2.weight": (cout, cout, 3, 3), f"{p}conv2.bias": (cout,)})
        if cin != cout:
            out.update({f"{p}nin_shortcut.weight": (cout, cin, 1, 1),
                        f"{p}nin_shortcut.bias": (cout,)})
        return out
    out.update({f"{p}in_layers.0.weight": (cin,), f"{p}in_layers.0.bias": (cin,),
                f"{p}in_layers.2.weight": (cout, cin, 3, 3), f"{p}in_layers.2.bias": (cout,),
                f"{p}emb_layers.1.weight": (cout, emb), f"{p}emb_layers.1.bias": (cout,),
                f"{p}out_layers.0.weight": (cout,), f"{p}out_layers.0.bias": (cout,),
                f"{p}out_layers.3.weight": (cout, cout, 3, 3), f"{p}out_layers.3.bias": (cout,)})
    if cin != cout:
        out.update({f"{p}skip_connection.weight": (cout, cin, 1, 1),
                    f"{p}skip_connection.bias": (cout,)})
    return out


def _transformer(p: str, ch: int, context: int = 768) -> dict[str, Shape]:
    t = f"{p}transformer_blocks.0."
    out = {f"{p}norm.weight": (ch,), f"{p}norm.bias": (ch,),
           f"{p}proj_in.weight": (ch, ch, 1, 1), f"{p}proj_in.bias": (ch,),
           f"{p}proj_out.weight": (ch, ch, 1, 1), f"{p}proj_out.bias": (ch,)}
    for attn, kv in (("attn1", ch), ("attn2", context)):
        out.update({f"{t}{attn}.to_q.weight": (ch, ch), f"{t}{attn}.to_k.weight": (ch, kv),
                    f"{t}{attn}.to_v.weight": (ch, kv), f"{t}{attn}.to_out.0.weight": (ch, ch),
                    f"{t}{attn}.to_out.0.bias": (ch,)})
    out.update({f"{t}ff.net.0.proj.weight": (ch * 8, ch), f"{t}ff.net.0.proj.bias": (ch * 8,),
                f"{t}ff.net.2.weight": (ch, ch * 4), f"{t}ff.net.2.bias": (ch,)})
    for n in (1, 2, 3):
        out.update({f"{t}norm{n}.weight": (ch,), f"{t}norm{n}.bias": (ch,)})
    return out


def unet(p: str = "model.diffusion_model.") -> dict[str, Shape]:
    emb, out = 1280, {}
    out.update({f"{p}time_embed.0.weight": (emb, 320), f"{p}time_embed.0.bias": (emb,),
                f"{p}time_embed.2.weight": (emb, emb), f"{p}time_embed.2.bias": (emb,),
                f"{p}input_blocks.0.0.weight": (320, 4, 3, 3),
                f"{p}input_blocks.0.0.bias": (320,)})
    skips, ch, block = [320], 320, 1
    for level, mult in enumerate((1, 2, 4, 4)):
        for _ in range(2):
            cout = 320 * mult
            out.update(_resblock(f"{p}input_blocks.{block}.0.", ch, cout, emb))
            if level < 3:
                out.update(_transformer(f"{p}input_blocks.{block}.1.", cout))
            ch = cout
            skips.append(ch)
            block += 1
        if level < 3:
            out.update({f"{p}input_blocks.{block}.0.op.weight": (ch, ch, 3, 3),
                        f"{p}input_blocks.{block}.0.op.bias": (ch,)})
            skips.append(ch)
            block += 1
    out.update(_resblock(f"{p}middle_block.0.", ch, ch, emb))
    out.update(_transformer(f"{p}middle_block.1.", ch))
    out.update(_resblock(f"{p}middle_block.2.", ch, ch, emb))
    block = 0
    for level, mult in reversed(list(enumerate((1, 2, 4, 4)))):
        for i in range(3):
            cout = 320 * mult
            b = f"{p}output_blocks.{block}."
            out.update(_resblock(f"{b}0.", ch + skips.pop(), cout, emb))
            ch = cout
            if level < 3:
                out.update(_transformer(f"{b}1.", ch))
            if level > 0 and i == 2:
                up = f"{b}{2 if level < 3 else 1}.conv."
                out.update({f"{up}weight": (ch, ch, 3, 3), f"{up}bias": (ch,)})
            block += 1
    out.update({f"{p}out.0.weight": (320,), f"{p}out.0.bias": (320,),
                f"{p}out.2.weight": (4, 320, 3, 3), f"{p}out.2.bias": (4,)})
    return out


def clip_l(p: str = "cond_stage_model.transformer.text_model.") -> dict[str, Shape]:
    out = {f"{p}embeddings.token_embedding.weight": (49408, 768),
           f"{p}embeddings.position_embedding.weight": (77, 768),
           f"{p}final_layer_norm.weight": (768,), f"{p}final_layer_norm.bias": (768,)}
    for i in range(12):
        layer = f"{p}encoder.layers.{i}."
        for proj in "kvq":
            out[f"{layer}self_attn.{proj}_proj.weight"] = (768, 768)
            out[f"{layer}self_attn.{proj}_proj.bias"] = (768,)
        out.update({f"{layer}self_attn.out_proj.weight": (768, 768),
                    f"{layer}self_attn.out_proj.bias": (768,),
                    f"{layer}layer_norm1.weight": (768,), f"{layer}layer_norm1.bias": (768,),
                    f"{layer}mlp.fc1.weight": (3072, 768), f"{layer}mlp.fc1.bias": (3072,),
                    f"{layer}mlp.fc2.weight": (768, 3072), f"{layer}mlp.fc2.bias": (768,),
                    f"{layer}layer_norm2.weight": (768,), f"{layer}layer_norm2.bias": (768,)})
    return out


def _vae_attention(p: str, ch: int) -> dict[str, Shape]:
    out = {f"{p}norm.weight": (ch,), f"{p}norm.bias": (ch,)}
    for name in ("q", "k", "v", "proj_out"):
        out.update({f"{p}{name}.weight": (ch, ch, 1, 1), f"{p}{name}.bias": (ch,)})
    return out


def vae(p: str = "first_stage_model.") -> dict[str, Shape]:
    mults = (1, 2, 4, 4)
    out = {f"{p}encoder.conv_in.weight": (128, 3, 3, 3), f"{p}encoder.conv_in.bias": (128,)}
    ch = 128
    for level, mult in enumerate(mults):
        for i in range(2):
            out.update(_resblock(f"{p}encoder.down.{level}.block.{i}.", ch, 128 * mult, None))
            ch = 128 * mult
        if level < 3:
            out.update({f"{p}encoder.down.{level}.downsample.conv.weight": (ch, ch, 3, 3),
                        f"{p}encoder.down.{level}.downsample.conv.bias": (ch,)})
    for side in ("encoder", "decoder"):
        if side == "decoder":
            out.update({f"{p}decoder.conv_in.weight": (512, 4, 3, 3),
                        f"{p}decoder.conv_in.bias": (512,)})
        out.update(_resblock(f"{p}{side}.mid.block_1.", 512, 512, None))
        out.update(_vae_attention(f"{p}{side}.mid.attn_1.", 512))
        out.update(_resblock(f"{p}{side}.mid.block_2.", 512, 512, None))
        if side == "encoder":
            out.update({f"{p}encoder.norm_out.weight": (512,), f"{p}encoder.norm_out.bias": (512,),
                        f"{p}encoder.conv_out.weight": (8, 512, 3, 3),
                        f"{p}encoder.conv_out.bias": (8,)})
    ch = 512
    for level in reversed(range(4)):
        for i in range(3):
            out.update(_resblock(f"{p}decoder.up.{level}.block.{i}.", ch, 128 * mults[level],
                                 None))
            ch = 128 * mults[level]
        if level > 0:
            out.update({f"{p}decoder.up.{level}.upsample.conv.weight": (ch, ch, 3, 3),
                        f"{p}decoder.up.{level}.upsample.conv.bias": (ch,)})
    out.update({f"{p}decoder.norm_out.weight": (128,), f"{p}decoder.norm_out.bias": (128,),
                f"{p}decoder.conv_out.weight": (3, 128, 3, 3), f"{p}decoder.conv_out.bias": (3,),
                f"{p}quant_conv.weight": (8, 8, 1, 1), f"{p}quant_conv.bias": (8,),
                f"{p}post_quant_conv.weight": (4, 4, 1, 1), f"{p}post_quant_conv.bias": (4,)})
    return out


def sd15() -> dict[str, Shape]:
    return {**unet(), **clip_l(), **vae()}
