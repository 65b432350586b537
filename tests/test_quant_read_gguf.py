"""The GGUF reader: files written by the gguf package's ``GGUFWriter`` read back (metadata,
shapes, values, as its own ``GGUFReader`` and ComfyUI-GGUF's loader see them), and broken or
hostile headers refused with one line and exit code 3 (4 for what readers would disagree on,
or a bomb)."""

from __future__ import annotations

import json
import struct

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize
from helpers import run_cli
from quant_read_files import QT, random_blocks, write_gguf

from ckptkit import open as ckpt_open
from ckptkit.errors import FormatError
from ckptkit.formats.dtypes import BY_NAME
from ckptkit.formats.quantized import QuantizedTensor

# Tiny tensors: on a busy machine torch's thread pool costs more than the work.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def mixed(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {
        "norm.bias": rng.standard_normal(64).astype(np.float32),
        "proj.weight": rng.standard_normal((48, 64)).astype(np.float16),
        "conv.weight": rng.standard_normal((8, 4, 3, 3)).astype(np.float32),
        "emb.weight": rng.standard_normal((2, 3, 32)).astype(np.float32),
    }
    q8 = rng.standard_normal((16, 256)).astype(np.float32)
    bf = rng.standard_normal((4, 32)).astype(np.float32)
    tensors = {**arrays,
               "q8.weight": (gguf_quantize(q8, QT.Q8_0), QT.Q8_0),
               "q4k.weight": (random_blocks(QT.Q4_K, 8).reshape(4, -1), QT.Q4_K),
               "bf.weight": (gguf_quantize(bf, QT.BF16), QT.BF16)}
    kv = {"general.name": "tiny", "test.count": 7, "test.flag": True, "test.scale": 0.5,
          "test.list": [1, 2, 3], "test.words": ["a", "b"],
          "tokenizer.ggml.scores": [0.0] * 5000, "tokenizer.ggml.tokens": ["t"] * 5000}
    path = write_gguf(tmp_path / "mixed.gguf", tensors, arch="flux", kv=kv)
    return path, arrays, tensors


def test_gguf_writer_file_reads_as_written(mixed):
    path, arrays, tensors = mixed
    reference = gguf.GGUFReader(str(path))
    with ckpt_open(path) as ck:
        assert ck.format == "gguf"
        assert list(ck) == [t.name for t in reference.tensors]
        for t in reference.tensors:  # shapes in torch order: ggml lists them innermost first
            assert ck[t.name].shape == tuple(int(d) for d in reversed(t.shape))
        meta = ck.metadata
        assert meta["general.architecture"] == "flux" and meta["general.name"] == "tiny"
        assert json.loads(meta["test.count"]) == 7 and json.loads(meta["test.flag"]) is True
        assert json.loads(meta["test.scale"]) == 0.5
        assert json.loads(meta["test.list"]) == [1, 2, 3]
        assert json.loads(meta["test.words"]) == ["a", "b"]
        assert meta["tokenizer.ggml.scores"] == "<array of 5,000 float32>"
        assert meta["tokenizer.ggml.tokens"] == "<array of 5,000 string>"
        for name, array in arrays.items():  # plain types: the same bytes, zero-copy
            tensor = ck[name]
            assert not isinstance(tensor, QuantizedTensor)
            assert np.array_equal(tensor.read().numpy(), array)
            assert np.array_equal(tensor.load().numpy(), array)
        q8 = ck["q8.weight"]
        assert isinstance(q8, QuantizedTensor) and q8.qtype == "Q8_0" and q8.block_size == 32
        assert q8.stored_nbytes == 16 * 256 // 32 * 34 and q8.bits_per_weight == 8.5
        assert bytes(q8.raw()) == tensors["q8.weight"][0].tobytes()
        # Values: the gguf package's, in the file's float type (F16: its unquantized
        # matrices are F16), or any type asked for, rounded once from float32.
        expected = gguf_dequantize(tensors["q8.weight"][0], QT.Q8_0)
        assert q8.dtype == BY_NAME["F16"]
        assert torch.equal(q8.read(), torch.from_numpy(expected).half())
        assert torch.equal(q8.dequantize(BY_NAME["F32"]), torch.from_numpy(expected))
        q4k = ck["q4k.weight"]
        expected = gguf_dequantize(tensors["q4k.weight"][0], QT.Q4_K)
        assert q4k.shape == (4, 512)
        assert torch.equal(q4k.dequantize(BY_NAME["F32"]), torch.from_numpy(expected))
        bf = ck["bf.weight"]  # BF16 is a plain element type
        assert bf.dtype == BY_NAME["BF16"] and bf.shape == (4, 32)
        assert torch.equal(bf.read().float(), torch.from_numpy(
            gguf_dequantize(tensors["bf.weight"][0], QT.BF16)))


