"""`loraflow store serve`: a local store read-only over real HTTP on 127.0.0.1, and the links that lead there.

The server runs on a free loopback port (in a thread of the test, or as the real CLI in a subprocess); requests go
through http.client so that paths reach it exactly as written ('..', percent-encodings), as a hostile client sends them.
"""

import http.client
import json
import os
import re
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 64
SUMMARY = "# Fine-tune `r1`\n\n| stage | outcome |\n|---|---|\n| train | built |\n\n<script>alert(1)</script>\n\n```python\nprint(1)\n```\n"


@pytest.fixture
def store(tmp_path) -> Path:
    """A store with a committed run folder, a secret beside it, and symbolic links out of it and inside it."""
    store = tmp_path / "store"
    run = store / "runs" / "r1"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    (run / "adapter" / "_manifest.json").write_text(json.dumps({"files": [{"path": "adapter_model.safetensors", "size": 16}]}))
    (run / "summary.md").write_text(SUMMARY)
    (run / "loss.png").write_bytes(PNG)
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.5}\n')
    (run / "page.html").write_text("<script>alert(1)</script>")
    secret = tmp_path / "secret"
    secret.mkdir()
    (secret / "key.txt").write_text("TOP-SECRET")
    (run / "out-file").symlink_to(secret / "key.txt")
    (run / "out-dir").symlink_to(secret)
    (run / "inside").symlink_to(run / "adapter")
    return store


@pytest.fixture
def served(store):
    from loraflow.store_server import start_in_thread

    server, url = start_in_thread([str(store)], "127.0.0.1", 0)
    yield url, store
    server.shutdown()
    server.server_close()


