"""Who may call what: every path of the backend belongs to one access class, decided here and nowhere else.

* ``OPEN`` — ``/`` and ``/health``: liveness for Label Studio and load balancers; details only to an
  authenticated caller.
* ``PROTOCOL`` — what Label Studio calls (``/setup``, ``/predict``, ``/versions``, ``/train``): HTTP Basic auth when
  ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` are set (the same user and password go into Label Studio's model
  connection), open otherwise.
* ``WEBHOOK`` — ``/webhook``: like ``PROTOCOL`` when ``WEBHOOK_REQUIRE_AUTH`` is on (by default: whenever Basic
  auth is set; the backend then registers its own Label Studio webhook that sends the header). It only schedules
  training of projects the backend already verified.
* ``DATA`` — everything that reveals project data (task and annotator ids, scores, versions' metrics, images):
  ``/disagreements``, ``/similar``, ``/duplicates``, ``/queue``, ``/job_status``, ``/metrics`` and any path not
  listed: always Basic auth; when Basic auth is not configured these answer 403 with the remedy.
"""

from __future__ import annotations

import base64
import binascii
import hmac
from dataclasses import dataclass
from enum import Enum

from ml_backend.settings import Settings

__all__ = ["Access", "Decision", "access_of", "basic_auth_ok", "decide"]


class Access(str, Enum):
    """Access classes of the backend's paths."""

    OPEN = "open"
    PROTOCOL = "protocol"
    WEBHOOK = "webhook"
    DATA = "data"


PATHS: dict[str, Access] = {
    "/": Access.OPEN,
    "/health": Access.OPEN,
    "/setup": Access.PROTOCOL,
    "/predict": Access.PROTOCOL,
    "/versions": Access.PROTOCOL,
    "/train": Access.PROTOCOL,
    "/webhook": Access.WEBHOOK,
}
"""Paths that are not ``DATA``; every other path reveals project data."""


def access_of(path: str) -> Access:
    """The access class of a request path."""
    return PATHS.get(path.rstrip("/") or "/", Access.DATA)


def basic_auth_ok(header: str | None, user: str, password: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``user:password`` (constant-time compare)."""
    if not header or not header.lower().startswith("basic ") or not user:
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return False
    given_user, sep, given_pass = decoded.partition(":")
    if not sep:
        return False
    ok_user = hmac.compare_digest(given_user.encode(), user.encode())
    ok_pass = hmac.compare_digest(given_pass.encode(), password.encode())
    return ok_user and ok_pass


@dataclass(frozen=True)
class Decision:
    """Whether a request may go on; else the status and the message to answer."""

    allowed: bool
    authenticated: bool
    status: int = 200
    message: str = ""


def decide(path: str, authorization: str | None, settings: Settings) -> Decision:
    """Whether a request to ``path`` with this ``Authorization`` header may go on under ``settings``."""
    configured = bool(settings.basic_auth_user)
    authenticated = configured and basic_auth_ok(authorization, settings.basic_auth_user or "",
                                                 settings.basic_auth_pass or "")
    access = access_of(path)
    if authenticated or access is Access.OPEN:
        return Decision(True, authenticated)
    if access is Access.DATA and not configured:
        return Decision(False, False, 403, f"{path} reveals project data and is served only to authenticated callers: "
                                           "set BASIC_AUTH_USER and BASIC_AUTH_PASS on the backend and call it with them.")
    needs = configured and (access is not Access.WEBHOOK or settings.webhook_auth)
    if not needs:
        return Decision(True, False)
    return Decision(False, False, 401, "Authentication required: use the BASIC_AUTH_USER / BASIC_AUTH_PASS of this "
                                       "backend (in Label Studio: the model connection's 'Use authentication').")
