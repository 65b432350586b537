"""``ckpt inspect``: text and ``--json`` reports checked against what torch and safetensors load.

Expected counts, dtypes and prefix groups are computed here from ``torch.load`` /
``safetensors.torch.load_file`` output and from the component roots each layout declares;
the group name expected for a component is the longest dotted prefix its keys share (the
README's "single-child chains are followed"). Inspecting must read headers only: a sparse
20 GB safetensors file is inspected while counting every byte read.
"""

from __future__ import annotations

import json
import os
import re
import struct
import time
from pathlib import Path

import pytest
import torch
from helpers import run_cli
from safetensors.torch import load_file, save_file

from ckptkit.cli.main import main
from ckptkit.formats.source import Source
from ckptkit.ops.inspect import inspect_file
from ckptkit.samples import demo

ST_NAMES = {
    torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
    torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64",
    torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}


def _t(*shape: int, dtype: torch.dtype = torch.float16) -> torch.Tensor:
    if dtype.is_floating_point:
        return torch.randn(*shape).to(dtype)
    return torch.zeros(*shape, dtype=dtype)


# Layouts: component root -> {key suffix: tensor}. Every root is one part of the model.
def sd1_layout() -> dict[str, dict[str, torch.Tensor]]:
    clip = "transformer.text_model."
    return {
        "model.diffusion_model": {
            "input_blocks.0.0.weight": _t(8, 4, 3, 3), "input_blocks.0.0.bias": _t(8),
            "time_embed.0.weight": _t(32, 8), "out.2.weight": _t(4, 8, 3, 3),
        },
        "cond_stage_model.transformer.text_model": {
            clip + "embeddings.token_embedding.weight": _t(100, 16),
            clip + "embeddings.position_ids": torch.arange(77).unsqueeze(0),
            clip + "encoder.layers.0.self_attn.q_proj.weight": _t(16, 16),
            clip + "final_layer_norm.weight": _t(16),
        },
        "first_stage_model": {
            "decoder.conv_in.weight": _t(8, 4, 3, 3), "encoder.conv_out.bias": _t(8),
            "quant_conv.weight": _t(8, 8, 1, 1, dtype=torch.float32),
        },
        "": {"alphas_cumprod": _t(10, dtype=torch.float32), "betas": _t(10, dtype=torch.float32)},
    }


def sdxl_layout() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model.diffusion_model": {
            "input_blocks.0.0.weight": _t(8, 4, 3, 3), "label_emb.0.0.weight": _t(32, 16),
            "middle_block.1.proj_in.weight": _t(8, 8), "out.2.bias": _t(4),
        },
        "conditioner.embedders.0": {
            "transformer.text_model.embeddings.token_embedding.weight": _t(100, 16),
            "transformer.text_model.embeddings.position_ids": torch.arange(77).unsqueeze(0),
            "transformer.text_model.encoder.layers.0.mlp.fc1.weight": _t(32, 16),
        },
        "conditioner.embedders.1": {
            "model.token_embedding.weight": _t(100, 24),
            "model.transformer.resblocks.0.attn.in_proj_weight": _t(72, 24),
            "model.text_projection": _t(24, 24), "model.ln_final.weight": _t(24),
        },
        "first_stage_model": {
            "decoder.conv_in.weight": _t(8, 4, 3, 3), "encoder.conv_in.weight": _t(8, 3, 3, 3),
        },
    }


def sd3_comfy_layout() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "model.diffusion_model": {
            "joint_blocks.0.x_block.attn.qkv.weight": _t(48, 16),
            "x_embedder.proj.weight": _t(16, 16, 2, 2), "final_layer.linear.weight": _t(64, 16),
        },
        "text_encoders.clip_l": {
            "transformer.text_model.embeddings.token_embedding.weight": _t(100, 16),
            "transformer.text_model.final_layer_norm.weight": _t(16),
        },
        "text_encoders.clip_g": {
            "transformer.text_model.embeddings.token_embedding.weight": _t(100, 32),
            "transformer.text_model.final_layer_norm.bias": _t(32),
            "transformer.text_projection.weight": _t(32, 32),
        },
        "text_encoders.t5xxl": {
            "transformer.encoder.block.0.layer.0.SelfAttention.q.weight": _t(16, 16),
            "transformer.shared.weight": _t(200, 16, dtype=torch.float8_e4m3fn),
        },
        "first_stage_model": {
            "decoder.conv_in.weight": _t(8, 16, 3, 3, dtype=torch.bfloat16),
            "encoder.conv_out.weight": _t(32, 8, 3, 3, dtype=torch.bfloat16),
        },
    }


