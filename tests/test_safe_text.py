"""``printable`` and ``json_text``: text from a file, made safe for a terminal and for JSON."""

from __future__ import annotations

import json
import os

from ckptkit.safe_text import has_surrogates, json_safe, json_text, printable


def test_printable_keeps_ordinary_text():
    for text in ("", "model.safetensors", "posix.system", "café 模型 🙂", r"C:\models\x.ckpt"):
        assert printable(text) == text


def test_printable_escapes_every_control_character():
    assert printable("a\x1b[2Ab") == "a\\x1b[2Ab"
    assert printable("\r\n\t") == "\\r\\n\\t"
    assert printable("\x00\x07\x08\x7f") == "\\x00\\x07\\x08\\x7f"
    assert printable("\x9b2J") == "\\x9b2J"  # C1 CSI, obeyed by some terminals
    assert printable("\u202etxt.exe") == "\\u202etxt.exe"  # right-to-left override
    assert printable("a\u2028b") == "a\\u2028b"
    assert printable("\U000e0041") == "\\U000e0041"  # a tag character (invisible)
    for code in range(0x110000):
        out = printable(chr(code))
        assert (out.isprintable() and out.isascii()) or out == chr(code)
        assert all(ch >= " " and ch != "\x7f" and not "\x80" <= ch <= "\x9f" for ch in out)


def test_bytes_of_names_that_are_not_utf8_show_as_bytes():
    name = os.fsdecode(b"caf\xff\xc3.ckpt") if os.name != "nt" else "caf\udcff\udcc3.ckpt"
    assert printable(name) == "caf\\xff\\xc3.ckpt"
    assert printable("\ud800") == "\\ud800"
    printable(name).encode("utf-8")


def test_json_text_only_replaces_surrogates():
    assert json_text("a\x1bb\u202e") == "a\x1bb\u202e"  # json.dumps escapes these itself
    assert json_text("caf\udcff.ckpt") == "caf\\xff.ckpt"
    assert json_text("x\udabcy") == "x\\udabcy"
    assert has_surrogates("caf\udcff") and not has_surrogates("café")
    value = json_safe({"caf\udcff": ["\udc80", ("t", 1, None)], "n": 2.5})
    assert value == {"caf\\xff": ["\\x80", ["t", 1, None]], "n": 2.5}
    dumped = json.dumps(value)
    assert "\\ud" not in dumped
    dumped.encode("utf-8")


def test_error_lines_show_escape_sequences_instead_of_obeying_them(tmp_path, capsys):
    from ckptkit.cli.main import main

    bad = tmp_path / "x\x1b[2K\rSAFE.safetensors"
    bad.write_bytes(b"x")
    assert main(["convert", str(bad), "-o", str(tmp_path / "o.safetensors"), "--quiet"]) == 3
    err = capsys.readouterr().err
    assert "\x1b" not in err and "\r" not in err
    assert "x\\x1b[2K\\rSAFE.safetensors" in err


def test_inspect_shows_escape_sequences_in_metadata_instead_of_obeying_them(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from ckptkit.cli.main import main

    path = tmp_path / "m.safetensors"
    save_file({"w": torch.zeros(2)}, str(path),
              metadata={"title": "a\x1b[2J\rb", "k\x1b[1A": '{"x": 1}'})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\r" not in out
    assert "a\\x1b[2J\\rb" in out and "k\\x1b[1A" in out


# C1 controls, bidi embeddings/overrides/isolates and the invisible direction marks: each can
# make a terminal show text other than the file's (a CSI sequence, a name read backwards).
HIDDEN = ["\x85", "\x9b", "\x9d", "\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)),
          *map(chr, range(0x2066, 0x206A))]


def test_printable_escapes_c1_controls_and_every_bidi_control():
    for ch in HIDDEN:
        out = printable(f"a{ch}b")
        assert out == f"a\\x{ord(ch):02x}b" if ord(ch) <= 0xFF else f"a\\u{ord(ch):04x}b"
        assert out.isascii()


def test_json_dumps_escapes_them_and_decodes_back():
    from ckptkit.safe_text import json_dumps

    value = {"k" + "".join(HIDDEN): ["\x1b[2J", "\U000e0041 tag", "café 模型 🙂", float("inf")],
             "caf\udcff": 1}
    text = json_dumps(value)
    assert all(ch.isprintable() for ch in text)
    assert "café 模型 🙂" in text  # readable text stays as it is
    assert "\\u202e" in text and "\\u009b" in text and "\\udb40\\udc41" in text
    assert json.loads(text) == {"k" + "".join(HIDDEN): ["\x1b[2J", "\U000e0041 tag",
                                                         "café 模型 🙂", "inf"],
                                "caf\\xff": 1}
