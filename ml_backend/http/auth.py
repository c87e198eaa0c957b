"""Optional HTTP Basic auth of the backend's endpoints.

Label Studio sends Basic auth on its ML backend calls when the model connection has a user and password
set (the same ``BASIC_AUTH_USER`` / ``BASIC_AUTH_PASS`` as here). ``/health`` is always open (Label Studio
and load balancers probe it). The annotation webhook Label Studio creates by itself carries no auth, so
``/webhook`` stays open unless ``WEBHOOK_REQUIRE_AUTH`` is set: it only asks for a (coalesced) training
run and returns nothing about the project. To protect it, set ``WEBHOOK_REQUIRE_AUTH=true``, delete the
auto-created webhook in the project's settings and add one to ``<backend>/webhook`` with the header
``Authorization: Basic <base64 user:pass>``.
"""

from __future__ import annotations

import base64
import binascii
import hmac

__all__ = ["OPEN_PATHS", "basic_auth_ok", "needs_auth"]

OPEN_PATHS: frozenset[str] = frozenset({"/health", "/"})
"""Paths answered without credentials."""


def basic_auth_ok(header: str | None, user: str, password: str) -> bool:
    """Whether an ``Authorization`` header carries exactly ``user:password`` (constant-time compare)."""
    if not header or not header.lower().startswith("basic "):
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


def needs_auth(path: str, user: str | None, webhook_requires_auth: bool) -> bool:
    """Whether a request to ``path`` must carry Basic auth under these settings."""
    if not user or path in OPEN_PATHS:
        return False
    if path == "/webhook" and not webhook_requires_auth:
        return False
    return True
