"""What a file's header metadata says about where it came from, in one shape for every tool.

``ancestry`` lists the parents a file names, each with the hash (and its kind) or the file
name by which the library finds it among its files:

- ckptkit's own (``ops.provenance``, ``ops.merge``, ``lora.bake``): ``ckptkit.merge_recipe``
  (each input's file and SHA-256), ``ckptkit.merge_lineage`` (the recipes the inputs carried,
  under each input's file name), ``ckptkit.sources``/``ckptkit.sources_sha256`` of other
  operations (split, convert, prune, vae bake), ``ckptkit.loras`` (LoRAs baked in).
- AUTOMATIC1111's merger (``modules/extras.py``): ``sd_merge_recipe`` with
  ``primary|secondary|tertiary_model_hash`` (SHA-256) and ``sd_merge_models``
  (``{sha256: {name, legacy_hash, sd_merge_recipe}}``, which carries the recipes of the
  parents' parents); supermerger's recipe (``model_a|b|c``, SHA-256) likewise.
- sd-mecha (``mecha_recipe``, its ``.mecha`` text): each ``model "path"`` line, by file name.
- kohya sd-scripts' training metadata: the model trained on (``ss_sd_model_name``,
  ``ss_new_sd_model_hash``: SHA-256, ``ss_sd_model_hash``: AutoV1) and its VAE
  (``ss_vae_name``, ``ss_new_vae_hash``, ``ss_vae_hash``).

An entry's ``parent`` is the index of the entry it is a parent of (None: of the file itself),
so a recorded history of merges of merges is a tree. Values come from files: anything of
the wrong type is skipped, never trusted to be a string.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any

SHA256 = re.compile(r"(0x)?([0-9a-fA-F]{64})")
AUTOV1 = re.compile(r"[0-9a-fA-F]{8}")
MAX_DEPTH = 16  # recorded merge histories nest a few levels; a hostile one is cut here
MAX_ENTRIES = 2000


def sections(metadata: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The metadata in groups: ``modelspec`` (``modelspec.*`` without the prefix),
    ``training`` (kohya's ``ss_*``), ``recipes`` (every merge recipe and lineage key), and
    ``ckptkit`` (the provenance keys)."""
    recipes = ("sd_merge_recipe", "sd_merge_models", "mecha_recipe")
    return {
        "modelspec": {k[len("modelspec."):]: v for k, v in metadata.items()
                      if k.startswith("modelspec.")},
        "training": {k: v for k, v in metadata.items() if k.startswith(("ss_", "sshs_"))},
        "recipes": {k: v for k, v in metadata.items()
                    if k in recipes or k in ("ckptkit.merge_recipe", "ckptkit.merge_lineage")},
        "ckptkit": {k: v for k, v in metadata.items() if k.startswith("ckptkit.")},
    }


def title(metadata: dict[str, Any]) -> str | None:
    for key in ("modelspec.title", "ss_output_name"):
        if isinstance(metadata.get(key), str) and metadata[key].strip():
            return metadata[key].strip()
    return None


def base_model(metadata: dict[str, Any]) -> str | None:
    """What the metadata says the model is for: kohya's ``ss_base_model_version``, else
    ModelSpec's architecture (without an adapter suffix such as ``/lora``)."""
    version = metadata.get("ss_base_model_version")
    if isinstance(version, str) and version:
        return version
    arch = metadata.get("modelspec.architecture")
    if isinstance(arch, str) and arch:
        return arch.split("/", 1)[0]
    return None


def ancestry(metadata: dict[str, Any]) -> list[dict[str, Any]]:
    """Every parent the metadata names (see the module's docstring): dicts of ``relation``,
    ``name``, ``hash_kind``, ``hash``, ``source`` (the key), ``detail`` and ``parent``."""
    out: list[dict[str, Any]] = []
    _ckptkit(metadata, out, None, 0)
    _webui(metadata, out, None, 0)
    _mecha(metadata.get("mecha_recipe"), out, None)
    _kohya(metadata, out)
    return out[:MAX_ENTRIES]


def _add(out: list, relation: str, source: str, parent: int | None, *, name: Any = None,
         sha256: Any = None, autov1: Any = None, detail: dict | None = None) -> int | None:
    """Appends an entry when it names something (a file name or a hash); its index."""
    name = os.path.basename(name) if isinstance(name, str) and name.strip() else None
    kind, value = None, None
    if isinstance(sha256, str) and (m := SHA256.fullmatch(sha256.strip())):
        kind, value = "sha256", m.group(2).lower()
    elif isinstance(sha256, str) and re.fullmatch(r"[0-9a-fA-F]{10}", sha256.strip()):
        kind, value = "autov2", sha256.strip().lower()
    elif isinstance(autov1, str) and AUTOV1.fullmatch(autov1.strip()):
        kind, value = "autov1", autov1.strip().lower()
    if (name is None and value is None) or len(out) >= MAX_ENTRIES:
        return None
    out.append({"relation": relation, "name": name, "hash_kind": kind, "hash": value,
                "source": source, "detail": detail or {}, "parent": parent})
    return len(out) - 1


def _json(value: Any) -> Any:
    if isinstance(value, str) and value[:1] in "{[":
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            return None
    return value


