"""Outputs name their sources by file name and SHA-256, hashed while the operation runs."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ckptkit.engine.writer import Deferred, OutputBatch, Planned, write_safetensors
from ckptkit.errors import OutputError
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.ops import hashing
from ckptkit.ops.parts import split
from ckptkit.ops.prune import prune
from ckptkit.ops.sample import sample


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def _one(value: float = 1.0):
    return [Planned("x", BY_NAME["F32"], (2,), lambda: torch.full((2,), value))]


def test_deferred_values_are_patched_in_and_a_shorter_one_is_padded(tmp_path):
    out = tmp_path / "out.safetensors"
    write_safetensors(str(out), _one(), {"a": Deferred("0" * 64, lambda: "f" * 64),
                                         "b": Deferred("[" + "0" * 30 + "]", lambda: "null")})
    with safe_open(str(out), "pt") as f:
        assert f.metadata() == {"a": "f" * 64, "b": "null"}
        assert torch.equal(f.get_tensor("x"), torch.ones(2))


def test_a_deferred_value_that_grows_is_refused_and_nothing_is_written(tmp_path):
    out = tmp_path / "out.safetensors"
    with pytest.raises(OutputError, match="grew"):
        write_safetensors(str(out), _one(), {"a": Deferred("0", lambda: "0" * 100)})
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_cancels_the_work_behind_deferred_values(tmp_path):
    cancelled = []

    def fail():
        raise RuntimeError("boom")

    planned = [Planned("x", BY_NAME["F32"], (2,), fail)]
    with pytest.raises(RuntimeError):
        write_safetensors(str(tmp_path / "o.safetensors"), planned,
                          {"a": Deferred("0", lambda: "1", lambda: cancelled.append(1))})
    assert cancelled == [1]


def test_split_and_prune_outputs_carry_the_source_sha256(tmp_path, file_sha256):
    src = tmp_path / "model.safetensors"
    sample("sd1", str(src), tiny=True)
    written = split(str(src), str(tmp_path / "parts"), hash_sources=True)
    expected = [file_sha256(src)]
    for part in written:
        meta = _metadata(part)
        assert json.loads(meta["ckptkit.sources"]) == ["model.safetensors"]
        assert json.loads(meta["ckptkit.sources_sha256"]) == expected
    pruned = tmp_path / "pruned.safetensors"
    prune(str(src), str(pruned), dtype="bf16", hash_sources=True)
    assert json.loads(_metadata(pruned)["ckptkit.sources_sha256"]) == expected


def test_without_hash_only_known_hashes_are_recorded(tmp_path, file_sha256):
    src = tmp_path / "model.safetensors"
    sample("sd1", str(src), tiny=True)
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    prune(str(src), str(first))
    assert json.loads(_metadata(first)["ckptkit.sources_sha256"]) == [None]
    hashing.file_hashes(str(src))  # what ckpt inspect --hash does
    prune(str(src), str(second))
    assert json.loads(_metadata(second)["ckptkit.sources_sha256"]) == [file_sha256(src)]


def test_hashes_are_remembered_until_the_file_changes(tmp_path, file_sha256):
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4)}, str(path))
    assert hashing.cached_sha256(str(path)) is None
    assert hashing.sha256(str(path)) == file_sha256(path)
    assert hashing.cached_sha256(str(path)) == file_sha256(path)
    save_file({"x": torch.ones(8)}, str(path))
    assert hashing.cached_sha256(str(path)) is None
    assert hashing.BackgroundSha256([str(path)]).result() == {str(path): file_sha256(path)}


def test_an_unwritable_cache_only_costs_the_shortcut(tmp_path, monkeypatch, file_sha256):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setenv("CKPTKIT_CACHE_DIR", str(blocker / "cache"))
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4)}, str(path))
    assert hashing.sha256(str(path)) == file_sha256(path)
    assert hashing.cached_sha256(str(path)) is None


def test_a_batch_finishes_its_files_together_and_leaves_none_after_a_failure(tmp_path):
    first, second, third = (tmp_path / f"{n}.safetensors" for n in ("a", "b", "c"))
    with OutputBatch() as batch:
        write_safetensors(str(first), _one(), {"h": Deferred("0" * 4, lambda: "abcd")},
                          batch=batch)
        assert not first.exists()  # written, not yet finished
    assert _metadata(first) == {"h": "abcd"}

    def fail():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError), OutputBatch() as batch:
        write_safetensors(str(second), _one(), {}, batch=batch)
        write_safetensors(str(third), [Planned("x", BY_NAME["F32"], (2,), fail)], {},
                          batch=batch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_the_hash_option_of_the_commands(tmp_path, file_sha256):
    from ckptkit.cli.main import main

    src = tmp_path / "model.safetensors"
    sample("sd1", str(src), tiny=True)
    out = tmp_path / "out.safetensors"
    assert main(["vae", "bake", str(src), str(src), "-o", str(out), "--hash", "--quiet"]) == 0
    assert json.loads(_metadata(out)["ckptkit.sources_sha256"]) == [file_sha256(src)] * 2
