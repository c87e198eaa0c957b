"""Real servers the test suite starts and stops: redis-server, Label Studio and the taxomoco backend.

Nothing here is a mock. Each server runs as a subprocess on a free port of 127.0.0.1 with its data in a
temporary directory; a missing binary fails loudly with the command that installs it.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


class ServerStartError(RuntimeError):
    """A test server did not come up; the message names the binary, the port and the log file."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.2)
        return sock.connect_ex((host, port)) == 0


def wait_until(check: Callable[[], bool], timeout_s: float, interval_s: float = 0.1) -> bool:
    """Poll ``check`` until it returns True or ``timeout_s`` passes; returns its last answer."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(interval_s)
    return check()


def stop_process(proc: subprocess.Popen | None, timeout_s: float = 15.0) -> None:
    """SIGTERM the process group of ``proc``, then SIGKILL it when it does not exit in time."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait(timeout=5)


def log_tail(path: Path, chars: int = 3000) -> str:
    """The last ``chars`` characters of a log file (empty when it does not exist)."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------------------------------------
# Redis
# --------------------------------------------------------------------------------------------------------

REDIS_INSTALL_HINT = "sudo apt-get install -y redis-server   (or run `make test`, which installs it)"


@dataclass
class RedisServer:
    """A private ``redis-server`` without persistence on a free port.

    ``stop()`` and ``start()`` may be called any number of times (Redis down/up tests); the port stays
    the same, so a URL handed out earlier points at the restarted server.

    Args:
        workdir: directory for the server's log (and its empty working directory).
        binary: path or name of ``redis-server``.
    """

    workdir: Path
    binary: str = "redis-server"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:<port>/0``."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.workdir / "redis.log"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server (no-op when it runs) and wait until it answers PING.

        Raises:
            ServerStartError: the binary is missing (with the install command) or the server did not answer.
        """
        if self.running:
            return
        exe = shutil.which(self.binary)
        if exe is None:
            raise ServerStartError(f"`{self.binary}` is not installed; install it with: {REDIS_INSTALL_HINT}")
        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
               "--dir", str(self.workdir), "--logfile", str(self.log_path), "--daemonize", "no"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if not wait_until(lambda: self._ping() or self.proc.poll() is not None, timeout_s) or not self._ping():
            stop_process(self.proc)
            raise ServerStartError(
                f"redis-server on port {self.port} did not answer PING within {timeout_s}s; "
                f"log {self.log_path}:\n{log_tail(self.log_path)}"
            )

    def stop(self) -> None:
        """Stop the server (no-op when it is not running) and wait until its port is closed."""
        stop_process(self.proc)
        self.proc = None
        wait_until(lambda: not port_open(self.port), 5.0)

    def restart(self) -> None:
        """Stop, then start again on the same port (all data is gone: there is no persistence)."""
        self.stop()
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self):
        """A ``redis.Redis`` connected to this server."""
        import redis

        return redis.Redis.from_url(self.url)

    def flush(self) -> None:
        """Delete every key (FLUSHALL)."""
        with self.client() as conn:
            conn.flushall()

    def _ping(self) -> bool:
        import redis

        try:
            with redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=0.5,
                             socket_connect_timeout=0.5) as conn:
                return bool(conn.ping())
        except redis.RedisError:
            return False
