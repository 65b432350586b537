"""The WSGI server that ``ckpt library serve`` runs the app on: waitress.

Waitress is a production WSGI server in pure Python with no dependencies of its own, safe to
leave on a network address (werkzeug's, which Flask runs for development, says it is not);
its worker threads answer several page and image requests at once. The listening socket is
made here rather than by waitress so that an address in use, or a host that does not
resolve, is one line from ckpt before anything starts, and so that ``--port 0`` (a free
port, for tests) reports the port the system chose.
"""

from __future__ import annotations

import errno
import socket

import waitress.server

from ...errors import UsageError

THREADS = 4


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` and listening; the reason in one line if not."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise UsageError(f"--host {host}: not an address of this machine ({exc})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(64)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise UsageError(f"port {port} on {host} is in use: give another with --port"
                             ) from None
        raise UsageError(f"cannot listen on {host} port {port}: {exc.strerror or exc}") from None
    return sock


def run(app, sock: socket.socket, ready=None) -> None:
    """Serves ``app`` on ``sock`` until Ctrl-C or SIGTERM (which ``ckpt`` turns into
    KeyboardInterrupt), calling ``ready()`` once requests can be answered; a stop at any
    moment, even before then, ends it the same way: the requests in progress are let
    finish (waitress's threads are daemons), the socket is closed, and it returns."""
    try:
        server = waitress.server.create_server(app, sockets=[sock], threads=THREADS,
                                               ident="ckptkit",
                                               clear_untrusted_proxy_headers=True)
        try:
            if ready is not None:
                ready()
            server.run()  # returns on KeyboardInterrupt, having stopped its worker threads
        finally:
            server.close()
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
