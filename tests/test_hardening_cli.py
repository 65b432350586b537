"""First use of the command line: one exit-code table for every command, the names users
type for components and families, and outputs that are written only where they may be."""

from __future__ import annotations

import os
import signal
import socket
import stat
import subprocess
import sys

import corpus
import pytest

from ckptkit.arch.families import component_name, families, family, family_id
from ckptkit.cli.main import main
from ckptkit.engine.atomic import check_output_path
from ckptkit.errors import FormatError, OutputError, UnsafeFileError, UsageError
from ckptkit.formats import detect_format
from ckptkit.ops import scan as scan_module
from ckptkit.ops.inspect import inspect_file


def _evil(path) -> None:
    corpus.torch_zip(str(path), b"\x80\x02" + corpus._call("posix", "system", corpus._u("true"))
                     + b".")


# One exit-code table: 2 usage, 3 unreadable input, 4 unsafe input, 5 output, 70 internal.

def test_unsafe_input_exits_4_in_scan_as_in_inspect_and_convert(tmp_path, capsys):
    evil = tmp_path / "evil.ckpt"
    _evil(evil)
    assert main(["scan", "--quiet", str(evil)]) == 4
    assert main(["inspect", str(evil)]) == 4
    assert main(["convert", str(evil), "-o", str(tmp_path / "out.safetensors")]) == 4
    capsys.readouterr()


def test_unreadable_input_exits_3_in_scan_as_in_inspect_and_convert(tmp_path, capsys):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    missing = tmp_path / "typo.ckpt"
    for path in (cut, missing):
        assert main(["scan", "--quiet", str(path)]) == 3
        assert main(["inspect", str(path)]) == 3
        assert main(["convert", str(path), "-o", str(tmp_path / "out.safetensors")]) == 3
    capsys.readouterr()


