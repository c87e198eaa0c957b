"""How an API key authenticates to Label Studio: a legacy token (``Authorization: Token``) or a personal access
token (a JWT refresh token exchanged for 5-minute ``Bearer`` access tokens)."""

from __future__ import annotations

import base64
import json
import threading
import time
from collections.abc import Callable, Mapping
from enum import Enum

from model.errors import ConfigError

__all__ = ["ACCESS_TOKEN_MARGIN_S", "LabelStudioAuth", "Refresher", "TokenKind", "access_expiry", "token_kind"]

#: Renew a JWT access token this many seconds before it expires.
ACCESS_TOKEN_MARGIN_S = 60.0


class TokenKind(str, Enum):
    """How an API key authenticates."""

    LEGACY = "legacy"  # Authorization: Token <key>
    PERSONAL_ACCESS = "personal_access"  # JWT refresh token -> Authorization: Bearer <access>


def _jwt_claims(token: str) -> dict | None:
    """The unverified claims of a JWT, or None when ``token`` is not one."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, json.JSONDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def token_kind(api_key: str) -> TokenKind:
    """Whether ``api_key`` is a legacy token or a personal access (JWT refresh) token.

    Raises:
        ConfigError: a JWT that is not a refresh token, or one that has expired.
    """
    claims = _jwt_claims(api_key)
    if claims is None:
        return TokenKind.LEGACY
    if claims.get("token_type") != "refresh":
        raise ConfigError(
            f"The Label Studio API key is a JWT of type {claims.get('token_type')!r}; use a personal access "
            "token (Account & Settings > Personal Access Token) or a legacy token in LABEL_STUDIO_API_KEY."
        )
    if float(claims.get("exp", 0)) <= time.time():
        raise ConfigError(
            "The Label Studio personal access token in LABEL_STUDIO_API_KEY has expired; create a new one "
            "under Account & Settings > Personal Access Token."
        )
    return TokenKind.PERSONAL_ACCESS


Refresher = Callable[[str], tuple[str, float]]
"""``refresh token -> (access token, expiry as Unix time)``: one call to ``POST /api/token/refresh/``."""


class LabelStudioAuth:
    """The headers that authenticate to one Label Studio, given on demand (the gate asks on every request).

    A legacy token is sent as ``Authorization: Token <key>``. A personal access token (a JWT refresh token) is
    exchanged for a 5-minute access token, sent as ``Authorization: Bearer <access>`` and renewed
    :data:`ACCESS_TOKEN_MARGIN_S` before it expires, and again when Label Studio refuses it (the outbound gate calls
    :meth:`invalidate` and retries once) — so a long image sync or task pull keeps working.

    Args:
        api_key: the legacy token or personal access token.
        refresh: exchanges the refresh token (used for personal access tokens only).

    Raises:
        ConfigError: an empty key, or an unusable JWT.
    """

    def __init__(self, api_key: str, refresh: Refresher) -> None:
        key = str(api_key or "").strip()
        if not key:
            raise ConfigError("No Label Studio API key; set LABEL_STUDIO_API_KEY (legacy token or personal access token).")
        self._key = key
        self.kind = token_kind(key)
        self._refresh = refresh
        self._lock = threading.Lock()
        self._access: str | None = None
        self._expires = 0.0

    def __repr__(self) -> str:  # never print the key
        return f"LabelStudioAuth(kind={self.kind.value})"

    def headers(self) -> dict[str, str]:
        """``{"Authorization": ...}`` for the next request."""
        if self.kind is TokenKind.LEGACY:
            return {"Authorization": f"Token {self._key}"}
        return {"Authorization": f"Bearer {self._access_token()}"}

    def invalidate(self, rejected: Mapping[str, str]) -> bool:
        """Label Studio refused the request sent with the headers ``rejected`` (401): forget that access token (unless
        another thread renewed it meanwhile); True when a retry may help (a personal access token)."""
        if self.kind is not TokenKind.PERSONAL_ACCESS:
            return False
        with self._lock:
            if self._access is not None and rejected.get("Authorization") == f"Bearer {self._access}":
                self._access = None
        return True

    def _access_token(self) -> str:
        with self._lock:
            if self._access is None or time.time() >= self._expires - ACCESS_TOKEN_MARGIN_S:
                self._access, self._expires = self._refresh(self._key)
            return self._access


def access_expiry(access: str) -> float:
    """The expiry (Unix time) of a JWT access token; five minutes from now when it carries none."""
    claims = _jwt_claims(access) or {}
    return float(claims.get("exp", time.time() + 300))
