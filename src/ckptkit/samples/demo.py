"""A training-style ``.ckpt`` for the README demo (``python -m ckptkit.samples.demo OUT``).

It is what a Lightning run of the original Stable Diffusion code leaves behind, shrunk: a
``state_dict`` with SD 1.x's UNet, CLIP and VAE, EMA copies, the noise schedule, a
shared-storage view, and the training leftovers (global step, optimizer state, callbacks)
that ``ckpt inspect`` reports and ``ckpt convert`` drops. The demo's file is ``complete``:
every key of SD 1.x at narrow widths (a 50 MB file that ``inspect`` identifies as the SD 1.x
training checkpoint it is); the tests' default keeps a few keys of each component (a 100 KB
file, written by dozens of tests).
"""

from __future__ import annotations

import sys


def build(seed: int = 0, complete: bool = False) -> dict:
    import torch

    gen = torch.Generator().manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to(torch.float16)

    unet = "model.diffusion_model."
    clip = "cond_stage_model.transformer.text_model."
    state = _complete_state(rand) if complete else {
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
    attn1 = f"{unet}middle_block.1.transformer_blocks.0.attn1.to_"
    width = state[attn1 + "k.weight"].shape[0] if complete else 32
    qkv = rand(3 * width, state[attn1 + "k.weight"].shape[1] if complete else 64)
    for i, name in enumerate(("q", "k", "v")):  # three projections: views of one storage
        state[f"{attn1}{name}.weight"] = qkv[width * i:width * (i + 1)]
    # LDM's EMA names: model.diffusion_model.x.0.w -> model_ema.diffusion_modelx0w
    state.update({"model_ema." + "".join(k.split(".")[1:]): v.clone()
                  for k, v in state.items() if k.startswith(unet)})
    if complete:  # the noise schedule the original training code keeps beside the weights
        betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
        state["betas"] = betas.float()
        state["alphas_cumprod"] = torch.cumprod(1 - betas, 0).float()
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


def _complete_state(rand) -> dict:
    """Every key of SD 1.x's three components in the original layout, at the narrow widths
    of ``ckpt sample sd1 --tiny``."""
    import torch

    from ..arch.families import family
    from ..ops.sample import sample_table

    return {key: torch.arange(shape[-1]).expand(shape).clone() if key.endswith("position_ids")
            else rand(*shape) for key, shape in sample_table(family("sd1"), tiny=True).items()}


def main(argv: list[str] | None = None) -> int:
    import torch

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m ckptkit.samples.demo OUT.ckpt", file=sys.stderr)
        return 2
    torch.save(build(complete=True), args[0])
    print(f"wrote {args[0]}: an SD 1.x training checkpoint at narrow widths (UNet, CLIP, VAE, "
          "EMA copies, optimizer state), made with torch.save")
    return 0


if __name__ == "__main__":
    sys.exit(main())
