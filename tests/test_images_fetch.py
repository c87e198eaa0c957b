"""Image fetching against a real local HTTP server: hosts, redirects, size, time, local files."""

import base64
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ml_backend.labelstudio.connections import LSConnection
from ml_backend.net.images import ImageFetchError, fetch_image_bytes, fetch_many
from ml_backend.settings import Settings
from model.errors import DataError
from model.images import load_image


def png(size=(1, 1), color=(255, 0, 0)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


ONE_PIXEL = png()
SEEN_HEADERS: list[dict] = []


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def _send(self, body: bytes, status=200, headers=None):
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeouts under test)
            pass

    def do_GET(self):
        SEEN_HEADERS.append(dict(self.headers))
        path = self.path
        if path.startswith("/data/upload/"):
            if self.headers.get("Authorization") != "Token secret":
                return self._send(b"no", 401)
            return self._send(ONE_PIXEL)
        if path == "/pixel.png":
            return self._send(ONE_PIXEL)
        if path == "/corrupt.png":
            return self._send(b"\x89PNG\r\n\x1a\nnot really")
        if path == "/huge-declared":
            return self._send(b"x" * 5000)
        if path == "/huge-streamed":  # no Content-Length: must be stopped while reading
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(100):
                    self.wfile.write(b"x" * 1000)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None
        if path == "/slow":  # trickles bytes: each read is within the timeout, the whole is not
            self.send_response(200)
            self.end_headers()
            try:
                for _ in range(40):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                pass
            return None
        if path == "/stall":
            time.sleep(2.0)
            return self._send(ONE_PIXEL)
        if path == "/redirect-same":
            return self._send(b"", 302, {"Location": "/pixel.png"})
        if path == "/redirect-other":
            port = self.server.server_address[1]
            return self._send(b"", 302, {"Location": f"http://localhost:{port}/pixel.png"})
        if path == "/loop":
            return self._send(b"", 302, {"Location": "/loop"})
        return self._send(b"missing", 404)


@pytest.fixture(scope="module")
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def settings(tmp_path):
    return Settings(model_dir=tmp_path / "models", image_max_bytes=2000, image_timeout_s=1.0, local_files_root=tmp_path)


def test_label_studio_hosted_upload_gets_the_token(server, settings):
    conn = LSConnection(server, "secret")
    data = fetch_image_bytes("/data/upload/3/a.png", settings, conn, {"Authorization": "Token secret"})
    assert load_image(data, 100).size == (1, 1)
    with pytest.raises(ImageFetchError, match="401.*token"):
        fetch_image_bytes("/data/upload/3/a.png", settings, conn, {"Authorization": "Token wrong"})


def test_label_studio_relative_url_without_connection_says_what_to_set(settings):
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        fetch_image_bytes("/data/local-files/?d=x.png", settings, None, {})


def test_absolute_url_only_on_allowed_hosts_and_token_not_leaked(server, settings):
    other = Settings(**{**settings.__dict__, "allowed_image_hosts": ("127.0.0.1",)})
    SEEN_HEADERS.clear()
    conn = LSConnection("http://ls.invalid:8080", "secret")
    assert fetch_image_bytes(f"{server}/pixel.png", other, conn, {"Authorization": "Token secret"}) == ONE_PIXEL
    assert "Authorization" not in SEEN_HEADERS[-1]
    with pytest.raises(ImageFetchError, match="not allowed.*ALLOWED_IMAGE_HOSTS"):
        fetch_image_bytes(f"{server}/pixel.png", settings, conn, {})


def test_redirects_same_host_followed_other_host_refused(server, settings):
    conn = LSConnection(server, "secret")
    assert fetch_image_bytes(f"{server}/redirect-same", settings, conn, {}) == ONE_PIXEL
    with pytest.raises(ImageFetchError, match="'localhost:.*not allowed"):
        fetch_image_bytes(f"{server}/redirect-other", settings, conn, {})
    with pytest.raises(ImageFetchError, match="redirected more than"):
        fetch_image_bytes(f"{server}/loop", settings, conn, {})


