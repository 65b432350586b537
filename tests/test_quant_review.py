"""Review of ``ckpt quantize`` and the quantized readers as a user meets them: options that
would do nothing are refused, the metadata holds only what applies, bad files end in one line."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli

from ckptkit.ops.sample import sample

gguf = pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def flux_dm(module_tmp):
    path = module_tmp("quant_review") / "flux.safetensors"
    sample("flux1-dev", str(path), tiny=True, dtype="bf16", components=["diffusion_model"])
    return path


def test_fp8_option_with_a_gguf_type_is_refused_and_gguf_metadata_has_no_fp8_key(
        flux_dm, tmp_path, capsys):
    out = tmp_path / "q.gguf"
    code, _, err = run_cli(capsys, "quantize", flux_dm, "-o", out, "--type", "Q8_0",
                           "--fp8", "e5m2", "--quiet")
    assert code == 2 and "--fp8" in err and err.count("\n") == 1
    assert not out.exists()
    code, _, err = run_cli(capsys, "quantize", flux_dm, "-o", out, "--type", "Q8_0", "--quiet")
    assert code == 0, err
    fields = gguf.GGUFReader(str(out)).fields
    assert "ckptkit.type" in fields and "ckptkit.fp8" not in fields


def test_quantizing_a_quantized_file_says_the_errors_are_not_against_the_original(
        flux_dm, tmp_path, capsys):
    first = tmp_path / "q4.gguf"
    code, out, err = run_cli(capsys, "quantize", flux_dm, "-o", first, "--type", "Q4_0",
                             "--quiet")
    assert code == 0, err
    assert "already quantized" not in out
    again = tmp_path / "q8.gguf"
    code, out, err = run_cli(capsys, "quantize", first, "-o", again, "--type", "Q8_0",
                             "--quiet", "--json")
    assert code == 0, err
    notes = json.loads(out)["notes"]
    assert any("q4.gguf is already quantized (Q4_0)" in n for n in notes), notes


def test_a_source_tensor_that_is_not_finite_is_refused_naming_the_file(
        flux_dm, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    weights = load_file(flux_dm)
    key = next(k for k in weights if k.endswith("double_blocks.0.img_mlp.0.weight"))
    weights[key][0, 0] = float("nan")
    bad = tmp_path / "nan-model.safetensors"
    save_file(weights, bad)
    for qtype, name in (("Q8_0", "q.gguf"), ("fp8-scaled", "q.safetensors")):
        code, out, err = run_cli(capsys, "quantize", bad, "-o", tmp_path / name, "--type",
                                 qtype, "--quiet")
        assert code == 3 and not out
        assert err.startswith(f"ckpt: error: {bad}: tensor double_blocks.0.img_mlp.0.weight")
        assert err.count("\n") == 1 and not (tmp_path / name).exists()
