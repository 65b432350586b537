"""The library's web pages through Flask's test client, over a library indexed from tiny
samples (library_web_samples.py): every route, what each page shows, the links between
models, and the refusal of anything that is not a file of the index."""

from __future__ import annotations

import json
import os
import re
import sqlite3
from pathlib import Path

import pytest
from library_web_samples import HOSTILE_NAME, HOSTILE_TEXT, make_library, png

from ckptkit.library.web import app as web_app
from ckptkit.library.web import security, views
from ckptkit.library.web.app import create_app


@pytest.fixture(scope="module")
def db(module_tmp) -> Path:
    return make_library(module_tmp("library"))


@pytest.fixture(scope="module")
def ids(db) -> dict[str, int]:
    """Library id of each model, by its path under models/."""
    conn = sqlite3.connect(db)
    root = os.fsencode(db.parent / "models") + b"/"
    found = {os.fsdecode(p[len(root):]): i for i, p in conn.execute("SELECT id, path FROM files")}
    conn.close()
    return found


@pytest.fixture
def client(db):
    return create_app(str(db)).test_client()


def _links(html: str) -> set[str]:
    return set(re.findall(r'href="([^"]*)"', html))


def _external(html: str) -> list[str]:
    """Every address in the page that is not on this server (the SVG namespace aside)."""
    addresses = re.findall(r'(?:src|href|action)\s*=\s*"([^"]*)"', html)
    return [a for a in addresses if not a.startswith("/") or a.startswith("//")]


def _rows(html: str) -> list[dict]:
    """The table's rows, as the page hands them to its script."""
    data = re.search(r'<script id="rows" type="application/json">(.*?)</script>', html, re.S)
    return json.loads(data.group(1))


def test_index_lists_every_model(client, ids, db):
    r = client.get("/")
    assert r.status_code == 200 and r.mimetype == "text/html"
    html = r.text
    rows = {row["id"]: row for row in _rows(html)}
    assert sorted(rows) == sorted(ids.values())
    base = rows[ids["base.safetensors"]]
    assert base["name"] == "base.safetensors" and base["folder"] == str(db.parent / "models")
    assert (base["kind"], base["family"], base["verdict"], base["format"]) == (
        "checkpoint", "sd1", "safe", "safetensors")
    assert base["size"] == (db.parent / "models" / "base.safetensors").stat().st_size
    assert base["size_text"] == "31.18 MB" and len(base["autov2"]) == 10
    assert rows[ids["base_copy.ckpt"]]["format"] == "torch-zip"
    for key, values in (("kind", ["checkpoint", "unknown", "vae"]), ("family", ["sd1"]),
                        ("verdict", ["safe"])):
        options = re.search(rf'<select name="{key}" data-key="{key}">(.*?)</select>', html,
                            re.S).group(1)
        assert re.findall(r'<option value="([^"]*)">', options) == ["", *values]
    assert '<script src="/static/table.js">' in html
    assert _external(html) == []
    assert "<script>" not in html  # no inline script (the CSP would refuse it anyway)


def test_model_page_shows_everything(client, ids):
    html = client.get(f"/model/{ids['base.safetensors']}").text
    assert "base.safetensors" in html and "ckptkit tiny sample of Stable Diffusion 1.x" in html
    for label in ("SHA-256", "AutoV1", "AutoV2", "AutoV3", "CRC32", "BLAKE3"):
        assert f"<dt>{label}</dt>" in html
    for component in ("diffusion_model", "clip_l", "vae"):
        assert f"<td>{component}</td>" in html
    assert "ModelSpec" in html and "modelspec.architecture" in html
    assert "512x512, 50 steps, guidance 7.5" in html  # sd1's sampling defaults
    assert "686 of 686 keys of sd1&#39;s diffusion_model" in html  # how it was identified
    assert f'src="/preview/{ids["base.safetensors"]}"' in html
    # duplicates and shared parts, each a link to the other model
    assert re.search(rf'same weights: <a href="/model/{ids["base_copy.ckpt"]}"', html)
    assert re.search(rf'shares vae: <a href="/model/{ids["parts/vae/base.safetensors"]}"', html)
    # what was made from it, and the table filtered on what it is
    links = _links(html)
    assert {f"/model/{ids['merged.safetensors']}",
            f"/model/{ids['parts/vae/base.safetensors']}"} <= links
    assert {"/?family=sd1", "/?kind=checkpoint", "/?verdict=safe"} <= links
    assert _external(html) == []


