"""The streaming safetensors writer, checked with the official ``safetensors`` library.

Every file ckptkit writes must be one the reference implementation reads back with the same
tensors (bit for bit, every dtype) and metadata. Outputs are atomic: a failure midway leaves
neither a file under the target's name nor a temporary file, an older target stays as it was,
and an input is never written over, whatever name (symlink, hard link) it is given by.
"""

from __future__ import annotations

import gc
import json
import os
import struct
import tracemalloc
import weakref
from pathlib import Path

import pytest
import torch
from failing_writes import fill_the_disk
from safetensors import safe_open
from safetensors.torch import load_file

import ckptkit
from ckptkit.engine import writer
from ckptkit.engine.writer import CopyRange, Planned, write_safetensors
from ckptkit.errors import OutputError
from ckptkit.formats.dtypes import from_torch
from ckptkit.formats.source import Source

DTYPES = [
    torch.float32, torch.float16, torch.bfloat16, torch.float64,
    torch.float8_e4m3fn, torch.float8_e5m2,
    torch.int8, torch.int16, torch.int32, torch.int64,
    torch.uint8, torch.uint16, torch.uint32, torch.uint64,
    torch.bool,
]


def _sample(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    if dtype.is_floating_point:
        return (torch.randn(shape, generator=gen, dtype=torch.float64) * 8).to(dtype)
    info = torch.iinfo(dtype)
    low, high = max(info.min, -(2**62)), min(info.max, 2**62)
    return torch.randint(low, high, shape, generator=gen, dtype=torch.int64).to(dtype)


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes (NaN-safe, -0.0-safe comparison)."""
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_same(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype
    assert tuple(a.shape) == tuple(b.shape)
    assert torch.equal(_bits(a), _bits(b))


def _tensors() -> dict[str, torch.Tensor]:
    tensors = {}
    for i, dtype in enumerate(DTYPES):
        name = str(dtype).removeprefix("torch.")
        tensors[f"t.{name}"] = _sample(dtype, (3, 5, 2), i)
        tensors[f"scalar.{name}"] = _sample(dtype, (), 100 + i)
        tensors[f"empty.{name}"] = torch.zeros((0, 4), dtype=dtype)
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-40])
    tensors["special.f32"] = special
    tensors["special.bf16"] = special.bfloat16()
    tensors["special.f16"] = special.half()
    tensors["noncontiguous"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    return tensors


def test_every_dtype_round_trips_through_the_official_reader(tmp_path: Path):
    tensors = _tensors()
    metadata = {"format": "pt", "recipe": '{"a": 1}', "ünïcode": "✓ ok", "empty": ""}
    out = tmp_path / "all.safetensors"
    ckptkit.save_safetensors(tensors, out, metadata)

    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == metadata
        assert sorted(f.keys()) == sorted(tensors)
        for key, expected in tensors.items():
            assert_same(f.get_tensor(key), expected)
    loaded = load_file(str(out))
    for key, expected in tensors.items():
        assert_same(loaded[key], expected)


def test_write_safetensors_with_planned_items_and_byte_producers(tmp_path: Path):
    a = torch.arange(12, dtype=torch.int32).reshape(3, 4)
    b = torch.randn(7, dtype=torch.float64)
    c = torch.tensor(True)
    raw_b = bytes(_bits(b).numpy().tobytes())
    planned = [
        Planned("a", from_torch(a.dtype), (3, 4), lambda: a),
        Planned("b", from_torch(b.dtype), (7,), lambda: bytearray(raw_b)),  # bytes producer
        Planned("c", from_torch(c.dtype), (), lambda: c),
    ]
    out = tmp_path / "planned.safetensors"
    write_safetensors(str(out), planned, {"k": "v"})
    loaded = load_file(str(out))
    assert sorted(loaded) == ["a", "b", "c"]
    assert_same(loaded["a"], a)
    assert_same(loaded["b"], b)
    assert_same(loaded["c"], c)
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"k": "v"}


def test_copy_range_producer_copies_input_bytes(tmp_path: Path):
    data = torch.arange(1000, dtype=torch.float32)
    src = tmp_path / "raw.bin"
    src.write_bytes(b"junk" * 4 + data.numpy().tobytes() + b"tail")
    source = Source(str(src))
    try:
        planned = [Planned("x", from_torch(torch.float32), (1000,),
                           lambda: CopyRange(source, 16, 4000))]
        out = tmp_path / "copy.safetensors"
        write_safetensors(str(out), planned)
    finally:
        source.close()
    assert_same(load_file(str(out))["x"], data)


@pytest.mark.parametrize("metadata", [None, {}, {"a": "b"}, {"x" * 3: "y" * 5}])
def test_header_is_aligned_and_data_tiles_the_file(tmp_path: Path, metadata):
    for n in range(1, 9):  # key lengths that shift the header's length through every residue
        out = tmp_path / f"align{n}.safetensors"
        ckptkit.save_safetensors({"k" * n: torch.ones(n, dtype=torch.uint8)}, out, metadata)
        raw = out.read_bytes()
        (size,) = struct.unpack("<Q", raw[:8])
        assert (8 + size) % 64 == 0
        header = json.loads(raw[8:8 + size])
        assert header["k" * n]["data_offsets"] == [0, n]
        assert len(raw) == 8 + size + n
        assert raw[8 + size:] == b"\x01" * n
        assert header.get("__metadata__", {}) == (metadata or {})
        assert load_file(str(out))["k" * n].tolist() == [1] * n


@pytest.mark.parametrize("metadata", [None, {"a": "b"}, {"x" * 37: "y" * 11}])
def test_tensors_of_aligned_sizes_start_64_byte_aligned(tmp_path: Path, metadata):
    """The data starts on a 64-byte boundary and tensors whose size is a multiple of 64 come
    first (safetensors allows no gaps), so each of them starts aligned: what load_pipeline
    maps without a copy. The others follow, in their order; the official reader reads all."""
    tensors = {"a.odd": torch.arange(3, dtype=torch.float16),
               "b.weight": torch.randn(32, 8), "c.position_ids": torch.arange(77),
               "d.bias": torch.randn(16), "e.weight": torch.randn(8, 4, dtype=torch.float16)}
    out = tmp_path / "aligned.safetensors"
    ckptkit.save_safetensors(tensors, out, metadata)
    raw = out.read_bytes()
    (size,) = struct.unpack("<Q", raw[:8])
    assert (8 + size) % 64 == 0
    header = json.loads(raw[8:8 + size])
    header.pop("__metadata__", None)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    assert order == ["b.weight", "d.bias", "e.weight", "a.odd", "c.position_ids"]
    for key in ("b.weight", "d.bias", "e.weight"):
        assert (8 + size + header[key]["data_offsets"][0]) % 64 == 0
    for key, value in load_file(str(out)).items():
        assert torch.equal(value, tensors[key])


@pytest.mark.parametrize("metadata", [{"a": 1}, {"a": None}, {"a": ["x"]}, {1: "a"},
                                      {"ok": "x", "bad": 2.5}])
def test_non_string_metadata_is_refused(tmp_path: Path, metadata):
    out = tmp_path / "meta.safetensors"
    with pytest.raises(OutputError):
        ckptkit.save_safetensors({"x": torch.ones(2)}, out, metadata)
    assert list(tmp_path.iterdir()) == []


def test_duplicate_keys_are_refused(tmp_path: Path):
    t = torch.ones(2)
    planned = [Planned("x", from_torch(t.dtype), (2,), lambda: t),
               Planned("y", from_torch(t.dtype), (2,), lambda: t),
               Planned("x", from_torch(t.dtype), (2,), lambda: t)]
    out = tmp_path / "dup.safetensors"
    with pytest.raises(OutputError):
        write_safetensors(str(out), planned)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("metadata", [None, {"a": "b"}])
def test_a_tensor_named_like_the_metadata_entry_is_refused(tmp_path: Path, metadata):
    out = tmp_path / "m.safetensors"
    with pytest.raises(OutputError):
        ckptkit.save_safetensors({"__metadata__": torch.ones(2)}, out, metadata)
    assert list(tmp_path.iterdir()) == []


def _input_file(tmp_path: Path) -> Path:
    path = tmp_path / "input.safetensors"
    ckptkit.save_safetensors({"w": torch.arange(10, dtype=torch.float32)}, path, {"m": "1"})
    return path


def _alias(kind: str, path: Path) -> Path:
    if kind == "same":
        return path
    if kind == "relative":
        return Path(os.path.relpath(path))
    if kind == "dotted":
        return path.parent / "." / ".." / path.parent.name / path.name
    alias = path.parent / f"alias-{kind}.safetensors"
    if kind == "symlink":
        alias.symlink_to(path)
    else:
        os.link(path, alias)
    return alias


@pytest.mark.parametrize("kind", ["same", "relative", "dotted", "symlink", "hardlink"])
def test_output_equal_to_an_input_is_refused(tmp_path: Path, kind, file_sha256):
    src = _input_file(tmp_path)
    before = file_sha256(src)
    target = _alias(kind, src)
    planned = [Planned("w", from_torch(torch.float32), (3,), lambda: torch.zeros(3))]
    with pytest.raises(OutputError) as err:
        write_safetensors(str(target), planned, inputs=(str(src),))
    assert err.value.exit_code == 5
    assert file_sha256(src) == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".ckptkit-tmp")]
    if kind == "symlink":
        assert target.is_symlink() and target.resolve() == src.resolve()


@pytest.mark.parametrize("kind", ["same", "symlink", "hardlink"])
def test_input_given_by_alias_is_protected_too(tmp_path: Path, kind, file_sha256):
    src = _input_file(tmp_path)
    alias = _alias(kind, src)
    before = file_sha256(src)
    planned = [Planned("w", from_torch(torch.float32), (3,), lambda: torch.zeros(3))]
    with pytest.raises(OutputError):
        write_safetensors(str(src), planned, inputs=(str(alias),))
    assert file_sha256(src) == before


def test_save_safetensors_refuses_to_overwrite_the_file_its_lazy_tensors_come_from(
        tmp_path: Path, file_sha256):
    """``ckptkit.open`` then ``save_safetensors`` to the same path writes over an input."""
    src = _input_file(tmp_path)
    before = file_sha256(src)
    with ckptkit.open(src) as ckpt, pytest.raises(OutputError):
        ckptkit.save_safetensors(ckpt, src, {"changed": "yes"})
    assert file_sha256(src) == before


def test_save_safetensors_of_lazy_tensors_to_another_file(tmp_path: Path, demo_ckpt):
    out = tmp_path / "lazy.safetensors"
    expected = torch.load(demo_ckpt, weights_only=True)["state_dict"]
    with ckptkit.open(demo_ckpt) as ckpt:
        ckptkit.save_safetensors(ckpt, out)
    loaded = load_file(str(out))
    assert sorted(loaded) == sorted(expected)
    for key, tensor in expected.items():
        assert_same(loaded[key], tensor)


class Boom(Exception):
    pass


def _failing_plan(fail_at: int, exc: BaseException, n: int = 5) -> list[Planned]:
    def produce(i: int):
        if i == fail_at:
            raise exc
        return torch.full((1000,), float(i))
    return [Planned(f"t{i}", from_torch(torch.float32), (1000,), lambda i=i: produce(i))
            for i in range(n)]


@pytest.mark.parametrize("exc", [Boom("midway"), KeyboardInterrupt()])
@pytest.mark.parametrize("fail_at", [0, 3])
def test_producer_failing_midway_leaves_no_file(tmp_path: Path, exc, fail_at):
    out = tmp_path / "out.safetensors"
    with pytest.raises(type(exc)):
        write_safetensors(str(out), _failing_plan(fail_at, exc))
    assert list(tmp_path.iterdir()) == []


def test_producer_failing_midway_keeps_the_older_target(tmp_path: Path, file_sha256):
    out = tmp_path / "out.safetensors"
    ckptkit.save_safetensors({"old": torch.ones(4)}, out, {"v": "old"})
    before = file_sha256(out)
    other = tmp_path / "unrelated.txt"
    other.write_text("keep me")
    with pytest.raises(Boom):
        write_safetensors(str(out), _failing_plan(2, Boom("midway")))
    assert file_sha256(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "unrelated.txt"]
    with safe_open(str(out), framework="pt") as f:
        assert f.metadata() == {"v": "old"}


def test_temporary_file_is_hidden_beside_the_target_while_writing(tmp_path: Path):
    out = tmp_path / "out.safetensors"
    seen: list[list[str]] = []

    def produce():
        seen.append(sorted(p.name for p in tmp_path.iterdir()))
        return torch.ones(3)

    write_safetensors(str(out), [Planned("x", from_torch(torch.float32), (3,), produce)])
    (names,) = seen
    assert len(names) == 1
    assert names[0].startswith(".out.safetensors.") and names[0].endswith(".ckptkit-tmp")
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_successful_write_replaces_an_older_target(tmp_path: Path):
    out = tmp_path / "out.safetensors"
    ckptkit.save_safetensors({"old": torch.ones(4)}, out)
    ckptkit.save_safetensors({"new": torch.zeros(2)}, out)
    assert list(load_file(str(out))) == ["new"]
    assert [p.name for p in tmp_path.iterdir()] == ["out.safetensors"]


def test_wrongly_sized_producer_output_leaves_no_file(tmp_path: Path):
    out = tmp_path / "out.safetensors"
    planned = [Planned("x", from_torch(torch.float32), (4,), lambda: torch.ones(5))]
    with pytest.raises(Exception):  # noqa: B017 - a bug in the plan, any error will do
        write_safetensors(str(out), planned)
    assert list(tmp_path.iterdir()) == []


def test_missing_output_folder_is_an_output_error(tmp_path: Path):
    out = tmp_path / "no" / "such" / "folder" / "x.safetensors"
    with pytest.raises(OutputError) as err:
        ckptkit.save_safetensors({"x": torch.ones(1)}, out)
    assert err.value.exit_code == 5
    assert not (tmp_path / "no").exists()


def test_output_that_is_a_directory_is_an_output_error(tmp_path: Path):
    (tmp_path / "d.safetensors").mkdir()
    with pytest.raises(OutputError):
        ckptkit.save_safetensors({"x": torch.ones(1)}, tmp_path / "d.safetensors")
    assert [p.name for p in tmp_path.iterdir()] == ["d.safetensors"]
    assert list((tmp_path / "d.safetensors").iterdir()) == []


def test_lazily_produced_tensors_are_released_as_they_are_written(tmp_path: Path):
    """Writing N produced tensors keeps only a fixed few alive, whatever N."""
    n = 40
    refs: list[weakref.ref] = []
    alive_at_produce: list[int] = []

    def produce(i: int):
        gc.collect()
        alive_at_produce.append(sum(r() is not None for r in refs))
        t = torch.full((256, 256), float(i))
        refs.append(weakref.ref(t))
        return t

    planned = [Planned(f"t{i}", from_torch(torch.float32), (256, 256),
                       lambda i=i: produce(i)) for i in range(n)]
    out = tmp_path / "many.safetensors"
    # Objects made before the write (the test session's imports) are set aside, so that each
    # collection looks at the write's own objects only: 0.4 s each in a full session, else.
    gc.freeze()
    try:
        write_safetensors(str(out), planned)
    finally:
        gc.unfreeze()
    gc.collect()
    assert len(alive_at_produce) == n
    # The writer produces up to PREFETCH tensors ahead of the one it writes: a bound that does
    # not grow with the number of tensors.
    assert max(alive_at_produce) <= writer.PREFETCH + 1
    assert sum(r() is not None for r in refs) == 0
    with safe_open(str(out), framework="pt") as f:
        for i in (0, n // 2, n - 1):
            assert torch.equal(f.get_tensor(f"t{i}"), torch.full((256, 256), float(i)))


def test_saving_lazy_tensors_needs_memory_for_about_one_tensor(tmp_path: Path):
    """Python-side allocations (the read buffers) stay near one tensor, not the model."""
    n, numel = 24, 1 << 18  # 24 tensors of 1 MiB
    src = tmp_path / "big.safetensors"
    ckptkit.save_safetensors({f"t{i}": torch.full((numel,), float(i)) for i in range(n)}, src)
    out = tmp_path / "copy.safetensors"
    with ckptkit.open(src) as ckpt:
        tracemalloc.start()
        try:
            ckptkit.save_safetensors(ckpt, out)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    total = n * numel * 4
    assert peak < 4 * numel * 4, f"peak {peak} bytes for a {total}-byte model"
    loaded = load_file(str(out))
    assert all(torch.equal(loaded[f"t{i}"], torch.full((numel,), float(i))) for i in range(n))


FAILING_FILL = """
import sys, torch
from ckptkit.engine.writer import Planned, write_safetensors
from ckptkit.formats.dtypes import from_torch

held = []

def fill(out):
    held.append(out)
    out[:10] = 1.0
    raise ValueError("the producer failed")

plan = [Planned("w", from_torch(torch.float32), (1 << 20,), lambda: None, fill)]
try:
    write_safetensors(sys.argv[1], plan)
except ValueError:
    pass
print(float(held[0][:20].sum()))  # the view outlives the failed write
"""


def test_a_failed_fill_into_the_mapped_file_does_not_pull_the_map_from_under_its_views(
        tmp_path):
    """A producer's error can leave tensors viewing the output map alive (in its traceback,
    or kept by the caller): the writer must not unmap under them, which crashed the process
    at their next use."""
    import subprocess
    import sys

    out = tmp_path / "o.safetensors"
    done = subprocess.run([sys.executable, "-c", FAILING_FILL, str(out)], capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-500:]
    assert done.stdout.strip() == "10.0"
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def _planned_bytes(n: int = 4096) -> list[Planned]:
    return [Planned("w", from_torch(torch.uint8), (n,), lambda: bytes(n))]


def test_a_full_disk_is_the_outputs_error_and_leaves_nothing(tmp_path: Path, monkeypatch):
    fill_the_disk(monkeypatch)
    target = tmp_path / "o.safetensors"
    with pytest.raises(OutputError) as err:
        write_safetensors(str(target), _planned_bytes())
    assert str(target) in str(err.value) and "No space left" in str(err.value)
    assert list(tmp_path.iterdir()) == []


def test_a_folder_that_refuses_files_is_said_as_such(tmp_path: Path, monkeypatch):
    """On a read-only file system the temporary file is never made: the error is that, not a
    failed clean-up of a file that does not exist."""
    import errno

    from ckptkit.engine import atomic

    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), args[0])

    monkeypatch.setattr(atomic.os, "open", refuse)
    monkeypatch.setattr(atomic.os, "unlink", refuse)
    target = tmp_path / "o.safetensors"
    with pytest.raises(OutputError) as err:
        write_safetensors(str(target), _planned_bytes())
    assert "cannot create a file" in str(err.value) and str(target) in str(err.value)
