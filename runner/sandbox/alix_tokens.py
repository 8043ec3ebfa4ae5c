"""The simulated Alix partner auth: access and refresh tokens issued to a partner whose
signature checks out, refreshed once each, expiring on the injected clock.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass

from runner.sandbox.alix_records import AlixCounters, AuthFailure, Tokens, partner_message
from runner.sandbox.config import AlixConfig
from runner.sandbox.signing import load_public_key, verify


@dataclass(slots=True)
class _RefreshGrant:
    expires_at: float
    access_token: str


class AlixTokens:
    """The tokens the account has issued; every refusal is reported to `on_refused` (a 401)."""

    def __init__(
        self,
        config: AlixConfig,
        counters: AlixCounters,
        *,
        now: Callable[[], float],
        on_refused: Callable[[AuthFailure], None],
    ) -> None:
        self.config = config
        self.counters = counters
        self.now = now
        self.note_unauthorized = on_refused
        self._partner_key = load_public_key("partner_public_key_pem", config.partner_public_key_pem)
        self._access: dict[str, float] = {}  # access token -> when it expires
        self._refresh: dict[str, _RefreshGrant] = {}

    def issue(self, partner_code: str, user_email: str, signature: object) -> Tokens | None:
        """New tokens for a partner whose credentials check out; None (a 401) otherwise."""
        if not (
            secrets.compare_digest(partner_code.encode(), self.config.partner_code.encode())
            and secrets.compare_digest(user_email.encode(), self.config.user_email.encode())
            and self._signed_by_partner(signature)
        ):
            self.note_unauthorized(AuthFailure.BAD_CREDENTIALS)
            return None
        self.counters.access_tokens_issued += 1
        return self._grant()

    def refresh(
        self, partner_code: str, refresh_token: str, signature: object
    ) -> Tokens | AuthFailure:
        """New tokens in exchange for `refresh_token`, which is spent with its access token."""
        if not (
            secrets.compare_digest(partner_code.encode(), self.config.partner_code.encode())
            and self._signed_by_partner(signature)
        ):
            self.note_unauthorized(AuthFailure.BAD_CREDENTIALS)
            return AuthFailure.BAD_CREDENTIALS
        grant = self._refresh.pop(refresh_token, None)
        if grant is None:
            self.note_unauthorized(AuthFailure.UNKNOWN_TOKEN)
            return AuthFailure.UNKNOWN_TOKEN
        self._access.pop(grant.access_token, None)
        if self.now() >= grant.expires_at:
            self.note_unauthorized(AuthFailure.EXPIRED_TOKEN)
            return AuthFailure.EXPIRED_TOKEN
        self.counters.refreshes += 1
        return self._grant()

    def check(self, token: str | None) -> AuthFailure | None:
        """None when `token` is a live access token; otherwise why not (counted as a 401)."""
        expires_at = None if token is None else self._access.get(token)
        if expires_at is None:
            failure = AuthFailure.UNKNOWN_TOKEN
        elif self.now() >= expires_at:
            failure = AuthFailure.EXPIRED_TOKEN
        else:
            return None
        self.note_unauthorized(failure)
        return failure

    def _signed_by_partner(self, signature: object) -> bool:
        message = partner_message(self.config.partner_code, self.config.secret_key)
        return verify(self._partner_key, message, signature)

    def _grant(self) -> Tokens:
        now = self.now()
        access, refresh = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        self._access[access] = now + self.config.access_token_ttl
        self._refresh[refresh] = _RefreshGrant(now + self.config.refresh_token_ttl, access)
        return Tokens(access, refresh, self.config.access_token_ttl)
