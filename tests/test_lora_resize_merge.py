"""``ckpt lora resize`` and ``ckpt lora merge`` through the CLI, on LoRAs written here with
safetensors' own ``save_file`` and read back with its ``load_file``: every result equals the
truncated full SVD (``torch.linalg.svd`` of the whole matrix, in fp64) of the product, or of
the weighted sum of products, within fp32 rounding; kohya's dynamic rules are written out
here from ``networks/resize_lora.py``'s definitions."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

# Four layers of SD 1.5's U-Net: diffusers name (kohya's SD 1.x names), canonical (ComfyUI)
# name, weight shape (the convolution narrowed to 32 inputs, for time). attn2.to_k's 768
# inputs say SD 1.x.
LAYERS = {
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k":
        ("input_blocks.1.1.transformer_blocks.0.attn2.to_k", (320, 768)),
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q":
        ("input_blocks.1.1.transformer_blocks.0.attn1.to_q", (320, 320)),
    "down_blocks.0.attentions.0.proj_in": ("input_blocks.1.1.proj_in", (320, 320, 1, 1)),
    "down_blocks.0.resnets.0.conv1": ("input_blocks.1.0.in_layers.2", (320, 32, 3, 3)),
}
LEAVES = {"kohya": (".lora_down.weight", ".lora_up.weight"),
          "comfyui": (".lora_down.weight", ".lora_up.weight"),
          "peft": (".lora_A.weight", ".lora_B.weight")}


def _name(fmt: str, layer: str) -> str:
    if fmt == "kohya":
        return "lora_unet_" + layer.replace(".", "_")
    if fmt == "comfyui":
        return "diffusion_model." + LAYERS[layer][0]
    return "unet." + layer


def write_lora(path, fmt: str, rank: int, alpha: float | None, seed: int,
               dtype=torch.float32, decay: bool = False) -> dict:
    """A LoRA of the four layers; returns layer -> (up, down, scale) as fp32 matrices.
    ``decay``: singular values spread over decades (for the dynamic rules)."""
    g = torch.Generator().manual_seed(seed)
    state, truth = {}, {}
    for index, (layer, (_, shape)) in enumerate(LAYERS.items()):
        cols = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        up = torch.randn(shape[0], rank, generator=g) * 0.1
        down = torch.randn(rank, cols, generator=g) * 0.1
        if decay:
            up = up * torch.logspace(0, -1 - index, rank)  # a spectrum of its own
        name = _name(fmt, layer)
        down_leaf, up_leaf = LEAVES[fmt]
        state[name + down_leaf] = down.reshape(rank, *shape[1:]).to(dtype)
        state[name + up_leaf] = (up.reshape(shape[0], rank, 1, 1) if len(shape) == 4
                                 else up).to(dtype)
        if alpha is not None:
            state[name + ".alpha"] = torch.tensor(alpha, dtype=dtype)
        scale = alpha / rank if alpha else 1.0
        truth[layer] = (up.to(dtype).float(), down.to(dtype).float(), scale)
    save_file(state, str(path), {"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})
    return truth


def _svd(matrix: torch.Tensor):
    return torch.linalg.svd(matrix.double(), full_matrices=False)


def _truncated(matrix: torch.Tensor, rank: int) -> torch.Tensor:
    u, s, vh = _svd(matrix)
    return (u[:, :rank] * s[:rank]) @ vh[:rank]


def _change(out: dict, name: str, leaves=LEAVES["kohya"]) -> torch.Tensor:
    """A module's change at strength 1 as kohya and ComfyUI apply it (alpha / rank)."""
    down, up = out[name + leaves[0]].double(), out[name + leaves[1]].double()
    rank = down.shape[0]
    alpha = out.get(name + ".alpha")
    scale = float(alpha) / rank if alpha is not None and float(alpha) != 0 else 1.0
    return (up.reshape(up.shape[0], rank) @ down.reshape(rank, -1)) * scale


