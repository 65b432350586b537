"""Helpers shared by several test files: a hang guard, key-table helpers, sd-mecha's tables."""

from __future__ import annotations

import functools
import math
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
