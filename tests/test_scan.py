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
def hostile(module_tmp):
    folder = module_tmp("hostile")
    markers = module_tmp("markers")
    runs = corpus.build_hostile(str(folder), str(markers))
    return folder, markers, runs


@pytest.fixture(scope="module")
def benign(module_tmp):
    folder = module_tmp("benign")
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
    assert main(["scan", "--quiet", str(broken)]) == 3
    capsys.readouterr()
    assert main(["scan", "--json", str(benign_dir), str(hostile_dir), str(broken)]) == 4
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


# Folders: nothing may be left out without a word (unreadable folders, links, loops, typos).

def _hostile_file(path) -> None:
    corpus.torch_zip(str(path), b"\x80\x02" + corpus._call("posix", "system", corpus._u("true"))
                     + b".")


def test_symlinked_model_folder_is_followed(tmp_path, capsys):
    real = tmp_path / "shared_models"
    real.mkdir()
    _hostile_file(real / "evil.ckpt")
    webui = tmp_path / "webui"
    webui.mkdir()
    (webui / "Stable-diffusion").symlink_to(real, target_is_directory=True)
    assert main(["scan", "--quiet", "--json", str(webui)]) == 4
    report = json.loads(capsys.readouterr().out)
    assert [(f["path"], f["verdict"]) for f in report["files"]] == [
        (str(webui / "Stable-diffusion" / "evil.ckpt"), "unsafe")]


