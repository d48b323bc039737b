"""`loraflow store serve`: a local artifact store, read-only over HTTP, so the links in the Prefect UI open.

Browsers refuse `file://` links from an http page ("Not allowed to load local resource"), so a local store's
artifact links did nothing when clicked. This serves the store on loopback (by default): folder listings,
markdown rendered, JSON/text/PNG shown, every file downloadable (`?download`), nothing else.

A file's URL path is its absolute path on this machine (`http://127.0.0.1:4201/home/me/store/runs/x/`): a link is
then a function of the path alone (`storage.browser_url` with `LORAFLOW_STORE_URL` set), whichever store a run used,
and a link into a store this server does not serve answers 404 naming the ones it does.

Built on the standard library's `http.server` (ThreadingHTTPServer + a SimpleHTTPRequestHandler subclass) rather
than a new dependency: it already has the threaded server, MIME types, conditional GET and HEAD; what a store
needs on top (confinement to the store, markdown, download links) is the code below. Starlette's StaticFiles
(installed with Prefect) has no folder listings and would need an ASGI server besides.
"""

from __future__ import annotations

import html
import os
import threading
import urllib.parse
from datetime import datetime, timezone
from functools import partial
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

from loraflow.errors import LoraflowError
from loraflow.storage import MANIFEST, STORE_URL_SETTING

# (loraflow.storage, with fsspec and pydantic, is imported where used: the CLI's parser reads the defaults below)

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 4201  # beside Prefect's 4200
# Shown as text, not run: the store is untrusted input (docs/store-and-security.md: "A shared store is untrusted input"), and a page
# served from here shares its origin with every other file of the store.
TEXT_TYPES = {".json": "application/json", ".jsonl": "text/plain", ".md": "text/plain", ".txt": "text/plain",
              ".log": "text/plain", ".yaml": "text/plain", ".yml": "text/plain", ".csv": "text/plain",
              ".py": "text/plain", ".html": "text/plain", ".htm": "text/plain", ".xhtml": "text/plain",
              ".svg": "text/plain", ".xml": "text/plain", ".js": "text/plain", ".mjs": "text/plain"}
# No script runs on a page of this server, and nothing is fetched from elsewhere.
SECURITY_HEADERS = {"Content-Security-Policy": "default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'",
                    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
STYLE = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}table{border-collapse:collapse}"
         "td,th{padding:.2em .8em;text-align:left;border-bottom:1px solid #ddd}pre{white-space:pre-wrap;"
         "background:#f6f6f6;padding:.6em}code{background:#f6f6f6}td.size{text-align:right}")


class StoreRoot:
    """A served store: the path as typed (absolute, as links are built) and where it really is."""

    def __init__(self, store: str):
        protocol, _, rest = store.partition("://") if "://" in store else ("", "", store)
        if protocol not in ("", "file", "local"):
            raise LoraflowError(f"{store}: `loraflow store serve` serves local stores only; the links of an {protocol}:// "
                                "store already open in a browser (the S3 console, or the object URL of a folder's "
                                "_manifest.json on an S3-compatible endpoint: AWS_ENDPOINT_URL)")
        self.path = os.path.abspath(rest if protocol else store)
        self.real = os.path.realpath(self.path)

    def holds(self, path: str) -> bool:
        return any(path == root or path.startswith(root.rstrip("/") + "/") for root in (self.path, self.real))


