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

WARM_COLD_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true" maxUsages="1">
    <Choice value="Warm"><Choice value="Red"/><Choice value="Orange"/></Choice>
    <Choice value="Cold"><Choice value="Blue"/></Choice>
  </Taxonomy>
</View>"""
"""A two-level colour taxonomy whose leaves plain colour images separate (the training job tests' projects)."""
WARM_COLD_COLOURS = {("Warm", "Red"): (220, 30, 30), ("Warm", "Orange"): (240, 150, 20), ("Cold", "Blue"): (30, 40, 220)}
"""The RGB colour of each leaf of :data:`WARM_COLD_CONFIG`."""

TWO_LEVEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Taxonomy name="taxonomy" toName="image" leafsOnly="true" maxUsages="1">
    <Choice value="Animal"><Choice value="Cat"/><Choice value="Dog"/></Choice>
    <Choice value="Plant"><Choice value="Tree"/><Choice value="Flower"/></Choice>
  </Taxonomy>
</View>"""
"""A two-level taxonomy label config over an image, used by the tests that talk to Label Studio."""


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


# --------------------------------------------------------------------------------------------------------
# PostgreSQL (a database for Label Studio)
# --------------------------------------------------------------------------------------------------------

POSTGRES_INSTALL_HINT = ("sudo apt-get install -y postgresql   (Debian's package puts initdb and postgres in "
                         "/usr/lib/postgresql/<major>/bin; or point TAXOMOCO_TEST_POSTGRES_BIN at such a directory)")


def postgres_bin_dir(env: Mapping[str, str] | None = None) -> Path:
    """The directory holding ``initdb`` and ``postgres``: ``$TAXOMOCO_TEST_POSTGRES_BIN``, else the newest
    ``/usr/lib/postgresql/<major>/bin`` (Debian's layout), else the directory of ``initdb`` on the PATH.

    Raises:
        ServerStartError: none found, with the command that installs PostgreSQL.
    """
    env = os.environ if env is None else env
    candidates = [Path(env["TAXOMOCO_TEST_POSTGRES_BIN"])] if env.get("TAXOMOCO_TEST_POSTGRES_BIN") else []
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        majors = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(majors, key=lambda p: int(p.name), reverse=True)]
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for directory in candidates:
        if (directory / "initdb").is_file() and (directory / "postgres").is_file():
            return directory
    raise ServerStartError(f"PostgreSQL (initdb, postgres) is not installed; install it with: {POSTGRES_INSTALL_HINT}")


class PostgresServer:
    """A throwaway PostgreSQL cluster: ``initdb`` in a fresh directory, ``postgres`` on a free port of
    127.0.0.1 (no Unix socket), trust authentication for its one superuser, one empty database.

    PostgreSQL refuses to run as root: when this process is root, the cluster's directory belongs to the
    unprivileged ``postgres`` user (Debian's package creates it; else set ``run_as``) and ``initdb`` and
    ``postgres`` run as that user (``subprocess``'s ``user=``). The directory is a new one under the system's
    temporary directory (a test's ``tmp_path`` is private to root) and is removed by :meth:`stop`.

    Args:
        bin_dir: where ``initdb`` and ``postgres`` are (default :func:`postgres_bin_dir`).
        database: the database created for the client.
        user: the superuser's name (any password is accepted: trust authentication on loopback).
        run_as: the user the server runs as when this process is root.
    """

    def __init__(self, bin_dir: Path | None = None, database: str = "labelstudio", user: str = "taxomoco",
                 run_as: str = "postgres") -> None:
        self.bin_dir = bin_dir or postgres_bin_dir()
        self.database = database
        self.user = user
        self.run_as = run_as if os.geteuid() == 0 else None
        self.port = free_port()
        self.workdir: Path | None = None
        self.proc: subprocess.Popen | None = None

    @property
    def log_path(self) -> Path:
        assert self.workdir is not None, "start() the server first"
        return self.workdir / "postgres.log"

    def start(self, timeout_s: float = 120.0) -> None:
        """``initdb``, start ``postgres`` and create the database; waits until the database accepts connections.

        Raises:
            ServerStartError: a step failed or the server did not answer, with the log's tail.
        """
        import tempfile

        self.workdir = Path(tempfile.mkdtemp(prefix="taxomoco-postgres-"))
        if self.run_as:
            shutil.chown(self.workdir, user=self.run_as)
        data = self.workdir / "data"
        as_user = {"user": self.run_as} if self.run_as else {}
        init = subprocess.run([str(self.bin_dir / "initdb"), "-D", str(data), "-U", self.user, "--auth=trust",
                               "-E", "UTF8", "--locale=C", "--no-instructions"], capture_output=True, text=True,
                              cwd=self.workdir, **as_user)
        if init.returncode != 0:
            raise ServerStartError(f"initdb failed ({init.returncode}): {init.stdout[-2000:]}{init.stderr[-2000:]}")
        cmd = [str(self.bin_dir / "postgres"), "-D", str(data), "-p", str(self.port), "-c", "listen_addresses=127.0.0.1",
               "-c", "unix_socket_directories="]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=self.workdir,
                                         start_new_session=True, **as_user)
        ready = [str(self.bin_dir / "pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user]

        def accepting() -> bool:
            return subprocess.run(ready, capture_output=True).returncode == 0

        if not wait_until(lambda: accepting() or self.proc.poll() is not None, timeout_s, 0.3) or not accepting():
            message = (f"postgres on port {self.port} did not accept connections within {timeout_s}s; "
                       f"log:\n{log_tail(self.log_path)}")
            self.stop()
            raise ServerStartError(message)
        made = subprocess.run([str(self.bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U",
                               self.user, self.database], capture_output=True, text=True)
        if made.returncode != 0:
            self.stop()
            raise ServerStartError(f"createdb {self.database} failed: {made.stderr[-2000:]}")

    def label_studio_env(self) -> dict[str, str]:
        """The environment that makes Label Studio 1.23 use this database (``core/settings/base.py``)."""
        return {"DJANGO_DB": "default", "POSTGRE_NAME": self.database, "POSTGRE_USER": self.user,
                "POSTGRE_PASSWORD": "unused-trust-authentication", "POSTGRE_HOST": "127.0.0.1",
                "POSTGRE_PORT": str(self.port)}

    def stop(self) -> None:
        """Fast shutdown (SIGINT: clients are disconnected), then remove the cluster's directory."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_process(self.proc)
        self.proc = None
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


# --------------------------------------------------------------------------------------------------------
# Label Studio
# --------------------------------------------------------------------------------------------------------

LABEL_STUDIO_VERSION = "1.23.2"
LABEL_STUDIO_INSTALL_HINT = (
    f"python3 -m venv .ls-venv && .ls-venv/bin/pip install label-studio=={LABEL_STUDIO_VERSION}   "
    "(or run `make test`, which does it; or point TAXOMOCO_TEST_LABEL_STUDIO at a `label-studio` binary)"
)
# Variables Label Studio reads under its own prefixes or as plain names; inherited values would leak in.
_LS_STRAY_ENV = ("HOST", "PORT", "USERNAME", "PASSWORD", "DEBUG", "DATABASE_URL", "DJANGO_SETTINGS_MODULE",
                 "DJANGO_DB", "LOG_LEVEL", "SECRET_KEY", "PYTHONPATH", "VIRTUAL_ENV")


def label_studio_binary(env: Mapping[str, str] | None = None) -> Path:
    """The ``label-studio`` executable: ``$TAXOMOCO_TEST_LABEL_STUDIO`` or ``<repo>/.ls-venv/bin/label-studio``.

    Raises:
        ServerStartError: neither exists, with the command that installs it.
    """
    env = os.environ if env is None else env
    candidate = Path(env.get("TAXOMOCO_TEST_LABEL_STUDIO") or REPO_ROOT / ".ls-venv" / "bin" / "label-studio")
    if not candidate.is_file():
        raise ServerStartError(f"Label Studio is not installed at {candidate}; install it with: {LABEL_STUDIO_INSTALL_HINT}")
    return candidate


@dataclass(frozen=True)
class LSUser:
    """A Label Studio user the suite created: its id, e-mail, password and legacy API token."""

    id: int
    email: str
    password: str
    token: str


class LabelStudioServer:
    """A real Label Studio server on a free port, data in ``workdir``, with an admin and a legacy token.

    Also a small administration client for test set-up (users, projects, imports, annotations, ML
    backends) that speaks plain REST with ``requests``; the product's own client is
    :class:`ml_backend.labelstudio.client.LabelStudioClient`, which the tests exercise separately.

    Args:
        workdir: directory for the SQLite database, uploads, local files and the server log.
        binary: the ``label-studio`` executable.
        env: Label Studio settings applied over the clean environment (e.g. its feature flags, or
            :meth:`PostgresServer.label_studio_env` to run it on PostgreSQL instead of SQLite).
    """

    ADMIN_EMAIL = "admin@taxomoco.test"
    ADMIN_PASSWORD = "admin-pass-1234"
    ADMIN_TOKEN = "taxomoco-test-admin-token-0001"

    def __init__(self, workdir: Path, binary: Path, env: Mapping[str, str] | None = None) -> None:
        self.workdir = workdir
        self.binary = binary
        self.extra_env = dict(env or {})
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = workdir / "data"
        self.files_root = workdir / "local-files"
        self.log_path = workdir / "label-studio.log"
        self.proc: subprocess.Popen | None = None
        self.admin = LSUser(id=1, email=self.ADMIN_EMAIL, password=self.ADMIN_PASSWORD, token=self.ADMIN_TOKEN)
        self._users: dict[str, LSUser] = {}
        self._pats: dict[str, str] = {}

    # ---- process ---------------------------------------------------------------------------------------
    def environment(self) -> dict[str, str]:
        """A clean environment for the server: inherited Label Studio / Django variables removed."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("LABEL_STUDIO_", "HEARTEX_", "TAXOMOCO_")) and k not in _LS_STRAY_ENV}
        env.update({
            "LABEL_STUDIO_BASE_DATA_DIR": str(self.data_dir),
            "LABEL_STUDIO_USERNAME": self.ADMIN_EMAIL,
            "LABEL_STUDIO_PASSWORD": self.ADMIN_PASSWORD,
            "LABEL_STUDIO_USER_TOKEN": self.ADMIN_TOKEN,
            "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
            "ML_BLOCK_LOCAL_IP": "false",
            "SSRF_PROTECTION_ENABLED": "false",
            "LOCAL_FILES_SERVING_ENABLED": "true",
            "LOCAL_FILES_DOCUMENT_ROOT": str(self.files_root),
            "LABEL_STUDIO_HOST": self.url,
            "LATEST_VERSION_CHECK": "false",
            "COLLECT_ANALYTICS": "false",
            "SECRET_KEY": "taxomoco-test-secret-key-not-for-production",
            "HOME": str(self.workdir),
        })
        env.update(self.extra_env)
        return env

    @property
    def uses_sqlite(self) -> bool:
        """Whether the server keeps its data in SQLite (Label Studio's default; else ``env`` chose a DJANGO_DB)."""
        return self.extra_env.get("DJANGO_DB", "sqlite") == "sqlite"

    def start(self, timeout_s: float = 240.0) -> None:
        """Start the server and wait until ``/health/`` answers (first start migrates: ~30-40 s).

        Raises:
            ServerStartError: the server exited or did not answer in time, with the log's tail.
        """
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.files_root.mkdir(parents=True, exist_ok=True)
        template = self.template_path()
        # the SQLite template only: on PostgreSQL the first start migrates its empty database
        from_template = self.uses_sqlite and template.is_file() and not self.database.exists()
        if from_template:
            shutil.copyfile(template, self.database)
        cmd = [str(self.binary), "start", "--no-browser", "--internal-host", "127.0.0.1", "--port", str(self.port)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.environment(), cwd=self.workdir, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        up = wait_until(lambda: self._healthy() or self.proc.poll() is not None, timeout_s, interval_s=0.5)
        if not up or not self._healthy():
            self.stop()
            raise ServerStartError(
                f"Label Studio ({self.binary}) did not answer {self.url}/health/ within {timeout_s}s "
                f"(exit code {self.proc.returncode if self.proc else None}); log {self.log_path}:\n{log_tail(self.log_path)}"
            )
        if self.uses_sqlite and not from_template:
            self._save_template(template)

    @property
    def database(self) -> Path:
        """Label Studio's SQLite database in the data directory."""
        return self.data_dir / "label_studio.sqlite3"

    def template_path(self) -> Path:
        """Where a freshly migrated database of this Label Studio installation is kept between test runs.

        The first start on an empty data directory migrates for 30-90 s; later sessions start from a copy
        of that database (admin user and token included) in a few seconds. The key changes with the
        binary, its installation time and the admin credentials.
        """
        import hashlib

        key = "|".join([str(self.binary.resolve()), str(self.binary.stat().st_mtime_ns), self.ADMIN_EMAIL,
                        self.ADMIN_PASSWORD, self.ADMIN_TOKEN])
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return REPO_ROOT / ".pytest_cache" / "taxomoco-label-studio" / f"migrated-{digest}.sqlite3"

    def _save_template(self, template: Path) -> None:
        """Copy the just-migrated database (SQLite online backup: consistent while the server runs)."""
        import sqlite3

        template.parent.mkdir(parents=True, exist_ok=True)
        partial = template.with_name(f".{template.name}.{os.getpid()}")
        src = sqlite3.connect(f"file:{self.database}?mode=ro", uri=True)
        try:
            dst = sqlite3.connect(partial)
            try:
                src.backup(dst)
            finally:
                dst.close()
        finally:
            src.close()
        os.replace(partial, template)

    def stop(self) -> None:
        """Stop the server (its whole process group)."""
        stop_process(self.proc)

    def _healthy(self) -> bool:
        import requests

        try:
            return requests.get(f"{self.url}/health/", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    # ---- REST --------------------------------------------------------------------------------------------
    def api(self, method: str, path: str, token: str | None = None, expect: tuple[int, ...] = (200, 201, 204),
            **kwargs):
        """Call ``<url><path>`` with ``Authorization: Token <token>`` (default the admin's).

        Raises:
            AssertionError: the status is not in ``expect``; the message holds the body.
        """
        import requests

        headers = {"Authorization": f"Token {token or self.ADMIN_TOKEN}", **kwargs.pop("headers", {})}
        response = requests.request(method, f"{self.url}{path}", headers=headers, timeout=60, **kwargs)
        assert response.status_code in expect, f"{method} {path} -> {response.status_code}: {response.text[:2000]}"
        return response

    def create_user(self, email: str, password: str = "annotator-pass-1234") -> LSUser:
        """A new member of the organisation with its own legacy token (invite link -> sign-up -> token).

        Calling it twice with the same e-mail returns the same user.
        """
        import requests

        if email in self._users:
            return self._users[email]
        invite = self.api("GET", "/api/invite").json()
        with requests.Session() as browser:
            signup = f"{self.url}/user/signup/?token={invite['token']}"
            browser.get(signup, timeout=30).raise_for_status()
            csrf = browser.cookies.get("csrftoken")
            assert csrf, "Label Studio's sign-up page set no csrftoken cookie"
            answer = browser.post(signup, data={"csrfmiddlewaretoken": csrf, "email": email, "password": password},
                                  headers={"Referer": signup}, allow_redirects=False, timeout=30)
            assert answer.status_code == 302, f"sign-up of {email} failed: {answer.status_code} {answer.text[:1000]}"
            token = browser.get(f"{self.url}/api/current-user/token", timeout=30).json()["token"]
        whoami = self.api("GET", "/api/current-user/whoami", token=token).json()
        user = LSUser(id=int(whoami["id"]), email=email, password=password, token=token)
        self._users[email] = user
        return user

    def personal_access_token(self, user: LSUser | None = None) -> str:
        """A JWT personal access token (refresh token) of ``user`` (default the admin), made with ``POST /api/token/``.

        Label Studio lets a user hold one valid token at a time (409 on a second one), so the token is
        cached per user.
        """
        user = user or self.admin
        if user.email not in self._pats:
            self._pats[user.email] = self.api("POST", "/api/token/", token=user.token).json()["token"]
        return self._pats[user.email]

    def create_project(self, label_config: str, title: str = "taxomoco test project", **fields) -> int:
        """A new project with ``label_config``; returns its id."""
        body = {"title": title, "label_config": label_config, **fields}
        return int(self.api("POST", "/api/projects", json=body).json()["id"])

    def import_images(self, project_id: int, images: Mapping[str, bytes]) -> list[int]:
        """Upload image files (name -> bytes); one task per file. Returns the new task ids in order.

        Label Studio takes at most 100 files per upload: more are sent in uploads of 100."""
        items = list(images.items())
        ids: list[int] = []
        for start in range(0, len(items), 100):
            part = items[start:start + 100]
            files = [(f"file{i}", (name, data, "application/octet-stream")) for i, (name, data) in enumerate(part)]
            answer = self.api("POST", f"/api/projects/{project_id}/import", files=files,
                              params={"return_task_ids": "true"}).json()
            assert answer["task_count"] == len(part), answer
            ids += [int(t) for t in answer["task_ids"]]
        return ids

    def import_tasks(self, project_id: int, tasks: list[dict]) -> list[int]:
        """Import task dicts (``{"image": url}`` or ``{"data": {...}}``). Returns the new task ids."""
        answer = self.api("POST", f"/api/projects/{project_id}/import", json=tasks,
                          params={"return_task_ids": "true"}).json()
        return [int(t) for t in answer["task_ids"]]

    def annotate(self, task_id: int, result: list[dict], user: LSUser | None = None, **fields) -> int:
        """Submit an annotation as ``user`` (default the admin); returns the annotation id."""
        body = {"result": result, "was_cancelled": False, "ground_truth": False, **fields}
        token = (user or self.admin).token
        return int(self.api("POST", f"/api/tasks/{task_id}/annotations/", token=token, json=body).json()["id"])

    def connect_backend(self, project_id: int, url: str, title: str = "taxomoco",
                        auth: tuple[str, str] | None = None, **fields) -> dict:
        """Connect an ML backend to the project (``POST /api/ml``), with HTTP Basic ``auth`` (user, password) when
        given; returns Label Studio's record of it."""
        body = {"project": project_id, "url": url, "title": title, **fields}
        if auth is not None:
            body.update(auth_method="BASIC_AUTH", basic_auth_user=auth[0], basic_auth_pass=auth[1])
        return self.api("POST", "/api/ml", json=body).json()

    def task(self, task_id: int, token: str | None = None) -> dict:
        """One task as the labeling UI gets it."""
        return self.api("GET", f"/api/tasks/{task_id}", token=token).json()


# --------------------------------------------------------------------------------------------------------
# The taxomoco backend
# --------------------------------------------------------------------------------------------------------

#: Settings that make training finish in seconds on two CPU cores (env var -> value).
FAST_TRAINING_ENV: dict[str, str] = {
    "ENCODER_ARCH": "resnet18-half",
    "ENCODER_INPUT_SIZE": "32",
    "PRETRAIN_EPOCHS": "1",
    "PRETRAIN_MAX_MINUTES": "1",
    "PRETRAIN_BATCH_SIZE": "16",
    "PRETRAIN_MIN_IMAGES": "0",  # the suite's projects are tiny; they still exercise pretraining
    "MIN_LABELS_TO_TRAIN": "2",
    "DEVICE": "cpu",
    "TAXOMOCO_HTTP_THREADS": "8",
    "LOG_LEVEL": "INFO",
    "OMP_NUM_THREADS": "1",
    # the suite's Label Studio runs on 127.0.0.1: accept it when only /setup names it (a deployment on a private
    # network sets LABEL_STUDIO_URL instead; see the README's Security section)
    "ALLOW_PRIVATE_SETUP_HOSTS": "true",
}


class BackendServer:
    """``taxomoco serve`` (in a subprocess) on a free port with its own MODEL_DIR.

    Args:
        workdir: holds ``models/`` (MODEL_DIR) and the server log.
        env: extra environment (settings env vars, e.g. ``REDIS_URL``); :data:`FAST_TRAINING_ENV` is applied
            first.
        auth: the backend's HTTP Basic credentials (user, password: ``BASIC_AUTH_USER``, ``BASIC_AUTH_PASS``), sent
            by :meth:`job_status` too; None: no Basic auth.
    """

    def __init__(self, workdir: Path, env: Mapping[str, str] | None = None,
                 auth: tuple[str, str] | None = None) -> None:
        self.workdir = workdir
        self.auth = auth
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.model_dir = workdir / "models"
        self.log_path = workdir / "taxomoco.log"
        self.extra_env = dict(env or {})
        self.proc: subprocess.Popen | None = None

    def environment(self) -> dict[str, str]:
        """The server's environment: ours without inherited taxomoco settings, plus fast training settings."""
        import dataclasses

        from ml_backend.settings import Settings

        ours = {f.metadata["env"] for f in dataclasses.fields(Settings)}
        env = {k: v for k, v in os.environ.items() if k not in ours}
        env.update(FAST_TRAINING_ENV)
        env.update({"TAXOMOCO_HOST": "127.0.0.1", "TAXOMOCO_PORT": str(self.port), "MODEL_DIR": str(self.model_dir),
                    "PYTHONUNBUFFERED": "1"})
        if self.auth is not None:
            env.update({"BASIC_AUTH_USER": self.auth[0], "BASIC_AUTH_PASS": self.auth[1]})
        env.update(self.extra_env)
        return env

    def start(self, timeout_s: float = 90.0) -> None:
        """Start ``python -m ml_backend.cli serve`` and wait until ``/health`` answers.

        Raises:
            ServerStartError: the server exited or did not answer in time, with the log's tail.
        """
        import requests

        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "ml_backend.cli", "serve"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.environment(), cwd=REPO_ROOT, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)

        def healthy() -> bool:
            try:
                return requests.get(f"{self.url}/health", timeout=2).status_code == 200
            except requests.RequestException:
                return False

        if not wait_until(lambda: healthy() or self.proc.poll() is not None, timeout_s, 0.3) or not healthy():
            self.stop()
            raise ServerStartError(f"taxomoco serve did not answer {self.url}/health within {timeout_s}s; "
                                   f"log {self.log_path}:\n{log_tail(self.log_path)}")

    def job_status(self, project_id: int) -> dict:
        """``POST /job_status`` for the project (with the server's Basic auth), which must answer 200."""
        import requests

        answer = requests.post(f"{self.url}/job_status", json={"project": project_id}, auth=self.auth, timeout=10)
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def stop(self) -> None:
        """Stop the server (its whole process group, training children included)."""
        stop_process(self.proc, timeout_s=40)

    def log(self) -> str:
        """The server's log so far."""
        return log_tail(self.log_path, 200_000)


# --------------------------------------------------------------------------------------------------------
# A stand-in Label Studio on loopback (for the HTTP contract; the real one is LabelStudioServer)
# --------------------------------------------------------------------------------------------------------


class FakeLabelStudio:
    """A small HTTP server on 127.0.0.1 that answers the Label Studio API calls the backend makes, and records
    every request it gets (path, headers, body). Plays Label Studio — or an attacker pretending to be one — in
    tests of the HTTP contract and of the trust model; the real server is :class:`LabelStudioServer`.

    Args:
        projects: project id -> label config.
        token: the legacy token it accepts (``Authorization: Token <token>``).
        images: path -> bytes served (e.g. ``/data/upload/1/a.png``), token required.
    """

    def __init__(self, projects: Mapping[int, str], token: str = "tok123",
                 images: Mapping[str, bytes] | None = None) -> None:
        import json
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.projects = dict(projects)
        self.token = token
        self.images = dict(images or {})
        self.requests: list[dict] = []
        self.webhooks: list[dict] = []
        self.ml_backends: list[dict] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _answer(self, status: int, body: object) -> None:
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                fake.requests.append({"method": method, "path": self.path, "headers": dict(self.headers),
                                      "body": raw})
                if self.headers.get("Authorization") != f"Token {fake.token}":
                    return self._answer(401, {"detail": "secret details an attacker wants echoed"})
                path, _, query = self.path.partition("?")
                parts = [p for p in path.split("/") if p]
                if parts[:2] == ["api", "projects"] and len(parts) == 3 and parts[2].isdigit():
                    pid = int(parts[2])
                    if pid not in fake.projects:
                        return self._answer(404, {"detail": "Not found."})
                    return self._answer(200, {"id": pid, "title": f"project {pid}",
                                              "label_config": fake.projects[pid], "task_number": 0})
                if parts == ["api", "ml"]:
                    return self._answer(200, fake.ml_backends)
                if parts == ["api", "webhooks"] and method == "GET":
                    return self._answer(200, fake.webhooks)
                if parts == ["api", "webhooks"] and method == "POST":
                    hook = {**json.loads(raw), "id": len(fake.webhooks) + 100}
                    fake.webhooks.append(hook)
                    return self._answer(201, hook)
                if parts[:2] == ["api", "webhooks"] and method == "DELETE":
                    fake.webhooks[:] = [h for h in fake.webhooks if str(h["id"]) != parts[2]]
                    return self._answer(204, b"")
                if path in fake.images:
                    return self._answer(200, fake.images[path])
                return self._answer(404, {"detail": "Not found."})

            def do_GET(self) -> None:
                self._handle("GET")

            def do_POST(self) -> None:
                self._handle("POST")

            def do_DELETE(self) -> None:
                self._handle("DELETE")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def saw(self, path_prefix: str) -> list[dict]:
        """The requests whose path starts with ``path_prefix``."""
        return [r for r in self.requests if r["path"].startswith(path_prefix)]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