def _same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal within fp32 rounding (a truncation's subspace moves by rounding / the gap
    between the singular values kept and dropped: 1e-4 of the largest entry)."""
    assert a.shape == b.shape
    error = float((a - b).abs().max()) / float(b.abs().max())
    assert error <= 1e-4, error


def test_resize_is_the_truncated_svd_of_the_product(tmp_path, capsys):
    src, out = tmp_path / "r16.safetensors", tmp_path / "r4.safetensors"
    truth = write_lora(src, "kohya", 16, 8.0, seed=1)
    code, text, err = run_cli(capsys, "lora", "resize", src, "-o", out, "--rank", "4")
    assert code == 0, err
    assert "4 modules from rank 16 to 4" in text
    got = load_file(str(out))
    assert set(got) == set(load_file(str(src)))  # the input's names, no more, no less
    for layer, (up, down, scale) in truth.items():
        name = _name("kohya", layer)
        full = up @ down * scale
        _same(_change(got, name), _truncated(full, 4))
        assert float(got[name + ".alpha"]) == pytest.approx(scale * 4)  # kohya's new alpha
        assert got[name + ".lora_down.weight"].shape[0] == 4
        ours = torch.linalg.svdvals(_change(got, name))[:4]
        ref = _svd(full)[1][:4]
        assert torch.allclose(ours, ref, rtol=1e-4, atol=0)
    conv = got[_name("kohya", "down_blocks.0.resnets.0.conv1") + ".lora_down.weight"]
    assert conv.shape == (4, 32, 3, 3)  # LoCon: the kernel stays in down
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ckptkit.operation"] == "lora resize"
    code, _, err = run_cli(capsys, "lora", "resize", src, "-o", out, "--rank", "4",
                           "--conv-rank", "2")
    assert code == 0, err
    got = load_file(str(out))
    assert got[_name("kohya", "down_blocks.0.resnets.0.conv1") + ".lora_down.weight"].shape[0] == 2
    assert got[_name("kohya", "down_blocks.0.attentions.0.proj_in") + ".lora_down.weight"
               ].shape[0] == 4  # a 1 x 1 convolution takes --rank


def test_resize_keeps_dtypes_and_folds_the_scale_where_there_is_no_alpha(tmp_path, capsys):
    src, out = tmp_path / "peft.safetensors", tmp_path / "small.safetensors"
    truth = write_lora(src, "peft", 8, None, seed=2, dtype=torch.float16)
    code, _, err = run_cli(capsys, "lora", "resize", src, "-o", out, "--rank", "3")
    assert code == 0, err
    got = load_file(str(out))
    assert all(t.dtype == torch.float16 for t in got.values())
    assert not any(k.endswith(".alpha") for k in got)
    for layer, (up, down, _) in truth.items():
        mine = _change({k: v.float() for k, v in got.items()}, _name("peft", layer),
                       LEAVES["peft"])
        ref = _truncated(up @ down, 3)
        assert float((mine - ref).abs().max()) <= 2e-3 * float(ref.abs().max())  # fp16


# kohya sd-scripts networks/resize_lora.py, written out: S largest first; sv_fro keeps the
# fewest values whose squares reach value^2 of the total; capped by --rank (new_rank).
def _kohya_fro(s: list[float], value: float, cap: int) -> int:
    total, running = sum(x * x for x in s), 0.0
    for i, x in enumerate(s):
        running += x * x
        if running / total >= value * value:
            return min(i + 1, cap)
    return min(len(s), cap)


def _kohya_ratio(s: list[float], value: float, cap: int) -> int:
    return max(1, min(sum(1 for x in s if x > s[0] / value), cap))


@pytest.mark.parametrize("rule,value,kohya", [("sv_fro", 0.95, _kohya_fro),
                                              ("sv_ratio", 20.0, _kohya_ratio)])
def test_resize_dynamic_picks_kohyas_rank(tmp_path, capsys, rule, value, kohya):
    src, out = tmp_path / "r16.safetensors", tmp_path / "dyn.safetensors"
    truth = write_lora(src, "kohya", 16, 16.0, seed=3, decay=True)
    code, _, err = run_cli(capsys, "lora", "resize", src, "-o", out, "--dynamic", rule,
                           "--value", str(value), "--rank", "12")
    assert code == 0, err
    got = load_file(str(out))
    ranks = set()
    for layer, (up, down, scale) in truth.items():
        name = _name("kohya", layer)
        full = up @ down * scale
        spectrum = _svd(full)[1].tolist()
        expected = kohya(spectrum, value, 12)
        assert got[name + ".lora_down.weight"].shape[0] == expected, layer
        _same(_change(got, name), _truncated(full, expected))
        ranks.add(expected)
    assert len(ranks) > 1 or rule == "sv_ratio"  # the rule does choose per module
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "Dynamic"


def test_resize_copies_other_adapters_and_says_so(tmp_path, capsys):
    src, out = tmp_path / "mixed.safetensors", tmp_path / "out.safetensors"
    write_lora(src, "kohya", 8, 4.0, seed=4)
    state = load_file(str(src))
    g = torch.Generator().manual_seed(5)
    loha = "lora_unet_down_blocks_0_attentions_0_proj_out"
    for role, shape in (("hada_w1_a", (320, 4)), ("hada_w1_b", (4, 320)),
                        ("hada_w2_a", (320, 4)), ("hada_w2_b", (4, 320))):
        state[f"{loha}.{role}"] = torch.randn(*shape, generator=g)
    state[f"{loha}.alpha"] = torch.tensor(4.0)
    save_file(state, str(src))
    code, text, err = run_cli(capsys, "lora", "resize", src, "-o", out, "--rank", "2")
    assert code == 0, err
    assert "1 module copied unchanged: LoHa" in text
    got = load_file(str(out))
    for key in state:
        if key.startswith(loha):
            assert torch.equal(got[key], state[key])


def test_resize_refusals(tmp_path, capsys):
    src = tmp_path / "a.safetensors"
    write_lora(src, "kohya", 8, 4.0, seed=6)
    out = tmp_path / "out.safetensors"
    for argv, words in ((("--dynamic", "sv_fro"), "needs --value"),
                        (("--dynamic", "sv_fro", "--value", "1.5"), "(0, 1]"),
                        (("--rank", "0"), "at least 1"),
                        ((), "needs --rank")):
        code, _, err = run_cli(capsys, "lora", "resize", src, "-o", out, *argv)
        assert code == 2 and words in err and err.count("\n") == 1, err
        assert not out.exists()
    code, _, err = run_cli(capsys, "lora", "resize", src, "-o", src, "--rank", "2")
    assert code == 5 and not list(tmp_path.glob("*.tmp*"))


@pytest.mark.parametrize("fmt_b", ["comfyui", "peft"])
def test_merge_concat_is_the_weighted_sum_across_key_formats(tmp_path, capsys, fmt_b):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    ta = write_lora(a, "kohya", 4, 2.0, seed=7)
    tb = write_lora(b, fmt_b, 6, 3.0 if fmt_b != "peft" else None, seed=8)
    code, text, err = run_cli(capsys, "lora", "merge", f"{a}:0.7", f"{b}:-0.4", "-o", out,
                              "--concat", "--json")
    assert code == 0, err
    report = json.loads(text)
    assert report["modules"] == 4 and report["shared"] == 4 and report["diffs"] == 0
    got = load_file(str(out))
    assert all(k.startswith("lora_unet_") for k in got)  # the first LoRA's names
    for layer in LAYERS:
        ua, da, sa = ta[layer]
        ub, db, sb = tb[layer]
        total = 0.7 * sa * ua @ da - 0.4 * sb * ub @ db
        name = _name("kohya", layer)
        assert got[name + ".lora_down.weight"].shape[0] == 10  # ranks side by side
        _same(_change(got, name), total.double())


def test_merge_to_a_rank_is_the_truncated_svd_of_the_sum(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    ta = write_lora(a, "comfyui", 8, 8.0, seed=9)
    tb = write_lora(b, "kohya", 8, 4.0, seed=10)
    code, text, err = run_cli(capsys, "lora", "merge", a, f"{b}:1.5", "-o", out, "--rank", "5")
    assert code == 0, err
    assert "4 modules (4 in more than one LoRA), rank 5" in text
    got = load_file(str(out))
    for layer in LAYERS:
        (ua, da, sa), (ub, db, sb) = ta[layer], tb[layer]
        total = sa * ua @ da + 1.5 * sb * ub @ db
        name = _name("comfyui", layer)
        _same(_change(got, name), _truncated(total, 5))
        assert torch.allclose(torch.linalg.svdvals(_change(got, name))[:5], _svd(total)[1][:5],
                              rtol=1e-4, atol=0)


def test_merge_writes_a_diff_above_half_the_layer(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    ta = write_lora(a, "kohya", 90, 90.0, seed=11)
    tb = write_lora(b, "kohya", 90, 45.0, seed=12)
    code, text, err = run_cli(capsys, "lora", "merge", a, b, "-o", out, "--concat")
    assert code == 0, err
    got = load_file(str(out))
    # 180 > 320 / 2: every layer's smaller side is 320
    q = _name("kohya", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    assert q + ".diff" in got and q + ".lora_down.weight" not in got
    (ua, da, sa), (ub, db, sb) = (t["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"]
                                  for t in (ta, tb))
    _same(got[q + ".diff"].double(), (sa * ua @ da + sb * ub @ db).double())
    conv = _name("kohya", "down_blocks.0.resnets.0.conv1")
    assert got[conv + ".diff"].shape == (320, 32, 3, 3)
    assert "4 modules written as a full .diff" in text
    code, _, err = run_cli(capsys, "lora", "merge", a, b, "-o", out, "--rank", "150")
    assert code == 0, err
    got = load_file(str(out))
    assert got[q + ".lora_down.weight"].shape[0] == 150 and q + ".diff" not in got


def test_merge_refusals(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_lora(a, "kohya", 4, 4.0, seed=13)
    state = {"lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_a": torch.ones(320, 2),
             "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w1_b": torch.ones(2, 320),
             "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w2_a": torch.ones(320, 2),
             "lora_unet_down_blocks_0_attentions_0_proj_out.hada_w2_b": torch.ones(2, 320)}
    save_file(state, str(b))
    code, _, err = run_cli(capsys, "lora", "merge", a, b, "-o", out, "--rank", "4")
    assert code == 2 and "LoHa" in err and err.count("\n") == 1, err
    code, _, err = run_cli(capsys, "lora", "merge", a, b, "-o", out)
    assert code == 2
    assert not out.exists()


def test_merge_names_a_layer_only_a_later_lora_has_in_the_first_ones_format(tmp_path, capsys):
    a, b, out = tmp_path / "a.safetensors", tmp_path / "b.safetensors", tmp_path / "m.safetensors"
    write_lora(a, "comfyui", 4, 4.0, seed=14)
    tb = write_lora(b, "kohya", 4, 2.0, seed=15)
    state = load_file(str(a))
    only_b = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    save_file({k: v for k, v in state.items() if LAYERS[only_b][0] not in k}, str(a))
    code, _, err = run_cli(capsys, "lora", "merge", a, b, "-o", out, "--concat")
    assert code == 0, err
    got = load_file(str(out))
    assert all(k.startswith("diffusion_model.") for k in got)  # ComfyUI's names throughout
    up, down, scale = tb[only_b]
    _same(_change(got, _name("comfyui", only_b)), (up @ down * scale).double())
