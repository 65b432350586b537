"""The Flask app of ``ckpt library serve``: the index as a table, a page per model, its
preview image, and the page's own script and style sheet.

Nothing a request names reaches the file system: a model and its preview are asked for by
their id in the index (an integer, or the route does not match), and the file served is the
one the index recorded for that id; the script and style sheet are read from the package
once, when the app is made, and looked up by name in that table. Every string from the
index (file names, metadata: text a downloaded file chose) goes through Jinja's escaping and
``printable`` (control and bidi characters shown as escapes), and the page runs no script
but the package's own (see ``security.py`` for the headers that enforce it).
"""

from __future__ import annotations

import mimetypes
import os
import stat
from importlib import resources

from flask import Flask, abort, render_template, send_file
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from ...cli.fmt import human_bytes
from ...errors import CkptError
from ...safe_text import printable
from . import security, views

PREVIEW_MAX_BYTES = 64 << 20
# The image types a preview may be, by their first bytes (never by the file's extension).
_IMAGE_MAGIC = ((b"\x89PNG\r\n\x1a\n", "image/png"), (b"\xff\xd8\xff", "image/jpeg"),
                (b"GIF87a", "image/gif"), (b"GIF89a", "image/gif"))


def _assets() -> dict[str, tuple[bytes, str]]:
    """The shipped static files, name -> (bytes, MIME type)."""
    folder = resources.files(__package__) / "static"
    return {f.name: (f.read_bytes(), mimetypes.guess_type(f.name)[0] or "text/plain")
            for f in folder.iterdir() if f.is_file()}


def _image_type(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    return next((kind for magic, kind in _IMAGE_MAGIC if head.startswith(magic)), None)


def _open_image(path: str):
    """The preview file at ``path`` (from the index) opened for sending, with its type; None
    when it is gone, not a regular file (a FIFO would hang the request), too big, or not
    an image."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    f = os.fdopen(fd, "rb")
    info = os.fstat(fd)
    kind = None
    if stat.S_ISREG(info.st_mode) and info.st_size <= PREVIEW_MAX_BYTES:
        kind = _image_type(f.read(16))
        f.seek(0)
    if kind is None:
        f.close()
        return None
    return f, kind


def _shown(value):
    """What a template prints of ``value``: text through ``printable`` line by line (a
    metadata value keeps its line breaks; every other control character is shown as an
    escape, and a file name that is not UTF-8 as its bytes, so the page always encodes)."""
    if isinstance(value, str) and not isinstance(value, Markup):  # Markup: made by us (tojson)
        return "\n".join(printable(line) for line in value.split("\n"))
    return value


def create_app(db_path: str, token: str | None = None) -> Flask:
    """The app over the index at ``db_path``; ``token``: required on every request (see
    ``security.install``), None for a server bound to loopback."""
    app = Flask(__name__, static_folder=None)
    app.config["DB_PATH"] = db_path
    assets = _assets()
    security.install(app, token)
    app.jinja_env.finalize = _shown
    app.jinja_env.filters["bytes"] = lambda n: human_bytes(n) if n is not None else ""

    @app.context_processor
    def _everywhere():
        return {"db_name": os.path.basename(db_path)}

    @app.get("/")
    def index():
        with views.library(db_path) as lib:
            rows, choices = views.index_rows(lib)
        return render_template("index.html", rows=rows, choices=choices,
                               columns=views.COLUMNS)

    @app.get("/model/<int:model_id>")
    def model(model_id: int):
        with views.library(db_path) as lib:
            page = views.model_page(lib, model_id)
        if page is None:
            abort(404, f"no model with id {model_id} in the index")
        return render_template("model.html", m=page)

    @app.get("/preview/<int:model_id>")
    def preview(model_id: int):
        with views.library(db_path) as lib:
            path = views.preview_path(lib, model_id)
        opened = _open_image(path) if path else None
        if opened is None:
            abort(404, f"no preview image for id {model_id} in the index")
        f, kind = opened
        return send_file(f, mimetype=kind, max_age=0)

    @app.get("/static/<name>")
    def asset(name: str):
        if name not in assets:
            abort(404, "no such file")
        data, kind = assets[name]
        return app.response_class(data, mimetype=kind)

    @app.errorhandler(CkptError)
    def _database(exc: CkptError):  # the index went missing or bad while serving
        return render_template("error.html", code=503, title="Library unavailable",
                               message=str(exc)), 503

    @app.errorhandler(HTTPException)
    def _error(exc: HTTPException):
        return render_template("error.html", code=exc.code, title=exc.name,
                               message=exc.description), exc.code

    return app
