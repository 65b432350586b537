"""How torch's idle threads wait, set before torch loads (by ``ckpt`` and by the tests).

By default (libgomp, no ``OMP_WAIT_POLICY``) an OpenMP worker busy-waits for a while after
every parallel region, taking a core from ckptkit's own threads (the inputs' hashing, the
reading ahead): on 2 cores a first SD 1.5 merge spent 1.4 s of its 5 s of CPU spinning
(``perf``: libgomp), and the merge tests 3x the CPU (80 s instead of 28). Our parallel regions
are whole slices of a tensor, so waking a worker costs nothing that shows. libgomp reads the
setting once, when torch loads: this must run before that.
"""

from __future__ import annotations

import os


def let_idle_threads_sleep() -> None:
    """Asks torch's idle OpenMP workers to sleep rather than spin; a value the user set is
    kept."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