def flux_layout() -> dict[str, dict[str, torch.Tensor]]:
    return {
        "double_blocks": {"0.img_attn.qkv.weight": _t(48, 16, dtype=torch.bfloat16),
                          "1.txt_mlp.0.weight": _t(64, 16, dtype=torch.bfloat16)},
        "single_blocks": {"0.linear1.weight": _t(80, 16, dtype=torch.bfloat16),
                          "1.norm.key_norm.scale": _t(8, dtype=torch.bfloat16)},
        "img_in": {"weight": _t(16, 64, dtype=torch.bfloat16),
                   "bias": _t(16, dtype=torch.bfloat16)},
        "time_in": {"in_layer.weight": _t(16, 256, dtype=torch.bfloat16),
                    "out_layer.weight": _t(16, 16, dtype=torch.bfloat16)},
    }


LAYOUTS = {"sd1": sd1_layout, "sdxl": sdxl_layout, "sd3": sd3_comfy_layout,
           "flux": flux_layout}


def flatten(layout: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {f"{root}.{k}" if root else k: v for root, part in layout.items()
            for k, v in part.items()}


def expected_prefixes(layout: dict[str, dict[str, torch.Tensor]],
                      loaded: dict[str, torch.Tensor]) -> dict[str, tuple[int, int]]:
    """Group name -> (tensors, parameters): the longest dotted prefix a component's keys
    share (leaf names excluded); counts from the loaded tensors."""
    groups = {}
    for root in layout:
        keys = [k for k in loaded if (k.startswith(root + ".") if root else "." not in k)]
        assert keys
        if root:
            split = [k.split(".")[:-1] for k in keys]
            common = []
            for parts in zip(*split, strict=False):
                if len(set(parts)) != 1:
                    break
                common.append(parts[0])
            name = ".".join(common)
            assert name == root or name.startswith(root + ".")
        else:
            name = "(top level)"
        groups[name] = (len(keys), sum(loaded[k].numel() for k in keys))
    assert sum(n for n, _ in groups.values()) == len(loaded)
    return groups


def expected_dtypes(loaded: dict[str, torch.Tensor]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for tensor in loaded.values():
        entry = out.setdefault(ST_NAMES[tensor.dtype], {"tensors": 0, "parameters": 0})
        entry["tensors"] += 1
        entry["parameters"] += tensor.numel()
    return out


def _check_report(report: dict, path: Path, loaded: dict[str, torch.Tensor], layout) -> None:
    assert report["path"] == str(path)
    assert report["file_size"] == path.stat().st_size
    assert report["tensor_count"] == len(loaded)
    assert report["parameter_count"] == sum(t.numel() for t in loaded.values())
    assert report["tensor_bytes"] == sum(t.numel() * t.element_size() for t in loaded.values())
    assert report["dtypes"] == expected_dtypes(loaded)
    params = [e["parameters"] for e in report["dtypes"].values()]
    assert params == sorted(params, reverse=True)
    got = {e["prefix"]: (e["tensors"], e["parameters"]) for e in report["prefixes"]}
    assert got == expected_prefixes(layout, loaded)
    params = [e["parameters"] for e in report["prefixes"]]
    assert params == sorted(params, reverse=True)


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_inspect_json_safetensors_layouts(name: str, tmp_path: Path, capsys):
    layout = LAYOUTS[name]()
    path = tmp_path / f"{name}.safetensors"
    save_file(flatten(layout), str(path), metadata={"modelspec.architecture": name})
    code, stdout, err = run_cli(capsys, "inspect", "--json", path)
    assert code == 0, err
    (line,) = stdout.splitlines()
    report = json.loads(line)
    assert report["format"] == "safetensors"
    _check_report(report, path, load_file(str(path)), layout)
    assert report["metadata"] == {"modelspec.architecture": name}
    assert "extras" not in report
    assert report["notes"] == []


@pytest.mark.parametrize("name", sorted(LAYOUTS))
@pytest.mark.parametrize("container", ["zip", "legacy"])
def test_inspect_json_pickles_lightning_wrapped(name: str, container: str, tmp_path: Path,
                                                capsys):
    layout = LAYOUTS[name]()
    if container == "legacy":  # torch cannot load float8 storages back from a legacy file
        for part in layout.values():
            for key, value in part.items():
                if value.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    part[key] = value.half()
    path = tmp_path / f"{name}-{container}.ckpt"
    obj = {"epoch": 3, "global_step": 12345, "state_dict": flatten(layout),
           "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}}}],
           "hparams": {"lr": 0.5, "name": "run"}}
    torch.save(obj, path, _use_new_zipfile_serialization=container == "zip")
    code, stdout, err = run_cli(capsys, "inspect", "--json", path)
    assert code == 0, err
    report = json.loads(stdout)
    assert report["format"] == ("torch-zip" if container == "zip" else "torch-legacy")
    loaded = torch.load(path, weights_only=True)["state_dict"]
    _check_report(report, path, loaded, layout)
    assert report["weights_at"] == "state_dict"
    assert report["metadata"] == {}
    extras = report["extras"]
    assert set(extras) == {"epoch", "global_step", "optimizer_states", "hparams"}
    assert extras["epoch"] == 3 and extras["global_step"] == 12345
    assert extras["hparams"] == {"lr": 0.5, "name": "run"}
    assert "holding 1 tensor (" in str(extras["optimizer_states"])


def _section(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"  {title}") + 1
    out = []
    for line in lines[start:]:
        if not line.startswith("    "):
            break
        out.append(line.strip())
    return out


def _count(n: int) -> str:
    for unit in ("", "K", "M", "G"):
        if n < 1000 or unit == "G":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    raise AssertionError


def test_inspect_text_of_the_demo_training_checkpoint(demo_ckpt: Path, capsys):
    code, stdout, err = run_cli(capsys, "inspect", demo_ckpt)
    assert code == 0, err
    assert err == ""
    loaded = torch.load(demo_ckpt, weights_only=True)
    sd = loaded["state_dict"]
    lines = stdout.splitlines()
    assert lines[0] == str(demo_ckpt)
    assert "  format     torch-zip" in lines
    assert "  weights at state_dict" in lines
    size = demo_ckpt.stat().st_size
    assert any(ln.startswith("  size") and f"({size:,} bytes)" in ln for ln in lines)
    n_params = sum(t.numel() for t in sd.values())
    assert f"  tensors    {len(sd):,} holding {_count(n_params)} parameters" in stdout

    dtypes = {}
    for row in _section(stdout, "dtypes"):
        name, tensors, _, params, _ = row.split()
        dtypes[name] = (int(tensors.replace(",", "")), params)
    assert dtypes == {name: (e["tensors"], _count(e["parameters"]))
                      for name, e in expected_dtypes(sd).items()}

    prefixes = {}
    for row in _section(stdout, "key prefixes"):
        name, tensors, _, params, _ = row.split()
        prefixes[name] = (int(tensors.replace(",", "")), params)
    groups = {"model.diffusion_model": "model.diffusion_model.", "model_ema": "model_ema.",
              "first_stage_model": "first_stage_model.",
              "cond_stage_model.transformer.text_model":
                  "cond_stage_model.transformer.text_model."}
    expected = {}
    for name, start in groups.items():
        keys = [k for k in sd if k.startswith(start)]
        expected[name] = (len(keys), _count(sum(sd[k].numel() for k in keys)))
    assert prefixes == expected

    extras = _section(stdout, "other entries (not weights; not loaded)")
    assert "global_step: 470000" in extras
    assert "epoch: 6" in extras
    assert "pytorch-lightning_version: 1.4.2" in extras
    assert any(e.startswith("optimizer_states: ") for e in extras)
    assert "  metadata" not in lines


def test_inspect_legacy_demo_json(demo_ckpt_legacy: Path, capsys):
    code, stdout, _ = run_cli(capsys, "inspect", "--json", demo_ckpt_legacy)
    assert code == 0
    report = json.loads(stdout)
    sd = torch.load(demo_ckpt_legacy, weights_only=True)["state_dict"]
    assert report["format"] == "torch-legacy"
    assert report["tensor_count"] == len(sd)
    assert report["parameter_count"] == sum(t.numel() for t in sd.values())
    assert report["dtypes"] == expected_dtypes(sd)
    assert report["extras"]["global_step"] == 470000
    assert report["extras"]["pytorch-lightning_version"] == "1.4.2"


def test_metadata_json_values_are_decoded(tmp_path: Path, capsys):
    metadata = {"obj": '{"a": 1, "b": [true, null]}', "arr": " [1, 2.5, \"x\"]",
                "plain": "hello", "broken": "{not json", "num": "42",
                "ss_tag_frequency": json.dumps({"set": {"cat": 3, "dög": 1}})}
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.alpha": torch.tensor(4.0)}, str(path), metadata=metadata)
    code, stdout, _ = run_cli(capsys, "inspect", "--json", path)
    assert code == 0
    assert json.loads(stdout)["metadata"] == {
        "obj": {"a": 1, "b": [True, None]}, "arr": [1, 2.5, "x"], "plain": "hello",
        "broken": "{not json", "num": "42", "ss_tag_frequency": {"set": {"cat": 3, "dög": 1}}}

    code, stdout, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "    plain: hello" in stdout.splitlines()
    assert "    broken: {not json" in stdout.splitlines()
    meta = "\n".join(stdout.splitlines()[stdout.splitlines().index("  metadata"):])
    assert '"dög": 1' in meta
    assert '        "a": 1,' in meta.splitlines()  # objects pretty-printed under their key


def _strict_json(line: str):
    def refuse(token: str):
        raise ValueError(f"{token} is not JSON")
    return json.loads(line, parse_constant=refuse)


def test_json_is_strict_json_even_for_infinite_or_nan_extras(tmp_path: Path, capsys):
    """Training scripts save ``best_loss = float("inf")``; ``--json`` must still be JSON
    (RFC 8259 has no NaN or Infinity) so that jq and other parsers read it."""
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": {"w": torch.ones(2)}, "best_loss": float("inf"),
                "last_loss": float("nan"), "global_step": 10}, path)
    code, stdout, _ = run_cli(capsys, "inspect", "--json", path)
    assert code == 0
    report = json.loads(stdout)
    assert report["extras"]["global_step"] == 10
    assert set(report["extras"]) == {"best_loss", "last_loss", "global_step"}
    _strict_json(stdout)