def test_inspect_names_the_quantization(mixed, capsys):
    path, _, _ = mixed
    code, out, err = run_cli(capsys, "inspect", path, "--json")
    assert code == 0, err
    report = json.loads(out)
    quant = report["quantization"]
    assert quant["scheme"] == "gguf"
    assert quant["tensor_types"]["q8.weight"] == "Q8_0"
    assert quant["tensor_types"]["q4k.weight"] == "Q4_K"
    assert quant["tensor_types"]["norm.bias"] == "F32"
    params = {"Q8_0": 4096, "Q4_K": 2048, "F16": 48 * 64, "BF16": 128,
              "F32": 64 + 8 * 4 * 9 + 2 * 3 * 32}
    total = sum(params.values())
    assert {k: v["parameters"] for k, v in quant["types"].items()} == params
    assert quant["types"]["Q8_0"]["share"] == pytest.approx(4096 / total, abs=1e-6)
    stored = 4096 * 34 / 32 + 2048 * 144 / 256 + 2 * (48 * 64 + 128) + 4 * params["F32"]
    assert report["tensor_bytes"] == stored
    assert quant["bits_per_weight"] == pytest.approx(stored * 8 / total, abs=1e-4)
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    line = next(x for x in out.splitlines() if x.strip().startswith("quantized"))
    assert "gguf: Q8_0" in line and "bits per weight" in line
    for flags in ((), ("--verify-data",)):  # data only: nothing to run
        code, out, _ = run_cli(capsys, "scan", *flags, path)
        assert code == 0 and out.startswith("SAFE")


def test_a_gguf_named_safetensors_reads_as_gguf(mixed, tmp_path):
    path, _, _ = mixed
    renamed = tmp_path / "model.safetensors"
    renamed.write_bytes(path.read_bytes())
    with ckpt_open(renamed) as ck:
        assert ck.format == "gguf"
        assert any("named .safetensors but holds a GGUF" in n for n in ck.notes)


def test_orig_shape_alignment_and_no_architecture(tmp_path):
    """ComfyUI-GGUF's SD1/SDXL reshape undone from ``comfy.gguf.orig_shape``; a custom
    alignment; no ``general.architecture`` (a note, and SDXL's 1x1 proj_in read as linear,
    as ComfyUI-GGUF's compatibility mode does)."""
    rng = np.random.default_rng(1)
    conv = rng.standard_normal((4, 320, 3, 3)).astype(np.float32)
    flat = conv.reshape(-1, 256)
    proj = rng.standard_normal((32, 32, 1, 1)).astype(np.float16)
    tensors = {"input_blocks.1.0.in_layers.2.weight": (gguf_quantize(flat, QT.Q8_0), QT.Q8_0),
               "input_blocks.4.1.proj_in.weight": proj,
               "label_emb.0.0.weight": rng.standard_normal((8, 32)).astype(np.float16)}
    kv = {"comfy.gguf.orig_shape.input_blocks.1.0.in_layers.2.weight": [4, 320, 3, 3]}
    path = write_gguf(tmp_path / "sd.gguf", tensors, arch=None, kv=kv, alignment=64)
    with ckpt_open(path) as ck:
        assert ck.metadata["general.alignment"] == "64"  # the values below say it is used
        assert "general.architecture" not in ck.metadata
        assert not any(k.startswith("comfy.gguf.orig_shape") for k in ck.metadata)
        assert any("no general.architecture" in n for n in ck.notes)
        conv_in = ck["input_blocks.1.0.in_layers.2.weight"]
        assert conv_in.shape == (4, 320, 3, 3)
        expected = gguf_dequantize(tensors["input_blocks.1.0.in_layers.2.weight"][0], QT.Q8_0)
        assert torch.equal(conv_in.dequantize(BY_NAME["F32"]),
                           torch.from_numpy(expected.reshape(4, 320, 3, 3)))
        assert ck["input_blocks.4.1.proj_in.weight"].shape == (32, 32)
        assert np.array_equal(ck["input_blocks.4.1.proj_in.weight"].read().numpy(),
                              proj.reshape(32, 32))


