"""The files other tools keep beside a model, and what the library takes from them.

For a model ``<stem>.<ext>`` (``stem``: the file name without its extension):

- ``<stem>.civitai.info``: Civitai Helper's copy of Civitai's by-hash answer (``baseModel``,
  ``model.name``, ``trainedWords``...).
- ``<stem>.cm-info.json``: Stability Matrix's connected-model info (``ModelName``,
  ``BaseModel``, ``TrainedWords``, ``Hashes``...).
- ``<stem>.metadata.json``: ComfyUI-Lora-Manager's (``model_name``, ``base_model``,
  ``sha256``, ``civitai``...).
- ``<stem>.json``: AUTOMATIC1111's user metadata (``description``, ``sd version``,
  ``activation text``, ``preferred weight``, ``notes``).
- Previews: ``<stem>.preview.<image>`` (A1111, Civitai Helper, Stability Matrix, Lora
  Manager) or ``<stem>.<image>`` (A1111), image one of png, jpg, jpeg, webp, gif.

Sidecars are found in the folder listing the scan already has (no file system call per
candidate name). A sidecar's JSON is read whole up to ``MAX_SIDECAR_BYTES``; one that is
larger or not JSON is recorded without content.
"""

from __future__ import annotations

import json
import os
from collections.abc import Collection
from typing import Any

MAX_SIDECAR_BYTES = 8 * 1024 * 1024  # a Civitai answer with many images is a few hundred KB
IMAGES = ("png", "jpg", "jpeg", "webp", "gif")
JSON_KINDS = ((".civitai.info", "civitai-info"), (".cm-info.json", "cm-info"),
              (".metadata.json", "metadata-json"), (".json", "a1111-json"))


def stem(name: str) -> str:
    return os.path.splitext(name)[0]


def candidates(model_name: str) -> list[tuple[str, str]]:
    """(file name, kind) of every sidecar a model named ``model_name`` may have, previews in
    the order a preview is chosen."""
    base = stem(model_name)
    names = [(base + suffix, kind) for suffix, kind in JSON_KINDS]
    names += [(f"{base}.preview.{ext}", "preview") for ext in IMAGES]
    names += [(f"{base}.{ext}", "preview") for ext in IMAGES]
    return names


def find(folder: str, model_name: str, listing: Collection[str]) -> list[tuple[str, str]]:
    """(path, kind) of the sidecars of ``model_name`` present in ``listing`` (the names in
    ``folder``)."""
    return [(os.path.join(folder, name), kind) for name, kind in candidates(model_name)
            if name in listing and name != model_name]


def read(path: str) -> Any:
    """A JSON sidecar's content, or None (too large, unreadable, not JSON)."""
    try:
        if os.path.getsize(path) > MAX_SIDECAR_BYTES:
            return None
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8", "replace"))
    except (OSError, ValueError, RecursionError):
        return None


def described(kind: str, content: Any) -> dict[str, Any]:
    """What a sidecar says of the model, in the library's words: ``title``, ``base_model``,
    ``trigger_words``, ``civitai`` (model and version ids)."""
    if not isinstance(content, dict):
        return {}
    out: dict[str, Any] = {}
    if kind == "civitai-info":
        model = content.get("model") if isinstance(content.get("model"), dict) else {}
        out = {"title": model.get("name"), "base_model": content.get("baseModel"),
               "trigger_words": content.get("trainedWords"),
               "civitai": {"model": content.get("modelId"), "version": content.get("id")}}
    elif kind == "cm-info":
        out = {"title": content.get("ModelName"), "base_model": content.get("BaseModel"),
               "trigger_words": content.get("TrainedWords"),
               "civitai": {"model": content.get("ModelId"), "version": content.get("VersionId")}}
    elif kind == "metadata-json":
        civitai = content.get("civitai") if isinstance(content.get("civitai"), dict) else {}
        out = {"title": content.get("model_name"), "base_model": content.get("base_model"),
               "trigger_words": civitai.get("trainedWords"),
               "civitai": {"model": civitai.get("modelId"), "version": civitai.get("id")}}
    elif kind == "a1111-json":
        out = {"base_model": content.get("sd version"),
               "trigger_words": content.get("activation text")}
    return {k: v for k, v in out.items() if _kept(v)}


def _kept(value: Any) -> bool:
    if isinstance(value, dict):
        return any(isinstance(v, (str, int)) for v in value.values())
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str) for v in value)
    return isinstance(value, str) and bool(value.strip()) and value.strip().lower() != "unknown"