def test_unreadable_folder_is_an_error_not_a_pass(tmp_path, monkeypatch, capsys):
    # Made unreadable by refusing to list it, so that the test holds when run as root too.
    (tmp_path / "ok.txt").write_text("a config")
    hidden = tmp_path / "hidden"
    hidden.mkdir()
    _hostile_file(hidden / "evil.ckpt")
    real_scandir = os.scandir

    def scandir(path="."):
        if path == str(hidden):  # (other callers pass a file descriptor)
            raise PermissionError(13, "Permission denied", path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert main(["scan", "--quiet", str(tmp_path)]) == 3
    out = capsys.readouterr().out
    assert f"ERROR  {hidden}\n" in out
    assert "cannot list the folder (Permission denied)" in out
    assert "1 error" in out
    assert main(["scan", "--quiet", "--json", str(tmp_path)]) == 3
    report = json.loads(capsys.readouterr().out)
    entry = next(f for f in report["files"] if f["path"] == str(hidden))
    assert entry["verdict"] == "error" and "Permission denied" in entry["reasons"][0]["message"]


def test_symlink_loops_end_and_are_reported(tmp_path, capsys):
    models = tmp_path / "models"
    (models / "sub").mkdir(parents=True)
    _hostile_file(models / "sub" / "evil.ckpt")
    (models / "sub" / "back").symlink_to(models, target_is_directory=True)
    (models / "via_link").symlink_to(models / "sub", target_is_directory=True)
    (models / "self").symlink_to(models / "self")
    assert main(["scan", "--quiet", "--json", str(models)]) == 4
    report = json.loads(capsys.readouterr().out)
    by_path = {f["path"]: f for f in report["files"]}
    assert by_path[str(models / "sub" / "evil.ckpt")]["verdict"] == "unsafe"
    assert str(models / "via_link" / "evil.ckpt") not in by_path  # each real folder once
    back = by_path[str(models / "sub" / "back")]
    assert back["verdict"] == "skipped" and "symbolic link loop" in back["reasons"][0]["message"]
    again = by_path[str(models / "via_link")]
    assert again["verdict"] == "skipped" and str(models / "sub") in again["reasons"][0]["message"]
    assert "symbolic link loop" in by_path[str(models / "self")]["reasons"][0]["message"]
    assert len(report["files"]) == 4


def test_missing_path_or_link_loop_on_the_command_line_is_an_error(tmp_path, capsys):
    missing = tmp_path / "typo"
    assert main(["scan", "--quiet", str(missing)]) == 3
    out = capsys.readouterr().out
    assert f"ERROR  {missing}\n" in out and "no such file or folder" in out
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert main(["scan", "--quiet", str(loop)]) == 3
    out = capsys.readouterr().out
    assert f"ERROR  {loop}\n" in out and "symbolic link loop" in out
    assert "no such file" not in out
    dangling = tmp_path / "model.safetensors"
    dangling.symlink_to(tmp_path / "gone")
    assert main(["scan", "--quiet", "--json", str(dangling)]) == 3
    reason = json.loads(capsys.readouterr().out)["files"][0]["reasons"][0]["message"]
    assert "symbolic link to a file or folder that does not exist" in reason


def test_sniff_names_a_symlink_loop(tmp_path):
    from ckptkit.errors import FormatError
    from ckptkit.formats import detect_format

    loop = tmp_path / "loop.ckpt"
    loop.symlink_to(loop)
    with pytest.raises(FormatError, match="symbolic link loop"):
        detect_format(str(loop))


# Text from a file reaches the terminal escaped, and JSON stays strict.

_FAKE = "\x1b[2A\r\x1b[J" + "SAFE   esc/evil.ckpt" + "\x1b[8m"


def _no_control_characters(text: str) -> bool:
    return all(ch == "\n" or (ch >= " " and ch != "\x7f" and not "\x80" <= ch <= "\x9f")
               for ch in text)


def test_escape_sequences_from_a_file_are_shown_not_obeyed(tmp_path, capsys):
    folder = tmp_path / "esc"
    folder.mkdir()
    corpus.torch_zip(str(folder / "evil.ckpt"), b"\x80\x02" + corpus._call(
        "posix", "system" + _FAKE, corpus._u("true")) + b".")
    named = folder / "name\x1b]0;pwned\x07\u202e.ckpt"
    _hostile_file(named)
    assert main(["scan", "--quiet", str(folder)]) == 4
    out = capsys.readouterr().out
    assert _no_control_characters(out) and "\u202e" not in out
    assert "global posix.system\\x1b[2A\\r\\x1b[JSAFE   esc/evil.ckpt\\x1b[8m" in out
    assert "UNSAFE " + str(folder) + "/name\\x1b]0;pwned\\x07\\u202e.ckpt\n" in out
    assert main(["scan", "--quiet", "--json", str(folder)]) == 4
    raw = capsys.readouterr().out
    assert _no_control_characters(raw)
    report = json.loads(raw)  # json.dumps escapes them; the parsed values are the originals
    messages = {r["message"] for f in report["files"] for r in f["reasons"]}
    assert "global posix.system" + _FAKE in messages
    assert str(named) in {f["path"] for f in report["files"]}


def test_file_names_that_are_not_utf8(tmp_path, capsys):
    folder = os.fsencode(tmp_path)
    raw_name = os.path.join(folder, b"caf\xff\x1b.ckpt")
    try:
        with open(raw_name, "wb") as f:
            f.write(b"\x80\x02" + corpus._call("posix", "system", corpus._u("true")) + b".")
    except (OSError, UnicodeError):
        pytest.skip("this file system refuses names that are not UTF-8")
    assert main(["scan", "--quiet", str(tmp_path)]) == 4
    out = capsys.readouterr().out
    assert f"UNSAFE {tmp_path}/caf\\xff\\x1b.ckpt\n" in out
    assert main(["scan", "--quiet", "--json", str(tmp_path)]) == 4
    text = capsys.readouterr().out
    text.encode("utf-8")  # no lone surrogate reaches the output...
    assert "\\ud" not in text  # ...not even escaped, which strict JSON readers refuse
    entry = json.loads(text)["files"][0]
    assert entry["path"] == f"{tmp_path}/caf\\xff\x1b.ckpt"
    assert bytes.fromhex(entry["path_bytes"]) == raw_name
    assert "path_bytes" not in json.loads(_json_of_benign(tmp_path, capsys))["files"][0]


def _json_of_benign(tmp_path, capsys) -> str:
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "model.safetensors").write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")
    main(["scan", "--quiet", "--json", str(plain)])
    return capsys.readouterr().out


class _Shell:
    """Calls os.system when unpickled (the payload of a plain pickle.dumps file)."""

    def __reduce__(self):
        return (os.system, ("true",))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
@pytest.mark.parametrize("name", ["model.pkl", "preview.png", "model.pt", "data"])
def test_plain_pickles_of_every_protocol_are_unsafe(tmp_path, protocol, name):
    """pickle.dumps writes protocol 4 or 5 by default: loading refuses them, the scan reads
    them far enough to name the globals; unsafe, never skipped."""
    import pickle

    path = tmp_path / name
    path.write_bytes(pickle.dumps(_Shell(), protocol=protocol))
    result = scan_file(str(path))
    assert result.verdict == "unsafe", result
    messages = [r["message"] for r in result.to_dict()["reasons"]]
    assert "global posix.system" in messages and "call posix.system" in messages
    assert (f"structure pickle protocol {protocol}" in messages) == (protocol > 3)


