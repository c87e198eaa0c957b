"""Fixtures shared by the whole suite: real servers (redis-server, Label Studio, the taxomoco backend).

- ``redis_server`` (session): a private redis-server; ``.url``, ``.stop()``, ``.start()``, ``.restart()``.
- ``redis_url`` (function): the URL of that server, flushed (and started again if a test stopped it).
- ``label_studio`` (session): a real Label Studio server with an admin user and a legacy token.
- ``backend_server`` (function factory): starts ``taxomoco serve`` on a free port with small settings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.servers import BackendServer, LabelStudioServer, RedisServer, label_studio_binary


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (no persistence) for the whole session; stopped at the end."""
    server = RedisServer(workdir=tmp_path_factory.mktemp("redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """URL of the session's redis-server, running and empty at the start of the test."""
    redis_server.start()
    redis_server.flush()
    return redis_server.url


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudioServer]:
    """A real Label Studio server for the whole session (admin token: ``.admin.token``); stopped at the end."""
    server = LabelStudioServer(workdir=tmp_path_factory.mktemp("label-studio"), binary=label_studio_binary())
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def backend_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., BackendServer]]:
    """Factory: ``backend_server(REDIS_URL=..., ...)`` starts ``taxomoco serve`` with fast training settings.

    Keyword arguments are extra environment variables (settings). Every server started is stopped at the
    end of the test.
    """
    started: list[BackendServer] = []

    def start(**env: str) -> BackendServer:
        server = BackendServer(tmp_path_factory.mktemp("taxomoco"), env={k: str(v) for k, v in env.items()})
        started.append(server)
        server.start()
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()
