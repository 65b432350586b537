"""First use of the command line: one exit-code table for every command, the names users
type for components and families, and outputs that are written only where they may be."""

from __future__ import annotations

import corpus
import pytest

from ckptkit.cli.main import main
from ckptkit.ops import scan as scan_module


def _evil(path) -> None:
    corpus.torch_zip(str(path), b"\x80\x02" + corpus._call("posix", "system", corpus._u("true"))
                     + b".")


# One exit-code table: 2 usage, 3 unreadable input, 4 unsafe input, 5 output, 70 internal.

def test_unsafe_input_exits_4_in_scan_as_in_inspect_and_convert(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    _evil(evil)
    assert main(["scan", "--quiet", str(evil)]) == 4
    assert main(["inspect", str(evil)]) == 4
    assert main(["convert", str(evil), "-o", str(tmp_path / "out.safetensors")]) == 4
    capsys.readouterr()


def test_unreadable_input_exits_3_in_scan_as_in_inspect_and_convert(tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    missing = tmp_path / "typo.ckpt"
    for path in (cut, missing):
        assert main(["scan", "--quiet", str(path)]) == 3
        assert main(["inspect", str(path)]) == 3
        assert main(["convert", str(path), "-o", str(tmp_path / "out.safetensors")]) == 3
    capsys.readouterr()


def test_unsafe_outranks_unreadable_in_a_scan(tmp_path, capsys):
    _evil(tmp_path / "evil.ckpt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["scan", "--quiet", str(tmp_path)]) == 4
    capsys.readouterr()


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as done:
        main(["scan", "--no-such-option", "x"])
    assert done.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_a_bug_on_one_file_exits_70_in_a_scan(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"anything")

    def broken(path, verify_data):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(scan_module, "_scan", broken)
    assert main(["scan", "--quiet", str(tmp_path)]) == 70
    assert "ZeroDivisionError" in capsys.readouterr().out


# The demo's file is what the demo calls it.

def test_demo_training_checkpoint_is_identified_as_one(tmp_path, capsys):
    from ckptkit.ops.inspect import inspect_file
    from ckptkit.samples import demo

    path = tmp_path / "sd1-training.ckpt"
    assert demo.main([str(path)]) == 0
    assert "SD 1.x training checkpoint" in capsys.readouterr().out
    found = inspect_file(str(path))["identification"]
    assert (found["kind"], found["family"], found["missing"]) == ("checkpoint", "sd1", [])
    assert [c["name"] for c in found["components"]] == ["diffusion_model", "clip_l", "vae"]
    assert found["extra"] == {"ema weights (model_ema.*)": 688, "noise schedule buffers": 2}
