"""Helpers shared by several test files: a hang guard, key-table helpers, sd-mecha's tables."""

from __future__ import annotations

import functools
import math
import pickle
import signal
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

from ckptkit.arch.keys import KeyTable


class Hang(BaseException):
    pass


@contextmanager
def time_limit(seconds: float):
    """Turns a hang into a test failure instead of a stuck test run."""

    def on_alarm(signum, frame):
        raise Hang(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def params(table: KeyTable) -> int:
    return sum(math.prod(shape) for shape in table.values())


def meta(table: KeyTable, prefix: str = "") -> dict[str, torch.Tensor]:
    return {prefix + k: torch.empty(shape, device="meta") for k, shape in table.items()}


def shapes(state_dict) -> KeyTable:
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@functools.cache
def mecha(config: str) -> dict[str, dict[str, dict]]:
    """sd-mecha's published key table ``config`` (components -> key -> shape, dtype, ...)."""
    import sd_mecha

    path = (Path(sd_mecha.__file__).parent / "extensions" / "builtin" / "model_configs"
            / f"{config}.yaml")
    return yaml.safe_load(path.read_text())["components"]


class DataOnlyUnpickler(pickle.Unpickler):
    """The reference for the pickle reader: CPython's C unpickler, allowed only the globals
    protocol 2 uses for builtin data (bytes via _codecs.encode or bytes(), set)."""

    def find_class(self, module, name):
        if (module, name) in {("_codecs", "encode"), ("builtins", "set"), ("__builtin__", "set"),
                              ("builtins", "bytes"), ("__builtin__", "bytes")}:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def comparable(value, path: tuple[int, ...] = ()):
    """A value read by the pickle reader or by CPython in a comparable form: NaN equal to NaN,
    containers compared by type and content (sets and frozensets alike), a global by its name
    (ours is an emulation, CPython's the object itself), a container that holds itself (memo
    references can build cycles) by how far up the cycle goes."""
    from ckptkit.formats.pickle_vm import Emulated

    if isinstance(value, Emulated):
        return ("global", value.qualname.replace("__builtin__.", "builtins."))
    if callable(value):
        return ("global", f"{value.__module__}.{value.__qualname__}")
    if isinstance(value, float) and math.isnan(value):
        return ("nan",)
    if isinstance(value, (list, tuple, dict, set, frozenset)):
        if id(value) in path:
            return ("cycle", len(path) - path.index(id(value)))
        inner = (*path, id(value))
        if isinstance(value, dict):
            return ("dict", [(comparable(k, inner), comparable(v, inner))
                             for k, v in value.items()])
        if isinstance(value, (set, frozenset)):
            return ("set", sorted(repr(comparable(v, inner)) for v in value))
        return (type(value).__name__, [comparable(v, inner) for v in value])
    return (type(value).__name__, value)


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    """``ckpt ARGV...`` in this process: its exit code (argparse's usage errors included),
    stdout and stderr."""
    from ckptkit.cli.main import main

    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse ends usage errors with SystemExit(2)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err
