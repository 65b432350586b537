"""The library server's request rules (security.py) on an app of one route: loopback hosts
only without a token; with one, the token on every request (query traded for a cookie,
cookie, bearer header), compared in constant time; the headers on every response."""

from __future__ import annotations

import pytest
from flask import Flask

from ckptkit.library.web import security

TOKEN = "s3cret-token_value"


def _app(token):
    app = Flask(__name__, static_folder=None)
    security.install(app, token)
    app.get("/page")(lambda: "the page")
    return app.test_client()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::1]", "127.0.0.1:8000",
                                  "localhost:1234", "[::1]:8080", "127.3.2.1:80"])
def test_loopback_hosts_are_answered(host):
    r = _app(None).get("/page", headers={"Host": host})
    assert r.status_code == 200 and r.text == "the page"


@pytest.mark.parametrize("host", ["evil.example:8000", "192.168.1.10:8000", "10.0.0.1",
                                  "localhost.evil.example", "[2001:db8::1]:80", "0.0.0.0:80"])
def test_other_hosts_are_refused_without_token(host):
    """A page that made its own name resolve to 127.0.0.1 (DNS rebinding) sends its own
    name as Host: refused."""
    r = _app(None).get("/page", headers={"Host": host})
    assert r.status_code == 403 and "the page" not in r.text


def test_token_required_on_every_request():
    client = _app(TOKEN)
    assert client.get("/page").status_code == 403
    assert client.get("/page?token=wrong").status_code == 403
    assert client.get("/page", headers={"Authorization": "Bearer wrong"}).status_code == 403
    assert client.get("/page", headers={"Authorization": f"Basic {TOKEN}"}).status_code == 403
    assert client.get("/nowhere").status_code == 403  # not even whether a route exists


def test_token_in_address_becomes_cookie_and_leaves_the_address():
    client = _app(TOKEN)
    r = client.get(f"/page?token={TOKEN}&x=1&x=2", headers={"Host": "box.lan:8000"})
    assert r.status_code == 303
    assert r.headers["Location"] == "/page?x=1&x=2"
    cookie = r.headers["Set-Cookie"]
    assert f"{security.TOKEN_COOKIE}={TOKEN}" in cookie
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = client.get("/page?x=1", headers={"Host": "box.lan:8000"})  # the cookie now
    assert r.status_code == 200 and r.text == "the page"


def test_bearer_header():
    r = _app(TOKEN).get("/page", headers={"Authorization": f"Bearer {TOKEN}"})
    assert r.status_code == 200


def test_compare_is_hmac(monkeypatch):
    """Every token comparison goes through hmac.compare_digest (constant time)."""
    calls = []
    real = security.hmac.compare_digest
    monkeypatch.setattr(security.hmac, "compare_digest",
                        lambda a, b: calls.append((a, b)) or real(a, b))
    client = _app(TOKEN)
    client.get("/page?token=abc")
    client.get("/page", headers={"Authorization": f"Bearer {TOKEN}"})
    assert (b"abc", TOKEN.encode()) in calls and (TOKEN.encode(), TOKEN.encode()) in calls
    assert security.same_token(TOKEN, TOKEN) and not security.same_token(TOKEN[:-1], TOKEN)
    assert not security.same_token("", TOKEN) and not security.same_token(None, TOKEN)
    assert not security.same_token("\udcff", TOKEN)  # a lone surrogate: no crash


@pytest.mark.parametrize("token", [None, TOKEN])
def test_headers_on_pages_and_refusals(token):
    client = _app(token)
    for r in (client.get("/page", headers={"Authorization": f"Bearer {TOKEN}"}),
              client.get("/page", headers={"Host": "evil.example"}),
              client.get("/missing", headers={"Authorization": f"Bearer {TOKEN}"})):
        assert r.headers["Content-Security-Policy"].startswith("default-src 'self'")
        assert "unsafe-inline" not in r.headers["Content-Security-Policy"]
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert r.headers["X-Frame-Options"] == "DENY"


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("127.255.0.1", True), ("0.0.0.0", False), ("::", False),
    ("192.168.0.2", False), ("myhost", False), ("", False)])
def test_is_loopback(host, loopback):
    assert security.is_loopback(host) is loopback


def test_tokens_differ_and_are_long():
    a, b = security.new_token(), security.new_token()
    assert a != b and len(a) >= 43
