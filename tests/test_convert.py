"""``convert`` and ``ckpt convert``: any checkpoint to safetensors, checked against torch.

Expected values always come from ``torch.load(weights_only=True)`` and ``tensor.to(dtype)``;
outputs are always read with the official ``safetensors`` library, never with ckptkit's reader.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.errors import UsageError
from ckptkit.ops.convert import convert
from ckptkit.samples import demo

CAST = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(got: torch.Tensor, expected: torch.Tensor, key: str = "") -> None:
    assert got.dtype == expected.dtype, key
    assert tuple(got.shape) == tuple(expected.shape), key
    assert torch.equal(_bits(got), _bits(expected)), key


def _state(legacy: bool = False) -> dict:
    """The demo checkpoint plus awkward tensors: views with offsets, strides and zero strides,
    special float values, every integer type and scalars. torch's own legacy loader cannot
    read float8 or uint16+ storages back, so the legacy variant leaves those out."""
    ckpt = demo.build()
    sd = ckpt["state_dict"]
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(6, 10, generator=gen)
    sd.update({
        "extra.transposed": base.t(),
        "extra.rows": base[2:4],                 # storage offset, contiguous
        "extra.stepped": base[1:, ::3],          # offset and strides
        "extra.column": base[:, 7],              # stride 10
        "extra.expanded": torch.randn(3, generator=gen).expand(4, 3),  # stride 0
        "extra.special": torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 1e-42]),
        "extra.f64": torch.randn(5, dtype=torch.float64, generator=gen),
        "extra.bf16": torch.randn(4, 4, generator=gen).bfloat16(),
        "extra.bf16_view": torch.randn(8, 8, generator=gen).bfloat16()[::2, 1::3],
        "extra.i8": torch.tensor([-128, 0, 127], dtype=torch.int8),
        "extra.i16": torch.tensor([-300, 7], dtype=torch.int16),
        "extra.u8": torch.arange(250, 256, dtype=torch.uint8),
        "extra.bool": torch.tensor([[True, False], [False, True]]),
        "extra.scalar": torch.tensor(3.25),
        "extra.empty": torch.zeros(0, 5),
    })
    if not legacy:
        sd["extra.f8e4m3"] = torch.randn(6, generator=gen).to(torch.float8_e4m3fn)
        sd["extra.f8e5m2"] = torch.randn(6, generator=gen).to(torch.float8_e5m2)
        sd["extra.u16"] = torch.tensor([1, 65535], dtype=torch.uint16)
    return ckpt


@pytest.fixture(params=["zip", "legacy"])
def pickle_ckpt(request, tmp_path: Path) -> Path:
    legacy = request.param == "legacy"
    path = tmp_path / f"model-{request.param}.ckpt"
    torch.save(_state(legacy), path, _use_new_zipfile_serialization=not legacy)
    return path


def _reference(path: Path) -> dict[str, torch.Tensor]:
    loaded = torch.load(path, weights_only=True)
    return {k: v for k, v in loaded["state_dict"].items() if isinstance(v, torch.Tensor)}


def test_pickle_converts_bit_identical_to_torch_load(pickle_ckpt: Path, tmp_path: Path):
    out = tmp_path / "out.safetensors"
    report = convert(str(pickle_ckpt), str(out))
    expected = _reference(pickle_ckpt)
    got = load_file(str(out))
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert_same(got[key], tensor, key)
    assert report.tensors == len(expected)
    assert report.bytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert report.source_format == ("torch-legacy" if "legacy" in pickle_ckpt.name
                                    else "torch-zip")
    assert report.cast == 0
    with safe_open(str(out), framework="pt") as f:  # the pickle's scalars, kept by default
        assert f.metadata() == {"format": "pt", "epoch": "6", "global_step": "470000",
                                "pytorch-lightning_version": "1.4.2"}


def test_cli_convert_pickle_bit_identical(pickle_ckpt: Path, tmp_path: Path, capsys,
                                          file_sha256):
    before = file_sha256(pickle_ckpt)
    out = tmp_path / "cli.safetensors"
    code, stdout, err = run_cli(capsys, "convert", pickle_ckpt, "-o", out)
    assert code == 0, err
    assert err == ""
    expected = _reference(pickle_ckpt)
    assert stdout.startswith(f"wrote {out}: {len(expected):,} tensors")
    got = load_file(str(out))
    assert sorted(got) == sorted(expected)
    for key, tensor in expected.items():
        assert_same(got[key], tensor, key)
    assert file_sha256(pickle_ckpt) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([pickle_ckpt.name, out.name])


def test_views_of_shared_storages_are_separate_contiguous_tensors(pickle_ckpt: Path,
                                                                  tmp_path: Path):
    out = tmp_path / "views.safetensors"
    convert(str(pickle_ckpt), str(out))
    expected = _reference(pickle_ckpt)
    qkv = [f"model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_{n}.weight"
           for n in "qkv"]
    # torch.load gives views of one storage; the output holds each as its own data
    assert len({expected[k].untyped_storage().data_ptr() for k in qkv}) == 1
    raw = out.read_bytes()
    size = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    spans = sorted(tuple(entry["data_offsets"]) for entry in header.values())
    position = 0
    for begin, end in spans:  # tiles the data section: no sharing, no gaps
        assert begin == position
        position = end
    assert 8 + size + position == len(raw)
    for key in [*qkv, "extra.transposed", "extra.stepped", "extra.column", "extra.expanded",
                "extra.rows", "extra.bf16_view"]:
        entry = header[key]
        t = expected[key]
        assert entry["data_offsets"][1] - entry["data_offsets"][0] == t.numel() * t.element_size()
    got = load_file(str(out))
    base = torch.cat([got[k] for k in qkv])
    for i, key in enumerate(qkv):
        assert torch.equal(got[key], base[32 * i:32 * (i + 1)])
        assert_same(got[key], expected[key].contiguous(), key)
    assert torch.equal(got["extra.transposed"], expected["extra.transposed"])
    assert torch.equal(got["extra.expanded"], expected["extra.expanded"])
    assert torch.equal(got["extra.expanded"][0], got["extra.expanded"][3])


@pytest.mark.parametrize("name", sorted(CAST))
def test_dtype_casts_floats_like_torch_and_keeps_ints(pickle_ckpt: Path, tmp_path: Path,
                                                      capsys, name: str):
    out = tmp_path / f"{name}.safetensors"
    code, stdout, err = run_cli(capsys, "convert", pickle_ckpt, "-o", out, "--dtype", name)
    assert code == 0, err
    expected = _reference(pickle_ckpt)
    got = load_file(str(out))
    assert sorted(got) == sorted(expected)
    casts = 0
    for key, tensor in expected.items():
        if tensor.dtype.is_floating_point:
            assert_same(got[key], tensor.to(CAST[name]), key)
            casts += tensor.dtype != CAST[name]
        else:
            assert_same(got[key], tensor, key)  # int64 position_ids, int32, uint8, bool...
    position_ids = "cond_stage_model.transformer.text_model.embeddings.position_ids"
    assert got[position_ids].dtype == torch.int64
    assert got[position_ids].tolist() == [list(range(77))]
    assert casts > 0
    assert f", {casts:,} cast to {name}" in stdout.splitlines()[0]


@pytest.mark.parametrize("name", sorted(CAST))
def test_dtype_cast_from_safetensors_with_float8_input(tmp_path: Path, capsys, name: str):
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a.f8e4m3": torch.randn(16, generator=gen).to(torch.float8_e4m3fn),
        "a.f8e5m2": torch.randn(16, generator=gen).to(torch.float8_e5m2),
        "a.f16": torch.randn(3, 3, generator=gen).half(),
        "a.f32": torch.randn(3, 3, generator=gen),
        "a.i32": torch.tensor([1, -2, 2**31 - 1], dtype=torch.int32),
        "a.u8": torch.tensor([0, 255], dtype=torch.uint8),
        "a.bool": torch.tensor([True, False]),
    }
    src = tmp_path / "in.safetensors"
    save_file(tensors, str(src))
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", name)
    assert code == 0, err
    got = load_file(str(out))
    for key, tensor in tensors.items():
        wanted = tensor.to(CAST[name]) if tensor.dtype.is_floating_point else tensor
        assert_same(got[key], wanted, key)


def _warning_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_values_out_of_fp16_range_warn_with_a_count(tmp_path: Path, capsys):
    src = tmp_path / "big.safetensors"
    values = torch.tensor([1e5, -7e4, 65504.0, float("inf"), 1.0, 70000.0])
    save_file({"a": values, "b": torch.ones(3), "i": torch.tensor([10**9])}, str(src))
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "fp16")
    assert code == 0
    (line,) = _warning_lines(err)
    assert "3 values in 1 tensor were" in line and "fp16" in line
    got = load_file(str(out))
    assert_same(got["a"], values.half())
    assert got["i"].tolist() == [10**9]


def test_no_overflow_warning_when_values_fit(tmp_path: Path, capsys):
    src = tmp_path / "ok.safetensors"
    save_file({"a": torch.tensor([65504.0, -1.0, float("inf")])}, str(src))
    code, _, err = run_cli(capsys, "convert", src, "-o", tmp_path / "o.safetensors",
                           "--dtype", "fp16")
    assert code == 0
    assert err == ""


def test_overflow_from_bf16_to_fp16_is_counted(tmp_path: Path, capsys):
    """bf16 holds values up to 3e38; fp16 only up to 65504: a bf16 -> fp16 cast overflows as
    easily as fp32 -> fp16 (FLUX and SD3 checkpoints ship in bf16)."""
    src = tmp_path / "bf16.safetensors"
    values = torch.tensor([1e10, -2e5, 1.0, 100.0]).bfloat16()
    save_file({"w": values}, str(src))
    out = tmp_path / "o.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "fp16")
    assert code == 0
    assert_same(load_file(str(out))["w"], values.half())
    assert torch.isinf(values.half()).sum() == 2
    lines = _warning_lines(err)
    assert len(lines) == 1 and "2 values in 1 tensor were" in lines[0], err


def test_overflow_count_reported_in_json(tmp_path: Path, capsys):
    src = tmp_path / "big.safetensors"
    save_file({"a": torch.tensor([1e6, 2e6, 3.0]), "b": torch.tensor([1e9])}, str(src))
    code, stdout, _ = run_cli(capsys, "convert", src, "-o", tmp_path / "o.safetensors",
                              "--dtype", "fp16", "--json")
    assert code == 0
    assert json.loads(stdout)["overflowed"] == {"a": 2, "b": 1}


@pytest.mark.parametrize("target", ["fp16", "bf16"])
def test_overflow_counted_in_the_one_slice_that_has_it(tmp_path: Path, capsys, target):
    """A tensor of three slices (``SLICE_ELEMENTS`` values each): values just inside and
    just beyond the target's range in the second, NaN in the third; the count is torch's
    (infinities the cast makes)."""
    from ckptkit.engine.slices import SLICE_ELEMENTS

    wide = torch.finfo(CAST[target]).max
    values = torch.randn(3 * SLICE_ELEMENTS // 64, 64, generator=torch.Generator().manual_seed(0))
    row = SLICE_ELEMENTS // 64 + 5  # the second slice
    values[row, :4] = torch.tensor([wide * 1.003, -wide * 1.5, wide * 1.0001, wide])
    values[-1, 0] = float("nan")  # the last slice: its extremes say nothing
    src = tmp_path / "w.safetensors"
    save_file({"w": values}, str(src))
    code, stdout, _ = run_cli(capsys, "convert", src, "-o", tmp_path / "o.safetensors",
                              "--dtype", target, "--json")
    assert code == 0
    expected = int(torch.isinf(values.to(CAST[target])).sum() - torch.isinf(values).sum())
    assert expected >= 1
    assert json.loads(stdout)["overflowed"] == {"w": expected}
    assert_same(load_file(str(tmp_path / "o.safetensors"))["w"], values.to(CAST[target]))


def _sub_byte_file(path: Path, dtype: str, nbytes: int) -> None:
    """A safetensors file with a packed sub-byte float tensor (4 values) and an F32 one,
    written by hand: the reader accepts these dtypes."""
    header = {"q": {"dtype": dtype, "shape": [4], "data_offsets": [0, nbytes]},
              "w": {"dtype": "F32", "shape": [1], "data_offsets": [nbytes, nbytes + 4]}}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    body = bytes(range(0x12, 0x12 + nbytes)) + struct.pack("<f", 1.5)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + body)


@pytest.mark.parametrize(("dtype", "nbytes"), [("F4", 2), ("F6_E2M3", 3), ("F6_E3M2", 3)])
def test_cast_of_a_file_with_sub_byte_floats_is_no_internal_error(tmp_path: Path, capsys,
                                                                   dtype: str, nbytes: int):
    """Without --dtype these files convert; with it, the result must be a clean conversion
    or a one-line error, never exit code 70 (which the README reserves for bugs)."""
    src = tmp_path / f"{dtype}.safetensors"
    _sub_byte_file(src, dtype, nbytes)
    code, _, err = run_cli(capsys, "convert", src, "-o", tmp_path / "plain.safetensors")
    assert code == 0, err
    raw = (tmp_path / "plain.safetensors").read_bytes()
    assert raw.endswith(bytes(range(0x12, 0x12 + nbytes)) + struct.pack("<f", 1.5))
    out = tmp_path / "cast.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, "--dtype", "fp16")
    assert code != 70 and "internal error" not in err, err
    if code == 0:
        with safe_open(str(out), framework="pt") as f:
            assert f.get_tensor("w").tolist() == [1.5]
    else:
        assert err.startswith("ckpt: error: ") and err.count("\n") == 1
        assert not out.exists()


def test_non_tensor_entries_are_dropped_and_listed(tmp_path: Path, capsys):
    ckpt = demo.build()
    ckpt["state_dict"]["not_a_tensor"] = 5
    src = tmp_path / "m.ckpt"
    torch.save(ckpt, src)
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out, "--drop-metadata")
    assert code == 0, err
    dropped = ["epoch", "global_step", "pytorch-lightning_version", "optimizer_states",
               "lr_schedulers", "callbacks"]
    (line, holding) = [ln for ln in stdout.splitlines() if "dropped" in ln]
    assert line.startswith("note: dropped 7 entries that are not weights: ")
    assert holding.startswith("note: 1 of the dropped entries holds ")
    assert holding.endswith(" tensors, not written: optimizer_states")
    listed = line.split(": ", 2)[2].split(", ")
    assert set(listed) == {*dropped, "state_dict.not_a_tensor"}
    tensors = {k for k, v in ckpt["state_dict"].items() if isinstance(v, torch.Tensor)}
    assert set(load_file(str(out))) == tensors

    code, stdout, _ = run_cli(capsys, "convert", src, "-o", tmp_path / "j.safetensors",
                              "--json")
    assert code == 0  # the scalars are kept as metadata by default, so not dropped
    assert set(json.loads(stdout)["dropped"]) == {"optimizer_states", "lr_schedulers",
                                                  "callbacks"}


@pytest.mark.parametrize("flag", [[], ["--keep-metadata"]])
def test_pickle_scalars_are_kept_unless_dropped(flag: list[str], demo_ckpt: Path,
                                                tmp_path: Path, capsys):
    out = tmp_path / "meta.safetensors"
    code, _, err = run_cli(capsys, "convert", demo_ckpt, "-o", out, *flag)
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        metadata = f.metadata()
    assert metadata == {"format": "pt", "epoch": "6", "global_step": "470000",
                        "pytorch-lightning_version": "1.4.2"}

    plain = tmp_path / "plain.safetensors"
    assert run_cli(capsys, "convert", demo_ckpt, "-o", plain, "--drop-metadata")[0] == 0
    with safe_open(str(plain), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


@pytest.mark.parametrize("flag", [[], ["--keep-metadata"]])
def test_safetensors_metadata_is_kept_unless_dropped(flag: list[str], tmp_path: Path, capsys):
    metadata = {"format": "pt", "modelspec.title": "Tïtle ✓", "ss_tag_frequency": '{"a": 1}',
                "ss_network_dim": "32"}
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.ones(2, 2)}, str(src), metadata=metadata)
    out = tmp_path / "out.safetensors"
    code, _, err = run_cli(capsys, "convert", src, "-o", out, *flag, "--dtype", "bf16")
    assert code == 0, err
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == metadata
    plain = tmp_path / "plain.safetensors"
    assert run_cli(capsys, "convert", src, "-o", plain, "--drop-metadata")[0] == 0
    with safe_open(str(plain), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_json_output_parses(demo_ckpt: Path, tmp_path: Path, capsys):
    out = tmp_path / "o.safetensors"
    code, stdout, err = run_cli(capsys, "convert", demo_ckpt, "-o", out, "--json",
                                "--dtype", "bf16")
    assert code == 0, err
    (line,) = stdout.splitlines()
    report = json.loads(line)
    expected = _reference(demo_ckpt)
    assert report["input"] == str(demo_ckpt)
    assert report["output"] == str(out)
    assert report["source_format"] == "torch-zip"
    assert report["tensors"] == len(expected)
    floats = [t for t in expected.values() if t.dtype.is_floating_point]
    assert report["cast"] == len(floats)
    assert report["bytes"] == sum(t.numel() * (2 if t.dtype.is_floating_point else
                                               t.element_size()) for t in expected.values())
    assert report["overflowed"] == {}
    assert "optimizer_states" in report["dropped"]
    assert report["notes"] == []


def test_ckpt_renamed_safetensors_converts_with_a_note(demo_ckpt: Path, tmp_path: Path,
                                                       capsys):
    renamed = tmp_path / "model.safetensors"
    shutil.copy(demo_ckpt, renamed)
    out = tmp_path / "real.safetensors"
    code, stdout, err = run_cli(capsys, "convert", renamed, "-o", out)
    assert code == 0, err
    notes = [ln for ln in stdout.splitlines() if ln.startswith("note:") and ".safetensors" in ln]
    assert len(notes) == 1 and "pickle" in notes[0].lower()
    expected = _reference(demo_ckpt)
    got = load_file(str(out))
    for key, tensor in expected.items():
        assert_same(got[key], tensor, key)
    code, stdout, _ = run_cli(capsys, "convert", renamed, "-o", tmp_path / "j.safetensors",
                              "--json")
    assert len(json.loads(stdout)["notes"]) == 1


class _System:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def _bad_input(kind: str, folder: Path, demo_file: Path) -> tuple[Path, int]:
    """A bad input file and the exit code the README documents for it."""
    if kind == "empty":
        path = folder / "empty.ckpt"
        path.write_bytes(b"")
        return path, 3
    if kind == "html":
        path = folder / "model.safetensors"
        path.write_text("<!DOCTYPE html>\n<html><head><title>404</title></head></html>\n")
        return path, 3
    if kind == "truncated-zip":
        path = folder / "trunc.ckpt"
        path.write_bytes(demo_file.read_bytes()[: demo_file.stat().st_size * 2 // 3])
        return path, 3
    if kind == "truncated-legacy":
        full = folder / "full.pt"
        torch.save({"w": torch.ones(1000)}, full, _use_new_zipfile_serialization=False)
        path = folder / "trunc.pt"
        path.write_bytes(full.read_bytes()[:-100])
        full.unlink()
        return path, 3
    if kind == "truncated-safetensors":
        full = folder / "full.safetensors"
        save_file({"w": torch.ones(1000)}, str(full))
        path = folder / "trunc.safetensors"
        path.write_bytes(full.read_bytes()[:-10])
        full.unlink()
        return path, 3
    if kind == "directory":
        path = folder / "dir.ckpt"
        path.mkdir()
        return path, 3
    if kind in ("os-system-zip", "os-system-legacy"):
        path = folder / f"{kind}.ckpt"
        marker = folder / "PWNED"
        payload = {"state_dict": {"w": torch.ones(2)}, "x": _System(f"touch {marker}")}
        torch.save(payload, path, _use_new_zipfile_serialization=kind.endswith("zip"))
        return path, 4
    raise AssertionError(kind)


BAD_INPUTS = ["empty", "html", "truncated-zip", "truncated-legacy", "truncated-safetensors",
              "directory", "os-system-zip", "os-system-legacy"]


@pytest.mark.parametrize("kind", BAD_INPUTS)
def test_bad_input_is_one_line_error_and_no_output(kind: str, tmp_path: Path, demo_ckpt: Path,
                                                   capsys, file_sha256):
    folder = tmp_path / "bad"
    folder.mkdir()
    path, exit_code = _bad_input(kind, folder, demo_ckpt)
    before = None if path.is_dir() else file_sha256(path)
    listing = sorted(p.name for p in folder.iterdir())
    out = folder / "out.safetensors"
    code, stdout, err = run_cli(capsys, "convert", path, "-o", out)
    assert code == exit_code
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("ckpt: error: ")
    assert str(path) in lines[0]
    assert "Traceback" not in err
    assert stdout == ""
    assert not out.exists()
    assert sorted(p.name for p in folder.iterdir()) == listing  # no output, no temp file
    if before is not None:
        assert file_sha256(path) == before
    assert not (folder / "PWNED").exists()


def test_missing_input_is_an_error(tmp_path: Path, capsys):
    code, _, err = run_cli(capsys, "convert", tmp_path / "nope.ckpt", "-o",
                           tmp_path / "o.safetensors")
    assert code == 3
    assert err.startswith("ckpt: error: ") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
def test_output_equal_to_input_is_refused(kind: str, tmp_path: Path, capsys, file_sha256):
    src = tmp_path / "in.safetensors"
    save_file({"w": torch.randn(4, 4)}, str(src), metadata={"format": "pt"})
    target = src
    if kind == "symlink":
        target = tmp_path / "link.safetensors"
        target.symlink_to(src)
    elif kind == "hardlink":
        target = tmp_path / "hard.safetensors"
        os.link(src, target)
    listing = sorted(p.name for p in tmp_path.iterdir())
    before = file_sha256(src)
    for extra in ([], ["--dtype", "fp16"]):
        code, _, err = run_cli(capsys, "convert", src, "-o", target, *extra)
        assert code == 5
        assert err.startswith("ckpt: error: ") and err.count("\n") == 1
        assert str(target) in err
        assert file_sha256(src) == before
        assert sorted(p.name for p in tmp_path.iterdir()) == listing


def test_pickle_output_equal_to_input_is_refused(demo_ckpt: Path, capsys, file_sha256):
    before = file_sha256(demo_ckpt)
    code, _, err = run_cli(capsys, "convert", demo_ckpt, "-o", demo_ckpt)
    assert code == 5
    assert err.startswith("ckpt: error: ") and "Traceback" not in err
    assert file_sha256(demo_ckpt) == before


def test_missing_output_folder_exit_code_5(demo_ckpt: Path, tmp_path: Path, capsys):
    code, _, err = run_cli(capsys, "convert", demo_ckpt, "-o", tmp_path / "no" / "o.safetensors")
    assert code == 5
    assert err.startswith("ckpt: error: ") and err.count("\n") == 1


def test_unknown_dtype_is_a_usage_error(demo_ckpt: Path, tmp_path: Path, capsys):
    code, _, err = run_cli(capsys, "convert", demo_ckpt, "-o", tmp_path / "o.safetensors",
                           "--dtype", "fp64")
    assert code == 2
    assert err.startswith("ckpt: error: ")
    with pytest.raises(UsageError):
        convert(str(demo_ckpt), str(tmp_path / "o.safetensors"), dtype="int8")
    assert not (tmp_path / "o.safetensors").exists()


def test_convert_memory_is_about_one_tensor(tmp_path: Path):
    """Python-side allocations while converting (and casting) stay near one tensor."""
    n, numel = 16, 1 << 18  # 16 float32 tensors of 1 MiB
    src = tmp_path / "big.ckpt"
    torch.save({"state_dict": {f"t{i}": torch.full((numel,), float(i)) for i in range(n)}}, src)
    for dtype in (None, "fp16"):
        out = tmp_path / f"out-{dtype}.safetensors"
        tracemalloc.start()
        try:
            convert(str(src), str(out), dtype=dtype)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak < 4 * numel * 4, (dtype, peak)
        got = load_file(str(out))
        assert all(torch.equal(got[f"t{i}"].float(), torch.full((numel,), float(i)))
                   for i in range(n))


def _console_script() -> str:
    beside = Path(sys.executable).with_name("ckpt")
    found = str(beside) if beside.exists() else shutil.which("ckpt")
    assert found, "the ckpt console script is not installed"
    return found


def test_installed_ckpt_console_script(demo_ckpt: Path, tmp_path: Path):
    out = tmp_path / "console.safetensors"
    done = subprocess.run([_console_script(), "convert", str(demo_ckpt), "-o", str(out),
                           "--quiet", "--dtype", "fp16"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"wrote {out}: ")
    expected = _reference(demo_ckpt)
    got = load_file(str(out))
    for key, tensor in expected.items():
        wanted = tensor.half() if tensor.dtype.is_floating_point else tensor
        assert_same(got[key], wanted, key)

    bad = tmp_path / "page.safetensors"
    bad.write_text("<html><body>Bad gateway</body></html>")
    done = subprocess.run([_console_script(), "convert", str(bad), "-o",
                           str(tmp_path / "x.safetensors")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and done.stderr.startswith(f"ckpt: error: {bad}")
    assert not (tmp_path / "x.safetensors").exists()


# --- weights under keys other than state_dict; files without tensors ----------------------


def _nested_cases(gen: torch.Generator) -> dict[str, tuple[dict, dict[str, torch.Tensor]]]:
    """name -> (object to save, the tensors the output must hold, by key)."""
    sd = {"conv.weight": torch.randn(3, 3, generator=gen), "conv.bias": torch.randn(3)}
    ema = {k: v + 1 for k, v in sd.items()}
    vectors = torch.randn(2, 8, generator=gen)
    return {
        "embedding": ({"string_to_token": {"*": 265}, "string_to_param": {"*": vectors},
                       "name": "style", "step": 500}, {"string_to_param.*": vectors}),
        "esrgan": ({"params": sd, "params_ema": ema}, ema),
        "net": ({"net": sd, "epoch": 1}, sd),
        "root-and-state_dict": ({"w": torch.ones(2), "state_dict": sd},
                                {"w": torch.ones(2),
                                 **{f"state_dict.{k}": v for k, v in sd.items()}}),
    }


@pytest.mark.parametrize("case", ["embedding", "esrgan", "net", "root-and-state_dict"])
def test_weights_nested_under_other_keys_are_converted(case: str, tmp_path: Path, capsys):
    obj, expected = _nested_cases(torch.Generator().manual_seed(3))[case]
    src = tmp_path / "in.pt"
    torch.save(obj, src)
    out = tmp_path / "out.safetensors"
    code, stdout, err = run_cli(capsys, "convert", src, "-o", out)
    assert code == 0, err
    got = load_file(str(out))
    assert list(got) == list(expected)
    for key, tensor in expected.items():
        assert_same(got[key], tensor, key)
    count = f"{len(expected)} tensor{'s' if len(expected) > 1 else ''}, "
    assert count in stdout.splitlines()[0]
    if case == "esrgan":  # the other copy of the weights is listed with its tensors
        assert "note: 1 of the dropped entries holds 2 tensors, not written: params" in stdout
        code, stdout, _ = run_cli(capsys, "convert", src, "-o", tmp_path / "j.safetensors",
                                  "--json")
        assert json.loads(stdout)["dropped_tensors"] == {"params": 2}
    else:
        assert "hold" not in stdout


@pytest.mark.parametrize("case", ["scalars", "list-of-tensors", "empty-state_dict", "tensor",
                                  "list", "safetensors"])
def test_file_without_tensors_is_refused_and_nothing_written(case: str, tmp_path: Path,
                                                             capsys):
    src = tmp_path / ("in.safetensors" if case == "safetensors" else "in.pt")
    if case == "safetensors":
        save_file({}, str(src))
    else:
        torch.save({"scalars": {"name": "x", "step": 3},
                    "list-of-tensors": {"hyper": [torch.ones(2)], "step": 3},
                    "empty-state_dict": {"state_dict": {}},
                    "tensor": torch.ones(2),
                    "list": [{"w": torch.ones(2)}]}[case], src)
    out = tmp_path / "out.safetensors"
    for json_flag in ([], ["--json"]):
        code, stdout, err = run_cli(capsys, "convert", src, "-o", out, *json_flag)
        assert code == 3, err
        assert err.startswith(f"ckpt: error: {src}: ") and err.count("\n") == 1, err
        assert "Pickled" not in err and "Summary" not in err
        assert not out.exists()
        assert sorted(p.name for p in tmp_path.iterdir()) == [src.name]
        if json_flag:
            report = json.loads(stdout)
            assert report["path"] == str(src) and report["exit_code"] == 3
            assert report["error"] in err
        else:
            assert stdout == ""
    if case == "list-of-tensors":
        assert "hyper (list of 1 holding 1 tensor" in err


@pytest.mark.parametrize("name", ["out.ckpt", "out.pt", "out.PTH", "out.bin", "out.gguf"])
def test_output_named_as_another_format_is_refused(name: str, demo_ckpt: Path,
                                                   tmp_path: Path, capsys):
    """A loader picks its reader by the name: safetensors bytes under .ckpt would be handed
    to torch.load, which fails on them."""
    out = tmp_path / name
    code, _, err = run_cli(capsys, "convert", demo_ckpt, "-o", out)
    assert code == 2, err
    assert err.startswith("ckpt: error: ") and err.count("\n") == 1 and ".safetensors" in err
    assert not out.exists()
    for fine in ("out.sft", "out"):
        assert run_cli(capsys, "convert", demo_ckpt, "-o", tmp_path / fine)[0] == 0


def test_entries_kept_as_metadata_are_not_listed_as_dropped(demo_ckpt: Path, tmp_path: Path,
                                                            capsys):
    code, stdout, err = run_cli(capsys, "convert", demo_ckpt, "-o", tmp_path / "o.safetensors",
                                "--keep-metadata", "--json")
    assert code == 0, err
    report = json.loads(stdout)
    with safe_open(str(tmp_path / "o.safetensors"), framework="pt") as f:
        kept = set(f.metadata()) - {"format"}
    assert kept == {"epoch", "global_step", "pytorch-lightning_version"}
    assert not kept & set(report["dropped"])
    assert {"optimizer_states", "lr_schedulers", "callbacks"} <= set(report["dropped"])


def test_json_failure_prints_an_error_object(tmp_path: Path, capsys):
    """Like inspect --json: an object with the error on stdout, the error line on stderr."""
    out = tmp_path / "o.safetensors"
    missing = tmp_path / "nope.ckpt"
    code, stdout, err = run_cli(capsys, "convert", missing, "-o", out, "--json")
    assert code == 3
    assert json.loads(stdout) == {"path": str(missing), "exit_code": 3,
                                  "error": json.loads(stdout)["error"]}
    assert json.loads(stdout)["error"] in err
    code, stdout, err = run_cli(capsys, "convert", missing, "-o", out, "--json", "--dtype",
                                "fp16")
    assert code == 3 and "error" in json.loads(stdout)
