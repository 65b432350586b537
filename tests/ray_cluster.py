"""A two-node Ray cluster on 127.0.0.1 for the batch tests and benchmark: a head and one more
node, each ``ray start --block`` in a session of its own (so that stopping it ends every
process it started, and nothing else: never ``ray stop``, which stops any cluster of the
machine), each with few CPUs and a small object store."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time

RAY = os.path.join(os.path.dirname(sys.executable), "ray")
SRC = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "src"))
STORE = 100 * 1000 * 1000  # bytes of object store per node (Ray's minimum is 75 MB)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _node(args: list[str], log: str, env: dict) -> subprocess.Popen:
    ports = []
    for flag in ("--dashboard-agent-listen-port", "--dashboard-agent-grpc-port",
                 "--metrics-export-port", "--runtime-env-agent-port", "--node-manager-port",
                 "--object-manager-port"):
        ports += [flag, str(_free_port())]
    with open(log, "w") as out:
        return subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address", "127.0.0.1",
             "--object-store-memory", str(STORE), "--disable-usage-stats",
             "--min-worker-port", "0", "--max-worker-port", "0", *ports, *args],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the node's session (``ray start --block`` then stops its processes),
    SIGKILL to whatever of it is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(30)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def cluster(folder: str, cpus: int = 1):
    """Yields the head's address once both nodes are up; stops them after."""
    env = dict(os.environ, PYTHONPATH=SRC, RAY_AUTH_MODE="disabled")
    port = _free_port()
    address = f"127.0.0.1:{port}"
    nodes = [_node(["--head", "--port", str(port), "--num-cpus", str(cpus),
                    "--include-dashboard", "false", "--temp-dir", folder],
                   os.path.join(folder, "head.log"), env)]
    try:
        _wait_for(address, 1, nodes, env)
        nodes.append(_node(["--address", address, "--num-cpus", str(cpus)],
                           os.path.join(folder, "worker.log"), env))
        _wait_for(address, 2, nodes, env)
        yield address
    finally:
        for node in reversed(nodes):
            _stop(node)


def _wait_for(address: str, count: int, nodes, env) -> None:
    check = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if any(n.poll() is not None for n in nodes):
            raise RuntimeError("a Ray node exited while starting (see its log)")
        out = subprocess.run([sys.executable, "-c", check, address], capture_output=True,
                             text=True, env=env, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray cluster at {address} did not get {count} nodes in 120 s")