def test_a_protocol_4_opcode_in_a_protocol_2_pickle_is_named():
    """FRAME and STACK_GLOBAL where torch.save writes neither: named once, then read on."""
    import pickletools

    from ckptkit.formats.pickle_vm import PickleVM
    from ckptkit.formats.torch_globals import find_global

    body = pickletools.optimize(pickle_bytes := __import__("pickle").dumps(
        _Shell(), protocol=4))
    assert body[:2] == b"\x80\x04" and pickle_bytes
    data = b"\x80\x02" + body[2:]  # the same opcodes, declared as protocol 2
    findings = []
    PickleVM(data, 0, find_global=find_global, persistent_load=None, where="file",
             findings=findings).run()
    kinds = [(f.kind, f.name) for f in findings]
    assert kinds[0][0] == "structure" and "protocol 4" in kinds[0][1]
    assert ("global", "posix.system") in kinds and len(
        [k for k in kinds if k[0] == "structure"]) == 1


def test_loading_still_refuses_protocol_4():
    import pickle

    from ckptkit.errors import UnsafeFileError
    from ckptkit.formats.pickle_vm import PickleVM
    from ckptkit.formats.torch_globals import find_global

    with pytest.raises(UnsafeFileError, match="protocol 4"):
        PickleVM(pickle.dumps({"a": 1}, protocol=4), 0, find_global=find_global,
                 persistent_load=None, where="file").run()


def test_files_that_are_not_pickles_stay_skipped(tmp_path):
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "notes.txt").write_text("(an opening parenthesis, then words\n")
    (tmp_path / "almost").write_bytes(b"\x80\x09" + bytes(16))  # no pickle has protocol 9
    for name in ("image.png", "notes.txt", "almost"):
        assert scan_file(str(tmp_path / name)).verdict == "skipped", name


@pytest.mark.parametrize("data", [
    b"S'x'\n0cos\nsystem\n(S'true'\ntR.",  # protocol 0: a STRING and a POP before the global
    b"I1\n0cos\nsystem\n(S'true'\ntR.",  # an INT first
    b"\x80\x02K\x012cos\nsystem\n(X\x04\x00\x00\x00truetR.",  # DUP, which torch never writes
])
def test_a_refused_opcode_before_the_first_global_does_not_hide_it(tmp_path, data):
    import pickletools

    assert any(op.name == "GLOBAL" for op, _, _ in pickletools.genops(data))
    path = tmp_path / "x.pkl"
    path.write_bytes(data)
    result = scan_file(str(path))
    assert result.verdict == "unsafe"
    assert "global os.system" in [r["message"] for r in result.to_dict()["reasons"]]


def test_text_files_are_not_called_pickles(tmp_path):
    for name, text in (("notes.txt", "Some notes\nmore\n"), ("ints.txt", "I am text\n"),
                       ("readme.md", "# Title\n\nwords\n")):
        (tmp_path / name).write_text(text)
        assert scan_file(str(tmp_path / name)).verdict == "skipped", name


def test_sets_in_a_protocol_4_pickle_do_not_hide_what_follows(tmp_path):
    """EMPTY_SET, ADDITEMS and FROZENSET (protocol 4), read by the scan only."""
    import pickle

    path = tmp_path / "sets.pkl"
    path.write_bytes(pickle.dumps([frozenset({1, 2}), {3, 4}, _Shell()], protocol=4))
    messages = [r["message"] for r in scan_file(str(path)).to_dict()["reasons"]]
    assert "global posix.system" in messages and "call posix.system" in messages
    assert not any(m.startswith("parsing stopped") for m in messages)


def test_a_yaml_file_that_opens_with_c_is_not_a_pickle(tmp_path):
    """ComfyUI's extra_model_paths.yaml opens with "comfyui:", which reads as a GLOBAL of a
    module named "omfyui:" that no import can find: not a danger, not unsafe."""
    path = tmp_path / "extra_model_paths.yaml"
    path.write_text("comfyui:\n    base_path: path/to/comfyui/\n    checkpoints: models/\n")
    assert scan_file(str(path)).verdict == "skipped"
    evil = tmp_path / "evil.yaml"
    evil.write_text("cos\nsystem\n(S'true'\ntR.")
    assert scan_file(str(evil)).verdict == "unsafe"
