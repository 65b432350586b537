"""The pool's forkserver: a fork of the run when the run has a single thread (its children
start with everything imported), multiprocessing's own fresh server otherwise (forking a
process with other threads could copy a lock one of them holds); either way its children do
the work, and nothing outlives the run (a fork, holding what the run had open, not even
the run's end). Children are replaced every few files, each file still answered once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ckptkit.ops.scan import scan_file

sys.path.insert(0, os.path.dirname(__file__))
import batch_files

SRC = os.path.join(os.path.dirname(__file__), "..", "src")

# Starts the server, has one child scan a file, and says what the server is.
SCRIPT = """
import json, os, sys, threading
from multiprocessing import forkserver
if sys.argv[2] == "thread":
    stop = threading.Event()
    threading.Thread(target=stop.wait, daemon=True).start()
from ckptkit.batch import pool
pool.start_server()
server = forkserver._forkserver._forkserver_pid
def cmdline(pid):
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return f.read()
workers = pool.Pool(1)
task = pool.Task(0, "header", ("scan", sys.argv[1], None, None), 60.0)
[(done, row)] = list(workers.run([task]))
workers.close()
forked = cmdline(server) == cmdline(os.getpid())
pool.stop_server()
print(json.dumps({"server": server, "forked": forked, "verdict": row["verdict"],
                  "stopped": not os.path.exists(f"/proc/{server}")}))
"""


@pytest.mark.parametrize("threads", ["none", "thread"])
def test_the_server_is_a_fork_of_a_single_threaded_run_and_ends_with_it(tmp_path, threads):
    sample = str(tmp_path / "page.ckpt")  # a web page saved under a model's name
    with open(sample, "wb") as f:
        f.write(batch_files.BROKEN["page.ckpt"])
    env = dict(os.environ, PYTHONPATH=SRC)
    done = subprocess.run([sys.executable, "-c", SCRIPT, sample, threads], env=env,
                          capture_output=True, text=True, timeout=120, check=True)
    report = json.loads(done.stdout)
    assert report["forked"] == (threads == "none")
    # A fork holds what the run had open: it ends with the run (reaped), the fresh server
    # with the process.
    assert report["stopped"] == (threads == "none")
    assert report["verdict"] == scan_file(sample).verdict == "error"
    deadline = time.monotonic() + 10  # the run is gone: its server follows
    while running(report["server"]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not running(report["server"])


def running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # (a zombie has ended)
    except OSError:
        return False


def test_children_replaced_every_few_files_answer_each_file_once(tmp_path):
    """A child is replaced after ``recycle`` files, its successor started while it finishes
    its last ones: every file answered once, as ``scan_file`` says, a crashing one too."""
    from ckptkit.batch import pool

    contents = list(batch_files.BROKEN.items())
    paths = []
    for i in range(30):
        name, data = contents[i % len(contents)]
        paths.append(str(tmp_path / f"{i:03d}-{'CRASH-' if i == 17 else ''}{name}"))
        with open(paths[-1], "wb") as f:
            f.write(data)
    workers = pool.Pool(2, faults=[("crash", "CRASH")], recycle=4)
    started = []
    start = workers._start
    workers._start = lambda: started.append(start()) or started[-1]
    tasks = [pool.Task(i, "header", ("scan", p, None, None), 60.0) for i, p in enumerate(paths)]
    try:
        answers = [(task.key, result) for task, result in workers.run(tasks)]
    finally:
        workers.close()
    assert sorted(key for key, _ in answers) == list(range(30))
    for key, result in answers:
        if key == 17:
            assert result == pool.Failure("the reader crashed twice (its process exited "
                                          "with code 77)")
        else:
            assert result["verdict"] == scan_file(paths[key]).verdict, paths[key]
    assert len(started) > 2


def test_ctrl_c_stops_the_run_without_a_traceback_from_its_children(tmp_path):
    """Ctrl-C reaches the whole process group: the run keeps what is done and stops its
    children, which ignore it (each printed a KeyboardInterrupt traceback, or died of it
    and was taken for a crash)."""
    files = tmp_path / "files"
    files.mkdir()
    for i in range(40):
        name = "020-HANG.safetensors" if i == 20 else f"{i:03d}.safetensors"
        (files / name).write_bytes(batch_files.BROKEN["truncated.safetensors"])
    env = dict(os.environ, PYTHONPATH=SRC, CKPTKIT_BATCH_TEST_FAULTS="hang:HANG")
    proc = subprocess.Popen([sys.executable, "-m", "ckptkit.cli.main", "batch", "scan",
                             str(files), "-o", str(tmp_path / "r.parquet"), "--quiet"],
                            env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 60
    while len(below(proc.pid)) < 3 and time.monotonic() < deadline:  # server, 2 children
        time.sleep(0.05)
    time.sleep(0.5)  # (the children at work: one on the hanging file)
    children = [p for p in below(proc.pid) if p not in below(proc.pid, depth=1)]
    assert children
    for child in children:  # first to the children alone: they carry on
        os.kill(child, signal.SIGINT)
    time.sleep(0.5)
    assert all(running(child) for child in children)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    assert "interrupted after" in err


def below(pid: int, depth: int = 99) -> list[int]:
    """The processes below ``pid``, ``depth`` levels down at most."""
    found, frontier = [], [(pid, 0)]
    while frontier:
        pid, level = frontier.pop()
        try:
            with open(f"/proc/{pid}/task/{pid}/children") as f:
                children = [int(p) for p in f.read().split()]
        except OSError:
            continue
        found += children
        if level + 1 < depth:
            frontier += [(child, level + 1) for child in children]
    return found
