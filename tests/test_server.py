"""The waitress server of ``ml_backend.http.server``: a response is written with its connection corked (header and body
leave in one TCP segment, the client is woken once) and the cork is released when the task ends."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest

from ml_backend.http.server import build_server
from ml_backend.settings import Settings

pytestmark = pytest.mark.skipif(not hasattr(socket, "TCP_CORK"), reason="TCP_CORK is Linux's; elsewhere nothing is corked")


def test_a_response_is_written_corked_and_the_cork_is_released(tmp_path):
    seen: dict[str, Any] = {}

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        # waitress hands the app its channel's disconnect check: the channel's socket is the connection's
        sock = environ["waitress.client_disconnected"].__self__.socket
        seen["socket"] = sock
        body = json.dumps({"corked": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK)}).encode()
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    server = build_server(Settings(model_dir=tmp_path, host="127.0.0.1", port=0), lambda s: app)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        with socket.create_connection(("127.0.0.1", int(server.effective_port)), timeout=30) as client:
            reader = client.makefile("rb")
            for _ in range(2):  # one kept-alive connection: the second answer must not wait behind a held cork
                client.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
                assert reader.readline().split()[1] == b"200"
                headers = {}
                while (line := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.decode().partition(":")
                    headers[name.lower()] = value.strip()
                assert json.loads(reader.read(int(headers["content-length"]))) == {"corked": 1}
            # the task has ended: its connection, still open, holds nothing back
            assert seen["socket"].getsockopt(socket.IPPROTO_TCP, socket.TCP_CORK) == 0
    finally:
        server.close()
