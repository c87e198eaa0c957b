"""How an API key authenticates to Label Studio: a legacy token (``Authorization: Token``) or a personal access
token (a JWT refresh token exchanged for 5-minute ``Bearer`` access tokens)."""

from __future__ import annotations

import base64
import json
import time
from enum import Enum

from model.errors import ConfigError

__all__ = ["ACCESS_TOKEN_MARGIN_S", "TokenKind", "token_kind"]

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