def test_several_files_one_bad(tmp_path: Path, demo_ckpt: Path, capsys):
    good = tmp_path / "good.safetensors"
    save_file({"a.b.w": torch.ones(3)}, str(good))
    empty = tmp_path / "empty.ckpt"
    empty.write_bytes(b"")
    code, stdout, err = run_cli(capsys, "inspect", demo_ckpt, empty, good)
    assert code == 3
    lines = stdout.splitlines()
    assert str(demo_ckpt) in lines and str(good) in lines
    assert str(empty) not in lines
    (line,) = err.splitlines()
    assert line.startswith(f"ckpt: error: {empty}")

    code, stdout, err = run_cli(capsys, "inspect", "--json", demo_ckpt, empty, good)
    assert code == 3
    reports = [json.loads(ln) for ln in stdout.splitlines()]
    assert [r["path"] for r in reports] == [str(demo_ckpt), str(empty), str(good)]
    assert reports[0]["tensor_count"] == 24 and reports[2]["tensor_count"] == 1
    assert "error" in reports[1] and "empty" in reports[1]["error"]
    assert err.count("\n") == 1


def test_unsafe_file_among_several_gives_exit_4(tmp_path: Path, demo_ckpt: Path, capsys):
    class System:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'PWNED'}",)

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1)}, "x": System()}, evil)
    code, stdout, err = run_cli(capsys, "inspect", evil, demo_ckpt)
    assert code == 4
    assert str(demo_ckpt) in stdout.splitlines()
    assert err.startswith(f"ckpt: error: {evil}") and err.count("\n") == 1
    assert not (tmp_path / "PWNED").exists()


