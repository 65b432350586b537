"""Benchmark: ``ckpt library serve`` over a large index (10,000 files by default).

The index is made by scanning two tiny samples and copying their rows (new ids, paths and
hashes) up to ``--files``: what the pages cost depends on the rows, not on the files. A live
server (a child process, as a user runs it) is timed on the table page and a model page
(median of ``--repeat`` requests), against the query alone in this process
(``queries.list_models``, ``queries.model``: what any front end must run), and, with
``--browser``, Debian's chromium loading the table and applying one filter keystroke.

    PYTHONPATH=src .venv/bin/python bench/library_web_bench.py [--files 10000] [--browser]
"""

from __future__ import annotations

import argparse
import http.client
import os
import re
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time

from ckptkit.cli.main import main
from ckptkit.library import queries
from ckptkit.library.db import open_library
from ckptkit.ops.sample import sample


def build(folder: str, files: int) -> str:
    models = os.path.join(folder, "models")
    os.makedirs(models)
    sample("sd1", os.path.join(models, "a.safetensors"), tiny=True, components=["vae"])
    sample("sd1", os.path.join(models, "b.safetensors"), tiny=True, components=["vae"], seed=1)
    db = os.path.join(folder, "library.sqlite")
    assert main(["library", "scan", models, "--db", db, "--quiet"]) == 0
    conn = sqlite3.connect(db)
    columns = [r[1] for r in conn.execute("PRAGMA table_info(files)") if r[1] != "id"]
    have = conn.execute("SELECT count(*) FROM files").fetchone()[0]
    with conn:
        for i in range(have, files):
            src = 1 + i % have
            copied = conn.execute(f"SELECT {', '.join(columns)} FROM files WHERE id = ?",
                                  (src,)).fetchone()
            values = dict(zip(columns, copied, strict=True))
            path = os.path.join(models, f"f{i // 100:03d}", f"model_{i:05d}.safetensors")
            values.update(path=os.fsencode(path), display=path, name=os.path.basename(path),
                          inode=10_000_000 + i, sha256=f"{i:064x}", autov2=f"{i:010x}")
            cur = conn.execute(f"INSERT INTO files ({', '.join(values)}) VALUES "
                               f"({', '.join('?' * len(values))})", list(values.values()))
            conn.execute("INSERT INTO components SELECT ?, name, digest, tensors, bytes "
                         "FROM components WHERE file_id = ?", (cur.lastrowid, src))
    conn.close()
    return db


def timed(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def fetch(port: int, path: str) -> bytes:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    conn.request("GET", path)
    r = conn.getresponse()
    body = r.read()
    assert r.status == 200, (path, r.status)
    conn.close()
    return body


def browser(url: str) -> tuple[float, float]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path="/usr/bin/chromium",
                              args=["--headless", "--no-sandbox", "--disable-gpu"])
        page = b.new_page()
        start = time.perf_counter()
        page.goto(url, wait_until="load")
        load = time.perf_counter() - start
        drawn = page.locator("#models tbody tr").count()
        assert drawn == 500 and page.is_visible("#more"), drawn  # the rest on demand
        keystroke = page.evaluate("""() => {
            const f = document.getElementById('filter');
            f.value = 'model_0999';
            const t = performance.now();
            f.dispatchEvent(new Event('input'));
            return performance.now() - t; }""")
        shown = page.inner_text("#shown")
        b.close()
    assert shown.startswith("10 of "), shown
    return load, keystroke / 1000


def main_bench() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--browser", action="store_true")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ckpt-web-bench-") as folder:
        db = build(folder, args.files)
        conn = open_library(db, create=False)
        q_list = timed(lambda: queries.list_models(conn), args.repeat)
        q_model = timed(lambda: queries.model(conn, args.files // 2), args.repeat)
        conn.close()
        proc = subprocess.Popen([sys.executable, "-m", "ckptkit.cli.main", "library", "serve",
                                 "--db", db, "--port", "0"], stdout=subprocess.PIPE, text=True)
        try:
            url = re.search(r"(http://\S+)", proc.stdout.readline()).group(1)
            port = int(url.rsplit(":", 1)[1].strip("/"))
            size = len(fetch(port, "/"))
            table = timed(lambda: fetch(port, "/"), args.repeat)
            page = timed(lambda: fetch(port, f"/model/{args.files // 2}"), args.repeat)
            shown = browser(url) if args.browser else None
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=30)
    print(f"{args.files:,} files in the index")
    print(f"table page   {table * 1000:8.0f} ms  ({size / 1e6:.1f} MB of HTML); "
          f"list_models alone {q_list * 1000:.0f} ms: {table / q_list:.1f}x")
    print(f"model page   {page * 1000:8.0f} ms; model() alone {q_model * 1000:.0f} ms: "
          f"{page / q_model:.1f}x")
    if shown:
        print(f"chromium: table loaded in {shown[0] * 1000:.0f} ms, one filter keystroke "
              f"applied in {shown[1] * 1000:.0f} ms")


if __name__ == "__main__":
    main_bench()