def _ckptkit(metadata: dict[str, Any], out: list, parent: int | None, depth: int) -> None:
    recipe = _json(metadata.get("ckptkit.merge_recipe"))
    by_file: dict[str, int] = {}
    if isinstance(recipe, dict) and isinstance(recipe.get("inputs"), dict):
        methods = [s.get("method") for s in recipe.get("steps") or [] if isinstance(s, dict)]
        for input_name, entry in recipe["inputs"].items():
            if not isinstance(entry, dict):
                continue
            at = _add(out, "merge", "ckptkit.merge_recipe", parent, name=entry.get("file"),
                      sha256=entry.get("sha256"),
                      detail={"input": input_name, "methods": [m for m in methods if m]})
            if at is not None and isinstance(entry.get("file"), str):
                by_file[entry["file"]] = at
    elif isinstance(_json(metadata.get("ckptkit.sources")), list):
        names = _json(metadata["ckptkit.sources"])
        hashes = _json(metadata.get("ckptkit.sources_sha256"))
        hashes = hashes if isinstance(hashes, list) else []
        operation = metadata.get("ckptkit.operation")
        for i, name in enumerate(names):
            _add(out, "source", "ckptkit.sources", parent, name=name,
                 sha256=hashes[i] if i < len(hashes) else None,
                 detail={"operation": operation} if isinstance(operation, str) else {})
    loras = _json(metadata.get("ckptkit.loras"))
    for lora in loras if isinstance(loras, list) else []:
        if isinstance(lora, dict):
            _add(out, "lora", "ckptkit.loras", parent, name=lora.get("file"),
                 sha256=lora.get("sha256"),
                 detail={k: lora[k] for k in ("strength", "te_strength")
                         if isinstance(lora.get(k), (int, float))})
    lineage = _json(metadata.get("ckptkit.merge_lineage"))
    if isinstance(lineage, dict) and depth < MAX_DEPTH:
        for file_name, recorded in lineage.items():
            if isinstance(recorded, dict) and file_name in by_file:
                _ckptkit(recorded, out, by_file[file_name], depth + 1)
                _webui(recorded, out, by_file[file_name], depth + 1)
                _mecha(recorded.get("mecha_recipe"), out, by_file[file_name])


_WEBUI_PARENTS = ("primary_model_hash", "secondary_model_hash", "tertiary_model_hash",
                  "model_a", "model_b", "model_c")


def _webui(metadata: dict[str, Any], out: list, parent: int | None, depth: int,
           models: dict | None = None) -> None:
    """AUTOMATIC1111's ``sd_merge_recipe`` (and supermerger's), with the parents' own
    recipes from ``sd_merge_models``."""
    recipe = _json(metadata.get("sd_merge_recipe"))
    if models is None:
        models = _json(metadata.get("sd_merge_models"))
        models = models if isinstance(models, dict) else {}
    if not isinstance(recipe, dict) or depth >= MAX_DEPTH:
        return
    detail = {k: recipe[k] for k in ("type", "interp_method", "multiplier", "mode",
                                     "base_alpha", "calcmode")
              if isinstance(recipe.get(k), (str, int, float))}
    for key in _WEBUI_PARENTS:
        value = recipe.get(key)
        if not isinstance(value, str):
            continue
        known = models.get(value) if isinstance(models.get(value), dict) else {}
        at = _add(out, "merge", "sd_merge_recipe", parent, name=known.get("name"),
                  sha256=value, autov1=known.get("legacy_hash"),
                  detail={**detail, "role": key.removesuffix("_model_hash")})
        if at is not None and known.get("sd_merge_recipe"):
            _webui({"sd_merge_recipe": known["sd_merge_recipe"]}, out, at, depth + 1, models)


_MECHA_MODEL = re.compile(r'^\s*model\s+"((?:[^"\\]|\\.)*)"')
_MECHA_MERGE = re.compile(r'^\s*merge\s+"((?:[^"\\]|\\.)*)"')


def _mecha(recipe: Any, out: list, parent: int | None) -> None:
    """sd-mecha's serialized recipe: a ``version`` line, then one instruction a line."""
    if not isinstance(recipe, str) or not recipe.startswith("version"):
        return
    lines = recipe.splitlines()
    methods = [m.group(1) for line in lines if (m := _MECHA_MERGE.match(line))]
    for line in lines:
        if m := _MECHA_MODEL.match(line):
            path = m.group(1).replace('\\"', '"').replace("\\\\", "\\")
            _add(out, "merge", "mecha_recipe", parent, name=path.replace("\\", "/"),
                 detail={"methods": methods})


def _kohya(metadata: dict[str, Any], out: list) -> None:
    version = metadata.get("ss_base_model_version")
    detail = {"base_model_version": version} if isinstance(version, str) else {}
    _add(out, "base-model", "ss_sd_model_name", None, name=metadata.get("ss_sd_model_name"),
         sha256=metadata.get("ss_new_sd_model_hash"), autov1=metadata.get("ss_sd_model_hash"),
         detail=detail)
    _add(out, "vae", "ss_vae_name", None, name=metadata.get("ss_vae_name"),
         sha256=metadata.get("ss_new_vae_hash"), autov1=metadata.get("ss_vae_hash"))
