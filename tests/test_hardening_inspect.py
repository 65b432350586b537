"""``ckpt inspect`` on hostile and awkward input: bounded work, folders, reports.

Work is measured by memory (``tracemalloc``), not wall time: a quadratic algorithm shows as a
peak that grows with the square of the input, whatever the machine.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from pathlib import Path

import pytest
from helpers import run_cli

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


# --- reports ------------------------------------------------------------------------------------


def kohya_lora(path: Path, te_layers: int = 12) -> Path:
    """An SD1 kohya LoRA: 60 U-Net attention modules at rank 16 and 5 CLIP-L modules per
    layer at rank 8, each with its alpha."""
    entries = {}
    modules = [(f"lora_unet_down_blocks_{b}_attentions_{a}_transformer_blocks_0_{p}", 320, 16)
               for b in range(3) for a in range(2)
               for p in ("attn1_to_q", "attn1_to_k", "attn1_to_v", "attn1_to_out_0",
                         "attn2_to_q", "attn2_to_k", "attn2_to_v", "attn2_to_out_0",
                         "ff_net_0_proj", "ff_net_2")]
    modules += [(f"lora_te_text_model_encoder_layers_{n}_{p}", 768, 8) for n in range(te_layers)
                for p in ("self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj",
                          "self_attn_out_proj", "mlp_fc1")]
    for name, width, rank in modules:
        entries[name + ".lora_down.weight"] = ("F16", [rank, width], 2 * rank * width)
        entries[name + ".lora_up.weight"] = ("F16", [width, rank], 2 * rank * width)
        entries[name + ".alpha"] = ("F32", [], 4)
    return write_safetensors(path, entries)


def test_a_lora_is_summarised_by_component_and_format(tmp_path, capsys):
    """A LoRA's every module was a key prefix group: 144 modules, 182 lines."""
    path = kohya_lora(tmp_path / "lora.safetensors")
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) < 30, out
    start = lines.index("  adapters")
    rows = [line.split() for line in lines[start + 1:start + 3]]
    assert rows == [["diffusion_model", "kohya-lora", "60", "modules", "rank", "16"],
                    ["clip_l", "kohya-lora", "60", "modules", "rank", "8"]]
    assert "  key prefixes" not in lines
    code, out, _ = run_cli(capsys, "inspect", "--verbose", path)
    assert "  key prefixes" in out.splitlines() and len(out.splitlines()) > 120
    code, out, _ = run_cli(capsys, "inspect", "--json", path)
    groups = json.loads(out)["identification"]["lora"]["groups"]
    assert groups == [
        {"component": "diffusion_model", "format": "kohya-lora", "modules": 60, "ranks": [16, 16]},
        {"component": "clip_l", "format": "kohya-lora", "modules": 60, "ranks": [8, 8]}]


def test_many_prefix_groups_are_cut_short_unless_verbose(tmp_path, capsys):
    path = write_safetensors(tmp_path / "wide.safetensors",
                             {f"block{i}.w": ("F32", [1], 4) for i in range(100)})
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "    ... and 70 more groups holding 70 tensors (--verbose lists them)" in out
    assert len(out.splitlines()) < 60
    code, out, _ = run_cli(capsys, "inspect", "--verbose", path)
    assert sum(line.startswith("    block") for line in out.splitlines()) == 100


def test_counts_of_one_are_singular(tmp_path, capsys):
    path = write_safetensors(tmp_path / "one.safetensors", {"a.w": ("F32", [1], 4)})
    _, out, _ = run_cli(capsys, "inspect", path)
    assert "  tensors    1 holding 1 parameter (4 B)" in out
    assert "F32               1 tensor           1 parameter" in out
    assert " 1 tensors" not in out and " 1 parameters" not in out


# --- folders ------------------------------------------------------------------------------------


