"""The library's page in a real browser: Debian's chromium, driven by Playwright, against a
live ``ckpt library serve`` over a library indexed from tiny samples. Load the table,
filter and sort it, open a model's page, follow a lineage link, with screenshots (in the
test's folder) taken at each step and the page's text checked at that moment; the browser
fetches nothing but the server's own files and reports no script or CSP error; a path
outside the index is refused.

Marked ``browser`` (``pytest -m browser``, which .ci/run runs): chromium missing is a
failure, not a skip. No browser is ever downloaded.
"""

from __future__ import annotations

import os
import shutil
import struct
from pathlib import Path

import pytest
from library_web_samples import make_library, start_server, stop_server

pytestmark = pytest.mark.browser

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not os.access(path, os.X_OK):
        pytest.fail("Debian's chromium is not installed (apt-get install chromium); the "
                    "browser tests need it and never download a browser")
    return path


@pytest.fixture(scope="module")
def live(module_tmp):
    db = make_library(module_tmp("library"))
    proc, url, _ = start_server(db)
    yield url
    code, err = stop_server(proc)
    assert code == 0 and "Traceback" not in err, err


def _screenshot(page, path: Path) -> tuple[int, int]:
    """A full-page screenshot; its width and height, once it is shown to be a PNG."""
    page.screenshot(path=str(path), full_page=True)
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and data[12:16] == b"IHDR", path
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 800 and height >= 200 and len(data) > 5000, (path, width, height)
    return width, height


def _visible_names(page) -> list[str]:
    return page.eval_on_selector_all(
        "#models tbody tr:not([hidden]) td:first-child", "cells => cells.map(c => c.innerText)")


def test_table_filter_model_page_lineage(chromium, live, tmp_path):
    from playwright.sync_api import sync_playwright

    origin = live.rstrip("/")
    requests, problems = [], []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("request", lambda r: requests.append(r.url))
            page.on("console", lambda m: m.type in ("error", "warning")
                    and problems.append(m.text))
            page.on("pageerror", lambda e: problems.append(str(e)))

            # the table
            page.goto(live)
            assert page.title() == "models · ckpt library"
            names = _visible_names(page)
            assert sorted(names) == sorted(
                ["base.safetensors", "base_copy.ckpt", "merged.safetensors",
                 "other.safetensors", "base.safetensors", "vae_copy.safetensors",
                 "<img src=x onerror=alert(1)>\\u202eevil\\xff.safetensors"])
            assert page.inner_text("#shown") == "7 models"
            _screenshot(page, tmp_path / "1-table.png")

            # filter by text, then by kind (the filter goes into the address)
            page.fill("#filter", "merged")
            assert _visible_names(page) == ["merged.safetensors"]
            assert page.inner_text("#shown") == "1 of 7 models"
            _screenshot(page, tmp_path / "2-filtered.png")
            page.fill("#filter", "")
            page.select_option("select[name=kind]", "vae")
            assert _visible_names(page) == ["base.safetensors", "vae_copy.safetensors"]
            assert page.url.endswith("/?kind=vae")
            assert "parts/vae" in page.inner_text("#models tbody tr:first-child")
            page.select_option("select[name=kind]", "")

            # sort by size, both ways
            page.click("#models th:has-text('size') button")
            assert _visible_names(page)[0].endswith("evil\\xff.safetensors")  # 400 bytes
            page.click("#models th:has-text('size') button")
            assert _visible_names(page)[0] == "base_copy.ckpt"  # the pickle is the largest
            assert page.get_attribute("#models th:has-text('size')", "aria-sort") == "descending"

            # a model's page, from the table
            page.click("#models a:text-is('merged.safetensors')")
            page.wait_for_url("**/model/*")
            assert page.inner_text("#model-name") == "merged.safetensors"
            assert "Merged From Civitai" in page.inner_text("#identification")
            lineage = page.inner_text("#lineage")
            assert "base.safetensors" in lineage and "other.safetensors" in lineage
            assert "merge A weighted-sum" in lineage
            assert page.locator("svg.lineage a").count() == 2
            assert "SHA-256" in page.inner_text("#hashes")
            _screenshot(page, tmp_path / "3-merged.png")

            # follow the lineage link to a parent: its page, preview, duplicates
            page.click("svg.lineage a:has-text('base.safetensors')")
            page.wait_for_load_state()
            assert page.inner_text("#model-name") == "base.safetensors"
            assert "/models/base.safetensors" in page.inner_text(".model-head")
            duplicates = page.inner_text("#duplicates")
            assert "same weights: base_copy.ckpt" in duplicates
            assert "shares vae: base.safetensors" in duplicates
            assert "merged.safetensors (merge)" in page.inner_text("#lineage")
            width = page.eval_on_selector("img.preview", "i => i.complete && i.naturalWidth")
            assert width == 64  # the preview image, served from the index
            _screenshot(page, tmp_path / "4-base.png")

            # back to the table by the family link: filtered to sd1
            page.click("#identification a:text-is('sd1')")
            page.wait_for_url("**/?family=sd1")
            assert len(_visible_names(page)) == 6  # all but the unidentified file

            # paths outside the index
            for path in ("/preview/..%2f..%2f..%2fetc%2fpasswd", "/static/..%2fapp.py",
                         "/preview/99999", "/model/99999"):
                r = page.request.get(origin + path)
                assert r.status == 404 and "root:" not in r.text(), path
            page.goto(origin + "/../../etc/passwd")  # the browser asks for /etc/passwd
            assert "404" in page.inner_text("h2") and "root:" not in page.content()
            _screenshot(page, tmp_path / "5-refused.png")
        finally:
            browser.close()
    assert requests and all(u.startswith(origin + "/") for u in requests), requests
    assert [m for m in problems if "404" not in m] == [], problems
