"""Who may ask the library's web server for anything, and what a page may load.

The index names every model file a user keeps, with paths and hashes; a page over it must
not be readable by another machine or by a web site the user happens to visit:

- Bound to a loopback address, only the user's own machine can connect, but a site in the
  user's browser could still reach it by DNS rebinding (its own name made to resolve to
  127.0.0.1): every request must name a loopback host (``Host: 127.0.0.1:P``,
  ``localhost:P``, ``[::1]:P``), which such a page cannot forge.
- Bound to any other address, every request must carry the server's token: in the address
  ckpt prints (``?token=...``, traded at once for a cookie and a redirect to the same page
  without it, so that it stays out of the history and of any Referer), in that cookie, or
  as ``Authorization: Bearer ...`` for scripts. It is compared in constant time.
- Every response forbids loading anything from elsewhere (``Content-Security-Policy:
  default-src 'self'``, no inline script or style), framing, MIME sniffing and referrers.
"""

from __future__ import annotations

import hmac
import ipaddress
import secrets
from urllib.parse import urlencode

from flask import Flask, Response, abort, redirect, request

TOKEN_COOKIE = "ckpt_library_token"
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Opener-Policy": "same-origin",
    "Cross-Origin-Resource-Policy": "same-origin",
    "Cache-Control": "no-store",
}
LOOPBACK_NAMES = ("localhost",)


def new_token() -> str:
    """A token nobody can guess (256 bits), URL-safe so it can sit in the printed address."""
    return secrets.token_urlsafe(32)


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address as given to ``--host``, or the name part of a ``Host``
    header) is this machine's loopback: 127.0.0.0/8, ::1 or ``localhost``."""
    host = host.strip("[]").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_name(header: str) -> str:
    """The name part of a ``Host`` header: ``[::1]:8000`` -> ``::1``, ``a:80`` -> ``a``."""
    if header.startswith("["):
        return header[1:].split("]", 1)[0]
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def same_token(given: str | None, token: str) -> bool:
    """Whether ``given`` is ``token``, in time that does not depend on where they differ."""
    if not given:
        return False
    return hmac.compare_digest(given.encode("utf-8", "replace"), token.encode())


def install(app: Flask, token: str | None) -> None:
    """Checks every request (``token`` None: loopback hosts only; else the token) and adds
    the security headers to every response, error pages included."""

    @app.before_request
    def _check():
        if token is None:
            if not is_loopback(_host_name(request.host)):
                abort(403, "this library server answers only to addresses of this machine "
                           "(127.0.0.1, localhost, [::1])")
            return None
        if same_token(request.args.get("token"), token):
            rest = [(k, v) for k, v in request.args.items(multi=True) if k != "token"]
            to = request.path + ("?" + urlencode(rest) if rest else "")
            response = redirect(to, 303)
            response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="Strict")
            return response
        bearer = request.headers.get("Authorization", "")
        if (same_token(request.cookies.get(TOKEN_COOKIE), token)
                or (bearer.startswith("Bearer ") and same_token(bearer[7:], token))):
            return None
        abort(403, "this library server needs its token: open the address that "
                   "`ckpt library serve` printed")

    @app.after_request
    def _headers(response: Response) -> Response:
        response.headers.update(HEADERS)
        return response
