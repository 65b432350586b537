"""``ckpt inspect`` on hostile and awkward input: bounded work, folders, reports.

Work is measured by memory (``tracemalloc``), not wall time: a quadratic algorithm shows as a
peak that grows with the square of the input, whatever the machine.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

from ckptkit.formats import open_checkpoint
from ckptkit.ops.inspect import inspect_file, key_prefixes


def write_safetensors(path: Path, entries: dict[str, tuple[str, list[int], int]],
                      metadata: dict[str, str] | None = None) -> Path:
    """A safetensors file of zero bytes per element (``entries``: name -> dtype, shape, nbytes)."""
    header: dict = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, (dtype, shape, nbytes) in entries.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)
    return path


def peak_bytes(call) -> int:
    tracemalloc.start()
    try:
        call()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# --- bounded work -----------------------------------------------------------------------------


def test_prefix_groups_of_a_long_dotted_key_take_linear_memory(tmp_path):
    """Every prefix of every key was stored: a 60 KB key of 30,000 components made 1.1 GB."""
    for n in (5_000, 20_000):
        key = "a." * n + "w"
        peak = peak_bytes(lambda key=key: key_prefixes({key: 1, "b.w": 2}))
        assert peak < 40 * len(key) + 100_000, (n, peak)
    path = write_safetensors(tmp_path / "long.safetensors", {"a." * 30_000 + "w": ("F32", [1], 4)})
    inspect_file(str(path))  # the layout tables are built once, outside the measurement
    assert peak_bytes(lambda: inspect_file(str(path))) < 5_000_000


def test_prefix_groups_are_those_of_the_longest_shared_chains():
    sizes = {"model.diffusion_model.a.w": 1, "model.diffusion_model.b.w": 2,
             "conditioner.embedders.0.t.x.w": 3, "conditioner.embedders.1.m.w": 4,
             "conditioner.embedders.1.m.v": 5, "x.y": 6, "x.y.z.w": 7, "top": 8,
             "text_encoders.clip_l.transformer.a.w": 9, "text_encoders.t5xxl.b.w": 10}
    got = {g["prefix"]: (g["tensors"], g["parameters"]) for g in key_prefixes(sizes)}
    assert got == {"model.diffusion_model": (2, 3), "conditioner.embedders.0.t.x": (1, 3),
                   "conditioner.embedders.1.m": (2, 9), "x": (1, 6), "x.y.z": (1, 7),
                   "(top level)": (1, 8),
                   "text_encoders.clip_l.transformer.a": (1, 9),
                   "text_encoders.t5xxl.b": (1, 10)}
    assert [g["parameters"] for g in key_prefixes(sizes)] == sorted(
        (g["parameters"] for g in key_prefixes(sizes)), reverse=True)


def test_a_header_of_many_empty_tensors_is_opened_in_memory_proportional_to_it(tmp_path):
    """The whole header's JSON was held at once (plus its raw bytes twice): 1.8 GB for a
    93 MB header of 1.6 M empty tensors. Read entry by entry, the peak is the header text
    and the tensors it describes."""
    n = 50_000
    path = write_safetensors(tmp_path / "many.safetensors",
                             {f"layer.{i}.w": ("F32", [0], 0) for i in range(n)})
    size = path.stat().st_size
    with open_checkpoint(path):
        pass
    peak = peak_bytes(lambda: open_checkpoint(path).close())
    assert peak < 7 * size, peak / size  # 12 times the header before
    with open_checkpoint(path) as checkpoint:
        assert len(checkpoint) == n
        assert len({id(t.shape) for t in checkpoint.values()}) == 1  # one tuple per shape


ENTRY = '{"dtype": "U8", "shape": [1], "data_offsets": [0, 1]}'
HEADERS = [h.replace("@", ENTRY) for h in (  # @: one valid entry
    '{"a": @}', '{ "a" :\n\t@\r\n}  ', '{"a": @,}', '{"a" @}', '{"a": @ "b": 1}', "{'a': @}",
    '{"a": @}}', '{"a": @, "__metadata__": {"k": "v", "k": "w"}}', '{a: @}',
    '{"a": {"dtype": "U8", "dtype": "U8", "shape": [1], "data_offsets": [0, 1]}}',
    '{"a\\u0041": @}', '{"a\x01": @}', '{"a": @, }', '{}', '{"a": @',
    '{"a": @, "__metadata__": {"k": "v"}}', '{"a": }')]


def test_the_header_is_read_entry_by_entry_by_the_grammar_of_json(tmp_path):
    """Streaming the top-level object must accept exactly the headers json.loads accepts."""
    from ckptkit.errors import FormatError

    for i, text in enumerate(HEADERS):
        raw = text.encode()
        path = tmp_path / f"h{i}.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + (b"x" if "[0, 1]" in text else b""))
        try:
            parsed = json.loads(text)
            valid = True
        except ValueError:
            valid = False
        try:
            with open_checkpoint(path) as checkpoint:
                assert valid, text
                assert set(checkpoint) == set(parsed) - {"__metadata__"}
        except FormatError as exc:
            assert not valid or "twice" in exc.reason, (text, exc.reason)