def test_lineage_graph_links_to_the_parents(client, ids):
    html = client.get(f"/model/{ids['merged.safetensors']}").text
    svg = html[html.index("<svg"):html.index("</svg>")]
    parents = {f"/model/{ids['base.safetensors']}", f"/model/{ids['other.safetensors']}"}
    assert _links(svg) == parents  # the model itself is drawn, not linked
    assert "merge A weighted-sum" in svg and "merge B weighted-sum" in svg
    assert "ckptkit.merge_recipe" in html  # the recipe in the metadata
    assert "&#34;alpha&#34;: 0.3" in html or '"alpha": 0.3' in html
    # what the Civitai sidecar says
    assert "<dd>Merged From Civitai</dd>" in html and "<dd>shiny, test words</dd>" in html
    assert "civitai-info: <span" in html and "merged.civitai.info" in html
    other = client.get(f"/model/{ids['other.safetensors']}").text
    assert "No merge or training ancestry" in other and "<svg" not in other
    assert f'href="/model/{ids["merged.safetensors"]}"' in other  # made from it


def test_identical_files(client, ids):
    html = client.get(f"/model/{ids['vae_copy.safetensors']}").text
    assert re.search(rf'same bytes: <a href="/model/{ids["parts/vae/base.safetensors"]}"', html)
    assert re.search(rf'shares vae: <a href="/model/{ids["base.safetensors"]}"', html)


def test_lineage_with_a_parent_not_in_the_library(client, ids):
    odd = next(i for p, i in ids.items() if p.startswith("odd/"))
    html = client.get(f"/model/{odd}").text
    svg = html[html.index("<svg"):html.index("</svg>")]
    assert '<g class="node missing">' in svg and "v1-5-pruned.ckpt (not in the library)" in svg
    assert _links(svg) == set()  # nothing to link to
    assert "base-model" in svg


def test_hostile_names_and_metadata_are_shown_escaped(client, ids):
    odd = next(i for p, i in ids.items() if p.startswith("odd/"))
    html = client.get("/").text
    assert "<img src=x" not in html and "\u202e" not in html
    row = next(r for r in _rows(html) if r["id"] == odd)  # the script sets it as text
    assert row["name"] == "<img src=x onerror=alert(1)>\\u202eevil\\xff.safetensors"
    html = client.get(f"/model/{odd}").text
    assert "<img src=x" not in html and "<script>alert" not in html
    assert "\u202e" not in html  # the bidi override shown as an escape
    assert "&lt;img src=x onerror=alert(1)&gt;\\u202eevil\\xff" in html
    assert "&lt;/pre&gt;&lt;script&gt;alert(&#39;meta&#39;)&lt;/script&gt;" in html
    assert HOSTILE_TEXT not in html and HOSTILE_NAME not in html
    assert _external(html) == []


def test_preview_is_the_indexed_file(client, ids, db):
    r = client.get(f"/preview/{ids['base.safetensors']}")
    assert r.status_code == 200 and r.mimetype == "image/png"
    assert r.data == (db.parent / "models" / "base.preview.png").read_bytes() == png(64, 64)
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert client.get(f"/preview/{ids['other.safetensors']}").status_code == 404  # none


@pytest.mark.parametrize("url", [
    "/preview/../../../../etc/passwd", "/preview/..%2f..%2f..%2fetc%2fpasswd",
    "/preview/%2fetc%2fpasswd", "/preview//etc/passwd", "/preview/etc/passwd",
    "/preview/-1", "/preview/1.0", "/preview/0x1", "/preview/99999",
    "/model/99999", "/model/-1", "/model/../1", "/model/%2e%2e", "/model/abc",
    "/static/../app.py", "/static/..%2fapp.py", "/static/%2e%2e%2fapp.py",
    "/static/..%5capp.py", "/static/%2fetc%2fpasswd", "/static/table.js%00",
    "/static/templates", "/static/", "/templates/base.html", "/app.py",
    "/etc/passwd", "/..%2f..%2fetc%2fpasswd", "/library.sqlite",
])
def test_paths_outside_the_index_are_refused(client, monkeypatch, url):
    """No route opens a file a request names: nothing is opened at all for these."""
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    r = client.get(url)
    assert r.status_code == 404, (url, r.status_code)
    assert b"root:" not in r.data and b"def create_app" not in r.data
    assert opened == []
    assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")


