"""``ckpt library lineage``: the ancestry recorded by ckptkit's merge, AUTOMATIC1111's merger
(with the parents' own recipes in ``sd_merge_models``), sd-mecha (its own serializer writes
the recipe here) and kohya's training metadata, resolved to the library's files."""

from __future__ import annotations

import json

import pytest
import sd_mecha
import torch
from helpers import run_cli
from safetensors.torch import save_file

from ckptkit.ops.model_hash import hash_file
from ckptkit.ops.parts import split
from ckptkit.ops.sample import sample


def _tiny(path, metadata):
    save_file({"w": torch.zeros(2)}, str(path), metadata=metadata)


@pytest.fixture(scope="module")
def library(module_tmp):
    from ckptkit.cli.main import main

    folder = module_tmp("models")
    base1, base2 = folder / "base1.safetensors", folder / "base2.safetensors"
    sample("sd1", str(base1), tiny=True, seed=1)
    sample("sd1", str(base2), tiny=True, seed=2)
    merged = folder / "merged.safetensors"
    assert main(["merge", "weighted-sum", str(base1), str(base2), "--alpha", "0.3", "-o",
                 str(merged), "--quiet"]) == 0
    split(str(merged), str(folder / "parts"), components=["vae"])  # keeps merged's recipe
    h1, h_merged = hash_file(str(base1)), hash_file(str(merged))
    gone = "f" * 64  # a parent not in the library, whose own recipe the file carries
    _tiny(folder / "webui.safetensors", {
        "format": "pt",
        "sd_merge_recipe": json.dumps({"type": "webui", "primary_model_hash": h_merged["sha256"],
                                       "secondary_model_hash": gone,
                                       "interp_method": "Weighted sum", "multiplier": 0.5}),
        "sd_merge_models": json.dumps({
            h_merged["sha256"]: {"name": "merged.safetensors", "legacy_hash": "00000000"},
            gone: {"name": "gone.safetensors", "legacy_hash": "12345678",
                   "sd_merge_recipe": json.dumps({"type": "webui",
                                                  "primary_model_hash": h1["sha256"]})}})})
    recipe = sd_mecha.weighted_sum(sd_mecha.model("/elsewhere/base2.safetensors", "sd1-ldm"),
                                   sd_mecha.model("/elsewhere/missing.safetensors", "sd1-ldm"))
    _tiny(folder / "mecha.safetensors",
          {"mecha_recipe": sd_mecha.serialize(recipe, finalize=False)})
    _tiny(folder / "lora.safetensors", {"ss_sd_model_hash": h1["autov1"],
                                        "ss_sd_model_name": "renamed.ckpt",
                                        "ss_base_model_version": "sd_v1"})
    db = folder / "lib.sqlite"
    assert main(["library", "scan", "--quiet", "--db", str(db), str(folder)]) == 0
    return folder, db


def _tree(capsys, db, path) -> dict:
    code, out, err = run_cli(capsys, "library", "lineage", "--json", "--db", db, path)
    assert code == 0, err
    return json.loads(out)


def _names(node) -> list[str]:
    return [f["name"] for f in node["files"]]


def test_ckptkit_merge_resolves_by_sha256(library, capsys):
    folder, db = library
    tree = _tree(capsys, db, folder / "merged.safetensors")
    parents = tree["parents"]
    assert [(p["relation"], p["hash_kind"]) for p in parents] == [("merge", "sha256")] * 2
    assert [_names(p) for p in parents] == [["base1.safetensors"], ["base2.safetensors"]]
    assert all(p["files"][0]["match"] == "sha256" for p in parents)


def test_webui_recipe_and_its_recorded_parents(library, capsys):
    folder, db = library
    (merged, gone) = _tree(capsys, db, folder / "webui.safetensors")["parents"]
    assert _names(merged) == ["merged.safetensors"]
    # expanded through the merged file's own (ckptkit) recipe
    assert [_names(p) for p in merged["parents"]] == [["base1.safetensors"],
                                                       ["base2.safetensors"]]
    assert gone["name"] == "gone.safetensors" and gone["files"] == []
    (grand,) = gone["parents"]  # from sd_merge_models
    assert _names(grand) == ["base1.safetensors"]


def test_mecha_recipe_by_name(library, capsys):
    folder, db = library
    parents = _tree(capsys, db, folder / "mecha.safetensors")["parents"]
    assert [p["name"] for p in parents] == ["base2.safetensors", "missing.safetensors"]
    assert _names(parents[0]) == ["base2.safetensors"] and parents[1]["files"] == []
    assert parents[0]["files"][0]["match"] == "name"


def test_kohya_base_model_by_autov1_and_children(library, capsys):
    folder, db = library
    (base,) = _tree(capsys, db, folder / "lora.safetensors")["parents"]
    assert base["relation"] == "base-model" and base["hash_kind"] == "autov1"
    assert _names(base) == ["base1.safetensors"]
    code, out, _ = run_cli(capsys, "library", "show", "--json", "--db", db,
                           folder / "base1.safetensors")
    children = {c["name"] for c in json.loads(out)["children"]}
    assert children == {"merged.safetensors", "lora.safetensors"}
    code, out, _ = run_cli(capsys, "library", "lineage", "--db", db,
                           folder / "webui.safetensors")
    assert code == 0 and "└─ merge: gone.safetensors: not in the library" in out


def test_an_operations_output_inherits_its_sources_history(library, capsys):
    """A part split from a merge carries the merge's recipe: the recipe is the merged
    file's history, under it, not the part's own parents."""
    folder, db = library
    (source,) = _tree(capsys, db, folder / "parts" / "vae" / "merged.safetensors")["parents"]
    assert (source["relation"], source["detail"]["operation"]) == ("source", "split")
    assert _names(source) == ["merged.safetensors"]
    assert [_names(p) for p in source["parents"]] == [["base1.safetensors"],
                                                       ["base2.safetensors"]]
