"""The design's layers, checked on the source: data flows downward, so a package imports only
packages of its own rank or below. A new import that reaches up (formats importing engine,
ops importing the command line) fails here, naming the file, rather than growing into a
cycle that nobody drew.

Ranks, lowest first (DESIGN.md's drawing, with the packages added since it was drawn):

0. the leaf modules beside the packages: errors, safe_text, threads, the version
1. quant (block codecs, no file knowledge) and formats (file readers, which decode through it)
2. arch (the architecture registry)
3. engine (streamed jobs, the writer)
4. ops and lora (operations; a LoRA bake is an operation and operations apply LoRAs)
5. library, batch, samples (work over many files, or sample files, built on operations)
6. api (the public Python surface)
7. the front ends: cli and the library's web pages (which share cli's formatting)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parent.parent / "src"
RANKS = {
    "errors": 0, "safe_text": 0, "threads": 0, "__version__": 0,
    "quant": 1, "formats": 1,
    "arch": 2,
    "engine": 3,
    "ops": 4, "lora": 4,
    "library": 5, "batch": 5, "samples": 5,
    "api": 6,
    "cli": 7, "library.web": 7, "__init__": 7,
}


def unit(module: str) -> str:
    """The layer unit a dotted module name belongs to (``ckptkit.library.web.app`` ->
    ``library.web``, ``ckptkit.ops.merge`` -> ``ops``; ``ckptkit`` and names its
    ``__init__`` defines, such as ``ckptkit.open``, -> ``__init__``)."""
    parts = module.split(".")[1:]
    if parts == ["__version__"]:  # set in __init__ before its imports, for provenance
        return "__version__"
    if parts[:2] == ["library", "web"]:
        return "library.web"
    package = SRC / "ckptkit"
    if parts and ((package / parts[0]).is_dir() or (package / f"{parts[0]}.py").exists()):
        return parts[0]
    return "__init__"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(path: Path, src: Path = SRC) -> list[str]:
    """Every ckptkit module ``path`` imports, absolute, wherever in the file the import is."""
    here = module_name(path, src)
    package = here.split(".") if path.name == "__init__.py" else here.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            found += [f"{target}.{alias.name}" for alias in node.names]
    return [name for name in found if name == "ckptkit" or name.startswith("ckptkit.")]


def sources() -> list[Path]:
    return sorted((SRC / "ckptkit").rglob("*.py"))


def test_every_package_has_a_rank():
    units = {unit(module_name(path)) for path in sources()}
    assert units <= RANKS.keys(), f"give these a rank in RANKS: {sorted(units - RANKS.keys())}"


@pytest.mark.parametrize("path", sources(), ids=lambda p: str(p.relative_to(SRC)))
def test_imports_flow_downward(path):
    source = unit(module_name(path))
    upward = [name for name in imported(path)
              if RANKS.get(unit(name), 0) > RANKS[source]]
    assert not upward, f"{path.relative_to(SRC)} ({source}) imports from above: {upward}"


def test_the_check_sees_upward_imports_in_every_spelling(tmp_path):
    """The rule itself, on a module written here: relative, absolute and function-local
    imports are all found and resolved to the unit they reach."""
    probe = tmp_path / "ckptkit" / "formats" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from ..engine import writer\nfrom . import gguf\n"
                     "def f():\n    import ckptkit.cli.main\n    from ckptkit import open\n")
    names = imported(probe, tmp_path)
    assert names == ["ckptkit.engine.writer", "ckptkit.formats.gguf", "ckptkit.cli.main",
                     "ckptkit.open"]
    assert [RANKS[unit(name)] for name in names] == [3, 1, 7, 7]