def test_unsafe_outranks_unreadable_in_a_scan(tmp_path, capsys):
    _evil(tmp_path / "evil.ckpt")
    (tmp_path / "cut.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    assert main(["scan", "--quiet", str(tmp_path)]) == 4
    capsys.readouterr()


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as done:
        main(["scan", "--no-such-option", "x"])
    assert done.value.code == 2
    assert capsys.readouterr().err.count("\n") == 1


def test_the_help_lists_the_codes_the_errors_carry(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    table = capsys.readouterr().out.split("exit codes")[1]
    for error in (UsageError, FormatError, UnsafeFileError, OutputError):
        assert f"\n  {error.exit_code} " in table, error


def test_a_bug_on_one_file_exits_70_in_a_scan(tmp_path, monkeypatch, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"anything")

    def broken(path, verify_data):
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(scan_module, "_scan", broken)
    assert main(["scan", "--quiet", str(tmp_path)]) == 70
    assert "ZeroDivisionError" in capsys.readouterr().out


# The demo's file is what the demo calls it.

def test_demo_training_checkpoint_is_identified_as_one(tmp_path, capsys):
    from ckptkit.ops.inspect import inspect_file
    from ckptkit.samples import demo

    path = tmp_path / "sd1-training.ckpt"
    assert demo.main([str(path)]) == 0
    assert "SD 1.x training checkpoint" in capsys.readouterr().out
    found = inspect_file(str(path))["identification"]
    assert (found["kind"], found["family"], found["missing"]) == ("checkpoint", "sd1", [])
    assert [c["name"] for c in found["components"]] == ["diffusion_model", "clip_l", "vae"]
    assert found["extra"] == {"ema weights (model_ema.*)": 688, "noise schedule buffers": 2}


# The names users call families and components by.

@pytest.mark.parametrize(("typed", "fid"), [
    ("sd15", "sd1"), ("SD1.5", "sd1"), ("sd-1.5", "sd1"), ("sd21", "sd2"),
    ("sdxl-base", "sdxl"), ("SDXL_Refiner", "sdxl-refiner"), ("sd3", "sd3-medium"),
    ("sd3.5-large", "sd3.5-large"), ("sd35m", "sd3.5-medium"), ("flux-dev", "flux1-dev"),
    ("FLUX.1-schnell", "flux1-schnell"), ("stable-diffusion-xl-v1-base", "sdxl"),
])
def test_family_aliases(typed, fid):
    assert family_id(typed) == fid
    assert family(typed).id == fid


def test_every_family_id_and_component_name_names_itself():
    for fid, fam in families().items():
        assert family_id(fid) == fid
        for name in fam.component_names:
            assert component_name(name) == name


@pytest.mark.parametrize("typed", ["flux", "sd3.5", "sdxl-lightning"])
def test_names_that_are_no_one_family_are_refused_with_the_choices(typed, tmp_path, capsys):
    assert main(["sample", typed, "--tiny", "-o", str(tmp_path / "x.safetensors")]) == 2
    err = capsys.readouterr().err
    assert f"unknown family {typed!r}" in err and "flux1-dev, flux1-schnell" in err
    assert not list(tmp_path.iterdir())


@pytest.fixture(scope="module")
def tiny_sdxl(module_tmp):
    path = module_tmp("sdxl") / "sdxl.safetensors"
    assert main(["sample", "sdxl-base", "--tiny", "-o", str(path), "--quiet"]) == 0
    return path


def test_component_aliases_in_sample_split_prune_and_merge(tiny_sdxl, tmp_path, capsys):
    assert main(["sample", "sd15", "--tiny", "--layout", "comfyui", "--components", "UNet",
                 "-o", str(tmp_path / "unet.safetensors"), "--quiet"]) == 0
    found = inspect_file(str(tmp_path / "unet.safetensors"))["identification"]
    assert (found["kind"], found["family"]) == ("diffusion-model", "sd1")

    assert main(["split", str(tiny_sdxl), "-o", str(tmp_path / "parts"),
                 "--components", "unet,clip-l"]) == 0
    assert sorted(p.name for p in (tmp_path / "parts").rglob("*.safetensors")) == [
        "sdxl.safetensors", "sdxl_clip_l.safetensors"]

    pruned = tmp_path / "pruned.safetensors"
    assert main(["prune", str(tiny_sdxl), "-o", str(pruned), "--drop", "VAE", "--quiet"]) == 0
    assert inspect_file(str(pruned))["identification"]["missing"] == ["vae"]

    merged = tmp_path / "merged.safetensors"
    assert main(["merge", "weighted-sum", str(tiny_sdxl), str(pruned), "-o", str(merged),
                 "--components", "unet", "--take", "ae=A", "--quiet"]) == 0
    capsys.readouterr()


# An output's format and its name agree: loaders choose their reader by the extension.

@pytest.mark.parametrize(("command", "name"), [
    (["prune", "--drop", "vae"], "pruned.ckpt"),
    (["merge", "weighted-sum", "SELF", "--alpha", "0.5"], "merged.pt"),
    (["convert"], "converted.gguf"),
])
def test_safetensors_outputs_under_another_format_s_name_are_refused(command, name, tiny_sdxl,
                                                                       tmp_path, capsys):
    out = tmp_path / name
    args = [str(tiny_sdxl) if a == "SELF" else a for a in command]
    args[1 + (command[0] == "merge"):1 + (command[0] == "merge")] = [str(tiny_sdxl)]
    assert main([*args, "-o", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err and "name it .safetensors" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("fmt", "name"), [("ckpt", "x.safetensors"), ("safetensors", "x.ckpt"),
                                           ("safetensors", "x.pt")])
def test_sample_refuses_a_format_its_name_contradicts(fmt, name, tmp_path, capsys):
    out = tmp_path / name
    assert main(["sample", "sd1", "--tiny", "--format", fmt, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--format {fmt}" in err and name in err
    assert not out.exists()


@pytest.mark.parametrize(("name", "fmt"), [("x.ckpt", "torch-zip"), ("x.pt", "torch-zip"),
                                           ("x.safetensors", "safetensors"),
                                           ("x", "safetensors")])
def test_sample_format_follows_the_extension_by_default(name, fmt, tmp_path, capsys):
    out = tmp_path / name
    assert main(["sample", "sd1", "--tiny", "-o", str(out), "--quiet"]) == 0
    assert detect_format(str(out)) == fmt


# Outputs: only regular files are replaced, with a note; a killed writer's leftovers go.

def test_an_output_that_is_a_fifo_is_refused_and_left_as_it_is(demo_ckpt, tmp_path, capsys):
    fifo = tmp_path / "out.safetensors"
    os.mkfifo(fifo)
    assert main(["convert", str(demo_ckpt), "-o", str(fifo)]) == 5
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is a FIFO, not a regular file" in err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.ckpt", "out.safetensors"]


def test_an_output_that_is_a_device_is_refused():
    # Checked, not written: as root, a write that got past the check would replace /dev/null.
    with pytest.raises(OutputError, match="is a device, not a regular file") as err:
        check_output_path("/dev/null")
    assert err.value.exit_code == 5


def test_replacing_an_existing_output_says_so(demo_ckpt, tmp_path, capsys):
    out = tmp_path / "out.safetensors"
    assert main(["convert", str(demo_ckpt), "-o", str(out), "--quiet"]) == 0
    assert "replacing" not in capsys.readouterr().err
    assert main(["convert", str(demo_ckpt), "-o", str(out), "--quiet"]) == 0
    assert f"note: replacing the existing {out}\n" in capsys.readouterr().err


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return int(done.stdout)


def test_stale_temporaries_of_dead_writers_are_removed(demo_ckpt, tmp_path):
    out = tmp_path / "out.safetensors"
    host = socket.gethostname()
    dead = tmp_path / f".out.safetensors.{_dead_pid()}@{host}.0a1b2c3d.ckptkit-tmp"
    dead_folder = tmp_path / f".out.safetensors.{_dead_pid()}@{host}.x_9k2.ckptkit-tmp"
    kept = [tmp_path / f".out.safetensors.{os.getpid()}@{host}.0a1b2c3d.ckptkit-tmp",
            tmp_path / f".out.safetensors.{_dead_pid()}@elsewhere.0a1b2c3d.ckptkit-tmp",
            tmp_path / ".out.safetensors.0a1b2c3d.ckptkit-tmp",  # no writer named
            tmp_path / f".other.safetensors.{_dead_pid()}@{host}.0a1b2c3d.ckptkit-tmp"]
    for path in [dead, *kept]:
        path.write_bytes(b"half a file")
    dead_folder.mkdir()
    (dead_folder / "model_index.json").write_text("{}")
    assert main(["convert", str(demo_ckpt), "-o", str(out), "--quiet"]) == 0
    assert not dead.exists() and not dead_folder.exists()
    assert all(path.exists() for path in kept)


def test_a_killed_writers_temporary_is_removed_by_the_next_write(demo_ckpt, tmp_path):
    out = tmp_path / "out.safetensors"
    killed = subprocess.run([sys.executable, "-c", (
        "import os, signal, sys\n"
        "from ckptkit.engine.atomic import AtomicOutput\n"
        "with AtomicOutput(sys.argv[1]) as o:\n"
        "    os.write(o.fd, b'half')\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"), str(out)])
    assert killed.returncode == -signal.SIGKILL
    (left,) = [p.name for p in tmp_path.iterdir() if p.name.endswith(".ckptkit-tmp")]
    assert left.startswith(".out.safetensors.")
    assert main(["convert", str(demo_ckpt), "-o", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.ckpt", "out.safetensors"]


def test_every_json_output_escapes_what_a_terminal_would_obey(tmp_path, capsys):
    """C1 controls and bidi overrides in a file name reach --json output of every command as
    \\u escapes (as inspect's did), and names that are not UTF-8 as valid JSON."""
    import json as json_module

    from ckptkit.cli.main import main as ckpt_main

    name = "m\u009b2J\u202e" + os.fsdecode(b"\xfe") + ".safetensors"
    out = tmp_path / name
    runs = [["sample", "sd1", "--tiny", "--components", "vae", "-o", str(out), "--json"],
            ["scan", str(out), "--json"],
            ["convert", str(out), "-o", str(tmp_path / ("c" + name)), "--json"],
            ["prune", str(out), "-o", str(tmp_path / ("p" + name)), "--json"]]
    for argv in runs:
        capsys.readouterr()
        assert ckpt_main(argv) == 0, argv
        text = capsys.readouterr().out
        assert "\u009b" not in text and "\u202e" not in text, argv
        decoded = json_module.loads(text)
        # no lone surrogate, even escaped: strict JSON readers refuse "\udcfe"
        json_module.dumps(decoded, ensure_ascii=False).encode("utf-8")
