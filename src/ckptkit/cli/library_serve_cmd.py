"""``ckpt library serve``: the library's index as a local web page, until Ctrl-C.

Bound to 127.0.0.1 unless ``--host`` names another address; then every request needs a
token (``--token``, or one made here and printed in the address to open). The rules, the
pages and the server are in ``ckptkit.library.web``; this module checks the database and
the address before anything starts, so that a missing or corrupt index, a port in use or a
host that does not resolve is one line and a non-zero exit, and prints where to look.
"""

from __future__ import annotations

import sys

from ..errors import UsageError
from ..library.db import default_path
from ..safe_text import printable

MIN_TOKEN_CHARS = 16


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve", help="browse the index in a web browser (a local page)",
        description="Serve a web page over the index: a table of every model to sort and "
                    "filter, and a page per model (identification, components, metadata, "
                    "hashes, preview, duplicates, lineage). Only the files the index "
                    "records are served, and the page loads nothing from outside this "
                    "machine. Ctrl-C stops it.")
    p.add_argument("--db", metavar="PATH", help=f"the library database (default: "
                   f"{default_path()})")
    p.add_argument("--port", type=int, default=8765, metavar="P",
                   help="the port to listen on (default 8765; 0: any free port)")
    p.add_argument("--host", default="127.0.0.1", metavar="H",
                   help="the address to listen on (default 127.0.0.1, this machine only); "
                        "any other requires a token on every request")
    p.add_argument("--token", metavar="T",
                   help=f"the token to require (at least {MIN_TOKEN_CHARS} characters; "
                        "default with --host: a new random one, printed in the address; "
                        "one given here is visible to other users in the process list)")
    p.set_defaults(run=run)


def run(args) -> int:
    try:  # the library extra
        from ..library.web import server, views
        from ..library.web.app import create_app
        from ..library.web.security import is_loopback, new_token
    except ImportError as exc:
        raise UsageError(f"ckpt library serve needs the library extra ({exc.name} is not "
                         "installed): pip install 'ckptkit[library]'") from None
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port {args.port}: not a port number (0 to 65535)")
    token = args.token
    if token is not None and (len(token) < MIN_TOKEN_CHARS or not token.isascii()
                              or not token.isprintable() or " " in token):
        raise UsageError(f"--token: give at least {MIN_TOKEN_CHARS} printable ASCII "
                         "characters without spaces")
    if token is None and not is_loopback(args.host):
        token = new_token()
    db_path = args.db or default_path()
    views.check(db_path)
    app = create_app(db_path, token)
    sock = server.listen(args.host, args.port)
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    address = f"http://{host}:{port}/" + (f"?token={token}" if token else "")
    server.run(app, sock, ready=lambda: print(
        f"serving {printable(db_path)} at {address} (Ctrl-C stops)", flush=True))
    print("ckpt: library server stopped", file=sys.stderr)
    return 0