def test_renamed_pickle_is_inspected_with_a_note(demo_ckpt: Path, tmp_path: Path, capsys):
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(demo_ckpt.read_bytes())
    code, stdout, _ = run_cli(capsys, "inspect", "--json", renamed)
    assert code == 0
    report = json.loads(stdout)
    assert report["format"] == "torch-zip"
    assert len(report["notes"]) == 1 and ".safetensors" in report["notes"][0]


# --- inspect reads headers only ---------------------------------------------------------

def _sparse_safetensors(path: Path, n_big: int = 10) -> tuple[int, int, int]:
    """A safetensors file of n_big 2 GiB F16 tensors plus small ones, written as a header and a
    hole: nothing but the header is on disk. Returns (header length, tensors, parameters)."""
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    params = 0
    for i in range(n_big):
        shape = [32768, 32768]
        nbytes = 32768 * 32768 * 2
        header[f"model.diffusion_model.block.{i}.weight"] = {
            "dtype": "F16", "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
        params += 32768 * 32768
    for i in range(200):
        header[f"first_stage_model.layer.{i}.bias"] = {
            "dtype": "F32", "shape": [16], "data_offsets": [offset, offset + 64]}
        offset += 64
        params += 16
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    return len(raw), n_big + 200, params


def _rchar() -> int | None:
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def test_inspect_of_a_huge_file_reads_only_the_header(tmp_path: Path, capsys, monkeypatch):
    path = tmp_path / "huge.safetensors"
    header_len, n_tensors, params = _sparse_safetensors(path)
    size = path.stat().st_size
    assert size > 20 * 2**30
    if os.stat(path).st_blocks * 512 > 2**30:
        pytest.skip("this file system does not make sparse files")

    reads: list[tuple[int, int]] = []
    original = Source.read

    def counting_read(self, offset, n):
        reads.append((offset, n))
        return original(self, offset, n)

    def refuse(*args, **kwargs):
        raise AssertionError("inspect touched tensor data")

    monkeypatch.setattr(Source, "read", counting_read)
    monkeypatch.setattr(Source, "mmap", refuse)

    inspect_file(str(path))  # warm up lazy imports so that rchar counts only file reads
    reads.clear()
    before = _rchar()
    started = time.monotonic()
    code, stdout, err = run_cli(capsys, "inspect", "--json", path)
    elapsed = time.monotonic() - started
    after = _rchar()
    assert code == 0, err
    report = json.loads(stdout)
    assert report["file_size"] == size
    assert report["tensor_count"] == n_tensors
    assert report["parameter_count"] == params
    assert report["tensor_bytes"] == size - 8 - header_len
    assert report["dtypes"]["F16"] == {"tensors": 10, "parameters": 10 * 32768 * 32768}
    assert {e["prefix"] for e in report["prefixes"]} == {
        "model.diffusion_model.block", "first_stage_model.layer"}
    assert sum(n for _, n in reads) <= 8 + header_len
    assert all(offset + n <= 8 + header_len for offset, n in reads)
    if before is not None and after is not None:
        assert after - before < 8 + header_len + 64 * 1024
    assert elapsed < 10  # reading 20 GB, even of holes, would take far longer


def test_inspect_of_a_large_pickle_reads_no_tensor_data(tmp_path: Path, capsys, monkeypatch):
    path = tmp_path / "big.ckpt"
    big = torch.zeros(8 * 2**20)  # 32 MiB of tensor data
    torch.save({"state_dict": {"big": big, "small": torch.ones(3)}, "global_step": 9}, path)
    size = path.stat().st_size
    reads: list[int] = []
    original = Source.read

    def counting_read(self, offset, n):
        reads.append(n)
        return original(self, offset, n)

    monkeypatch.setattr(Source, "read", counting_read)
    inspect_file(str(path))
    reads.clear()
    before = _rchar()
    code, stdout, _ = run_cli(capsys, "inspect", "--json", path)
    after = _rchar()
    assert code == 0
    report = json.loads(stdout)
    assert report["tensor_count"] == 2
    assert report["parameter_count"] == 8 * 2**20 + 3
    assert report["extras"] == {"global_step": 9}
    assert sum(reads) < 64 * 1024 < size // 100
    if before is not None and after is not None:
        assert after - before < 256 * 1024


def test_inspect_matches_demo_module(tmp_path: Path):
    """The demo sample's documented shape: 24 tensors, views of one storage, training extras."""
    path = tmp_path / "demo.ckpt"
    torch.save(demo.build(), path)
    report = inspect_file(str(path))
    assert report["tensor_count"] == 24
    assert re.fullmatch(r"list of 1 holding \d+ tensors? \(\d+ bytes\)",
                        report["extras"]["optimizer_states"])


# --- metadata and values that JSON cannot hold ------------------------------------------------

_DEEP = "[" * 3000 + "]" * 3000  # deeper than Python's JSON parser can recurse


def _kohya_lora(alphas: list[float]) -> dict[str, torch.Tensor]:
    out = {}
    for name, alpha in zip(("to_q", "to_k", "to_v"), alphas, strict=True):
        module = f"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_{name}"
        out[f"{module}.lora_down.weight"] = torch.ones(4, 320)
        out[f"{module}.lora_up.weight"] = torch.ones(320, 4)
        out[f"{module}.alpha"] = torch.tensor(alpha)
    return out


def test_bad_metadata_is_shown_as_text_and_every_file_is_inspected(tmp_path: Path, capsys):
    lora = _kohya_lora([4.0, 4.0, 4.0])
    files = {
        "deep.safetensors": ({"w": torch.ones(2)}, {"x": _DEEP}),
        "inf.safetensors": ({"w": torch.ones(2)}, {"x": "[1e999]", "y": '{"a": -1e400}'}),
        "wide.safetensors": ({"w": torch.ones(2)}, {"x": "[" * 65 + "]" * 65,
                                                     "ok": "[" * 64 + "]" * 64}),
        "lora_deep.safetensors": (lora, {"lora_adapter_metadata": _DEEP,
                                         "ss_network_args": _DEEP}),
        "lora_nan.safetensors": (lora, {"lora_adapter_metadata": '{"unet.r": NaN}'}),
        "lora_big.safetensors": (lora, {"lora_adapter_metadata": '{"unet.r": 1e400}',
                                        "ss_network_dim": "nan"}),
    }
    paths = []
    for name, (tensors, metadata) in files.items():
        save_file(tensors, str(tmp_path / name), metadata=metadata)
        paths.append(tmp_path / name)
    code, stdout, err = run_cli(capsys, "inspect", "--json", *paths)
    assert code == 0, err
    assert err == ""
    reports = [_strict_json(line) for line in stdout.splitlines()]
    assert [r["path"] for r in reports] == [str(p) for p in paths]
    assert reports[0]["metadata"] == {"x": _DEEP}
    assert reports[1]["metadata"] == {"x": "[1e999]", "y": '{"a": -1e400}'}
    assert reports[2]["metadata"]["x"] == "[" * 65 + "]" * 65  # deeper than 64: as text
    assert isinstance(reports[2]["metadata"]["ok"], list)
    for report in reports[3:]:
        assert report["identification"]["lora"]["alphas"] == [4.0]
    reasons = [" ".join(r["identification"]["reasons"]) for r in reports[3:]]
    assert "lora_adapter_metadata is not valid JSON" in reasons[0]
    assert "not finite numbers (unet.r)" in reasons[1] and "(unet.r)" in reasons[2]
    assert "ss_network_dim=nan is not a finite number" in reasons[2]
    code, stdout, err = run_cli(capsys, "inspect", *paths)  # the text report too
    assert code == 0 and err == ""
    assert all(f"{p}" in stdout.splitlines() for p in paths)


def test_json_alphas_that_are_nan_or_infinite_are_strings(tmp_path: Path, capsys):
    path = tmp_path / "lora.safetensors"
    save_file(_kohya_lora([4.0, float("nan"), float("inf")]), str(path))
    code, stdout, err = run_cli(capsys, "inspect", "--json", path)
    assert code == 0, err
    lora = _strict_json(stdout)["identification"]["lora"]
    assert lora["alphas"] == [4.0, "inf", "nan"]
    code, stdout, _ = run_cli(capsys, "inspect", path)
    assert "alphas [4.0, inf, nan]" in stdout
    assert "2 .alpha tensors hold inf or nan" in stdout


def test_json_of_names_and_text_that_are_not_utf8_is_valid_utf8(tmp_path: Path, capsys):
    """A file name with a byte that is not UTF-8 (os.fsdecode keeps it as a surrogate): the
    output is still valid UTF-8, the odd characters written as backslash escapes. A header
    whose JSON escapes a lone surrogate is refused, as the reference library refuses it."""
    odd = tmp_path / os.fsdecode(b"bad\xffname.safetensors")
    save_file({"w": torch.ones(2)}, str(odd), metadata={"plain": "ok"})
    header = b'{"__metadata__": {"k\\ud800": "v\\udfff"}, "w": {"dtype": "F32", ' \
             b'"shape": [1], "data_offsets": [0, 4]}}'
    lone = tmp_path / "lone.safetensors"
    lone.write_bytes(struct.pack("<Q", len(header)) + header + struct.pack("<f", 1.0))
    code, stdout, err = run_cli(capsys, "inspect", "--json", odd, lone)
    assert code == 3 and "lone surrogate" in err, err
    stdout.encode("utf-8")  # strict: a lone surrogate here would raise
    first = _strict_json(stdout.splitlines()[0])
    assert first["path"] == str(tmp_path / "bad\\xffname.safetensors")
    code, stdout, _ = run_cli(capsys, "inspect", odd)
    stdout.encode("utf-8")
    assert stdout.splitlines()[0] == str(tmp_path / "bad\\xffname.safetensors")


def test_a_bug_on_one_file_does_not_stop_the_others(tmp_path: Path, capsys, monkeypatch):
    from ckptkit.cli import inspect_cmd

    good = [tmp_path / f"{n}.safetensors" for n in ("a", "b", "c")]
    for path in good:
        save_file({"w": torch.ones(2)}, str(path))
    real = inspect_cmd.inspect_file

    def flaky(path, **kwargs):
        if path.endswith("b.safetensors"):
            raise RecursionError("simulated")
        return real(path, **kwargs)

    monkeypatch.setattr(inspect_cmd, "inspect_file", flaky)
    monkeypatch.delenv("CKPT_DEBUG", raising=False)
    code, stdout, err = run_cli(capsys, "inspect", "--json", *good)
    assert code == 70
    reports = [_strict_json(line) for line in stdout.splitlines()]
    assert [r["path"] for r in reports] == [str(p) for p in good]
    assert reports[1] == {"path": str(good[1]), "exit_code": 70,
                          "error": "internal error: RecursionError: simulated"}
    assert reports[2]["tensor_count"] == 1
    (line,) = err.splitlines()
    assert line.startswith("ckpt: internal error: RecursionError") and str(good[1]) in line


def test_a_diffusers_folder_inside_a_searched_folder_is_reported_as_one(tmp_path, capsys):
    from ckptkit.ops.sample import sample

    (tmp_path / "models").mkdir()
    sample("sd1", str(tmp_path / "models" / "diff-sd1"), tiny=True, layout="diffusers")
    sample("sd1", str(tmp_path / "models" / "single.safetensors"), tiny=True)
    capsys.readouterr()
    assert main(["inspect", str(tmp_path / "models"), "--json", "--quiet"]) == 0
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert sorted(os.path.basename(r["path"]) for r in reports) == ["diff-sd1",
                                                                     "single.safetensors"]
    folder = next(r for r in reports if r["path"].endswith("diff-sd1"))
    assert folder["format"] == "diffusers-folder"
