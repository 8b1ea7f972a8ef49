"""Serving corpus reports over HTTP, so the Prefect UI's summary artifact can link to them (a
browser will not open a file:// link from a web page).

``http://HOST:PORT/<slug>/reports/index.html`` is ROOT/reports/index.html of the corpus whose
``CorpusLayout.slug`` is ``<slug>``; the report's relative links reach the plates' previews,
working copies and best crops under ``/<slug>/plates_structured/``. Only those are served, read
only, and only where their real path stays inside the corpus: never a source, a manifest or
plateflow's state. `plateflow server` runs one for its corpus and tells its workers the URL
(PLATEFLOW_REPORT_URL); `plateflow report --root R --serve` runs one on its own.
"""

from __future__ import annotations

import html
import mimetypes
import os
import stat
import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import quote, unquote, urlsplit

from plateflow.layout import PLATES, REPORTS, RUNS, VIZ, WORKING_COPY, CorpusLayout

# What a report links to inside a plate folder: its viz/ PNGs, the working copy, a run's best crop.
_PLATE_FILE = re.compile(rf"^[^/]+/({VIZ}/[^/]+\.png|{re.escape(WORKING_COPY)}|{RUNS}/[^/]+/best_crop\.(jpg|png))$")


def _allowed(rest: str) -> bool:
    """Whether a path under a corpus is one the report server serves: a file of reports/, or a
    plate's preview, plots, working copy or best crop."""
    if ".." in rest.split("/") or "\0" in rest:
        return False
    if rest.startswith(f"{REPORTS}/"):
        return not any(part.startswith(".") for part in rest.split("/"))
    return rest.startswith(f"{PLATES}/") and bool(_PLATE_FILE.match(rest[len(PLATES) + 1:]))


def served_path(corpus: Path, rest: str) -> Path | None:
    """The file under ``corpus`` that URL path ``rest`` names, if it is one the report server
    serves (``_allowed``), and so is the regular file it really is: a symlink inside the corpus
    to a manifest, a source or plateflow's state is not served."""
    if not _allowed(rest):
        return None
    real = os.path.realpath(corpus / rest)
    top = os.fspath(corpus) + os.sep
    if not real.startswith(top) or not _allowed(real[len(top):].replace(os.sep, "/")):
        return None
    try:
        if not stat.S_ISREG(os.stat(real).st_mode):
            return None
    except OSError:
        return None
    return Path(real)


class _Handler(BaseHTTPRequestHandler):
    corpora: dict[str, Path] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, body: bool) -> None:
        try:
            path = unquote(urlsplit(self.path).path, errors="strict").lstrip("/")
        except (ValueError, UnicodeDecodeError):
            path = "\0"
        if "\0" in path:  # a malformed URL: said, never a traceback
            return self._send(HTTPStatus.BAD_REQUEST, "text/plain; charset=utf-8", b"bad request\n", body)
        if not path:
            return self._send(HTTPStatus.OK, "text/html; charset=utf-8", self._listing(), body)
        slug, _, rest = path.partition("/")
        corpus = self.corpora.get(slug)
        target = served_path(corpus, rest or f"{REPORTS}/index.html") if corpus else None
        if target is None:
            return self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", body)
        try:
            data = target.read_bytes()
        except OSError:
            return self._send(HTTPStatus.NOT_FOUND, "text/plain; charset=utf-8", b"not found\n", body)
        kind = mimetypes.guess_type(target.name)[0] or "application/octet-stream"
        self._send(HTTPStatus.OK, kind + ("; charset=utf-8" if kind == "text/html" else ""), data, body)

    def _listing(self) -> bytes:
        items = "".join(f'<li><a href="/{quote(CorpusLayout(root).report_url_path)}">{html.escape(str(root))}</a></li>'
                        for root in self.corpora.values())
        return f"<!doctype html><meta charset='utf-8'><title>plateflow reports</title><ul>{items}</ul>".encode()

    def _send(self, status: HTTPStatus, kind: str, data: bytes, body: bool) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - quiet: no line per thumbnail
        pass


class ReportServer:
    """An HTTP server of the reports of ``roots``, on a thread (``start``) or in the foreground
    (``serve_forever``)."""

    def __init__(self, roots: list[Path], host: str = "127.0.0.1", port: int = 0):
        corpora = {CorpusLayout(Path(r).resolve()).slug: Path(r).resolve() for r in roots}
        handler = type("Handler", (_Handler,), {"corpora": corpora})
        self.httpd = ThreadingHTTPServer((host, port), handler)
        self.httpd.daemon_threads = True
        self.corpora = corpora
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def report_url(self, root: Path) -> str:
        return f"{self.url}/{CorpusLayout(Path(root).resolve()).report_url_path}"

    def start(self) -> "ReportServer":
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="plateflow-reports", daemon=True)
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self.httpd.serve_forever()

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
