"""Every command that takes ``--json`` reports a failure the same way: one JSON object on
stdout, ``{"error", "exit_code", "path"}`` (``cli.failure``), the same words as the one
line on stderr, and the exit code of the table in ``ckpt --help``."""

from __future__ import annotations

import argparse
import json

import pytest
from helpers import run_cli

from ckptkit.cli.main import build_parser

# Each command, given a missing input ({m}); outputs go to an existing folder ({o}).
MISSING_INPUT = {
    "inspect": ["inspect", "{m}"],
    "convert": ["convert", "{m}", "-o", "{o}"],
    "sample": None,  # its input is a family name, not a file: see test_sample_...
    "split": ["split", "{m}", "-o", "{d}"],
    "assemble": ["assemble", "--diffusion-model", "{m}", "-o", "{o}"],
    "vae bake": ["vae", "bake", "{m}", "{m}", "-o", "{o}"],
    "prune": ["prune", "{m}", "-o", "{o}"],
    "merge": ["merge", "weighted-sum", "{m}", "{m}", "-o", "{o}"],
    "lora check": ["lora", "check", "{m}"],
    "lora convert": ["lora", "convert", "{m}", "--to", "kohya", "-o", "{o}"],
    "lora bake": ["lora", "bake", "{m}", "{m}", "-o", "{o}"],
    "lora extract": ["lora", "extract", "{m}", "{m}", "-o", "{o}", "--rank", "4"],
    "lora resize": ["lora", "resize", "{m}", "-o", "{o}", "--rank", "4"],
    "lora merge": ["lora", "merge", "{m}", "{m}", "-o", "{o}", "--rank", "4"],
    "generate": ["generate", "{m}", "--prompt", "x", "-o", "{d}/o.png"],
    "quantize": ["quantize", "{m}", "-o", "{d}/o.gguf", "--type", "Q8_0"],
    "hash": ["hash", "{m}"],
    # the library's input is its database
    "library list": ["library", "list", "--db", "{m}"],
    "library find": ["library", "find", "abc", "--db", "{m}"],
    "library show": ["library", "show", "1", "--db", "{m}"],
    "library dupes": ["library", "dupes", "--db", "{m}"],
    "library lineage": ["library", "lineage", "1", "--db", "{m}"],
    # reports whose every entry says what became of one path (a missing one: an error entry)
    "scan": None,
    "library scan": None,
    "batch": None,  # one row per file; its own usage errors are checked in test_batch_local
}


def _json_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    if "--json" in parser._option_string_actions:
        yield " ".join(path)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _json_commands(sub, (*path, name))


def test_the_table_names_every_json_command():
    assert sorted(_json_commands(build_parser())) == sorted(MISSING_INPUT)


def _one_failure(capsys, argv: list, code: int) -> dict:
    got, out, err = run_cli(capsys, *argv, "--json")
    assert got == code, err
    (line,) = err.splitlines()
    report = json.loads(out)
    assert out.count("\n") == 1
    assert set(report) == {"error", "exit_code", "path"}
    assert report["exit_code"] == code
    assert line == f"ckpt: error: {report['error']}"
    return report


@pytest.mark.parametrize("command", [c for c, argv in MISSING_INPUT.items() if argv])
def test_a_missing_input(command, tmp_path, capsys):
    names = {"m": tmp_path / "missing.safetensors", "o": tmp_path / "out.safetensors",
             "d": tmp_path}
    argv = [a.format(**names) for a in MISSING_INPUT[command]]
    # no database yet is a usage error: "index some folders first"
    report = _one_failure(capsys, argv, 2 if command.startswith("library") else 3)
    assert report["path"] == str(names["m"])
    assert str(names["m"]) in report["error"]
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


def test_sample_into_a_missing_folder(tmp_path, capsys):
    out = tmp_path / "no" / "x.safetensors"
    report = _one_failure(capsys, ["sample", "sd1", "--tiny", "-o", out], 5)
    assert report["path"] == str(out)


@pytest.mark.parametrize(("exc", "code", "line"), [
    (RuntimeError("simulated"), 70, "ckpt: internal error: RuntimeError: simulated (a bug in "
                                    "ckptkit; CKPT_DEBUG=1 shows the traceback, please report it)"),
    (KeyboardInterrupt(), 130, "ckpt: interrupted; no output was written"),
])
def test_a_bug_and_an_interruption(tmp_path, capsys, monkeypatch, exc, code, line):
    from ckptkit.cli import convert_cmd

    def fail(*args, **kwargs):
        raise exc

    monkeypatch.setattr(convert_cmd, "convert", fail)
    monkeypatch.delenv("CKPT_DEBUG", raising=False)
    got, out, err = run_cli(capsys, "convert", "in", "-o", tmp_path / "o", "--json")
    assert (got, err) == (code, line + "\n")
    assert json.loads(out) == {"error": line.removeprefix("ckpt: ").split(" (a bug")[0],
                               "exit_code": code, "path": None}
