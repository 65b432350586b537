"""The pool's children under a main script (a Ray actor's main is Ray's worker script): each
child runs the main again (multiprocessing's rule), so the forkserver imports the script's
module once, and a child's rerun finds what the script imports already there."""

from __future__ import annotations

import os
import subprocess
import sys

SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))

HEAVY = """
import os
with open(os.environ["IMPORTS_LOG"], "a") as f:
    f.write(f"{os.getpid()}\\n")
"""
MAIN = """
import sys

import app.heavy  # noqa: F401  (what the script imports: Ray, for a Ray worker)
from ckptkit.batch.pool import Pool, Task

if __name__ == "__main__":
    pool = Pool(1)
    for i in range(3):  # a new child for each file
        task = Task(i, "header", ("scan", sys.argv[1], None, None), 60)
        assert [r["verdict"] for _, r in pool.run([task])] == ["skipped"]
        pool.close()
"""


def test_a_scripts_imports_are_done_once_by_the_forkserver(tmp_path):
    app = tmp_path / "app"
    app.mkdir()
    (app / "__init__.py").write_text("")
    (app / "heavy.py").write_text(HEAVY)
    (app / "main.py").write_text(MAIN)
    sample = tmp_path / "sample.txt"
    sample.write_text("not a checkpoint\n")
    log = tmp_path / "imports.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([SRC, str(tmp_path)]),
               IMPORTS_LOG=str(log))
    subprocess.run([sys.executable, str(app / "main.py"), str(sample)], env=env, check=True,
                   timeout=120, cwd=tmp_path.parent)
    # The script itself and the forkserver; not each of the three children.
    assert len(log.read_text().split()) == 2, log.read_text()
