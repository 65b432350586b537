"""Property tests: corrupt files and random pickles end as CkptError, never anything else.

Valid files (safetensors, torch zip, torch legacy) are corrupted byte by byte (bit flips,
overwrites, insertions, deletions, truncation). Opening the result either works or raises a
``CkptError``; when it works, every tensor's ``read``/``load``/``raw`` either works or raises a
``CkptError``. Never another exception type, never a hang. Random pickle streams go straight
into ``PickleVM`` with the real allow-list.

Examples are derandomized so that a run of the suite is reproducible; set
``CKPTKIT_FUZZ_EXAMPLES`` (e.g. 5000) to explore more, with fresh random examples.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
from pathlib import Path

import pytest
import torch
from fuzzing import MUTATION, mutate
from helpers import Hang, time_limit
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from ckptkit.errors import CkptError
from ckptkit.formats import open_checkpoint
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.formats.pickle_vm import PickleVM
from ckptkit.formats.torch_globals import StorageHandle, find_global

_EXAMPLES = int(os.environ.get("CKPTKIT_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=_EXAMPLES, deadline=2000, derandomize=_EXAMPLES <= 200,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
                database=None)
_READ_LIMIT = 1 << 28  # bytes; a larger materialisation would be a test-machine hazard


def check_open_and_read(path: Path) -> str:
    """Opens ``path`` and materialises every tensor; returns "ok" or "refused". Any
    exception that is not a CkptError propagates and fails the property."""
    try:
        with time_limit(5):
            try:
                ck = open_checkpoint(path)
            except CkptError as exc:
                assert str(exc).startswith(str(path)), str(exc)
                return "refused"
            with ck:
                assert ck.format in ("safetensors", "torch-zip", "torch-legacy")
                for key in ck:
                    lazy = ck[key]
                    assert isinstance(key, str)
                    if lazy.numel * max(lazy.dtype.bits // 8, 1) > _READ_LIMIT:
                        continue
                    for method in ("read", "load", "raw"):
                        try:
                            got = getattr(lazy, method)()
                        except CkptError:
                            continue
                        if method == "raw":
                            assert len(got) == lazy.nbytes
                        else:  # torch may pack values (F4), so compare sizes in bytes
                            assert got.numel() * got.element_size() == lazy.nbytes
            return "ok"
    except Hang as hang:
        raise AssertionError(f"{path.name}: {hang}") from None


# --- mutations ----------------------------------------------------------------------------

MUTATIONS = st.lists(MUTATION, min_size=1, max_size=4)


# --- seed files ---------------------------------------------------------------------------


def _tensors() -> dict[str, torch.Tensor]:
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    return {"a.weight": base, "a.view": base[1:, ::2], "b.bias": torch.ones(3).half(),
            "c.ids": torch.arange(4), "d.flag": torch.tensor(True),
            "e.bf16": torch.full((2, 2), 0.5, dtype=torch.bfloat16)}


@pytest.fixture(scope="module")
def workdir(module_tmp) -> Path:
    return module_tmp("fuzz")


@pytest.fixture(scope="module")
def seeds(workdir) -> dict[str, bytes]:
    out = {}
    st_path = workdir / "seed.safetensors"
    save_file({k: v.contiguous() for k, v in _tensors().items()}, st_path,
              metadata={"format": "pt", "note": "seed"})
    out["safetensors"] = st_path.read_bytes()
    wrapped = {"state_dict": _tensors(), "global_step": 7, "epoch": 1}
    buf = io.BytesIO()
    torch.save(wrapped, buf)
    out["zip"] = buf.getvalue()
    buf = io.BytesIO()
    torch.save(wrapped, buf, _use_new_zipfile_serialization=False)
    out["legacy"] = buf.getvalue()
    for name, data in out.items():  # every seed is valid to begin with
        path = workdir / f"check-{name}"
        path.write_bytes(data)
        assert check_open_and_read(path) == "ok", name
    return out


def _fuzz_file(workdir: Path, name: str, data: bytes) -> str:
    path = workdir / name
    path.write_bytes(data)
    return check_open_and_read(path)


@FUZZ
@given(mutations=MUTATIONS)
def test_corrupt_safetensors(workdir, seeds, mutations):
    _fuzz_file(workdir, "m.safetensors", mutate(seeds["safetensors"], mutations))


@FUZZ
@given(mutations=MUTATIONS, header_only=st.booleans())
def test_corrupt_safetensors_header(workdir, seeds, mutations, header_only):
    """Mutations kept inside the 8-byte length and the JSON header, where the rules are."""
    data = seeds["safetensors"]
    end = 8 + struct.unpack("<Q", data[:8])[0]
    head = mutate(data[:end], mutations) if header_only else data[:end]
    if not header_only:
        head = mutate(head[8:], mutations)
        head = struct.pack("<Q", len(head)) + head  # a consistent length, broken JSON
    _fuzz_file(workdir, "h.safetensors", head + data[end:])


@FUZZ
@given(mutations=MUTATIONS)
def test_corrupt_torch_zip(workdir, seeds, mutations):
    _fuzz_file(workdir, "m.ckpt", mutate(seeds["zip"], mutations))


@FUZZ
@given(mutations=MUTATIONS)
def test_corrupt_torch_legacy(workdir, seeds, mutations):
    _fuzz_file(workdir, "m.pt", mutate(seeds["legacy"], mutations))


@FUZZ
@given(mutations=MUTATIONS)
def test_corrupt_data_pkl_in_a_valid_zip(workdir, seeds, mutations):
    """data.pkl mutated, then the archive rebuilt with correct CRCs, so that the corruption
    reaches the pickle interpreter instead of stopping at the CRC check."""
    with zipfile.ZipFile(io.BytesIO(seeds["zip"])) as archive:
        members = [(i.filename, archive.read(i)) for i in archive.infolist()]
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members:
            archive.writestr(name, mutate(data, mutations) if name.endswith("data.pkl")
                             else data)
    _fuzz_file(workdir, "p.pt", out.getvalue())


# --- the pickle interpreter on its own ----------------------------------------------------


def X(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _global(module: str, name: str) -> bytes:
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


# Fragments that make mostly well-formed streams, so that random programs get past the first
# few bytes: containers, stack ops, memo, numbers, strings, allowed and refused globals.
_FRAGMENTS = [
    b"}", b"]", b")", b"(", b"t", b"\x85", b"\x86", b"\x87", b"s", b"u", b"a", b"e", b"b",
    b"R", b"\x81", b"Q", b"N", b"\x88", b"\x89", b".", b"K\x00", b"K\x03", b"M\xff\xff",
    b"J\xff\xff\xff\xff", b"\x8a\x01\x05", b"\x8a\x00", b"G" + struct.pack(">d", 0.5),
    b"C\x03abc", b"B\x00\x00\x00\x00", X("state_dict"), X("storage"), X("0"), X("cpu"),
    X("f8"), X("latin1"), X("<"), b"q\x00", b"q\x01", b"r\x02\x00\x00\x00", b"h\x00",
    b"h\x01", b"j\x02\x00\x00\x00",
    _global("collections", "OrderedDict"), _global("torch._utils", "_rebuild_tensor_v2"),
    _global("torch._utils", "_rebuild_tensor_v3"), _global("torch._utils", "_rebuild_parameter"),
    _global("torch._tensor", "_rebuild_from_type_v2"), _global("torch", "FloatStorage"),
    _global("torch", "float16"), _global("torch", "Size"), _global("torch", "Tensor"),
    _global("torch.storage", "UntypedStorage"), _global("_codecs", "encode"),
    _global("builtins", "set"), _global("builtins", "frozenset"), _global("numpy", "dtype"),
    _global("numpy._core.multiarray", "scalar"), _global("torch", "device"),
    _global("pytorch_lightning.callbacks.model_checkpoint", "ModelCheckpoint"),
    _global("numpy._core.multiarray", "_reconstruct"), _global("numpy", "ndarray"),
    _global("argparse", "Namespace"), _global("torch.nn.modules.container", "ParameterDict"),
    _global("os", "system"), b"I1\n", b"\x93", b"\x8c\x01a",
]
PROGRAMS = st.lists(st.sampled_from(_FRAGMENTS), max_size=40).map(
    lambda parts: b"\x80\x02" + b"".join(parts) + b".")


def _storage(pid):
    if not isinstance(pid, tuple):
        raise CkptError("persistent id is not a tuple")
    return StorageHandle("0", BY_NAME["F32"], 16, "cpu")


def run_vm(data: bytes, persistent_load) -> None:
    try:
        with time_limit(5):
            try:
                _obj, end = PickleVM(data, 0, find_global=find_global,
                                    persistent_load=persistent_load, where="fuzz").run()
            except CkptError:
                return
            assert 0 < end <= len(data)
            assert data[end - 1:end] == b"."
    except Hang as hang:
        raise AssertionError(str(hang)) from None


@FUZZ
@given(data=st.binary(max_size=300), protocol=st.booleans())
def test_pickle_vm_random_bytes(data, protocol):
    run_vm((b"\x80\x02" if protocol else b"") + data, None)


@FUZZ
@given(program=PROGRAMS, storages=st.booleans())
def test_pickle_vm_random_programs(program, storages):
    run_vm(program, _storage if storages else None)


@FUZZ
@given(mutations=MUTATIONS)
def test_pickle_vm_mutated_real_pickle(seeds, mutations):
    with zipfile.ZipFile(io.BytesIO(seeds["zip"])) as archive:
        real = next(archive.read(n) for n in archive.namelist() if n.endswith("data.pkl"))
    run_vm(mutate(real, mutations), _storage)
