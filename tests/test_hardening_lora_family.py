"""``ckpt lora convert`` of a LoRA whose module names fit several families: FLUX.1's and
SD3's transformers both have ``transformer_blocks.N.attn.to_q/to_k/to_v``, named apart by
kohya (FLUX.1 ``double_blocks_N_img_attn_qkv``, SD3 ``joint_blocks_N_x_block_attn_qkv``).
Where the shapes do not decide, the command refuses and asks for ``--family``."""

from __future__ import annotations

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file


def _attention_lora(path, width: int) -> str:
    """diffusers/PEFT names, only attention to_q/to_k/to_v of the first two blocks."""
    state = {}
    for block in range(2):
        for proj in ("to_q", "to_k", "to_v"):
            name = f"transformer.transformer_blocks.{block}.attn.{proj}"
            state[f"{name}.lora_A.weight"] = torch.randn(2, width).half()
            state[f"{name}.lora_B.weight"] = torch.randn(width, 2).half()
    save_file(state, str(path))
    return str(path)


def test_names_of_two_families_and_shapes_that_do_not_tell_are_refused(tmp_path, capsys):
    src = _attention_lora(tmp_path / "tiny.safetensors", 48)  # the tiny models' width
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli(capsys, "lora", "convert", src, "--to", "kohya", "-o", out)
    assert code == 2 and stdout == ""
    assert err.startswith(f"ckpt: error: {src}: ") and err.count("\n") == 1
    assert "sd3-medium" in err and "flux1-dev" in err and "give --family" in err
    assert not out.exists()
    kohya_names = {"flux1": "lora_unet_double_blocks_0_img_attn_qkv",
                   "sd3": "lora_unet_joint_blocks_0_x_block_attn_qkv"}
    for family, name in kohya_names.items():
        assert run_cli(capsys, "lora", "convert", src, "--to", "kohya", "-o", out,
                       "--family", family)[0] == 0
        assert f"{name}.lora_down.weight" in load_file(str(out))
        out.unlink()


def test_the_same_names_in_every_family_that_fits_need_no_choice(tmp_path, capsys):
    """To diffusers, both families keep the names the file has: nothing to choose."""
    src = _attention_lora(tmp_path / "tiny.safetensors", 48)
    out = tmp_path / "out.safetensors"
    assert run_cli(capsys, "lora", "convert", src, "--to", "diffusers", "-o", out)[0] == 0
    assert load_file(str(out)).keys() == load_file(src).keys()


@pytest.mark.parametrize(("width", "name"), [
    (3072, "lora_unet_double_blocks_0_img_attn_qkv"),  # FLUX.1
    (1536, "lora_unet_joint_blocks_0_x_block_attn_qkv"),  # SD3 (3.5) Medium
])
def test_the_width_decides(tmp_path, capsys, width, name):
    src = _attention_lora(tmp_path / "full.safetensors", width)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "lora", "convert", src, "--to", "kohya", "-o", out)
    assert code == 0, err
    assert f"{name}.lora_down.weight" in load_file(str(out))
