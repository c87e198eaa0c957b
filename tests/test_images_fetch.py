"""Image fetching against a real local HTTP server: hosts, redirects, size, time, local files."""

import base64
import io
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.net.images import ImageFetcher, ImageFetchError
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


def fetcher(settings: Settings, ls_url: str | None = None, token: str = "secret") -> ImageFetcher:
    """The images of a project whose Label Studio is ``ls_url`` (operator-configured: may be on loopback)."""
    return ImageFetcher(settings, LabelStudioClient(ls_url, token) if ls_url else None)


def test_label_studio_hosted_upload_gets_the_token(server, settings):
    data = fetcher(settings, server).fetch("/data/upload/3/a.png")
    assert load_image(data, 100).size == (1, 1)
    with pytest.raises(ImageFetchError, match="401.*token"):
        fetcher(settings, server, token="wrong").fetch("/data/upload/3/a.png")


def test_label_studio_relative_url_without_connection_says_what_to_set(settings):
    with pytest.raises(ImageFetchError, match="LABEL_STUDIO_URL"):
        fetcher(settings).fetch("/data/local-files/?d=x.png")


def test_absolute_url_only_on_allowed_hosts_and_token_not_leaked(server, settings):
    other = replace(settings, allowed_image_hosts=("127.0.0.1",), allow_private_image_hosts=True)
    SEEN_HEADERS.clear()
    assert fetcher(other, "http://ls.invalid:8080").fetch(f"{server}/pixel.png") == ONE_PIXEL
    assert "Authorization" not in SEEN_HEADERS[-1]
    with pytest.raises(ImageFetchError, match="not allowed.*ALLOWED_IMAGE_HOSTS"):
        fetcher(settings, "http://ls.invalid:8080").fetch(f"{server}/pixel.png")


def test_an_allowed_image_host_on_a_private_address_needs_the_explicit_setting(server, settings):
    private = replace(settings, allowed_image_hosts=("127.0.0.1",))
    with pytest.raises(ImageFetchError, match="non-public address 127.0.0.1.*ALLOW_PRIVATE_IMAGE_HOSTS"):
        fetcher(private, "http://ls.invalid:8080").fetch(f"{server}/pixel.png")


def test_redirects_same_host_followed_other_host_refused(server, settings):
    f = fetcher(settings, server)
    assert f.fetch(f"{server}/redirect-same") == ONE_PIXEL
    with pytest.raises(ImageFetchError, match="localhost:.*not allowed"):
        f.fetch(f"{server}/redirect-other")
    with pytest.raises(ImageFetchError, match="redirected more than"):
        f.fetch(f"{server}/loop")


def test_size_limit_declared_and_streamed(server, settings):
    f = fetcher(settings, server)
    with pytest.raises(ImageFetchError, match="announces 5000 bytes, over the limit of 2000"):
        f.fetch(f"{server}/huge-declared")
    with pytest.raises(ImageFetchError, match="more than 2000 bytes"):
        f.fetch(f"{server}/huge-streamed")


def test_slow_and_stalled_responses_time_out(server, settings):
    f = fetcher(settings, server)
    with pytest.raises(ImageFetchError, match="took too long.*IMAGE_TIMEOUT_S"):
        f.fetch(f"{server}/slow")
    with pytest.raises(ImageFetchError, match="did not answer.*IMAGE_TIMEOUT_S"):
        f.fetch(f"{server}/stall")


def test_http_errors_and_corrupt_image(server, settings):
    f = fetcher(settings, server)
    with pytest.raises(ImageFetchError, match="HTTP 404"):
        f.fetch(f"{server}/nope.png")
    data = f.fetch(f"{server}/corrupt.png")
    with pytest.raises(DataError):
        load_image(data, 100)


def test_cloud_uris_are_refused_with_the_remedy(settings):
    for uri in ("s3://bucket/a.png", "gs://b/a.png", "azure-blob://c/a.png"):
        with pytest.raises(ImageFetchError, match="presigned"):
            fetcher(settings).fetch(uri)
    with pytest.raises(ImageFetchError, match="unsupported scheme"):
        fetcher(settings).fetch("ftp://host/a.png")


