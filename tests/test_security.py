"""Issue 9: each attack reproduced against the backend, with real HTTP servers on loopback playing Label Studio and
the attacker (no mock of the outbound gate). Each test names the finding it covers."""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests
from PIL import Image

from ml_backend.http.app import create_app
from ml_backend.labelstudio import connections
from ml_backend.labelstudio.client import LabelStudioClient
from ml_backend.labelstudio.errors import LabelStudioError
from ml_backend.labelstudio.ids import project_id_of
from ml_backend.labelstudio.label_config import _parse_cached, parse_label_config
from ml_backend.net.gate import Destination, GateRefused, GateUnreachable, Origin, OutboundGate
from ml_backend.net.images import ImageFetcher, ImageFetchError
from ml_backend.queue.factory import make_scheduler
from ml_backend.serving.store import ModelStore
from ml_backend.settings import Settings
from model.errors import ConfigError, DataError
from tests.servers import FakeLabelStudio, wait_until

CONFIG = """<View><Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true">
    <Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice><Choice value="Plant"/>
  </Taxonomy></View>"""


def png(color=(200, 10, 10), size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, "PNG")
    return buf.getvalue()


class Attacker:
    """An HTTP server on loopback that records what reaches it (headers included) and answers 200 with a body."""

    def __init__(self) -> None:
        self.requests: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                outer.requests.append({"path": self.path, "headers": dict(self.headers)})
                body = png()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def attacker():
    server = Attacker()
    yield server
    server.close()


@pytest.fixture
def ls():
    server = FakeLabelStudio({7: CONFIG}, images={"/data/upload/7/a.png": png()})
    yield server
    server.close()


# ----- 1. tokens go to Label Studio's exact origin only --------------------------------------------------------


def test_1_backslash_url_never_reaches_the_other_host_with_the_token(ls, attacker, tmp_path):
    fetcher = ImageFetcher(Settings(model_dir=tmp_path), LabelStudioClient(ls.url, ls.token))
    for value in (f"http://127.0.0.1:{attacker.port}\\@{ls.url[7:]}/x.png", f"{attacker.url}\\@{ls.url[7:]}/x.png"):
        with pytest.raises(ImageFetchError, match="backslash"):
            fetcher.fetch(value)
    assert attacker.requests == []


def test_1_backslash_trick_on_an_allowed_image_host_is_refused_before_any_connection(tmp_path):
    settings = Settings(model_dir=tmp_path, allowed_image_hosts=("images.example.com",))
    with pytest.raises(ImageFetchError, match="backslash"):
        ImageFetcher(settings).fetch("http://169.254.169.254\\@images.example.com/latest/meta-data")


def test_1_userinfo_control_characters_and_other_schemes_are_refused():
    gate = OutboundGate(resolver=lambda host, port: ["93.184.216.34"])
    dest = Destination(origins=frozenset({Origin.of("http://example.com")}))
    for url in ("http://user:pw@example.com/x", "http://example.com@evil.test/x", "http://exa mple.com/x",
                "http://example.com/\x00x", "ftp://example.com/x", "gopher://example.com/x", "file:///etc/passwd"):
        with pytest.raises(GateRefused):
            gate.check(url, dest)


def test_1_resolved_private_addresses_are_refused_unless_the_operator_named_the_origin():
    dest = Destination(origins=frozenset({Origin.of("http://images.example.com")}))
    for ip in ("127.0.0.1", "10.1.2.3", "192.168.0.5", "169.254.169.254", "::1", "::ffff:127.0.0.1", "fd00::1",
               "100.64.0.1", "0.0.0.0"):
        gate = OutboundGate(resolver=lambda host, port, ip=ip: [ip])  # what DNS answers for the name
        with pytest.raises(GateRefused, match="non-public address"):
            gate.check("http://images.example.com/a.png", dest)
    trusted = replace(dest, private_ok=dest.origins)
    assert OutboundGate(resolver=lambda h, p: ["10.1.2.3"]).check("http://images.example.com/a.png", trusted)[2] \
        == "10.1.2.3"


