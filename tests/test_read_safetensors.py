"""safetensors: files from the official writer read identically; broken headers are refused.

The hand-built files check every header rule of the format. For each, the reference reader
(``safetensors.safe_open``) is asked too, so that our rules and the reference's are seen to
agree; the few rules where we are stricter than the reference say so in a comment.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ckptkit.errors import CkptError, FormatError
from ckptkit.formats import open_checkpoint


def as_bytes(tensor: torch.Tensor) -> bytes:
    flat = tensor.detach().contiguous().reshape(-1)
    if flat.numel() == 0:
        return b""
    return flat.view(torch.uint8).numpy().tobytes()


def sample(dtype: torch.dtype, shape=(3, 5)) -> torch.Tensor:
    """Deterministic bytes of ``dtype`` covering every bit pattern class (nan, inf, -0...)."""
    n = 1
    for d in shape:
        n *= d
    itemsize = torch.empty(0, dtype=dtype).element_size()
    raw = torch.arange(n * itemsize, dtype=torch.int64).mul_(37).add_(11).remainder_(256)
    raw = raw.to(torch.uint8)
    if dtype == torch.bool:
        return (raw.remainder(2) == 1).reshape(shape)
    return raw.view(dtype).reshape(shape)


# Every dtype safetensors.torch.save_file writes, by its header name.
WRITER_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
    "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
    "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2, "F8_E4M3FNUZ": torch.float8_e4m3fnuz,
    "F8_E5M2FNUZ": torch.float8_e5m2fnuz, "F8_E8M0": torch.float8_e8m0fnu,
    "C64": torch.complex64, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
}


def assert_reads_like_reference(path: Path) -> None:
    ref = load_file(path)
    with open_checkpoint(path) as ck:
        assert ck.format == "safetensors"
        assert set(ck) == set(ref)
        for key, expected in ref.items():
            lazy = ck[key]
            for got in (lazy.read(), lazy.load()):
                assert got.dtype == expected.dtype, key
                assert tuple(got.shape) == tuple(expected.shape), key
                assert as_bytes(got) == as_bytes(expected), key
            assert bytes(lazy.raw()) == as_bytes(expected), key


@pytest.mark.parametrize("name", sorted(WRITER_DTYPES))
def test_each_writer_dtype(tmp_path, name):
    dtype = WRITER_DTYPES[name]
    tensors = {"x": sample(dtype), "scalar": sample(dtype, ()), "empty": sample(dtype, (0, 4))}
    path = tmp_path / f"{name}.safetensors"
    save_file(tensors, path)
    assert_reads_like_reference(path)
    with open_checkpoint(path) as ck:
        assert ck["x"].dtype.name == name
        assert ck["x"].shape == (3, 5)
        assert ck["scalar"].shape == ()
        assert ck["empty"].shape == (0, 4)


def test_float4_written_by_the_reference(tmp_path):
    """save_file writes torch.float4_e2m1fn_x2 as dtype F4 (two values a byte; the header
    shape counts values, so [2, 8] for 8 bytes). torch 2.13 has the type, and the reference
    reads it back; so must we: same dtype, shape and bytes as ``load_file``."""
    packed = sample(torch.uint8, (2, 4)).view(torch.float4_e2m1fn_x2)
    path = tmp_path / "f4.safetensors"
    save_file({"q": packed}, path)
    ref = load_file(path)["q"]
    assert ref.dtype == torch.float4_e2m1fn_x2 and tuple(ref.shape) == (2, 4)
    with open_checkpoint(path) as ck:
        lazy = ck["q"]
        assert lazy.dtype.name == "F4"
        assert lazy.shape == (2, 8)
        assert bytes(lazy.raw()) == as_bytes(ref)
        for method in ("read", "load"):
            got = getattr(lazy, method)()
            assert got.dtype == ref.dtype, method
            assert tuple(got.shape) == tuple(ref.shape), method
            assert as_bytes(got) == as_bytes(ref), method


def test_all_dtypes_in_one_file_with_metadata(tmp_path):
    tensors = {f"model.{name.lower()}.weight": sample(dtype, (2, 3, 4))
               for name, dtype in WRITER_DTYPES.items()}
    tensors["model.zero_d"] = torch.tensor(1.25)
    tensors["model.empty"] = torch.empty(0, dtype=torch.float16)
    metadata = {"format": "pt", "modelspec.title": "Tiny ✓", "ss_network_dim": "16",
                "json": json.dumps({"a": [1, 2], "b": "c"}), "empty": ""}
    path = tmp_path / "all.safetensors"
    save_file(tensors, path, metadata=metadata)
    assert_reads_like_reference(path)
    with open_checkpoint(path) as ck, safe_open(path, "pt") as ref:
        assert ck.metadata == metadata == ref.metadata()
        assert ck.extras == {}
        assert ck.notes == []


def test_no_metadata_means_empty_dict(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file({"a": torch.ones(2)}, path)
    with open_checkpoint(path) as ck:
        assert ck.metadata == {}


def test_load_is_zero_copy_and_never_writes(tmp_path):
    path = tmp_path / "z.safetensors"
    save_file({"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(4, 4)}, path)
    before = path.read_bytes()
    header_len = struct.unpack("<Q", before[:8])[0]
    with open_checkpoint(path) as ck:
        a, b = ck["a"].load(), ck["b"].load()
        # both views lie in one mapping, at their header offsets
        offsets = json.loads(before[8:8 + header_len])
        delta = offsets["b"]["data_offsets"][0] - offsets["a"]["data_offsets"][0]
        assert b.data_ptr() - a.data_ptr() == delta
        a.fill_(7.0)
        copy = ck["b"].read()
        copy.fill_(3.0)
        assert torch.equal(ck["b"].load(), torch.ones(4, 4))
    del a, b
    assert path.read_bytes() == before


# --- hand-built files -------------------------------------------------------------------


def write_raw(path: Path, header: bytes, data: bytes = b"", length: int | None = None) -> Path:
    """Writes an 8-byte length (``len(header)`` unless given), ``header`` and ``data``."""
    n = len(header) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + header + data)
    return path


def entry(dtype: str, shape, begin, end) -> dict:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def js(obj) -> bytes:
    return json.dumps(obj).encode()


def reference_refuses(path: Path) -> bool:
    try:
        with safe_open(path, "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open objects are not mappings
                f.get_tensor(key)
    except (safetensors.SafetensorError, OSError, ValueError):
        return True
    return False


BAD_FILES = {
    "header-length-over-100MB": (b"{}", b"", 100_000_001),
    "header-length-huge": (b"{}", b"", 2**63 + 5),
    "header-length-past-eof": (js({"a": entry("U8", [1], 0, 1)}), b"x", 500),
    "header-cut-short": (js({"a": entry("U8", [4], 0, 4)})[:-5], b"", None),
    "invalid-utf8": (b'{"\xff\xfe": ' + js(entry("U8", [1], 0, 1)) + b"}", b"x", None),
    "invalid-utf8-in-value": (b'{"a": {"dtype": "U\xc3", "shape": [1], '
                              b'"data_offsets": [0, 1]}}', b"x", None),
    "not-json": (b"{this is not json}", b"", None),
    "json-nan": (b'{"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, NaN]}}', b"x",
                 None),
    "object-then-garbage": (js({"a": entry("U8", [1], 0, 1)}) + b"xyz", b"x", None),
    "two-objects": (js({"a": entry("U8", [1], 0, 1)}) + b"{}", b"x", None),
    "non-object-list": (b"[1, 2, 3]", b"", None),
    "non-object-string": (b'"{}"', b"", None),
    "duplicate-keys": (b'{"a": ' + js(entry("U8", [1], 0, 1)) + b', "a": '
                       + js(entry("U8", [1], 1, 2)) + b"}", b"xx", None),
    "metadata-int-value": (js({"__metadata__": {"k": 1}, "a": entry("U8", [1], 0, 1)}), b"x",
                           None),
    "metadata-null-value": (js({"__metadata__": {"k": None}, "a": entry("U8", [1], 0, 1)}),
                            b"x", None),
    "metadata-nested": (js({"__metadata__": {"k": {"x": "y"}}, "a": entry("U8", [1], 0, 1)}),
                        b"x", None),
    "metadata-not-object": (js({"__metadata__": ["k", "v"], "a": entry("U8", [1], 0, 1)}),
                            b"x", None),
    "unknown-dtype": (js({"a": entry("F12", [1], 0, 1)}), b"x", None),
    "dtype-lowercase": (js({"a": entry("f32", [1], 0, 4)}), b"xxxx", None),
    "dtype-not-string": (js({"a": entry(4, [1], 0, 4)}), b"xxxx", None),
    "negative-shape": (js({"a": entry("U8", [-1], 0, 1)}), b"x", None),
    "float-shape": (js({"a": entry("U8", [1.0], 0, 1)}), b"x", None),
    "bool-shape": (js({"a": entry("U8", [True], 0, 1)}), b"x", None),
    "string-shape": (js({"a": entry("U8", ["1"], 0, 1)}), b"x", None),
    "shape-not-list": (js({"a": entry("U8", 1, 0, 1)}), b"x", None),
    "huge-shape": (js({"a": entry("U8", [2**70], 0, 1)}), b"x", None),
    "negative-offset": (js({"a": entry("U8", [1], -1, 0)}), b"x", None),
    "float-offset": (js({"a": entry("U8", [1], 0.0, 1.0)}), b"x", None),
    "three-offsets": (js({"a": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1, 2]}}),
                      b"x", None),
    "offsets-reversed": (js({"a": entry("U8", [0], 1, 0), "b": entry("U8", [1], 0, 1)}), b"x",
                         None),
    "missing-data-offsets": (js({"a": {"dtype": "U8", "shape": [1]}}), b"x", None),
    "missing-dtype": (js({"a": {"shape": [1], "data_offsets": [0, 1]}}), b"x", None),
    "entry-not-object": (js({"a": [1, 2]}), b"x", None),
    "gap-between": (js({"a": entry("U8", [1], 0, 1), "b": entry("U8", [1], 2, 3)}), b"xyz",
                    None),
    "gap-at-start": (js({"a": entry("U8", [2], 1, 3)}), b"xyz", None),
    "overlap": (js({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 1, 3)}), b"xyz", None),
    "same-range-twice": (js({"a": entry("U8", [2], 0, 2), "b": entry("U8", [2], 0, 2)}), b"xy",
                         None),
    "trailing-bytes": (js({"a": entry("U8", [1], 0, 1)}), b"xy", None),
    "data-without-tensors": (b"{}", b"stray", None),
    "byte-size-too-small": (js({"a": entry("F32", [2], 0, 4)}), b"xxxx", None),
    "byte-size-too-big": (js({"a": entry("F16", [2], 0, 6)}), b"xxxxxx", None),
    "byte-size-for-empty": (js({"a": entry("F32", [0, 3], 0, 4)}), b"xxxx", None),
    "truncated-data": (js({"a": entry("F32", [4], 0, 16)}), b"x" * 10, None),
    "truncated-second-tensor": (js({"a": entry("U8", [2], 0, 2), "b": entry("F32", [2], 2, 10)}),
                                b"xy" + b"z" * 5, None),
    "odd-f4-count": (js({"a": entry("F4", [3], 0, 1)}), b"x", None),
}

# Where we refuse what safetensors 0.8's safe_open accepts (we are stricter on purpose, so a
# file we accept is read the same way by every tool):
# - "duplicate-keys" with *identical* entries: serde keeps the last value, so the reference
#   accepts {"a": X, "a": X}; with different ranges it refuses (the first range is a gap).
# - a header with whitespace before the opening brace is accepted by the reference (serde
#   skips it); our sniffer decides the format by the '{' at byte 8 and refuses it.
REFERENCE_ACCEPTS = {
    "duplicate-identical": (b'{"a": ' + js(entry("U8", [1], 0, 1)) + b', "a": '
                            + js(entry("U8", [1], 0, 1)) + b"}", b"x", None),
    "leading-whitespace": (b" " + js({"a": entry("U8", [1], 0, 1)}), b"x", None),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_header_rule_violations_are_format_errors(tmp_path, case):
    header, data, length = BAD_FILES[case]
    path = write_raw(tmp_path / "bad.safetensors", header, data, length)
    with pytest.raises(FormatError) as info:
        open_checkpoint(path)
    assert str(info.value).startswith(str(path)), str(info.value)
    assert info.value.reason  # one sentence saying what is wrong
    # the reference reader refuses the same file
    assert reference_refuses(path), f"safetensors accepts {case}"


@pytest.mark.parametrize("case", sorted(REFERENCE_ACCEPTS))
def test_rules_stricter_than_the_reference(tmp_path, case):
    header, data, length = REFERENCE_ACCEPTS[case]
    path = write_raw(tmp_path / "strict.safetensors", header, data, length)
    assert not reference_refuses(path)  # documents the difference: see the comment above
    with pytest.raises(FormatError) as info:
        open_checkpoint(path)
    assert str(info.value).startswith(str(path))


def test_header_padding_and_unknown_fields_accepted_like_reference(tmp_path):
    header = js({"a": {**entry("F16", [2], 0, 4), "extra": [1]}}) + b" " * 13
    path = write_raw(tmp_path / "pad.safetensors", header, b"\x00\x3c\x00\xc0")
    assert not reference_refuses(path)
    with open_checkpoint(path) as ck:
        assert ck["a"].read().tolist() == [1.0, -2.0]


def test_zero_size_tensors_anywhere_in_the_data(tmp_path):
    header = js({"a": entry("U8", [2], 0, 2), "e1": entry("F32", [0], 2, 2),
                 "b": entry("U8", [1], 2, 3), "e2": entry("I64", [3, 0], 3, 3)})
    path = write_raw(tmp_path / "zeros.safetensors", header, b"xyz")
    assert not reference_refuses(path)
    with open_checkpoint(path) as ck:
        assert bytes(ck["a"].raw()) == b"xy" and bytes(ck["b"].raw()) == b"z"
        assert ck["e2"].read().shape == (3, 0)


def test_header_exactly_at_limit_is_parsed_not_refused_for_size(tmp_path):
    # a 1000-byte header of spaces after the object: valid for both readers
    header = js({"a": entry("U8", [1], 0, 1)})
    header += b" " * (1000 - len(header))
    path = write_raw(tmp_path / "spaces.safetensors", header, b"q")
    assert not reference_refuses(path)
    with open_checkpoint(path) as ck:
        assert bytes(ck["a"].raw()) == b"q"


def test_deeply_nested_metadata_json_is_a_format_error(tmp_path):
    header = b'{"__metadata__": {"k": ' + b"[" * 100_000 + b"]" * 100_000 + b"}}"
    path = write_raw(tmp_path / "deep.safetensors", header)
    with pytest.raises(FormatError):
        open_checkpoint(path)
    assert reference_refuses(path)


@pytest.mark.parametrize(("dtype", "shape", "nbytes"), [
    ("F4", [2, 3], 3),  # whole bytes, but torch's float4_e2m1fn_x2 needs an even last dim
    ("F6_E2M3", [4], 3),  # valid safetensors; torch has no 6-bit type
    ("F6_E3M2", [2, 4], 6),
])
def test_sub_byte_types_torch_cannot_hold(tmp_path, dtype, shape, nbytes):
    """Valid headers (the reference parses them, and refuses only to make a torch tensor).
    The file opens, the bytes are there; making a torch tensor of them either works or is a
    CkptError — not a TypeError from deep inside."""
    data = bytes(range(1, nbytes + 1))
    path = write_raw(tmp_path / "sub.safetensors", js({"t": entry(dtype, shape, 0, nbytes)}),
                     data)
    with safe_open(path, "pt") as ref:
        assert list(ref.keys()) == ["t"]  # the header is fine for the reference
    with open_checkpoint(path) as ck:
        lazy = ck["t"]
        assert lazy.dtype.name == dtype
        assert lazy.shape == tuple(shape)
        assert bytes(lazy.raw()) == data
        for method in ("read", "load"):
            try:
                got = getattr(lazy, method)()
            except CkptError as exc:
                assert str(exc).startswith(str(path)), str(exc)
                continue
            except Exception as exc:
                pytest.fail(f"{dtype} {shape} {method}() raised {type(exc).__name__}: {exc}")
            assert as_bytes(got) == data


def test_load_view_outlives_close(tmp_path):
    """Using a load() view after the checkpoint is closed must not crash the interpreter
    (run in a child process so that a crash fails only this test)."""
    path = tmp_path / "w.safetensors"
    save_file({"w": torch.arange(1000, dtype=torch.float32)}, path)
    script = textwrap.dedent("""
        import sys
        from ckptkit.formats import open_checkpoint
        with open_checkpoint(sys.argv[1]) as ck:
            viewed = ck["w"].load()
        print(float(viewed.sum()), flush=True)
    """)
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-400:])
    assert done.stdout.strip() == "499500.0"
