"""A small training-style ``.ckpt`` for the README demo (``python -m ckptkit.samples.demo OUT``).

It is what a Lightning run of the original Stable Diffusion code leaves behind, shrunk: a
``state_dict`` with a few UNet, CLIP and VAE keys of SD 1.x (narrow widths), EMA copies, a
shared-storage view, and the training leftovers (global step, optimizer state, callbacks)
that ``ckpt inspect`` reports and ``ckpt convert`` drops.
"""

from __future__ import annotations

import sys


def build(seed: int = 0) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.float16)

    unet = "model.diffusion_model."
    clip = "cond_stage_model.transformer.text_model."
    state = {
        unet + "input_blocks.0.0.weight": rand(32, 4, 3, 3),
        unet + "input_blocks.0.0.bias": rand(32),
        unet + "time_embed.0.weight": rand(128, 32),
        unet + "middle_block.1.transformer_blocks.0.attn2.to_k.weight": rand(32, 64),
        unet + "out.2.weight": rand(4, 32, 3, 3),
        clip + "embeddings.token_embedding.weight": rand(1000, 64),
        clip + "embeddings.position_ids": torch.arange(77).unsqueeze(0),
        clip + "encoder.layers.0.self_attn.q_proj.weight": rand(64, 64),
        clip + "final_layer_norm.weight": rand(64),
        "first_stage_model.decoder.conv_in.weight": rand(64, 4, 3, 3),
        "first_stage_model.post_quant_conv.weight": rand(4, 4, 1, 1),
    }
    qkv = rand(96, 64)  # three projections stored as views of one storage
    for i, name in enumerate(("q", "k", "v")):
        state[f"{unet}middle_block.1.transformer_blocks.0.attn1.to_{name}.weight"] = \
            qkv[32 * i:32 * (i + 1)]
    # LDM's EMA names: model.diffusion_model.x.0.w -> model_ema.diffusion_modelx0w
    state.update({"model_ema." + "".join(k.split(".")[1:]): v.clone()
                  for k, v in state.items() if k.startswith(unet)})
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["model_ema.num_updates"] = torch.tensor(470000, dtype=torch.int32)
    exp_avg = {0: {"step": torch.tensor(470000.0), "exp_avg": rand(32, 4, 3, 3).float()}}
    return {
        "epoch": 6,
        "global_step": 470000,
        "pytorch-lightning_version": "1.4.2",
        "state_dict": state,
        "optimizer_states": [{"state": exp_avg,
                              "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.999),
                                                "params": [0]}]}],
        "lr_schedulers": [],
        "callbacks": {"ModelCheckpoint": {"best_model_score": None, "save_top_k": -1}},
    }


def main(argv: list[str] | None = None) -> int:
    import torch

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ckptkit.samples.demo OUT.ckpt", file=sys.stderr)
        return 2
    torch.save(build(), args[0])
    print(f"wrote {args[0]} (a small SD 1.x-style training checkpoint, made with torch.save)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
