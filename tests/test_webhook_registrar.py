"""The background scheduling of the authenticated-webhook check (the check itself runs against a real Label
Studio in tests/test_e2e_label_studio.py)."""

from __future__ import annotations

import threading
import time

import pytest

from ml_backend.labelstudio import webhook_setup
from ml_backend.labelstudio.connections import LSConnection
from ml_backend.settings import Settings

CONN = LSConnection(url="http://label-studio.invalid:8080", api_key="k")


class _Checks:
    """Counts the checks; the webhooks are found right from check number ``right_from`` on."""

    def __init__(self, right_from: int) -> None:
        self.right_from = right_from
        self.times: list[float] = []
        self.lock = threading.Lock()

    def __call__(self, settings: Settings, conn: LSConnection, project_id: int) -> list[str]:
        with self.lock:
            self.times.append(time.monotonic())
            return ["hook"] if len(self.times) >= self.right_from else []


@pytest.fixture()
def fast_follow_ups(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhook_setup, "FOLLOW_UP_S", (0.2, 0.2, 0.2))
    monkeypatch.setattr(webhook_setup, "RETRY_AFTER_S", 0.0)


def _settle(checks: _Checks, quiet_s: float = 0.8, timeout_s: float = 10.0) -> None:
    """Waits until no check happened for ``quiet_s``."""
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        with checks.lock:
            last = checks.times[-1] if checks.times else 0.0
        if checks.times and time.monotonic() - last > quiet_s:
            return
        time.sleep(0.05)
    raise AssertionError("the checks did not stop")


def test_a_check_that_fails_is_followed_up_until_the_webhooks_are_right(
        monkeypatch: pytest.MonkeyPatch, fast_follow_ups: None) -> None:
    checks = _Checks(right_from=3)
    monkeypatch.setattr(webhook_setup, "ensure_authenticated_webhook", checks)
    registrar = webhook_setup.WebhookRegistrar(Settings())
    registrar.ensure(1, CONN)
    _settle(checks)
    assert len(checks.times) == 3  # two follow-ups, none after the one that found them right
    registrar.ensure(1, CONN)
    time.sleep(0.5)
    assert len(checks.times) == 3  # done for this connection


def test_follow_ups_stop_after_their_last_delay(monkeypatch: pytest.MonkeyPatch, fast_follow_ups: None) -> None:
    checks = _Checks(right_from=99)
    monkeypatch.setattr(webhook_setup, "ensure_authenticated_webhook", checks)
    webhook_setup.WebhookRegistrar(Settings()).ensure(2, CONN)
    _settle(checks)
    assert len(checks.times) == 1 + 3


def test_a_setup_while_a_follow_up_waits_starts_no_second_chain(
        monkeypatch: pytest.MonkeyPatch, fast_follow_ups: None) -> None:
    monkeypatch.setattr(webhook_setup, "RETRY_AFTER_S", 0.1)
    checks = _Checks(right_from=99)
    monkeypatch.setattr(webhook_setup, "ensure_authenticated_webhook", checks)
    registrar = webhook_setup.WebhookRegistrar(Settings())
    registrar.ensure(3, CONN)
    deadline = time.monotonic() + 3.0
    while time.monotonic() < deadline and len(checks.times) < 4:
        registrar.ensure(3, CONN)  # /setup calls keep coming while the follow-ups run
        time.sleep(0.01)
    _settle(checks)
    # one chain: the first check and its 3 follow-ups (a second chain per /setup would give 8 or more); one more
    # only if a busy machine delays the first check past RETRY_AFTER_S
    assert 4 <= len(checks.times) <= 5