def test_1_a_cross_origin_redirect_carries_no_token(attacker, tmp_path):
    class Redirect(BaseHTTPRequestHandler):  # a Label Studio whose image redirects to another allowed host
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(302)
            self.send_header("Location", f"{attacker.url}/stolen.png")
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirecting = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirecting.serve_forever, daemon=True).start()
    try:
        ls_url = f"http://127.0.0.1:{redirecting.server_address[1]}"
        settings = Settings(model_dir=tmp_path, allowed_image_hosts=(f"127.0.0.1:{attacker.port}",),
                            allow_private_image_hosts=True)
        data = ImageFetcher(settings, LabelStudioClient(ls_url, "legacy-token-xyz")).fetch("/data/upload/7/x.png")
        assert data == png()
        assert attacker.requests and "Authorization" not in attacker.requests[-1]["headers"]
    finally:
        redirecting.shutdown()
        redirecting.server_close()


def test_1_a_personal_access_token_request_redirected_elsewhere_is_not_followed(attacker):
    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", f"{attacker.url}/api/projects/7/")
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_GET

    server = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        client = LabelStudioClient(f"http://127.0.0.1:{server.server_address[1]}", "legacy-token-abc")
        with pytest.raises(LabelStudioError, match="not allowed"):
            client.request("GET", "/api/projects/7/", "read project 7")
        assert attacker.requests == []  # another origin, even on the same machine, is never contacted
    finally:
        server.shutdown()
        server.server_close()


def test_1_the_connection_goes_to_the_address_the_gate_checked_with_the_original_host(attacker):
    """DNS rebinding: the gate resolves once, checks that address and connects to it (a name nobody's DNS knows
    reaches the loopback server only through the checked address), with the original Host header."""
    calls: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        calls.append(host)
        return ["127.0.0.1"]

    origin = Origin.of(f"http://images.rebind.invalid:{attacker.port}")
    dest = Destination(origins=frozenset({origin}), private_ok=frozenset({origin}))
    answer = OutboundGate(resolver=resolver).request("GET", f"{origin}/a.png", dest)
    assert answer.status == 200 and calls == ["images.rebind.invalid"]
    assert attacker.requests[-1]["headers"]["Host"] == f"images.rebind.invalid:{attacker.port}"


def test_1_credentials_go_to_label_studios_exact_origin_never_over_http_to_an_https_one():
    client = LabelStudioClient("https://ls.example.com", "legacy-token-abc", trusted=False)
    images = ImageFetcher(Settings(allowed_image_hosts=("ls.example.com",)), client).destination
    assert images.credentials_for == Origin.of("https://ls.example.com")
    for url in ("http://ls.example.com/data/upload/1/a.png", "https://ls.example.com:8443/a.png"):
        assert Origin.of(url) != images.credentials_for and images.allows(Origin.of(url))  # allowed, but no token
    with pytest.raises(GateRefused, match="not allowed"):
        OutboundGate(resolver=lambda h, p: ["93.184.216.34"]).check("http://ls.example.com/api/projects/",
                                                                    client.destination)


class RawServer:
    """A TCP server on loopback whose handler writes raw HTTP bytes (to misbehave as no HTTP library would).
    Records each connection it accepted and what became of the writes."""

    def __init__(self, handler) -> None:
        self.connections = 0
        self.outcomes: list[str] = []
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(16)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        outer = self

        def serve() -> None:
            while True:
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    return
                outer.connections += 1

                def run(conn: socket.socket = conn) -> None:
                    try:
                        handler(conn)
                        outer.outcomes.append("finished")
                    except OSError:
                        outer.outcomes.append("cut")
                    finally:
                        conn.close()

                threading.Thread(target=run, daemon=True).start()

        threading.Thread(target=serve, daemon=True).start()

    def destination(self) -> Destination:
        origin = Origin.of(self.url)
        return Destination(origins=frozenset({origin}), private_ok=frozenset({origin}))

    def close(self) -> None:
        self._sock.close()


def _read_request(reader) -> bytes | None:
    """The path of the next request on a connection (headers read and dropped), None at its end."""
    line = reader.readline()
    if not line:
        return None
    while reader.readline() not in (b"\r\n", b""):
        pass
    return line.split()[1]