def test_local_files_under_root_only(tmp_path, settings):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(ONE_PIXEL)
    (tmp_path / "big.png").write_bytes(b"x" * 3000)
    outside = tmp_path.parent / f"{tmp_path.name}-outside.png"
    outside.write_bytes(ONE_PIXEL)
    (tmp_path / "link.png").symlink_to(outside)
    f = fetcher(settings)
    assert f.fetch(str(tmp_path / "imgs" / "a.png")) == ONE_PIXEL
    assert f.fetch("imgs/a.png") == ONE_PIXEL
    assert f.fetch(f"file://{tmp_path}/imgs/a.png") == ONE_PIXEL
    for bad in ("imgs/../../etc/passwd", str(outside), "link.png"):
        with pytest.raises(ImageFetchError, match="outside LOCAL_FILES_ROOT"):
            f.fetch(bad)
    with pytest.raises(ImageFetchError, match="over IMAGE_MAX_BYTES"):
        f.fetch("big.png")
    with pytest.raises(ImageFetchError, match="does not exist"):
        f.fetch("imgs/none.png")
    with pytest.raises(ImageFetchError, match="set LOCAL_FILES_ROOT"):
        fetcher(Settings(model_dir=tmp_path)).fetch(str(tmp_path / "imgs" / "a.png"))


def test_local_non_files_are_refused_without_waiting(tmp_path, settings):
    """A directory or a FIFO under the root is refused at once (opening a FIFO for reading would wait for a writer
    and hold the request); a file of exactly IMAGE_MAX_BYTES is read whole."""
    import os

    (tmp_path / "dir.png").mkdir()
    os.mkfifo(tmp_path / "fifo.png")
    (tmp_path / "exact.png").write_bytes(b"y" * settings.image_max_bytes)
    f = fetcher(settings)
    for bad in ("dir.png", "fifo.png"):
        with pytest.raises(ImageFetchError, match="not a regular file"):
            f.fetch(bad)
    assert f.fetch("exact.png") == b"y" * settings.image_max_bytes


def test_data_uri(settings):
    uri = "data:image/png;base64," + base64.b64encode(ONE_PIXEL).decode()
    assert fetcher(settings).fetch(uri) == ONE_PIXEL
    with pytest.raises(ImageFetchError, match="base64"):
        fetcher(settings).fetch("data:image/png;base64,@@@")


def test_fetch_many_keeps_order_and_returns_errors(server, settings):
    f = fetcher(replace(settings, image_fetch_threads=4), server)
    values = [f"{server}/pixel.png", f"{server}/nope.png", "", f"{server}/stall", f"{server}/pixel.png"]
    out = f.fetch_many(values)
    assert out[0] == ONE_PIXEL and out[4] == ONE_PIXEL
    assert isinstance(out[1], ImageFetchError) and isinstance(out[2], ImageFetchError)
    assert isinstance(out[3], ImageFetchError)
    assert f.fetch_many([]) == []


def test_the_index_key_of_a_label_studio_url_carries_its_origin(settings):
    assert fetcher(settings, "http://ls-a:8080").key("/data/upload/1/x.png") == "http://ls-a:8080/data/upload/1/x.png"
    assert fetcher(settings, "http://ls-b:8080").key("/data/upload/1/x.png") != \
        fetcher(settings, "http://ls-a:8080").key("/data/upload/1/x.png")


def test_the_training_image_sync_fetches_a_repeated_url_once(server, settings):
    """Tasks showing the same image URL share one download (and one failure), as the index maps a URL to its hash."""
    from ml_backend.labelstudio.connections import LSConnection
    from ml_backend.labelstudio.label_config import parse_label_config
    from ml_backend.labelstudio.tasks import TaskRecord
    from ml_backend.training.images import sync_images
    from ml_backend.training.pull import ProjectSource

    config = parse_label_config('<View><Image name="image" value="$image"/>'
                                '<Taxonomy name="t" toName="image"><Choice value="A"/><Choice value="B"/></Taxonomy></View>')
    urls = [f"{server}/pixel.png"] * 3 + [f"{server}/corrupt.png"] * 2 + [f"{server}/nope.png"]
    tasks = [TaskRecord(id=i + 1, data={"image": url}, annotations=[], predictions=[], updated_at="")
             for i, url in enumerate(urls)]
    source = ProjectSource(LSConnection(server, "secret"), LabelStudioClient(server, "secret"), config, tasks)
    paths = settings.project(7)
    SEEN_HEADERS.clear()
    got = sync_images(settings, paths, source)
    assert len(SEEN_HEADERS) == 3  # one GET per distinct URL, not one per task
    assert got.task_ids == [1, 2, 3] and len(set(got.hashes)) == 1
    assert sorted(got.failed) == [4, 5, 6] and "HTTP 404" in got.failed[6]
    SEEN_HEADERS.clear()
    again = sync_images(settings, paths, source)  # stored images are not fetched again; failures are retried once
    assert again.task_ids == [1, 2, 3] and len(SEEN_HEADERS) == 2