def test_t5_llama_cpp_names_read_as_transformers(tmp_path):
    vec = np.ones(16, dtype=np.float32)
    tensors = {"token_embd.weight": np.ones((8, 16), dtype=np.float16),
               "enc.blk.0.attn_q.weight": np.ones((16, 16), dtype=np.float16),
               "enc.blk.0.ffn_gate.weight": np.ones((16, 16), dtype=np.float16),
               "enc.output_norm.weight": vec}
    path = write_gguf(tmp_path / "t5.gguf", tensors, arch="t5encoder")
    with ckpt_open(path) as ck:
        assert list(ck) == ["shared.weight", "encoder.block.0.layer.0.SelfAttention.q.weight",
                            "encoder.block.0.layer.1.DenseReluDense.wi_0.weight",
                            "encoder.final_layer_norm.weight"]


# -- broken and hostile files: headers built here from the published layout ---------------

def _string(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def gguf_bytes(tensors=(("w", [32, 2], 8, 0),), kv=(("general.architecture", 8, "flux"),),
               version=3, data=None, alignment=32, n_tensors=None, n_kv=None) -> bytes:
    """A GGUF file: ``tensors`` as (name, ggml dims, type id, offset), ``kv`` as (key, value
    type, value) for strings (8) and uint32 (4); ``data`` defaults to zeros for every tensor
    (each Q8_0 row of 32 values is 34 bytes), padded to the alignment."""
    out = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else
                                n_tensors, len(kv) if n_kv is None else n_kv)
    for key, kind, value in kv:
        out += _string(key) + struct.pack("<I", kind)
        out += _string(value) if kind == 8 else struct.pack("<I", value)
    for name, dims, kind, offset in tensors:
        out += _string(name) + struct.pack("<I", len(dims))
        out += b"".join(struct.pack("<Q", d) for d in dims)
        out += struct.pack("<IQ", kind, offset)
    out += b"\0" * (-len(out) % alignment)
    if data is None:
        data = b"\0" * 68 + b"\0" * (-68 % alignment)
    return out + data


def _refused(capsys, tmp_path, content: bytes, code: int = 3, match: str = "") -> str:
    path = tmp_path / "bad.gguf"
    path.write_bytes(content)
    got, _, err = run_cli(capsys, "inspect", path)
    assert got == code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err and str(path) in lines[0]
    assert match in lines[0]
    return lines[0]


def test_the_hand_built_file_is_valid(tmp_path):
    path = tmp_path / "ok.gguf"
    path.write_bytes(gguf_bytes())
    with ckpt_open(path) as ck:
        assert ck["w"].shape == (2, 32) and ck["w"].qtype == "Q8_0"
        assert torch.equal(ck["w"].read(), torch.zeros(2, 32, dtype=torch.float16))
    path.write_bytes(gguf_bytes()[:-28])  # the last tensor's padding may be left out
    with ckpt_open(path) as ck:
        assert ck["w"].numel == 64