@pytest.mark.parametrize("stage", ["status line", "headers", "body"])
def test_1_the_gate_cuts_a_remote_that_trickles_its_answer_at_the_deadline(stage):
    """A read timeout bounds each read only: a remote that sends a byte every 50 ms would hold the request (and its
    thread) for the 10 minutes it takes; the gate's deadline cuts the socket."""
    prefix = {"status line": b"", "headers": b"HTTP/1.1 200 OK\r\n",
              "body": b"HTTP/1.1 200 OK\r\nContent-Length: 12000\r\n\r\n"}[stage]
    trickle = {"status line": b"HTTP/1.1 200 OK" + b" " * 12000, "headers": b"X-Slow: " + b"a" * 12000,
               "body": b"b" * 12000}[stage]

    def slow(conn: socket.socket) -> None:
        _read_request(conn.makefile("rb"))
        conn.sendall(prefix)
        for i in range(len(trickle)):  # 12,000 bytes, 50 ms apart: 10 minutes
            conn.sendall(trickle[i:i + 1])
            time.sleep(0.05)

    server = RawServer(slow)
    try:
        with pytest.raises(GateUnreachable, match="in time|too long"):
            OutboundGate().request("GET", f"{server.url}/x.png", server.destination(), timeout=1.0, deadline_s=1.5)
        assert wait_until(lambda: server.outcomes == ["cut"], 10)  # the remote saw its socket closed
    finally:
        server.close()