def test_size_limit_declared_and_streamed(server, settings):
    conn = LSConnection(server, "secret")
    with pytest.raises(ImageFetchError, match="5000 bytes, over IMAGE_MAX_BYTES=2000"):
        fetch_image_bytes(f"{server}/huge-declared", settings, conn, {})
    with pytest.raises(ImageFetchError, match="larger than IMAGE_MAX_BYTES=2000"):
        fetch_image_bytes(f"{server}/huge-streamed", settings, conn, {})


def test_slow_and_stalled_responses_time_out(server, settings):
    conn = LSConnection(server, "secret")
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError, match="IMAGE_TIMEOUT_S"):
        fetch_image_bytes(f"{server}/slow", settings, conn, {})
    assert time.monotonic() - t0 < 2.5
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError, match="Timed out"):
        fetch_image_bytes(f"{server}/stall", settings, conn, {})
    assert time.monotonic() - t0 < 2.5


def test_http_errors_and_corrupt_image(server, settings):
    conn = LSConnection(server, "secret")
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        fetch_image_bytes(f"{server}/nope.png", settings, conn, {})
    data = fetch_image_bytes(f"{server}/corrupt.png", settings, conn, {})
    with pytest.raises(DataError):
        load_image(data, 100)


def test_cloud_uris_are_refused_with_the_remedy(settings):
    for uri in ("s3://bucket/a.png", "gs://b/a.png", "azure-blob://c/a.png"):
        with pytest.raises(ImageFetchError, match="presigned"):
            fetch_image_bytes(uri, settings, None, {})
    with pytest.raises(ImageFetchError, match="unsupported scheme"):
        fetch_image_bytes("ftp://host/a.png", settings, None, {})


def test_local_files_under_root_only(tmp_path, settings):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(ONE_PIXEL)
    (tmp_path / "big.png").write_bytes(b"x" * 3000)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(ONE_PIXEL)
    (tmp_path / "link.png").symlink_to(outside)
    assert fetch_image_bytes(str(tmp_path / "imgs" / "a.png"), settings) == ONE_PIXEL
    assert fetch_image_bytes("imgs/a.png", settings) == ONE_PIXEL
    assert fetch_image_bytes(f"file://{tmp_path}/imgs/a.png", settings) == ONE_PIXEL
    for bad in ("imgs/../../etc/passwd", str(outside), "link.png"):
        with pytest.raises(ImageFetchError, match="outside LOCAL_FILES_ROOT"):
            fetch_image_bytes(bad, settings)
    with pytest.raises(ImageFetchError, match="over IMAGE_MAX_BYTES"):
        fetch_image_bytes("big.png", settings)
    with pytest.raises(ImageFetchError, match="does not exist"):
        fetch_image_bytes("imgs/none.png", settings)
    off = Settings(model_dir=tmp_path)
    with pytest.raises(ImageFetchError, match="set LOCAL_FILES_ROOT"):
        fetch_image_bytes(str(tmp_path / "imgs" / "a.png"), off)


def test_data_uri(settings):
    uri = "data:image/png;base64," + base64.b64encode(ONE_PIXEL).decode()
    assert fetch_image_bytes(uri, settings) == ONE_PIXEL
    with pytest.raises(ImageFetchError, match="base64"):
        fetch_image_bytes("data:image/png;base64,@@@", settings)


def test_fetch_many_keeps_order_and_returns_errors(server, settings):
    conn = LSConnection(server, "secret")
    values = [f"{server}/pixel.png", f"{server}/nope.png", "", f"{server}/stall", f"{server}/pixel.png"]
    t0 = time.monotonic()
    out = fetch_many(values, Settings(**{**settings.__dict__, "image_fetch_threads": 4}), conn, {})
    assert time.monotonic() - t0 < 2.5
    assert out[0] == ONE_PIXEL and out[4] == ONE_PIXEL
    assert isinstance(out[1], ImageFetchError) and isinstance(out[2], ImageFetchError)
    assert isinstance(out[3], ImageFetchError)
    assert fetch_many([], settings) == []