def test_only_the_recorded_preview_is_opened(client, monkeypatch, ids, db):
    opened = []
    real_open = os.open
    monkeypatch.setattr(os, "open", lambda p, *a, **k: opened.append(p) or real_open(p, *a, **k))
    assert client.get(f"/preview/{ids['base.safetensors']}").status_code == 200
    assert opened == [str(db.parent / "models" / "base.preview.png")]


@pytest.mark.parametrize("content", [b"GIF89a not really", b"<svg onload=alert(1)>",
                                     b"#!/bin/sh\n", b"", None])
def test_a_preview_that_is_not_an_image_is_not_served(client, monkeypatch, ids, tmp_path,
                                                       content):
    """The index's preview path now holds something else (or a FIFO, which would hang a
    read): 404 unless its first bytes are an image's; the type comes from those bytes."""
    path = tmp_path / "base.preview.png"
    if content is None:
        os.mkfifo(path)
    else:
        path.write_bytes(content)
    monkeypatch.setattr(views, "preview_path", lambda conn, i: str(path))
    r = client.get(f"/preview/{ids['base.safetensors']}")
    if content and content.startswith(b"GIF89a"):
        assert r.status_code == 200 and r.mimetype == "image/gif"
    else:
        assert r.status_code == 404


def test_too_big_preview(client, monkeypatch, ids, tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png())
    monkeypatch.setattr(views, "preview_path", lambda conn, i: str(path))
    monkeypatch.setattr(web_app, "PREVIEW_MAX_BYTES", 10)
    assert client.get(f"/preview/{ids['base.safetensors']}").status_code == 404


def test_static_files_are_the_package_ones(client):
    r = client.get("/static/table.js")
    assert r.status_code == 200 and r.mimetype in ("text/javascript", "application/javascript")
    assert b"function render()" in r.data
    assert client.get("/static/style.css").mimetype == "text/css"
    assert client.get("/static/icon.svg").mimetype == "image/svg+xml"
    assert client.get("/static/nothere.js").status_code == 404


def test_shipped_assets_reference_nothing_outside():
    folder = Path(web_app.__file__).parent
    for f in [*(folder / "static").iterdir(), *(folder / "templates").iterdir()]:
        text = f.read_text()
        outside = re.findall(r"https?://[^\s\"')]+", text)
        assert [u for u in outside if u != "http://www.w3.org/2000/svg"] == [], f.name
        assert "@import" not in text and "url(" not in text, f.name


def test_only_get(client):
    assert client.post("/").status_code == 405
    assert client.delete("/model/1").status_code == 405


def test_token_on_every_route(db, ids):
    client = create_app(str(db), token="t" * 32).test_client()
    for url in ("/", f"/model/{ids['base.safetensors']}", f"/preview/{ids['base.safetensors']}",
                "/static/table.js", "/nowhere"):
        r = client.get(url)
        assert r.status_code == 403 and b"function render()" not in r.data and b"PNG" not in r.data
    r = client.get("/?token=" + "t" * 32)
    assert r.status_code == 303 and r.headers["Location"] == "/"
    assert client.get("/").status_code == 200  # with the cookie
    assert client.get(f"/preview/{ids['base.safetensors']}").status_code == 200


def test_loopback_app_refuses_other_hosts(client):
    assert client.get("/", headers={"Host": "attacker.example"}).status_code == 403
    assert client.get("/", headers={"Host": "127.0.0.1:8765"}).status_code == 200


@pytest.mark.parametrize("kind", ["missing", "corrupt", "newer"])
def test_database_failing_while_serving(tmp_path, kind):
    """The index gone or broken under a running server: a page that says so in one
    sentence (503), with the same headers, never a traceback."""
    path = tmp_path / "library.sqlite"
    if kind == "corrupt":
        path.write_bytes(b"this is not a database" * 100)
    elif kind == "newer":
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA user_version = 999")
        conn.close()
    r = create_app(str(path)).test_client().get("/")
    assert r.status_code == 503
    assert str(path) in r.text and "Traceback" not in r.text
    assert r.headers["Content-Security-Policy"] == security.CSP
    assert not (kind == "missing" and path.exists())  # a page never creates a database