@pytest.mark.parametrize("body_size", [300, 200_000])
def test_1_a_redirects_body_never_reaches_the_next_answer_on_a_pooled_connection(body_size):
    """A web server's redirect usually carries a small HTML body; left unread on a kept-alive connection it would be
    read as the next answer (here the body is itself a well-formed HTTP answer, as an attacker would send)."""
    smuggled = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED"
    body = (smuggled * (body_size // len(smuggled) + 1))[:body_size]

    def server_loop(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        while (path := _read_request(reader)) is not None:
            if path == b"/old.png":
                conn.sendall(b"HTTP/1.1 301 Moved Permanently\r\nLocation: /new.png\r\nContent-Length: %d\r\n\r\n"
                             % len(body) + body)
            else:
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nREAL")

    server = RawServer(server_loop)
    gate = OutboundGate()
    try:
        for _ in range(3):
            answer = gate.request("GET", f"{server.url}/old.png", server.destination(), timeout=5)
            assert (answer.status, answer.body, answer.url) == (200, b"REAL", f"{server.url}/new.png")
            assert gate.request("GET", f"{server.url}/x.png", server.destination(), timeout=5).body == b"REAL"
        if body_size <= 64 * 1024:
            assert server.connections == 1  # a small body is read and dropped: the connection is kept
    finally:
        gate.close()
        server.close()


# ----- 2. no unauthenticated caller repoints a project ---------------------------------------------------------


def _settings(tmp_path: Path, **over: object) -> Settings:
    return Settings(model_dir=tmp_path, allow_private_setup_hosts=True, **over)  # type: ignore[arg-type]


def test_2_a_pinned_project_cannot_be_moved_by_an_unauthenticated_setup(ls, tmp_path):
    fake = FakeLabelStudio({7: CONFIG}, token="attacker-token")  # an attacker's "Label Studio" with project 7
    try:
        settings = _settings(tmp_path)
        setup = connections.SetupRequest(7, ls.url, ls.token, CONFIG, authenticated=False)
        assert connections.accept_setup(settings, setup).url == ls.url
        attack = connections.SetupRequest(7, fake.url, fake.token, CONFIG, authenticated=False)
        with pytest.raises(ConfigError, match="is connected to the Label Studio at .* refused"):
            connections.accept_setup(settings, attack)
        assert connections.resolve(settings, 7).url == ls.url  # training still pulls from the real one
        assert fake.requests == []  # the attacker's host was not even asked
        # an authenticated /setup (Basic auth) may move the project, after verifying the new Label Studio
        moved = connections.accept_setup(settings, replace(attack, authenticated=True))
        assert moved is not None and moved.url == fake.url
    finally:
        fake.close()
        connections.forget_all()


def test_2_with_label_studio_url_the_setup_hostname_is_never_contacted_and_the_key_never_leaves(ls, attacker,
                                                                                                 tmp_path):
    settings = Settings(model_dir=tmp_path, label_studio_url=ls.url, label_studio_api_key=ls.token)
    conn = connections.accept_setup(settings, connections.SetupRequest(7, attacker.url, "anything", CONFIG, False))
    assert conn is not None and conn.url == ls.url and attacker.requests == []
    assert connections.resolve(settings, 7).api_key == ls.token
    assert all(r["headers"].get("Authorization") == f"Token {ls.token}" for r in ls.requests)
    connections.forget_all()
    with pytest.raises(ConfigError, match="LABEL_STUDIO_API_KEY is set without LABEL_STUDIO_URL"):
        Settings.from_env(env={"LABEL_STUDIO_API_KEY": "operator-key"})


def test_2_a_hostname_with_a_query_is_refused_and_remote_bodies_are_never_echoed(ls, tmp_path):
    settings = _settings(tmp_path)
    with pytest.raises(ConfigError, match="query or fragment"):
        connections.accept_setup(settings, connections.SetupRequest(7, f"{ls.url}/evil?", "t", CONFIG, False))
    with pytest.raises(ConfigError) as refused:  # the fake answers 401 with a tempting body
        connections.accept_setup(settings, connections.SetupRequest(7, ls.url, "wrong", CONFIG, False))
    assert "secret details" not in str(refused.value) and "HTTP 401" in str(refused.value)
    connections.forget_all()


def test_2_a_setup_whose_project_or_config_does_not_match_is_refused(ls, tmp_path):
    settings = _settings(tmp_path)
    other = CONFIG.replace("Plant", "Fungus")
    with pytest.raises(ConfigError, match="not project 7's label config"):
        connections.accept_setup(settings, connections.SetupRequest(7, ls.url, ls.token, other, False))
    with pytest.raises(ConfigError, match="no project 8"):
        connections.accept_setup(settings, connections.SetupRequest(8, ls.url, ls.token, CONFIG, False))
    assert not connections.known(settings, 7) and not connections.known(settings, 8)
    connections.forget_all()


def test_2_a_setup_host_on_a_private_network_needs_label_studio_url(ls, tmp_path):
    with pytest.raises(ConfigError, match="non-public address 127.0.0.1.*LABEL_STUDIO_URL"):
        connections.accept_setup(Settings(model_dir=tmp_path),
                                 connections.SetupRequest(7, ls.url, ls.token, CONFIG, False))
    connections.forget_all()


def test_2_the_image_index_key_changes_with_the_origin(tmp_path):
    a = ImageFetcher(Settings(model_dir=tmp_path), LabelStudioClient("http://ls-a.example:8080", "t"))
    b = ImageFetcher(Settings(model_dir=tmp_path), LabelStudioClient("http://ls-b.example:8080", "t"))
    assert a.key("/data/upload/1/x.png") != b.key("/data/upload/1/x.png")


# ----- 3, 4, 8, 9, 10, 11: the HTTP boundary ------------------------------------------------------------------


@pytest.fixture
def app_client(tmp_path, ls):
    settings = _settings(tmp_path, train_queue_max_projects=3)
    store = ModelStore(settings)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    client = create_app(settings, scheduler=scheduler, store=store).test_client()
    yield client, settings, scheduler, store
    scheduler.close()
    store.close()
    connections.forget_all()


def post(client, path, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return client.post(path, data=data, content_type="application/json", **kw)


def test_3_webhooks_for_invented_projects_schedule_nothing_and_the_line_is_bounded(app_client, ls):
    client, settings, scheduler, store = app_client
    for pid in range(1000, 1500):
        r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": pid}})
        assert r.status_code == 200 and r.get_json()["status"] == "ignored"
    assert scheduler.health()["waiting_projects"] == 0 and store.projects() == []
    for pid in range(1, 6):  # five verified projects, a line of three
        connections.accept_setup(settings, connections.SetupRequest(pid, "http://ls.example", "t", None, False),
                                 verify=lambda *_: None)
    actions = [post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": p}}).get_json()["action"]
               for p in range(1, 6)]
    assert actions.count("dropped") >= 1 and scheduler.health()["waiting_projects"] <= 3


def test_4_huge_and_odd_project_ids_are_bad_requests(app_client):
    client = app_client[0]
    for bad in ("9" * 300, "²", "-3", "0", 2**40, "1" * 4301, "٣"):
        with pytest.raises(DataError):
            project_id_of(bad)
        assert post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": bad}}).status_code == 400
    assert client.get("/versions?project=" + "9" * 300).status_code == 400
    assert client.get("/versions").status_code == 200  # and nothing broke


def test_8_small_endpoints_refuse_big_bodies_before_parsing(app_client):
    client, settings, *_ = app_client
    big = b'{"action": "START_TRAINING", "pad": "' + b"x" * (settings.small_request_max_bytes + 10) + b'"}'
    assert post(client, "/webhook", big).status_code == 413
    assert post(client, "/setup", big).status_code == 413
    body = {"tasks": [], "project": 7, "label_config": CONFIG, "pad": "x" * (settings.small_request_max_bytes + 10)}
    assert post(client, "/predict", body).status_code == 200  # /predict takes image batches


@pytest.mark.parametrize("auth", [False, True])
def test_8_the_server_refuses_a_big_body_from_its_headers_before_buffering_it(tmp_path, auth):
    """waitress buffers a whole body (to a temporary file past 512 KB) before the app sees the request: the limit
    of each path — and the small one for callers without the Basic auth the path needs — is applied as soon as the
    headers are read, so nobody makes the server spool 200 MB of /webhook (or, unauthenticated, of /predict)."""
    from ml_backend.http.server import build_server

    env = {"basic_auth_user": "u", "basic_auth_pass": "p"} if auth else {}
    settings = _settings(tmp_path, host="127.0.0.1", port=0, small_request_max_bytes=1000, max_request_bytes=50_000,
                         **env)
    scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
    server = build_server(settings, lambda s: create_app(s, scheduler=scheduler, store=ModelStore(s)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    header = "Authorization: Basic " + base64.b64encode(b"u:p").decode() + "\r\n"

    def status(path: str, length: int, authorization: str = "") -> int:
        """Send only the headers, announcing ``length`` bytes; the status answered without any body sent."""
        with socket.create_connection(("127.0.0.1", server.effective_port), timeout=60) as sock:
            sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n{authorization}"
                         f"Content-Length: {length}\r\n\r\n".encode())
            return int(sock.makefile("rb").readline().split()[1])

    try:
        for path in ("/webhook", "/setup", "/train", "/job_status"):
            assert status(path, 200_000_000) == 413
            assert status(path, 1001, header) == 413
        assert status("/predict", 50_001, header) == 413
        if auth:  # without the password, /predict takes no more than any small endpoint
            assert status("/predict", 1001) == 413
        r = requests.post(f"http://127.0.0.1:{server.effective_port}/predict", timeout=60,
                          json={"tasks": [], "project": 7, "pad": "x" * 20_000}, auth=("u", "p") if auth else None)
        assert r.status_code == 200  # within /predict's own limit
    finally:
        server.close()
        scheduler.close()
        connections.forget_all()


def test_9_malformed_input_answers_400_not_500(app_client):
    client = app_client[0]
    assert post(client, "/webhook", "[" * 100_000 + "]" * 100_000).status_code == 400
    assert post(client, "/setup", '{"project": ' + "[" * 50_000).status_code == 400
    deep = "<View><Image name='image' value='$image'/><Taxonomy name='t' toName='image'>" + \
        "<Choice value='a'>" * 5000 + "</Choice>" * 5000 + "</Taxonomy></View>"
    r = post(client, "/setup", {"project": 7, "schema": deep})
    assert r.status_code == 400 and "deep" in r.get_json()["error"]
    assert post(client, "/setup", {"project": 7, "schema": 12}).status_code == 400
    assert post(client, "/predict", {"tasks": [{"id": 1}], "project": "²"}).status_code == 400


def test_9_a_remote_answering_deeply_nested_json_is_refused_not_a_crash(tmp_path):
    """What claims to be Label Studio answers JSON nested 100,000 deep (the parser's stack overflows): /setup says
    it is not a Label Studio (400), /webhook still answers 2xx and schedules nothing, the gate's JSON is a DataError."""
    nested = b'{"id": 7, "label_config": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"

    def nesting(conn: socket.socket) -> None:
        reader = conn.makefile("rb")
        while _read_request(reader) is not None:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
                         % len(nested) + nested)

    server = RawServer(nesting)
    try:
        with pytest.raises(DataError, match="nested too deeply"):
            OutboundGate().request("GET", f"{server.url}/api/projects/7/", server.destination()).json()
        for settings in (_settings(tmp_path / "setup"),
                         Settings(model_dir=tmp_path / "url", label_studio_url=server.url, label_studio_api_key="k" * 40)):
            store = ModelStore(settings)
            scheduler = make_scheduler(settings, job_func="tests.test_app.sleeping_job")
            client = create_app(settings, scheduler=scheduler, store=store).test_client()
            r = post(client, "/setup", {"project": 7, "schema": CONFIG, "hostname": server.url, "access_token": "t" * 40})
            assert r.status_code == 400 and "did not answer like a Label Studio" in r.get_json()["error"]
            r = post(client, "/webhook", {"action": "START_TRAINING", "project": {"id": 7}})
            assert r.status_code == 200 and r.get_json()["status"] == "ignored"
            assert scheduler.health()["waiting_projects"] == 0
            scheduler.close()
            store.close()
            connections.forget_all()
    finally:
        server.close()


def test_10_per_project_state_grows_only_for_verified_projects(app_client, ls):
    client, settings, scheduler, store = app_client
    before = len(client.get("/health").get_data())
    for pid in range(2000, 2300):  # invented ids: the fake Label Studio does not hold them
        body = {"project": pid, "schema": CONFIG, "hostname": ls.url, "access_token": ls.token}
        assert post(client, "/setup", body).status_code == 400
        assert post(client, "/predict", {"tasks": [], "project": pid, "label_config": CONFIG}).status_code == 200
    assert store.projects() == [] and len(client.get("/health").get_data()) == before
    assert not any(settings.model_dir.glob("project-2*"))
    assert _parse_cached.cache_info().maxsize <= 16  # label configs kept in memory are bounded


def test_11_project_data_is_not_served_to_unauthenticated_callers(app_client):
    client = app_client[0]
    assert client.get("/health").get_json() == {"status": "UP", "model_class": "taxomoco"}
    for path in ("/disagreements?project=7", "/metrics", "/similar?project=7&task=1", "/queue?project=7"):
        assert client.get(path).status_code == 403
    assert post(client, "/job_status", {"project": 7}).status_code == 403


# ----- 5 and 7: memory and fairness of /predict ---------------------------------------------------------------


def test_5_predict_decodes_and_embeds_in_batches_under_the_pixel_limit(tmp_path):
    from model.bundle import load_live
    from model.images import content_hash
    from model.predictor import Predictor
    from tests.test_store import publish_tiny_bundle

    taxonomy = parse_label_config(CONFIG).taxonomy
    publish_tiny_bundle(tmp_path / "models", taxonomy)
    predictor = Predictor(load_live(tmp_path / "models"), cache_dir=tmp_path / "cache", device="cpu")
    held: list[int] = []
    original = predictor.embedder.embed_with_mask

    def recording(images, progress=False):
        held.append(sum(im.width * im.height for im in images))
        return original(images, progress=progress)

    predictor.embedder.embed_with_mask = recording  # type: ignore[method-assign]
    images = [png((i * 20 % 255, 10, 10), size=(100, 100)) for i in range(12)]
    items = [(data, content_hash(data)) for data in images]
    preds, errors = predictor.predict_encoded(items, batch_pixels=35_000)
    assert all(p is not None for p in preds) and errors == {}
    assert len(held) >= 4 and max(held) <= 35_000  # never more than three 100x100 images decoded at once
    held.clear()
    again, _ = predictor.predict_encoded(items, batch_pixels=35_000)
    assert held == [] and [p.path for p in again] == [p.path for p in preds]  # cached: nothing decoded


class _Slow(BaseHTTPRequestHandler):
    release = threading.Event()

    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        _Slow.release.wait(20)
        body = png()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_7_one_requests_slow_images_do_not_hold_another_projects_predict(tmp_path, ls):
    from tests.test_app import ColourModel

    slow = ThreadingHTTPServer(("127.0.0.1", 0), _Slow)
    slow.daemon_threads = True
    threading.Thread(target=slow.serve_forever, daemon=True).start()
    images = tmp_path / "images"
    images.mkdir()
    (images / "red.png").write_bytes(png())
    settings = Settings(model_dir=tmp_path / "data", local_files_root=images, allow_private_image_hosts=True,
                        allowed_image_hosts=(f"127.0.0.1:{slow.server_address[1]}",), image_timeout_s=30,
                        image_fetch_threads=8)
    for pid in (1, 2):
        connections.accept_setup(settings, connections.SetupRequest(pid, "http://ls.example", "t", None, False),
                                 verify=lambda *_: None)
    store = ModelStore(settings, loader=lambda pid: ColourModel("v1"), probe=lambda pid: "v1")
    client = create_app(settings, scheduler=make_scheduler(settings, job_func="tests.test_app.sleeping_job"),
                        store=store).test_client()
    done: list[str] = []
    slow_url = f"http://127.0.0.1:{slow.server_address[1]}"
    tasks = [{"id": i, "data": {"image": f"{slow_url}/{i}.png"}} for i in range(40)]

    def slow_request() -> None:
        post(client, "/predict", {"tasks": tasks, "project": 1, "label_config": CONFIG})
        done.append("slow")

    _Slow.release.clear()
    worker = threading.Thread(target=slow_request)
    worker.start()
    try:
        assert wait_until(lambda: len(store.projects()) >= 1, 10)
        r = post(client, "/predict", {"tasks": [{"id": 1, "data": {"image": "red.png"}}], "project": 2,
                                      "label_config": CONFIG})
        done.append("fast")
        assert r.status_code == 200 and r.get_json()["results"][0]["result"]
        assert done == ["fast"]  # answered while the other request still waits for its 40 slow images
    finally:
        _Slow.release.set()
        worker.join(30)
        slow.shutdown()
        slow.server_close()
        store.close()
        connections.forget_all()
    assert done == ["fast", "slow"]


# ----- 6. slow clients against the real server ----------------------------------------------------------------


def test_6_health_keeps_answering_with_40_slow_clients(backend_server):
    backend = backend_server()
    host, port = "127.0.0.1", backend.port
    sockets: list[socket.socket] = []
    try:
        for i in range(40):  # trickled request lines, headers and bodies, never finished
            s = socket.create_connection((host, port), timeout=5)
            if i % 3 == 0:
                s.sendall(b"GET /hea")
            elif i % 3 == 1:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Ty")
            else:
                s.sendall(b"POST /predict HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100000\r\n\r\n{\"tasks\": [")
            sockets.append(s)
        answers = []
        for _ in range(10):
            t0 = time.monotonic()
            r = requests.get(f"{backend.url}/health", timeout=10)
            answers.append(time.monotonic() - t0)
            assert r.status_code == 200
            for s in sockets:  # keep trickling
                try:
                    s.send(b"x")
                except OSError:
                    pass
        print(f"/health with 40 slow clients: worst {max(answers):.3f} s, median {sorted(answers)[5]:.3f} s")
        assert max(answers) < 5.0  # generous on a shared machine; the bench measures the real figure
    finally:
        for s in sockets:
            s.close()


@pytest.mark.e2e
def test_3_with_basic_auth_the_backend_registers_an_authenticated_webhook_in_label_studio(label_studio,
                                                                                          backend_server):
    backend = backend_server(BASIC_AUTH_USER="ls-user", BASIC_AUTH_PASS="ls-pass", LABEL_STUDIO_URL=label_studio.url,
                             LABEL_STUDIO_API_KEY=label_studio.admin.token)
    pid = label_studio.create_project(CONFIG, title="taxomoco webhook auth")
    label_studio.connect_backend(pid, backend.url, auth=("ls-user", "ls-pass"))
    header = "Basic " + base64.b64encode(b"ls-user:ls-pass").decode()

    def hooks() -> list[dict]:
        return label_studio.api("GET", "/api/webhooks/", params={"project": pid}).json()

    ml_id = label_studio.api("GET", "/api/ml", params={"project": pid}).json()[0]["id"]

    def ours_only() -> bool:
        label_studio.api("GET", f"/api/ml/{ml_id}")  # Label Studio calls /health and /setup on every read
        target = [h for h in hooks() if h["url"].rstrip("/").endswith("/webhook")]
        return len(target) == 1 and (target[0].get("headers") or {}).get("Authorization") == header

    assert wait_until(ours_only, 90, interval_s=3.0), hooks()  # the header-less one is gone
    r = requests.post(f"{backend.url}/webhook", json={"action": "START_TRAINING", "project": {"id": pid}}, timeout=5)
    assert r.status_code == 401  # WEBHOOK_REQUIRE_AUTH is on by default with Basic auth