def bad_files(folder: Path) -> dict[str, str]:
    """Files named like models whose content is not a checkpoint -> a word of their error."""
    (folder / "page.safetensors").write_text("<!DOCTYPE html><html>Not found</html>")
    (folder / "empty.ckpt").write_bytes(b"")
    (folder / "pointer.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n")
    (folder / "model.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 40)
    # refused as unsafe: listed whatever its name
    (folder / "archive.data").write_bytes(b"x" * 257 + b"ustar\x0000" + b"\x00" * 300)
    return {"page.safetensors": "HTML", "empty.ckpt": "empty", "pointer.safetensors": "LFS",
            "model.gguf": "GGUF", "archive.data": "tar"}


def test_a_folder_lists_the_model_files_it_cannot_read_with_their_error(tmp_path, capsys):
    """They were skipped in silence, although each gives a clear error alone."""
    folder = tmp_path / "models"
    folder.mkdir()
    bad = bad_files(folder)
    write_safetensors(folder / "good.safetensors", {"a.w": ("F32", [1], 4)})
    (folder / "readme.txt").write_text("not a model")
    (folder / "config.json").write_text("{}")
    (folder / "picture.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30)
    code, out, err = run_cli(capsys, "inspect", "--quiet", folder)
    assert code == 4  # the tar archive, refused as unsafe, outranks the unreadable files
    for name, word in bad.items():
        (line,) = [ln for ln in err.splitlines() if name in ln]
        assert line.startswith(f"ckpt: error: {folder / name}: ") and word in line, line
    assert len(err.splitlines()) == len(bad)
    assert out.startswith(str(folder / "good.safetensors"))
    code, out, _ = run_cli(capsys, "inspect", "--json", folder)
    reports = [json.loads(line) for line in out.splitlines()]
    assert {Path(r["path"]).name for r in reports if "error" in r} == set(bad)
    assert [Path(r["path"]).name for r in reports if "error" not in r] == ["good.safetensors"]
    (folder / "archive.data").unlink()
    assert run_cli(capsys, "inspect", "--quiet", folder)[0] == 3


def test_brief_lists_one_line_per_file_errors_included(tmp_path, capsys):
    folder = tmp_path / "models"
    folder.mkdir()
    kohya_lora(folder / "lora.safetensors")
    write_safetensors(folder / "unknown.safetensors", {"a.w": ("F16", [2], 4)})
    (folder / "empty.ckpt").write_bytes(b"")
    code, out, err = run_cli(capsys, "inspect", "--brief", folder)
    assert code == 3 and err == ""
    header, *rows = out.splitlines()
    assert header.split() == ["kind", "family", "variant", "size", "dtype", "file"]
    assert len(rows) == 3
    by_name = {Path(row.split()[-1].rstrip(":")).name if "error" not in row
               else "empty.ckpt": row.split() for row in rows}
    assert by_name["lora.safetensors"][:3] == ["lora", "-", "kohya-lora"]
    assert by_name["lora.safetensors"][3] == "r8-16"
    assert by_name["unknown.safetensors"][:3] == ["unknown", "-", "-"]
    assert by_name["unknown.safetensors"][-2:] == ["F16", str(folder / "unknown.safetensors")]
    assert by_name["empty.ckpt"][0] == "error" and "empty" in " ".join(by_name["empty.ckpt"])
    starts = {header.index(col) for col in ("family", "variant", "size", "dtype", "file")}
    assert all(row[s - 1] == " " for row in rows for s in starts)  # aligned columns
    code, _, err = run_cli(capsys, "inspect", "--brief", "--json", folder)  # argparse's exit
    assert code == 2 and "not allowed with" in err


def test_diffusers_components_that_are_paths_are_refused(tmp_path, capsys):
    """A component named '../x' or '/abs' in model_index.json opened files outside."""
    from ckptkit.ops.sample import sample

    outside = tmp_path / "outside"
    outside.mkdir()
    write_safetensors(outside / "secret.safetensors", {"a.w": ("F32", [1], 4)})
    pipeline = tmp_path / "pipe"
    sample("sd1", str(pipeline), tiny=True, layout="diffusers")
    index_path = pipeline / "model_index.json"
    index = json.loads(index_path.read_text())
    for name in ("../outside", str(outside), "unet/../../outside", "..", ".", ""):
        index_path.write_text(json.dumps({**index, name: ["diffusers", "UNet2DConditionModel"]}))
        code, out, err = run_cli(capsys, "inspect", "--json", pipeline)
        assert code == 4, (name, err)
        (line,) = err.splitlines()
        assert line.startswith(f"ckpt: error: {pipeline}: ") and repr(name) in line, line
        assert "secret" not in out
    index_path.write_text(json.dumps(index))
    assert run_cli(capsys, "inspect", pipeline)[0] == 0


def test_json_output_escapes_c1_controls_and_bidi_overrides(tmp_path, capsys):
    name = "w\x9b2J\u202etxt.exe\u2066.weight"
    path = write_safetensors(tmp_path / "m\u202e.safetensors", {name: ("F32", [1], 4)},
                             metadata={"title": "a\x9b1Ab\u200f"})
    code, out, _ = run_cli(capsys, "inspect", "--json", path)
    assert code == 0
    assert all(ch.isprintable() for ch in out.rstrip("\n"))
    assert "\\u009b" in out and "\\u202e" in out and "\\u2066" in out and "\\u200f" in out
    report = json.loads(out)
    assert report["metadata"]["title"] == "a\x9b1Ab\u200f"
    assert report["prefixes"][0]["prefix"] == name.removesuffix(".weight")
    code, out, _ = run_cli(capsys, "inspect", path)
    assert all(ch.isprintable() for line in out.splitlines() for ch in line)
    assert "a\\x9b1Ab\\u200f" in out


def test_messages_that_name_a_kind_take_the_right_article(tmp_path, capsys):
    from ckptkit.errors import a_or_an

    assert [a_or_an(w) for w in ("unknown", "vae", "openclip_h", "lora", "checkpoint")] == [
        "an unknown", "a vae", "an openclip_h", "a lora", "a checkpoint"]
    # By sound: initialisms read letter by letter, and "unet" read as you-net.
    assert [a_or_an(w) for w in ("sd1 LoRA", "SDXL checkpoint", "unet", "(IA)^3")] == [
        "an sd1 LoRA", "an SDXL checkpoint", "a unet", "an (IA)^3"]
    path = write_safetensors(tmp_path / "odd.safetensors", {"a.w": ("F32", [1], 4)})
    code, _, err = run_cli(capsys, "split", path, "-o", tmp_path / "out", "--quiet")
    assert code == 2
    assert "is an unknown" in err and "a unknown" not in err


def test_a_file_of_more_tensors_than_any_model_is_not_matched_key_by_key(tmp_path, capsys,
                                                                         monkeypatch):
    from ckptkit.arch import detect
    from ckptkit.ops import inspect as inspect_module

    def refuse(*args, **kwargs):
        raise AssertionError("the keys were matched")

    monkeypatch.setattr(inspect_module, "MAX_IDENTIFIED_TENSORS", 20)
    path = write_safetensors(tmp_path / "many.safetensors",
                             {f"t{i}": ("F32", [0], 0) for i in range(21)})
    monkeypatch.setattr(detect, "_identify", refuse)
    report = inspect_file(str(path))
    assert report["identification"]["kind"] == "unknown"
    assert "21 tensors, over the 20 that ckptkit matches" in report["identification"][
        "reasons"][0]
    assert report["tensor_count"] == 21


def test_lora_key_patterns_take_time_linear_in_the_key(tmp_path):
    """A pattern with '.*' searched from every FLUX block name in a key took the square of
    its length: 20 keys of 128 KB took 12 s. A 1 MB key of block names must take well under
    a second (quadratic: minutes); the bound is loose on purpose."""
    import time

    from ckptkit.lora.detect import detect_lora

    key = "double_blocks.0." * 65_536 + "x"
    started = time.process_time()
    assert detect_lora({key: (1,), "a.lora_down.weight": (4, 8)}, {}) is None
    assert time.process_time() - started < 5


def test_text_report_lines_are_bounded_whatever_the_names(tmp_path, capsys):
    """A key of 60 KB padded every prefix row to its length; a metadata name of megabytes
    was one line of megabytes. --json keeps them whole."""
    key = "a." * 30_000 + "w"
    path = write_safetensors(tmp_path / "long.safetensors",
                             {key: ("F32", [1], 4), "b.w": ("F32", [1], 4)},
                             metadata={"k" * 1_000_000: "v"})
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert max(len(line) for line in out.splitlines()) < 4100
    assert len(out) < 12_000
    rows = _rows(out, "key prefixes")
    assert [row.split()[1:] for row in rows] == [["1", "tensor", "1", "parameter"]] * 2
    assert "more characters)" in out
    report = json.loads(run_cli(capsys, "inspect", "--json", path)[1])
    from ckptkit.ops.inspect import MAX_PREFIX_DEPTH

    assert {p["prefix"] for p in report["prefixes"]} == {"a" + ".a" * (MAX_PREFIX_DEPTH - 1), "b"}


def _rows(text: str, title: str) -> list[str]:
    lines = text.splitlines()
    start = lines.index(f"  {title}") + 1
    return [ln for ln in lines[start:] if ln.startswith("    ")][:2]


def test_line_breaks_in_names_cannot_forge_report_lines(tmp_path, capsys):
    fake = "\n  is         checkpoint  sdxl  layout ldm\n"
    path = write_safetensors(tmp_path / "forged.safetensors", {f"a{fake}.w": ("F32", [1], 4)},
                             metadata={f"k{fake}": f"v{fake}", "j": json.dumps({"x": fake})})
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert [ln for ln in out.splitlines() if ln.startswith("  is")] == ["  is         unknown"]
    assert "a\\n  is         checkpoint" in out and "k\\n  is" in out and "v\\n  is" in out
    assert '      "x": "\\n  is         checkpoint' in out  # decoded JSON, pretty-printed
    write_safetensors(tmp_path / f"b{fake}.safetensors", {"w": ("F32", [1], 4)})
    code, out, _ = run_cli(capsys, "inspect", "--brief", tmp_path)
    assert len(out.splitlines()) == 3  # the header and one row per file


def test_a_subfolder_that_cannot_be_listed_is_an_error_not_a_silence(tmp_path, capsys,
                                                                      monkeypatch):
    import os

    folder = tmp_path / "models"
    (folder / "locked").mkdir(parents=True)
    write_safetensors(folder / "good.safetensors", {"a.w": ("F32", [1], 4)})
    real = os.scandir

    def scandir(path="."):
        if isinstance(path, str) and path == str(folder / "locked"):
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    code, out, err = run_cli(capsys, "inspect", "--quiet", folder)
    assert code == 3
    (line,) = err.splitlines()
    assert line.startswith(f"ckpt: error: {folder / 'locked'}: cannot list the folder")
    assert out.startswith(str(folder / "good.safetensors"))


def test_an_unsafe_file_sets_the_exit_code_wherever_it_comes(tmp_path, capsys):
    """Unreadable files named before an unsafe one must not hide it behind exit 3."""
    folder = tmp_path / "models"
    folder.mkdir()
    (folder / "a-empty.ckpt").write_bytes(b"")
    (folder / "z-archive.data").write_bytes(b"x" * 257 + b"ustar\x0000" + b"\x00" * 300)
    assert run_cli(capsys, "inspect", "--quiet", folder)[0] == 4
    assert run_cli(capsys, "inspect", "--quiet", folder / "z-archive.data",
                   folder / "a-empty.ckpt")[0] == 4
    (folder / "z-archive.data").unlink()
    assert run_cli(capsys, "inspect", "--quiet", folder)[0] == 3


def test_a_diffusion_model_alone_is_not_said_to_miss_its_companions(tmp_path, capsys):
    """A UNet-only file is loaded beside text encoders and a VAE; only a checkpoint that
    lacks them is missing them."""
    from ckptkit.ops.sample import sample

    alone, partial = tmp_path / "unet.safetensors", tmp_path / "partial.safetensors"
    sample("sdxl", str(alone), tiny=True, components=["diffusion_model"])
    sample("sdxl", str(partial), tiny=True, components=["diffusion_model", "vae"])
    code, out, _ = run_cli(capsys, "inspect", alone)
    assert code == 0 and "  loads with clip_l, clip_g, vae\n" in out
    assert "missing" not in out
    code, out, _ = run_cli(capsys, "inspect", partial)
    assert code == 0 and "missing    clip_l, clip_g" in out


def test_a_folder_without_model_files_says_so(tmp_path, capsys):
    (tmp_path / "README.md").write_text("notes")
    for flags in ([], ["--json"], ["--brief"]):
        code, out, err = run_cli(capsys, "inspect", *flags, tmp_path)
        assert code == 0 and out == ""
        assert err == f"ckpt: nothing to inspect: no model files under {tmp_path}\n"


def test_prefix_groups_stop_at_a_fixed_depth_so_work_per_key_is_bounded():
    """20,000 keys of 2,250 components each took two minutes: every component of every key
    was a refinement step. Past MAX_PREFIX_DEPTH a group is what it is."""
    from ckptkit.ops.inspect import MAX_PREFIX_DEPTH

    deep = "a." * 3000 + "w"
    (group,) = key_prefixes({deep: 1})
    assert group["prefix"] == ".".join(["a"] * MAX_PREFIX_DEPTH)


@pytest.mark.parametrize("family", ["sd1", "sdxl", "sd3.5-large", "flux1-dev"])
def test_the_depth_limit_leaves_real_models_prefix_groups_as_they_were(family, monkeypatch):
    from ckptkit.arch.families import families
    from ckptkit.ops import inspect as inspect_module
    from ckptkit.ops.sample import sample_table

    sizes = dict.fromkeys(sample_table(families()[family], tiny=True), 1)
    capped = key_prefixes(sizes)
    monkeypatch.setattr(inspect_module, "MAX_PREFIX_DEPTH", 10**9)
    assert key_prefixes(sizes) == capped


def test_a_header_of_more_tensors_than_any_model_is_refused_as_it_is_read(tmp_path,
                                                                         monkeypatch):
    from ckptkit.errors import UnsafeFileError
    from ckptkit.formats import safetensors

    monkeypatch.setattr(safetensors, "MAX_TENSORS", 100)
    ok = write_safetensors(tmp_path / "ok.safetensors",
                           {f"t{i}": ("F32", [0], 0) for i in range(100)})
    with open_checkpoint(ok) as checkpoint:
        assert len(checkpoint) == 100
    bomb = write_safetensors(tmp_path / "bomb.safetensors",
                             {f"t{i}": ("F32", [0], 0) for i in range(101)})
    with pytest.raises(UnsafeFileError, match="more than 100 tensors"):
        open_checkpoint(bomb)