@pytest.mark.parametrize(("content", "code", "match"), [
    (gguf_bytes(version=1), 3, "version 1"),
    (gguf_bytes(version=3 << 24), 3, "big-endian"),
    (gguf_bytes(version=4), 3, "version 4"),
    (gguf_bytes(tensors=(("w", [32, 2], 99, 0),)), 3, "unknown GGML type 99"),
    (gguf_bytes(tensors=(("w", [30, 2], 8, 0),)), 3, "not whole Q8_0 blocks"),
    (gguf_bytes(tensors=(("w", [32, 1, 1, 1, 2], 8, 0),)), 3, "5 dimensions"),
    (gguf_bytes(tensors=(("w", [32, 2], 8, 32),)), 3, "GGUF puts it at 0"),
    (gguf_bytes(tensors=(("w", [32, 2], 8, 0), ("v", [32, 1], 8, 68))), 3, "GGUF puts it"),
    (gguf_bytes(tensors=(("w", [32, 4], 8, 0),)), 3, "truncated"),
    (gguf_bytes() + b"\0" * 40, 3, "follow the last tensor"),
    (gguf_bytes(tensors=(("w", [32, 1], 8, 0), ("w", [32, 1], 8, 64))), 4, "twice"),
    (gguf_bytes(kv=(("a", 4, 1), ("a", 4, 2))), 4, "twice"),
    (gguf_bytes(kv=(("general.alignment", 4, 24),)), 3, "power of two"),
    (gguf_bytes(kv=(("general.alignment", 8, "32"),)), 3, "not a uint32"),
    (gguf_bytes(kv=(("x", 13, 0),)), 3, "unknown GGUF value type 13"),
    (gguf_bytes(n_tensors=1 << 40), 4, "tensor-count bomb"),
    (gguf_bytes(n_kv=1 << 40), 4, "key-count bomb"),
    (gguf_bytes(tensors=((b"\xff\xfe".decode("latin-1"), [32, 2], 8, 0),)), 0, ""),
    (gguf_bytes()[:20], 3, "too few"),
    (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1 << 60), 3, "truncated"),
])
def test_broken_headers_are_refused_in_one_line(capsys, tmp_path, content, code, match):
    if code == 0:  # a name that is valid UTF-8 (here: two Latin-1 letters) reads
        path = tmp_path / "ok.gguf"
        path.write_bytes(content)
        assert run_cli(capsys, "inspect", path)[0] == 0
        return
    _refused(capsys, tmp_path, content, code, match)


def test_bad_orig_shape_is_refused(capsys, tmp_path):
    tensors = {"w": np.ones((4, 256), dtype=np.float16)}
    path = write_gguf(tmp_path / "x.gguf", tensors, arch="sdxl",
                      kv={"comfy.gguf.orig_shape.w": [3, 256]})
    code, _, err = run_cli(capsys, "inspect", path)
    assert code == 3 and "comfy.gguf.orig_shape.w" in err and len(err.strip().splitlines()) == 1


def test_every_truncation_is_a_format_error(tmp_path):
    """Cut anywhere, a GGUF file is refused as unreadable, never with another exception."""
    content = write_gguf(tmp_path / "full.gguf", {
        "a": np.ones((2, 32), dtype=np.float32),
        "b": (gguf_quantize(np.ones((2, 64), dtype=np.float32), QT.Q8_0), QT.Q8_0)},
        kv={"test.words": ["x", "y"]}).read_bytes()
    path = tmp_path / "cut.gguf"
    for end in range(1, len(content) - 32):  # the last 32 bytes: b's padding, which may go
        path.write_bytes(content[:end])
        with pytest.raises(FormatError):
            ckpt_open(path).close()


def test_rows_read_alone_are_the_rows_of_the_whole(mixed, tmp_path):
    """``read_rows`` (what loading and slicing use) decodes only the rows' blocks and gives
    the same values as the whole tensor's, where rows are whole blocks or not."""
    path, _, _ = mixed
    conv = np.random.default_rng(2).standard_normal((4, 320, 3, 3)).astype(np.float32)
    reshaped = write_gguf(tmp_path / "orig.gguf", {
        "w": (gguf_quantize(conv.reshape(-1, 256), QT.Q8_0), QT.Q8_0)},
        kv={"comfy.gguf.orig_shape.w": [4, 320, 3, 3]})
    with ckpt_open(path) as ck, ckpt_open(reshaped) as other:
        for tensor in (ck["q8.weight"], ck["q4k.weight"], other["w"]):
            whole = tensor.read()
            for start, stop in ((0, 1), (1, 3), (2, 99)):
                assert torch.equal(tensor.read_rows(start, stop), whole[start:stop])
