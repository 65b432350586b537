"""``ckpt library serve`` as a command: its one-line errors before anything is served, the
token rule as the command applies it, and a live server (waitress, in a child process)
answering, refusing, and stopping cleanly on Ctrl-C."""

from __future__ import annotations

import re
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
from library_web_samples import get, start_server, stop_server
from safetensors.torch import save

from ckptkit.cli.main import main
from ckptkit.library.web import server


@pytest.fixture(scope="module")
def small_db(module_tmp) -> Path:
    """An index of one small file (the live server's page needs something to list)."""
    root = module_tmp("small")
    (root / "models").mkdir()
    (root / "models" / "tiny_lora.safetensors").write_bytes(
        save({"lora_unet_a.lora_down.weight": torch.zeros(2, 4)}))
    db = root / "library.sqlite"
    assert main(["library", "scan", str(root / "models"), "--db", str(db), "--quiet"]) == 0
    return db


def _one_line_error(capsys, code: int, rc: int, *words: str) -> str:
    out, err = capsys.readouterr()
    assert rc == code, err
    assert out == "" and err.count("\n") == 1 and err.startswith("ckpt: error: "), err
    for word in words:
        assert word in err, err
    return err


def test_missing_database(tmp_path, capsys):
    db = tmp_path / "none.sqlite"
    rc = main(["library", "serve", "--db", str(db), "--port", "0"])
    _one_line_error(capsys, 2, rc, str(db), "ckpt library scan")
    assert not db.exists()


def test_corrupt_database(tmp_path, capsys):
    db = tmp_path / "bad.sqlite"
    db.write_bytes(b"SQLite format 3\0" + b"\xff" * 4096)
    rc = main(["library", "serve", "--db", str(db), "--port", "0"])
    _one_line_error(capsys, 3, rc, str(db))


def test_port_in_use(small_db, capsys):
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    port = taken.getsockname()[1]
    try:
        rc = main(["library", "serve", "--db", str(small_db), "--port", str(port)])
    finally:
        taken.close()
    _one_line_error(capsys, 2, rc, f"port {port}", "in use", "--port")


@pytest.mark.parametrize(("args", "words"), [
    (["--port", "70000"], ["--port 70000"]),
    (["--port", "0", "--token", "short"], ["--token", "16"]),
    (["--port", "0", "--token", "sixteen chars with spaces"], ["--token"]),
    (["--port", "0", "--host", "192.0.2.1"], ["192.0.2.1"]),  # not an address of ours
])
def test_bad_options(small_db, capsys, args, words):
    rc = main(["library", "serve", "--db", str(small_db), *args])
    _one_line_error(capsys, 2, rc, *words)


def test_other_host_gets_a_token(small_db, capsys, monkeypatch):
    """--host with a non-loopback address: a new token, printed in the address, and an app
    that requires it. (Bound to loopback here: the test opens no port to the network.)"""
    served = {}
    monkeypatch.setattr(server, "listen", lambda host, port: served.setdefault(
        "sock", socket.create_server(("127.0.0.1", 0))))
    monkeypatch.setattr(server, "run", lambda app, sock, ready: ready() or served.update(app=app))
    assert main(["library", "serve", "--db", str(small_db), "--host", "0.0.0.0"]) == 0
    served["sock"].close()
    out = capsys.readouterr().out
    token = re.search(r"http://0\.0\.0\.0:\d+/\?token=([\w-]+) ", out).group(1)
    assert len(token) >= 43
    client = served["app"].test_client()
    assert client.get("/", headers={"Host": "box.lan"}).status_code == 403
    assert client.get("/", headers={"Host": "box.lan",
                                    "Authorization": f"Bearer {token}"}).status_code == 200


def test_live_server_answers_refuses_and_stops(small_db):
    proc, url, port = start_server(small_db)
    try:
        assert url == f"http://127.0.0.1:{port}/"
        r, body = get(port, "/")
        assert r.status == 200 and b"tiny_lora.safetensors" in body
        assert r.getheader("Content-Security-Policy").startswith("default-src 'self'")
        assert r.getheader("Server") == "ckptkit"  # waitress, named by us
        for path in ("//etc/passwd", "/../../etc/passwd", "/preview/..%2f..%2fetc%2fpasswd",
                     "/static/../app.py", "/preview/1"):  # 1 has no preview
            r, body = get(port, path)
            assert r.status == 404 and b"root:" not in body, path
        r, _ = get(port, "/", {"Host": "rebound.example:80"})
        assert r.status == 403
        started = time.monotonic()
        code, err = stop_server(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert code == 0 and "Traceback" not in err, err
    assert err.strip().endswith("ckpt: library server stopped"), err
    assert time.monotonic() - started < 10
    with pytest.raises(OSError):  # the port is closed
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_live_server_with_token(small_db):
    token = "a-token-of-32-characters-1234567"
    proc, url, port = start_server(small_db, "--token", token)
    try:
        assert url == f"http://127.0.0.1:{port}/?token={token}"
        assert get(port, "/")[0].status == 403
        assert get(port, "/?token=" + token[:-1] + "8")[0].status == 403
        r, _ = get(port, f"/?token={token}")
        assert r.status == 303 and r.getheader("Location") == "/"
        cookie = r.getheader("Set-Cookie").split(";")[0]
        r, body = get(port, "/", {"Cookie": cookie})
        assert r.status == 200 and b"tiny_lora.safetensors" in body
    finally:
        code, err = stop_server(proc)
    assert code == 0 and "Traceback" not in err


def test_sigterm_stops_too(small_db):
    proc, _, port = start_server(small_db)
    proc.terminate()
    assert proc.wait(timeout=20) == 0
    assert "Traceback" not in proc.stderr.read()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2)




def test_without_the_library_extra(small_db, capsys, monkeypatch):
    """Flask or waitress not installed: one line that names the extra to install."""
    for name in [m for m in sys.modules if m.startswith("ckptkit.library.web")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "waitress", None)
    monkeypatch.setitem(sys.modules, "waitress.server", None)
    rc = main(["library", "serve", "--db", str(small_db), "--port", "0"])
    _one_line_error(capsys, 2, rc, "waitress", "pip install 'ckptkit[library]'")
