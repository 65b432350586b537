"""``ckpt library list`` filters: a kind or family that no file can have is a usage error
naming the valid ones (a typo must not look like an empty library), and a part that fits
several families is listed under each of them."""

from __future__ import annotations

import json

import pytest
from helpers import run_cli
from safetensors.torch import load_file, save_file

from ckptkit.arch.detect import KINDS
from ckptkit.library.queries import FAMILIES


@pytest.fixture(scope="module")
def library(module_tmp, tiny):
    """An index of a tiny SD1 checkpoint and its VAE alone (which fits SD1 and SD2)."""
    models = module_tmp("models")
    base = load_file(str(tiny("sd1")))
    save_file(base, str(models / "base.safetensors"))
    vae = {k.removeprefix("first_stage_model."): v for k, v in base.items()
           if k.startswith("first_stage_model.")}
    save_file(vae, str(models / "vae.safetensors"))
    db = module_tmp("db") / "lib.sqlite"
    from ckptkit.cli.main import main

    assert main(["library", "scan", "--quiet", "--db", str(db), str(models)]) == 0
    return db


def _names(capsys, db, *filters) -> list[str]:
    code, out, _ = run_cli(capsys, "library", "list", "--json", "--db", db, *filters)
    assert code == 0
    return [m["name"] for m in json.loads(out)]


@pytest.mark.parametrize("option", ["--kind", "--family"])
def test_unknown_choice_is_a_usage_error(capsys, library, option):
    code, out, err = run_cli(capsys, "library", "list", "--db", library, option, "bogus")
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and "invalid choice: 'bogus'" in err
    valid = KINDS if option == "--kind" else FAMILIES
    assert all(f"'{v}'" in err for v in valid)


def test_filters_match_case_insensitively(capsys, library):
    assert _names(capsys, library, "--kind", "VAE") == ["vae.safetensors"]
    assert _names(capsys, library, "--kind", "checkpoint", "--family", "SD1") == \
        ["base.safetensors"]


def test_a_part_that_fits_several_families_is_listed_under_each(capsys, library):
    (vae,) = json.loads(run_cli(capsys, "library", "list", "--json", "--db", library,
                                "--kind", "vae")[1])
    fits = vae["family"].split(",")
    assert {"sd1", "sd2"} <= set(fits)
    for family in fits:
        assert "vae.safetensors" in _names(capsys, library, "--family", family)
    assert _names(capsys, library, "--family", "flux1-dev") == []
