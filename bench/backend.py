#!/usr/bin/env python3
"""The benchmark's stand-in for libertem-server: the test suite's fake plus the real GUI files.

``tests/fake_libertem_server.py`` already copies libertem-server's command line, token check,
ready line, streaming routes and websocket echo, so every setup (direct, ours, jupyter-server-
proxy) starts exactly this program the way it would start libertem-server. The fake's GUI is a
few hundred bytes, though, and the "first load" metric needs the real bundle (738 KB JS, 524 KB
CSS, fonts): when ``LIBERTEM_BENCH_CLIENT_DIR`` names a directory with LiberTEM's built client
(``index.html``, ``assets/``...), its files are served at ``/``, ``/favicon.ico``,
``/manifest.json`` and ``/assets/<name>`` like the real server does (ETag, no gzip). The fake
itself is imported, not edited.
"""

from __future__ import annotations

import mimetypes
import os
import sys
from pathlib import Path

import tornado.web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fake_libertem_server as fake

CLIENT_ENV = "LIBERTEM_BENCH_CLIENT_DIR"


def load_client(root: Path) -> dict[str, tuple[bytes, str]]:
    """Every file of the built client, keyed by URL path below ``/`` (``assets/x.js``)."""
    files: dict[str, tuple[bytes, str]] = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), ctype)
    return files


class ClientFileHandler(fake.BaseHandler):
    """Serves one client file; tornado adds the ETag and answers ``If-None-Match`` with 304."""

    def initialize(self, state: fake.FakeState, files: dict[str, tuple[bytes, str]]) -> None:  # type: ignore[override]
        super().initialize(state)
        self.files = files

    def get(self, name: str = "") -> None:
        entry = self.files.get(name or "index.html")
        if entry is None:
            raise tornado.web.HTTPError(404)
        body, ctype = entry
        self.set_header("Content-Type", ctype)
        self.finish(body)


def make_app_with_client(state: fake.FakeState) -> tornado.web.Application:
    """The fake's application; the real client's routes take precedence when configured."""
    app = _original_make_app(state)
    client_dir = os.environ.get(CLIENT_ENV, "")
    if client_dir and Path(client_dir, "index.html").is_file():
        kw = {"state": state, "files": load_client(Path(client_dir))}
        app.add_handlers(
            r".*$",
            [
                (r"/()", ClientFileHandler, kw),
                (r"/(favicon\.ico|manifest\.json)", ClientFileHandler, kw),
                (r"/(assets/.*)", ClientFileHandler, kw),
            ],
        )
    return app


_original_make_app = fake.make_app
fake.make_app = make_app_with_client  # run() looks make_app up at call time

if __name__ == "__main__":
    sys.exit(fake.main())
