"""``ckpt scan`` against a corpus with one hostile file per published bypass technique.

The corpus is checked first to be real: ``torch.load(weights_only=False)``, run in a child
process, does create the markers of the payloads marked as runnable. Then every hostile file
must come out ``unsafe`` from our scan, no marker may appear, every benign file must be ``safe``,
and the scan must not read tensor data.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from ckptkit.cli.main import main
from ckptkit.formats.source import Source
from ckptkit.ops.scan import scan_file

sys.path.insert(0, os.path.dirname(__file__))
import corpus


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    markers = tmp_path_factory.mktemp("markers")
    runs = corpus.build_hostile(str(folder), str(markers))
    return folder, markers, runs


@pytest.fixture(scope="module")
def benign(tmp_path_factory):
    folder = tmp_path_factory.mktemp("benign")
    return folder, corpus.build_benign(str(folder))


def test_corpus_payloads_really_run_under_torch_load(hostile, tmp_path):
    _, _, runs = hostile
    markers = tmp_path / "m"
    markers.mkdir()
    check = tmp_path / "h"
    check.mkdir()
    corpus.build_hostile(str(check), str(markers))
    runnable = sorted(name for name, real in runs.items() if real)
    script = ("import sys, torch\n"
              "for path in sys.argv[1:]:\n"
              "    try:\n        torch.load(path, weights_only=False)\n"
              "    except BaseException:\n        pass\n")
    subprocess.run([sys.executable, "-c", script, *[str(check / n) for n in runnable]],
                   cwd=tmp_path, timeout=120, capture_output=True, check=False)
    created = sorted(os.listdir(markers))
    assert len(created) == len(runnable), (runnable, created)  # one marker per payload


def test_every_hostile_file_is_unsafe_and_nothing_runs(hostile):
    folder, markers, runs = hostile
    for name in sorted(runs):
        result = scan_file(str(folder / name))
        assert result.verdict == "unsafe", (name, result.reasons)
        assert result.reasons, name
    assert os.listdir(markers) == []


def test_benign_files_are_safe(benign):
    folder, names = benign
    for name in names:
        result = scan_file(str(folder / name))
        assert result.verdict == "safe", (name, result.reasons)
        assert result.tensors and result.tensors > 0


def test_findings_name_each_global_and_where(hostile):
    folder, _, _ = hostile
    result = scan_file(str(folder / "zip_importlib.ckpt"))
    names = {r["message"] for r in result.reasons}
    assert {"global importlib.import_module", "global builtins.getattr"} <= names
    located = [r for r in result.reasons if r["kind"] == "global"]
    assert all(r["where"] == "data.pkl" and r["offset"] >= 0 and r["why"] for r in located)


def test_cli_exit_codes_and_json(hostile, benign, tmp_path, capsys):
    hostile_dir, _, runs = hostile
    benign_dir, names = benign
    assert main(["scan", "--quiet", str(benign_dir)]) == 0
    capsys.readouterr()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["scan", "--quiet", str(broken)]) == 2
    capsys.readouterr()
    assert main(["scan", "--json", str(benign_dir), str(hostile_dir), str(broken)]) == 1
    report = json.loads(capsys.readouterr().out)
    verdicts = {os.path.basename(f["path"]): f["verdict"] for f in report["files"]}
    assert len(report["files"]) == len(names) + len(runs) + 1  # one bad file stops nothing
    assert all(verdicts[n] == "safe" for n in names)
    assert all(verdicts[n] == "unsafe" for n in runs)
    assert verdicts["cut.safetensors"] == "error"
    assert report["summary"]["unsafe"] == len(runs)


def test_scan_reads_headers_not_tensor_data(tmp_path, monkeypatch):
    path = tmp_path / "big.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(8 * 1024 * 1024), "b": torch.ones(4)}}, path)
    read = []
    original = Source.read

    def counting(self, offset, n):
        read.append(n)
        return original(self, offset, n)

    monkeypatch.setattr(Source, "read", counting)
    result = scan_file(str(path))
    assert result.verdict == "safe"
    assert sum(read) < 64 * 1024 < os.path.getsize(path)
    read.clear()
    assert scan_file(str(path), verify_data=True).verdict == "safe"
    assert sum(read) >= 32 * 1024 * 1024  # --verify-data reads every record for its CRC


def test_benign_files_convert_bit_identically(benign, tmp_path):
    from safetensors.torch import load_file

    from ckptkit.ops.convert import convert

    folder, names = benign
    for name in names:
        src = folder / name
        out = tmp_path / f"{name}.safetensors"
        convert(str(src), str(out), fsync=False)
        loaded = torch.load(src, weights_only=False) if name != "model.safetensors" else None
        if loaded is not None and "state_dict" in loaded:
            loaded = loaded["state_dict"]
        expected = loaded if loaded is not None else load_file(src)
        got = load_file(out)
        assert set(got) == {k for k, v in expected.items() if isinstance(v, torch.Tensor)}
        for key, tensor in got.items():
            want = expected[key].contiguous()
            assert tensor.dtype == want.dtype and tensor.shape == want.shape, key
            assert torch.equal(tensor.view(-1).view(torch.uint8),
                               want.view(-1).view(torch.uint8)), (name, key)