class StoreRequestHandler(SimpleHTTPRequestHandler):
    """GET and HEAD of files inside the served stores; any other method is 501 (SimpleHTTPRequestHandler has none)."""

    server_version = "loraflow-store"

    def __init__(self, *args, roots: tuple[StoreRoot, ...], log_requests: bool = True, **kwargs):
        self.roots = roots
        self.log_requests = log_requests
        self.extra_headers: list[tuple[str, str]] = []
        self.resolved: str | None = None
        # directory= is only a fallback: translate_path answers with the path send_head has checked.
        super().__init__(*args, directory=roots[0].real, **kwargs)

    def translate_path(self, path: str) -> str:
        return self.resolved or "/nonexistent"

    def guess_type(self, path) -> str:
        kind = TEXT_TYPES.get(os.path.splitext(str(path))[1].lower()) or super().guess_type(path)
        return f"{kind}; charset=utf-8" if kind.startswith("text/") or kind == "application/json" else kind

    def end_headers(self) -> None:
        for name, value in [*SECURITY_HEADERS.items(), *self.extra_headers]:
            self.send_header(name, value)
        super().end_headers()

    def log_message(self, format: str, *args) -> None:
        if self.log_requests:
            super().log_message(format, *args)

    def send_head(self):
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
        if url.path in ("", "/"):
            return self._redirect(urllib.parse.quote(self.roots[0].path.rstrip("/")) + "/")
        path = self._checked(url.path)
        if path is None:
            return None
        if os.path.isdir(path):
            if not url.path.endswith("/"):
                return self._redirect(url.path + "/" + (f"?{url.query}" if url.query else ""))
            return self._listing(path, urllib.parse.unquote(url.path))
        if not os.path.isfile(path):
            self.send_error(HTTPStatus.NOT_FOUND, "no such file in the store")
            return None
        if "download" in query:
            name = urllib.parse.quote(os.path.basename(path))
            self.extra_headers.append(("Content-Disposition", f"attachment; filename*=UTF-8''{name}"))
        elif path.endswith(".md") and "raw" not in query:
            return self._markdown(path)
        self.resolved = path
        return super().send_head()

    def _checked(self, url_path: str) -> str | None:
        """The real path a request names, or None once a refusal is sent: '..' and '.' segments (also percent-encoded)
        are refused, a path outside every served store is not found, a symlink out of its store is refused."""
        try:
            path = urllib.parse.unquote(url_path, errors="strict")
        except UnicodeDecodeError:
            self.send_error(HTTPStatus.BAD_REQUEST, "the path is not UTF-8")
            return None
        if "\x00" in path or "\\" in path or any(segment in (".", "..") for segment in path.split("/")):
            self.send_error(HTTPStatus.FORBIDDEN, "'..', '.' and backslashes are refused: links name files inside the store")
            return None
        path = os.path.normpath(path)  # only folds '//' now
        root = next((root for root in self.roots if root.holds(path)), None)
        if root is None:
            self.send_error(HTTPStatus.NOT_FOUND, "not in a store this server serves: "
                            + ", ".join(root.path for root in self.roots) + " (`loraflow store serve STORE` serves another)")
            return None
        real = os.path.realpath(path)
        if not (real == root.real or real.startswith(root.real.rstrip("/") + "/")):
            self.send_error(HTTPStatus.FORBIDDEN, "this path leads out of the store (a symbolic link): not served")
            return None
        if not os.path.exists(real):
            self.send_error(HTTPStatus.NOT_FOUND, "no such file or folder in the store")
            return None
        return real

    def _redirect(self, location: str):
        self.send_response(HTTPStatus.MOVED_PERMANENTLY)
        self.send_header("Location", location)
        self.send_header("Content-Length", "0")
        self.end_headers()
        return None

    def _page(self, title: str, body: str):
        import io

        encoded = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
                   f"<style>{STYLE}</style></head><body>{body}</body></html>").encode()
        self.send_response(HTTPStatus.OK)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(encoded)))
        self.end_headers()
        return io.BytesIO(encoded)

    def _listing(self, real: str, shown: str):
        root = next(root for root in self.roots if root.holds(os.path.normpath(shown)))
        rows = []
        if os.path.normpath(shown) not in (root.path, root.real):
            rows.append("<tr><td><a href='../'>../</a></td><td></td><td></td><td></td></tr>")
        try:
            names = sorted(os.listdir(real), key=lambda name: (not os.path.isdir(os.path.join(real, name)), name))
        except OSError:
            self.send_error(HTTPStatus.FORBIDDEN, "this folder cannot be listed")
            return None
        for name in names:
            full = os.path.join(real, name)
            target = os.path.realpath(full)
            if not (target == root.real or target.startswith(root.real.rstrip("/") + "/")):
                continue  # a symbolic link out of the store: not listed (and refused if asked for)
            is_dir = os.path.isdir(target)
            link = urllib.parse.quote(name) + ("/" if is_dir else "")
            try:
                stat = os.stat(target)
            except OSError:
                continue
            modified = datetime.fromtimestamp(stat.st_mtime, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            size = "" if is_dir else _size(stat.st_size)
            download = "" if is_dir else f"<a href='{link}?download'>download</a>"
            rows.append(f"<tr><td><a href='{link}'>{html.escape(name)}{'/' if is_dir else ''}</a></td>"
                        f"<td class='size'>{size}</td><td>{modified}</td><td>{download}</td></tr>")
        committed = (f"<p>Committed: <a href='{MANIFEST}'>{MANIFEST}</a> lists every file with its size and sha256.</p>"
                     if os.path.isfile(os.path.join(real, MANIFEST)) else "")
        body = (f"<h1>{_breadcrumbs(shown, root)}</h1><p>loraflow artifact store <code>{html.escape(root.path)}</code>, read-only."
                f"</p>{committed}<table><tr><th>name</th><th>size</th><th>modified</th><th></th></tr>{''.join(rows)}</table>")
        return self._page(shown, body)

    def _markdown(self, path: str):
        from markdown_it import MarkdownIt

        with open(path, encoding="utf-8", errors="replace") as stream:
            text = stream.read()
        # html=False: raw HTML in a stored file is shown as text, never run (markdown-it also drops javascript: links).
        rendered = MarkdownIt("commonmark", {"html": False}).enable("table").render(text)
        name = html.escape(os.path.basename(path))
        header = (f"<p><a href='./'>folder</a> · <a href='{urllib.parse.quote(os.path.basename(path))}?raw'>{name} as text</a>"
                  f" · <a href='{urllib.parse.quote(os.path.basename(path))}?download'>download</a></p>")
        return self._page(os.path.basename(path), header + rendered)


def _breadcrumbs(shown: str, root: StoreRoot) -> str:
    """The folder's path, each folder from the store down a link to it."""
    path = os.path.normpath(shown)
    base = root.path if path == root.path or path.startswith(root.path.rstrip("/") + "/") else root.real
    parts = [part for part in path[len(base):].split("/") if part]
    crumbs = [f"<a href='{urllib.parse.quote(base)}/'>{html.escape(base)}</a>"]
    for depth, part in enumerate(parts):
        crumbs.append(f"<a href='{urllib.parse.quote('/'.join([base, *parts[:depth + 1]]))}/'>{html.escape(part)}</a>")
    return " / ".join(crumbs)


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def make_server(stores: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                log_requests: bool = True) -> ThreadingHTTPServer:
    """A bound server for these local stores (port 0: a free one); call serve_forever() to answer."""
    roots = tuple(StoreRoot(store) for store in stores)
    handler = partial(StoreRequestHandler, roots=roots, log_requests=log_requests)
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise LoraflowError(f"cannot serve the store on {host}:{port}: {error.strerror or error}; pick another port "
                            "(--port; `loraflow serve`: --store-port; 0 picks a free one)") from None
    server.daemon_threads = True
    return server


def server_url(server: ThreadingHTTPServer) -> str:
    """The base URL links use (LORAFLOW_STORE_URL): a server bound to every interface is linked through loopback."""
    host, port = server.server_address[:2]
    host = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def start_in_thread(stores: list[str], host: str = DEFAULT_HOST, port: int = DEFAULT_PORT,
                    log_requests: bool = False) -> tuple[ThreadingHTTPServer, str]:
    """The store server answering from a daemon thread of this process (`loraflow serve`, tests)."""
    server = make_server(stores, host, port, log_requests)
    threading.Thread(target=server.serve_forever, name="loraflow-store-server", daemon=True).start()
    return server, server_url(server)


def exposure_note(host: str) -> str | None:
    """A line for a server reachable from other machines: the store is then readable by anyone who can reach it."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return (f"note: bound to {host}, not loopback: anyone who can reach this port can read the whole store "
            "(there is no login); links are built from " + STORE_URL_SETTING)
