"""The server speaks HTTP/1.1 only (issue 20.13): cleartext HTTP/2 is refused, and every connection --
one that sends nothing, one that opens HTTP/2 -- is under the head timeout.

granian's default mode (auto) also answered HTTP/2 with prior knowledge, and measured with it: a
connection that sent nothing stayed open past four head timeouts, and so did one that sent the HTTP/2
preface and nothing more (docs/server.md). Each test here fails in that mode.
"""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from batch.tools.demo import ApiServer, http_get as get

HEAD_TIMEOUT_S = 1.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
EMPTY_SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # an HTTP/2 SETTINGS frame with no settings


@pytest.fixture(scope="module")
def server(tmp_path_factory, published):
    src, _, _ = published
    root = tmp_path_factory.mktemp("http2")
    shutil.copytree(src / "inputs", root / "inputs")
    shutil.copytree(src / "store", root / "store", symlinks=True)
    from conftest import make_settings
    _, cfg = make_settings(root, serving={"header_read_timeout_s": HEAD_TIMEOUT_S})
    with ApiServer(cfg, workers=1) as srv:
        yield srv


def _closed_after(port: int, payload: bytes, wait_s: float = 10.0) -> tuple[float, bytes]:
    """Seconds until the server closes a connection that sent ``payload`` and then nothing, and what
    it sent back; (inf, ...) when still open after ``wait_s``."""
    with socket.create_connection(("127.0.0.1", port), timeout=wait_s) as sock:
        sock.sendall(payload)
        t0, got = time.monotonic(), b""
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except TimeoutError:
            return float("inf"), got
        except ConnectionResetError:
            pass
        return time.monotonic() - t0, got


def _curl() -> str:
    curl = shutil.which("curl")
    if curl is None:
        pytest.skip("curl is not installed: it is the HTTP/2 client of this test (apt-get install curl)")
    features = subprocess.run([curl, "-V"], capture_output=True, text=True, check=True).stdout
    if "HTTP2" not in features:
        pytest.skip("this curl is built without HTTP/2 (no nghttp2), so it cannot make an h2c request")
    return curl


def test_cleartext_http2_is_refused_http1_answers(server):
    """curl --http2-prior-knowledge gets no HTTP/2 answer; HTTP/1.1 and an h2c Upgrade get HTTP/1.1 200."""
    curl = _curl()
    url = server.base + "/healthz"

    def run(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([curl, "-s", "-m", "10", "-o", "/dev/null", "-w", "%{http_code} %{http_version}",
                               *flags, url], capture_output=True, text=True)

    h2 = run("--http2-prior-knowledge")
    assert h2.returncode != 0 and h2.stdout.startswith("000"), (h2.returncode, h2.stdout)
    # the same URL over HTTP/1.1, and curl's h2c upgrade request (the server ignores the Upgrade header)
    assert run("--http1.1").stdout == "200 1.1"
    assert run("--http2").stdout == "200 1.1"


def test_an_http2_preface_is_dropped_at_once(server):
    """A client that opens HTTP/2 (the connection preface, then a SETTINGS frame or nothing) is closed
    without an answer right away, well inside the head timeout."""
    for payload in (PREFACE, PREFACE + EMPTY_SETTINGS):
        elapsed, got = _closed_after(server.port, payload)
        assert elapsed < HEAD_TIMEOUT_S and not got.startswith(b"\x00\x00"), (payload, elapsed, got[:40])
    assert get(server.base + "/healthz")[0] == 200


def test_a_connection_that_sends_nothing_is_dropped_after_the_head_timeout(server):
    """No first byte: closed once serving.header_read_timeout_s has passed (granian's auto mode waited
    for the first bytes without a timeout), and a second client that does send is answered meanwhile."""
    elapsed, got = _closed_after(server.port, b"")
    assert got == b"" and HEAD_TIMEOUT_S * 0.8 <= elapsed < HEAD_TIMEOUT_S + 3.0, elapsed
    # an idle keep-alive connection: the same timer after its answer
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        t0, got = time.monotonic(), b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got.startswith(b"HTTP/1.1 200") and time.monotonic() - t0 < HEAD_TIMEOUT_S + 3.0