def request(url: str, path: str, method: str = "GET", body: bytes | None = None) -> tuple[int, dict, bytes]:
    """One request with the path sent exactly as given."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=10)
    try:
        connection.request(method, path, body=body)
        reply = connection.getresponse()
        return reply.status, {k.lower(): v for k, v in reply.getheaders()}, reply.read()
    finally:
        connection.close()


def quoted(path: Path | str) -> str:
    return urllib.parse.quote(str(path))


def test_folders_are_listed_with_their_files_and_download_links(served):
    url, store = served
    status, headers, body = request(url, "/")
    assert status == 301 and headers["location"] == quoted(store) + "/"  # the root leads to the store
    status, headers, _ = request(url, quoted(store / "runs" / "r1"))
    assert status == 301 and headers["location"] == quoted(store / "runs" / "r1") + "/"
    status, headers, body = request(url, quoted(store / "runs" / "r1") + "/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for name in ("adapter/", "summary.md", "loss.png", "metrics.jsonl", "inside/"):
        assert f">{name}</a>" in page, name
    assert "loss.png?download" in page and "<a href='../'>" in page
    assert "out-file" not in page and "out-dir" not in page  # links out of the store are not listed
    status, _, body = request(url, quoted(store / "runs" / "r1" / "adapter") + "/")
    assert status == 200 and "_manifest.json</a> lists every file" in body.decode()
    assert "default-src 'none'" in headers["content-security-policy"]  # no script runs on a page of the store


def test_manifest_json_text_png_and_markdown_are_shown(served):
    url, store = served
    run = store / "runs" / "r1"
    status, headers, body = request(url, quoted(run / "adapter" / "_manifest.json"))
    assert status == 200 and headers["content-type"] == "application/json; charset=utf-8"
    assert json.loads(body)["files"][0]["path"] == "adapter_model.safetensors"
    assert "content-disposition" not in headers  # shown in the browser, not downloaded
    status, headers, body = request(url, quoted(run / "metrics.jsonl"))
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8" and body == (run / "metrics.jsonl").read_bytes()
    status, headers, body = request(url, quoted(run / "loss.png"))
    assert status == 200 and headers["content-type"] == "image/png" and body == PNG
    status, headers, body = request(url, quoted(run / "summary.md"))
    page = body.decode()
    assert status == 200 and headers["content-type"] == "text/html; charset=utf-8"
    assert "<h1>Fine-tune <code>r1</code></h1>" in page and "<td>train</td>" in page and "<pre><code class=\"language-python\">" in page
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # raw HTML in a stored file is text
    status, headers, body = request(url, quoted(run / "summary.md") + "?raw")
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8" and body.decode() == SUMMARY
    status, headers, body = request(url, quoted(run / "page.html"))  # a stored page is shown as text, never run
    assert status == 200 and headers["content-type"] == "text/plain; charset=utf-8"


def test_every_file_downloads_with_its_bytes(served):
    url, store = served
    for path in (store / "runs/r1/adapter/adapter_model.safetensors", store / "runs/r1/summary.md", store / "runs/r1/loss.png"):
        status, headers, body = request(url, quoted(path) + "?download")
        assert status == 200 and body == path.read_bytes(), path
        assert headers["content-disposition"] == f"attachment; filename*=UTF-8''{path.name}"
    status, headers, body = request(url, quoted(store / "runs/r1/adapter/adapter_model.safetensors"))
    assert status == 200 and headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize("path", [
    "{store}/../secret/key.txt", "{store}/runs/../../secret/key.txt", "{store}/%2e%2e/secret/key.txt",
    "{store}/%2E%2E/secret/key.txt", "{store}/runs/r1/..%2f..%2f..%2fsecret/key.txt", "{store}/./runs/r1/summary.md",
    "{store}/runs/r1/%5c..%5c..%5csecret", "{store}/runs%00/r1",
])
def test_path_traversal_is_refused(served, path):
    url, store = served
    status, _, body = request(url, path.format(store=quoted(store)))
    assert status == 403 and b"TOP-SECRET" not in body


@pytest.mark.parametrize("path", ["/etc/passwd", "//etc/passwd", "{secret}/key.txt", "{store}-other/x", "/%2e%2e/etc/passwd"])
def test_nothing_outside_the_store_is_served(served, path):
    url, store = served
    status, _, body = request(url, path.format(store=quoted(store), secret=quoted(store.parent / "secret")))
    assert status in (403, 404) and b"TOP-SECRET" not in body and b"root:" not in body


def test_symbolic_links_out_of_the_store_are_refused_and_inside_it_followed(served):
    url, store = served
    run = store / "runs" / "r1"
    for path in (run / "out-file", run / "out-dir" / "key.txt", run / "out-dir"):
        status, _, body = request(url, quoted(path) + ("/" if path.name == "out-dir" else ""))
        assert status == 403 and b"TOP-SECRET" not in body, path
    status, _, body = request(url, quoted(run / "inside" / "_manifest.json"))
    assert status == 200 and b"adapter_model.safetensors" in body


def test_the_store_is_read_only(served):
    url, store = served
    before = sorted(str(p) for p in store.rglob("*"))
    for method in ("PUT", "POST", "DELETE", "PATCH"):
        status, _, _ = request(url, quoted(store / "runs" / "r1" / "new.txt"), method, body=b"x")
        assert status == 501, method
    assert sorted(str(p) for p in store.rglob("*")) == before


def test_links_point_at_the_store_server_when_it_is_set_and_open_there(served, monkeypatch):
    from loraflow.storage import FILE_LINK_NOTE, browser_url

    url, store = served
    adapter = store / "runs" / "r1" / "adapter"
    monkeypatch.delenv("LORAFLOW_STORE_URL", raising=False)
    assert browser_url(str(adapter)) == adapter.as_uri()  # unset: the file:// URI, to copy (FILE_LINK_NOTE says why)
    assert "file://" in FILE_LINK_NOTE and "loraflow store serve" in FILE_LINK_NOTE and "LORAFLOW_STORE_URL" in FILE_LINK_NOTE
    monkeypatch.setenv("LORAFLOW_STORE_URL", url + "/")
    link = browser_url(str(adapter))
    assert link == f"{url}{quoted(adapter)}/"
    assert browser_url(f"file://{adapter}/_manifest.json") == f"{url}{quoted(adapter)}/_manifest.json"
    assert browser_url("s3://bucket/lf/runs/a/adapter").startswith("https://s3.console.aws.amazon.com/")  # S3 keeps its own view
    status, _, body = request(url, urllib.parse.urlsplit(link).path)
    assert status == 200 and ">adapter_model.safetensors</a>" in body.decode()
    # A link into a store this server does not serve says which it serves.
    other = store.parent / "other-store"
    other.mkdir()
    status, _, body = request(url, urllib.parse.urlsplit(browser_url(str(other))).path)
    assert status == 404 and str(store).encode() in body


def test_summary_says_why_a_file_link_does_not_open_and_drops_it_with_the_server(monkeypatch):
    from loraflow.report import _link
    from loraflow.storage import FILE_LINK_NOTE

    monkeypatch.delenv("LORAFLOW_STORE_URL", raising=False)
    assert _link("/tmp/store/runs/a") == "`/tmp/store/runs/a` ([open](file:///tmp/store/runs/a))"
    monkeypatch.setenv("LORAFLOW_STORE_URL", "http://127.0.0.1:4201")
    assert _link("/tmp/store/runs/a") == "`/tmp/store/runs/a` ([open](http://127.0.0.1:4201/tmp/store/runs/a))"
    assert FILE_LINK_NOTE.count(". ") == 0 and FILE_LINK_NOTE.endswith(".")  # one sentence


def test_store_serve_command_serves_on_loopback_until_stopped(store, tmp_path):
    """The real `loraflow store serve` in a subprocess: it says where it serves and what to set, and answers there."""
    from loraflow.launch import free_port

    port = free_port()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "loraflow.cli", "store", "serve", str(store), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        first = process.stdout.readline()
        assert f"serving {store} read-only at http://127.0.0.1:{port}/" in first, first
        assert f"LORAFLOW_STORE_URL=http://127.0.0.1:{port}" in process.stdout.readline()
        status, _, body = request(f"http://127.0.0.1:{port}", quoted(store / "runs" / "r1") + "/")
        assert status == 200 and ">summary.md</a>" in body.decode()
        import psutil

        listening = [c for c in psutil.Process(process.pid).net_connections() if c.status == psutil.CONN_LISTEN]
        assert [c.laddr.ip for c in listening] == ["127.0.0.1"]  # loopback only by default
    finally:
        process.terminate()
        process.wait(timeout=10)
    # A second server on a port in use: one error line naming the port and what to do.
    with __import__("socket").socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        busy = taken.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "loraflow.cli", "store", "serve", str(store), "--port", str(busy)],
                                capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert re.search(rf"error: cannot serve the store on 127.0.0.1:{busy}: .*pick another port", result.stderr), result.stderr
