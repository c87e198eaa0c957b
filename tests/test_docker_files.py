"""docker/ files: the compose file parses, sets only real settings, has healthchecks and volumes; the
Dockerfile's commands name real CLI commands and pins the torch pair the project pins."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import yaml

from ml_backend.cli import build_parser
from ml_backend.settings import Settings

DOCKER = Path(__file__).resolve().parent.parent / "docker"
OURS = ("backend", "worker")


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def setting_env_names() -> set[str]:
    return {f.metadata["env"] for f in dataclasses.fields(Settings)}


def cli_commands() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return set(sub.choices)


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def test_compose_has_the_four_services(compose: dict) -> None:
    assert set(compose["services"]) == {"label-studio", "redis", "backend", "worker"}
    assert compose["services"]["label-studio"]["image"].startswith("heartexlabs/label-studio:")


def test_every_env_var_of_our_services_is_a_setting(compose: dict) -> None:
    known = setting_env_names()
    for name in OURS:
        env = compose["services"][name]["environment"]
        unknown = sorted(set(env) - known)
        assert not unknown, f"{name} sets env vars that Settings does not read: {unknown}"
        assert env["MODEL_DIR"] == "/data" and env["REDIS_URL"].startswith("redis://redis:")


def test_env_defaults_parse_as_settings(compose: dict) -> None:
    for name in OURS:
        env = {k: re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", str(v)) for k, v in compose["services"][name]["environment"].items()}
        settings = Settings.from_env(env=env)
        assert settings.redis_url and str(settings.model_dir) == "/data"


def test_every_env_line_is_commented() -> None:
    lines = (DOCKER / "docker-compose.yml").read_text().splitlines()
    known = setting_env_names()
    for i, line in enumerate(lines):
        m = re.match(r"\s+([A-Z_]+):", line)
        if m and m.group(1) in known:
            above = [ln.strip() for ln in lines[max(0, i - 6):i]]
            assert any(a.startswith("#") for a in above), f"line {i + 1} ({m.group(1)}) has no comment above it"


def test_healthchecks_volumes_and_gpu_reservation(compose: dict) -> None:
    services = compose["services"]
    for name, service in services.items():
        assert service.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
    assert "/data" in " ".join(services["backend"]["volumes"]) and services["backend"]["volumes"] == services["worker"]["volumes"]
    assert set(compose["volumes"]) >= {"taxomoco-data", "redis-data", "label-studio-data"}
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"] and devices[0]["driver"] == "nvidia"
    assert services["backend"]["depends_on"]["redis"]["condition"] == "service_healthy"


def test_commands_name_real_cli_commands(compose: dict) -> None:
    commands = cli_commands()
    instructions = dockerfile_instructions()
    entry = [json.loads(rest) for word, rest in instructions if word == "ENTRYPOINT"]
    cmd = [json.loads(rest) for word, rest in instructions if word == "CMD"]
    assert entry == [["taxomoco"]] and cmd[-1][0] in commands
    for name in OURS:
        assert compose["services"][name]["command"][0] in commands
    assert compose["services"]["backend"]["command"] == ["serve"] and compose["services"]["worker"]["command"] == ["worker"]
    build_parser().parse_args(compose["services"]["worker"]["command"])  # parses without an error


def test_worker_healthcheck_calls_a_real_function(compose: dict) -> None:
    from ml_backend.queue import worker

    test = " ".join(compose["services"]["worker"]["healthcheck"]["test"])
    assert "ml_backend.queue.worker import healthcheck" in test and callable(worker.healthcheck)
    assert worker.healthcheck(Settings.from_env(env={})) == 1  # no REDIS_URL: unhealthy, not a crash


def test_worker_healthcheck_against_real_redis(redis_url: str, tmp_path: Path) -> None:
    from ml_backend.queue.worker import build_worker, healthcheck

    settings = Settings.from_env(env={}, redis_url=redis_url, model_dir=tmp_path)
    assert healthcheck(settings) == 1  # no worker registered yet
    worker = build_worker(settings)
    worker.register_birth()
    try:
        assert healthcheck(settings) == 0
    finally:
        worker.register_death()


def test_dockerfile_pins_torch_and_has_both_variants() -> None:
    text = (DOCKER / "Dockerfile").read_text()
    setup = (DOCKER.parent / "setup.cfg").read_text()
    torch_pin = re.search(r"torch==([\d.]+)", setup).group(1)
    vision_pin = re.search(r"torchvision==([\d.]+)", setup).group(1)
    assert f"ARG TORCH_VERSION={torch_pin}" in text and f"ARG TORCHVISION_VERSION={vision_pin}" in text
    assert 'TORCH_VARIANT" = "cpu"' in text and 'TORCH_VARIANT" = "cuda"' in text
    words = [w for w, _ in dockerfile_instructions()]
    assert words[0] in ("ARG", "FROM") and "HEALTHCHECK" in words and "USER" in words
    for src in re.findall(r"^COPY (.+) \./?\S*$", text, flags=re.M):
        for part in src.split():
            assert (DOCKER.parent / part).exists() or part == "README.md", f"COPY source {part} missing"


def test_compose_follows_the_recommended_deployment(compose: dict) -> None:
    """README "Security": LABEL_STUDIO_URL set, Basic auth required, the backend's port not published on the host."""
    backend = compose["services"]["backend"]
    env = backend["environment"]
    assert env["LABEL_STUDIO_URL"].startswith("http://label-studio:")
    assert re.fullmatch(r"\$\{BASIC_AUTH_PASS:\?.+\}", env["BASIC_AUTH_PASS"])  # compose refuses to start without it
    assert env["BASIC_AUTH_USER"] and "WEBHOOK_REQUIRE_AUTH" not in env  # on by default with Basic auth
    assert all(str(p).startswith("127.0.0.1:") for p in backend.get("ports", []))
    assert "worker" not in [s for s, v in compose["services"].items() if v.get("ports")]


def test_docs_name_the_server_the_backend_runs() -> None:
    """The server is waitress in one process (ml_backend/http/server.py); no text describes another set-up."""
    root = DOCKER.parent
    for path in [root / "README.md", *DOCKER.iterdir()]:
        text = path.read_text()
        assert not re.search(r"gunicorn|TAXOMOCO_HTTP_WORKERS", text, flags=re.I), f"{path} names another server set-up"
