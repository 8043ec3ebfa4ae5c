"""Alix Pay authentication: the partner signature, credentials from the environment, and an
access token kept alive by refreshing it (never re-issuing it) with one refresh at a time.
"""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import structlog
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from runner.errors import AuthenticationFailed, ConfigError, ProviderError
from runner.logs import register_secret
from runner.money import parse_provider_decimal
from runner.providers.http import (
    AnswerTooLarge,
    HttpAnswer,
    loads_exact,
    parse_retry_after,
    transport_message,
)

log = structlog.get_logger("runner.providers.alix")

# -- ASSUMPTIONS (docs/providers.md, "Alix: the assumptions ..."): change them here only ----

# ASSUMPTION "Access token": the endpoint's page is not public. Its path is guessed after the
# documented refresh call; its body and answer are in `access_token_body()` and `parse_grant()`.
ACCESS_TOKEN_PATH = "/auth/access-token"
# Documented: POST /api/v2/auth/refresh-token {"partnerCode", "refreshToken", "signature"}.
REFRESH_TOKEN_PATH = "/auth/refresh-token"


def access_token_body(partner_code: str, user_email: str, signature: str) -> dict[str, str]:
    """ASSUMPTION "Access token": the body, signed as the refresh call is."""
    return {"partnerCode": partner_code, "userEmail": user_email, "signature": signature}


def refresh_token_body(partner_code: str, refresh_token: str, signature: str) -> dict[str, str]:
    """The documented refresh body."""
    return {"partnerCode": partner_code, "refreshToken": refresh_token, "signature": signature}


def token_rejected(status: int) -> bool:
    """ASSUMPTION "Access token": an expired or unknown access token gets HTTP 401."""
    return status == 401


@dataclass(frozen=True, slots=True)
class Grant:
    """What the access-token and refresh calls answer; tokens never shown."""

    access_token: str = field(repr=False)
    refresh_token: str | None = field(repr=False)
    expires_in: Decimal | None  # seconds; None when the answer did not say


# The access token is sent as a header: printable ASCII without blanks, so that nothing in it
# can end the header or inject another (aiohttp would refuse it at every request).
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")


def parse_grant(data: Any) -> Grant:
    """ASSUMPTION "Access token": `data {accessToken, refreshToken, expiresIn (seconds)}`, and the
    refresh call answers the same shape. Raises ValueError when the answer holds no token."""
    if not isinstance(data, Mapping):
        raise ValueError("the answer has no data object")
    access = data.get("accessToken")
    if not isinstance(access, str) or not access.strip():
        raise ValueError("the answer has no accessToken")
    if not _HEADER_SAFE.fullmatch(access):
        # Never quoted: it is a secret, whatever is wrong with it.
        raise ValueError("the answer's accessToken holds characters a header cannot carry")
    refresh = data.get("refreshToken")
    refresh = refresh if isinstance(refresh, str) and refresh.strip() else None
    try:
        expires_in: Decimal | None = parse_provider_decimal(data.get("expiresIn"))
    except ValueError:
        expires_in = None
    if expires_in is not None and expires_in <= 0:
        expires_in = None
    return Grant(access, refresh, expires_in)


# Refresh this long before the token runs out, so a request sent just before the expiry does
# not arrive after it; at most a fifth of the lifetime, since sandbox tokens live seconds.
REFRESH_MARGIN_S = 30.0
REFRESH_MARGIN_FRACTION = 0.2

# -- signature and credentials ---------------------------------------------------------------


def _private_key(private_key_pem: bytes) -> rsa.RSAPrivateKey:
    """The RSA private key of a PEM; ValueError with a reason that quotes nothing of it."""
    try:
        key = serialization.load_pem_private_key(private_key_pem, password=None)
    except TypeError:
        raise ValueError("is encrypted with a passphrase: store it unencrypted") from None
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("is not a PEM private key") from None
    if not isinstance(key, rsa.RSAPrivateKey):
        raise ValueError(f"holds a {type(key).__name__.lstrip('_')}, not an RSA private key")
    return key


def _public_key(public_key_pem: bytes) -> rsa.RSAPublicKey:
    try:
        key = serialization.load_pem_public_key(public_key_pem)
    except (ValueError, UnsupportedAlgorithm):
        raise ValueError("is not a PEM public key") from None
    if not isinstance(key, rsa.RSAPublicKey):
        raise ValueError(f"holds a {type(key).__name__.lstrip('_')}, not an RSA public key")
    return key


def sign(partner_code: str, secret_key: str, private_key_pem: bytes) -> str:
    """Base64 of the RSA PKCS#1 v1.5 SHA-256 signature over UTF-8 `partnerCode|secretKey`."""
    try:
        key = _private_key(private_key_pem)
    except ValueError as exc:
        raise ConfigError(f"the Alix private key {exc}") from None
    message = f"{partner_code}|{secret_key}".encode()
    return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode("ascii")


def verify_signature(message: bytes, signature: bytes, public_key: rsa.RSAPublicKey) -> bool:
    """Whether `signature` is an RSA PKCS#1 v1.5 SHA-256 signature of `message` by the key."""
    try:
        public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256())
    except InvalidSignature:
        return False
    return True


def load_public_key(public_key_pem: bytes) -> rsa.RSAPublicKey:
    """The RSA public key of a PEM; ConfigError otherwise."""
    try:
        return _public_key(public_key_pem)
    except ValueError as exc:
        raise ConfigError(f"the Alix webhook public key {exc}") from None


@dataclass(frozen=True, slots=True, repr=False)
class AlixCredentials:
    """The partner's secrets, read once from the environment; the repr shows none of them."""

    partner_code: str
    secret_key: str
    private_key_pem: bytes
    user_email: str
    webhook_public_key_pem: bytes | None = None

    def __repr__(self) -> str:
        webhook = "set" if self.webhook_public_key_pem is not None else "unset"
        return (
            f"AlixCredentials(partner_code={self.partner_code!r}, "
            f"user_email={self.user_email!r}, secret_key=<hidden>, private_key=<hidden>, "
            f"webhook_public_key=<{webhook}>)"
        )

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, require_webhook_key: bool = False
    ) -> AlixCredentials:
        """Read and check every variable; ConfigError names the first one missing or invalid."""
        partner_code = _required(env, "ALIX_PARTNER_CODE", "the partner code from onboarding")
        secret_key = _required(env, "ALIX_SECRET_KEY", "the secret key from onboarding")
        register_secret(secret_key)
        if "|" in partner_code:
            # The signed text is `partnerCode|secretKey`: a bar here would make it ambiguous.
            raise ConfigError("ALIX_PARTNER_CODE must not contain '|'")
        private_pem = _pem_file(env, "ALIX_PRIVATE_KEY_FILE", _private_key, "private key")
        user_email = _required(env, "ALIX_USER_EMAIL", "the e-mail of the Alix user")
        if "@" not in user_email:
            raise ConfigError("ALIX_USER_EMAIL is not an e-mail address")
        webhook_pem: bytes | None = None
        if require_webhook_key or env.get("ALIX_WEBHOOK_PUBLIC_KEY_FILE", "").strip():
            webhook_pem = _pem_file(
                env, "ALIX_WEBHOOK_PUBLIC_KEY_FILE", _public_key, "webhook public key"
            )
        return cls(partner_code, secret_key, private_pem, user_email, webhook_pem)


def _required(env: Mapping[str, str], name: str, what: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise ConfigError(f"{name} is not set: export {what} to use Alix")
    return value


def _pem_file(
    env: Mapping[str, str], name: str, check: Callable[[bytes], object], what: str
) -> bytes:
    path = _required(env, name, f"the path of the PEM file with the {what}")
    try:
        pem = Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read {path}: {exc.strerror or exc}") from None
    try:
        check(pem)
    except ValueError as exc:
        raise ConfigError(f"{name}: {path} {exc}") from None
    return pem


# -- the token manager -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AccessToken:
    """One access token as handed to a request; `generation` tells renewals apart."""

    value: str = field(repr=False)
    generation: int


@dataclass(frozen=True, slots=True)
class _Held:
    token: AccessToken
    refresh_token: str | None = field(repr=False)
    refresh_at: float  # on the manager's clock; inf when the lifetime is not known


class _Refused(Exception):
    """The auth endpoint said no (as opposed to not answering)."""


# POST a JSON body to a path under the API root, no access token; may raise aiohttp errors.
AuthSender = Callable[[str, str], Awaitable[HttpAnswer]]

_AUTH_ATTEMPTS = 3


class TokenManager:
    """The one access token every request carries, renewed by one caller while others wait.

    The first request obtains a token; afterwards it is refreshed shortly before it expires or
    when Alix answers 401, as the docs demand. Only when the refresh itself is refused is a new
    token obtained, once, and logged loudly. `issued` and `refreshed` count the two calls.
    """

    def __init__(
        self,
        credentials: AlixCredentials,
        send: AuthSender,
        *,
        clock: Callable[[], float] = time.monotonic,
        retry_delay: float = 0.2,
    ) -> None:
        self._credentials = credentials
        self._send = send
        self._clock = clock
        self._retry_delay = retry_delay
        # PKCS#1 v1.5 is deterministic: the signature never changes, and it is as good as a
        # password to anyone who sees it, so it is computed once and kept out of every log.
        self._signature = sign(
            credentials.partner_code, credentials.secret_key, credentials.private_key_pem
        )
        register_secret(self._signature)
        self._lock = anyio.Lock()
        self._held: _Held | None = None
        self._generation = 0
        self.issued = 0
        self.refreshed = 0

    def __repr__(self) -> str:
        return f"TokenManager(issued={self.issued}, refreshed={self.refreshed})"

    async def current(self) -> AccessToken:
        """A token to send now: the held one, or a renewed one when it is due."""
        held = self._held
        if held is not None and self._clock() < held.refresh_at:
            return held.token
        async with self._lock:
            held = self._held
            # Whoever held the lock before us may already have renewed it.
            if held is not None and self._clock() < held.refresh_at:
                return held.token
            return await self._renew()

    async def after_rejection(self, rejected: AccessToken) -> AccessToken:
        """A token to replace one Alix answered 401 to; renewed only if nobody did since."""
        async with self._lock:
            held = self._held
            if held is not None and held.token.generation != rejected.generation:
                return held.token
            return await self._renew()

    def is_current(self, token: AccessToken) -> bool:
        """Whether `token` is the one held now (a 401 for it cannot be blamed on a renewal)."""
        return self._held is not None and self._held.token.generation == token.generation

    async def _renew(self) -> AccessToken:
        """Refresh if a refresh token exists, else obtain one. Called with the lock held."""
        held = self._held
        started = self._clock()
        if held is not None and held.refresh_token is not None:
            body = refresh_token_body(
                self._credentials.partner_code, held.refresh_token, self._signature
            )
            try:
                grant = await self._call(REFRESH_TOKEN_PATH, body)
            except _Refused as exc:
                # The docs forbid a brand-new token while refreshing works; it did not.
                log.error("alix.token.reacquired", reason=str(exc), generation=self._generation)
                grant = await self._obtain()
            else:
                self.refreshed += 1
                log.info("alix.token.refreshed", generation=self._generation + 1)
        else:
            grant = await self._obtain()
        register_secret(grant.access_token)
        register_secret(grant.refresh_token)
        refresh_token = grant.refresh_token
        if refresh_token is None and held is not None:
            refresh_token = held.refresh_token  # a refresh answer may omit an unchanged one
        self._generation += 1
        token = AccessToken(grant.access_token, self._generation)
        self._held = _Held(token, refresh_token, self._refresh_at(started, grant.expires_in))
        return token

    def _refresh_at(self, started: float, expires_in: Decimal | None) -> float:
        if expires_in is None:
            log.warning("alix.token.lifetime_unknown")
            return float("inf")  # renewed on the first 401 only
        lifetime = float(expires_in)
        # Counted from before the request was sent: the token may have been made any time after.
        return started + lifetime - min(REFRESH_MARGIN_S, lifetime * REFRESH_MARGIN_FRACTION)

    async def _obtain(self) -> Grant:
        body = access_token_body(
            self._credentials.partner_code, self._credentials.user_email, self._signature
        )
        try:
            grant = await self._call(ACCESS_TOKEN_PATH, body)
        except _Refused as exc:
            raise AuthenticationFailed(
                f"Alix refused the access-token request ({exc}): check ALIX_PARTNER_CODE, "
                "ALIX_SECRET_KEY, ALIX_PRIVATE_KEY_FILE and ALIX_USER_EMAIL"
            ) from None
        self.issued += 1
        log.info("alix.token.issued", generation=self._generation + 1)
        return grant

    async def _call(self, path: str, body: Mapping[str, str]) -> Grant:
        """POST to an auth endpoint: a Grant, `_Refused`, or ProviderError once retries run out.

        Asking for a token moves no money, so every failure that is not a refusal is retried,
        except those that would recur: an answer too large, a request aiohttp will not send.
        """
        text = json.dumps(body)
        last = ""
        for attempt in range(1, _AUTH_ATTEMPTS + 1):
            wait = self._retry_delay * 2 ** (attempt - 1)
            try:
                answer = await self._send(path, text)
            except AnswerTooLarge as exc:
                raise ProviderError(f"Alix POST {path}: {exc}") from None
            except (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError) as exc:
                raise ProviderError(f"Alix POST {path}: {transport_message(exc)}") from None
            except aiohttp.ClientError as exc:
                last = type(exc).__name__
            except TimeoutError:
                last = "no answer before the timeout"
            except ValueError as exc:
                raise ProviderError(f"Alix POST {path}: {type(exc).__name__}") from None
            else:
                try:
                    payload = loads_exact(answer.body)
                except ValueError:
                    payload = None
                status = answer.status
                said = f"HTTP {status}"
                if message := self._redact(envelope_message(payload)):
                    said = f"{said}: {message}"
                if status == 429:
                    after = parse_retry_after(answer.retry_after)
                    wait = wait if after is None else after
                    last = said
                elif status == 408 or status >= 500:
                    last = said
                elif 400 <= status < 500:
                    raise _Refused(said)
                elif not isinstance(payload, Mapping):
                    last = f"HTTP {status} with a body that is not a JSON envelope"
                elif payload.get("success") is not True:
                    raise _Refused(said)
                else:
                    try:
                        return parse_grant(payload.get("data"))
                    except ValueError as exc:
                        raise ProviderError(f"Alix POST {path}: {exc}") from None
            if attempt < _AUTH_ATTEMPTS:
                await anyio.sleep(wait)
        raise ProviderError(f"Alix POST {path} failed {_AUTH_ATTEMPTS} times: {last}")

    def _redact(self, text: str) -> str:
        """`text` without any secret we hold, for messages that leave this class."""
        held = self._held
        for secret in (
            self._credentials.secret_key,
            self._signature,
            held.token.value if held else None,
            held.refresh_token if held else None,
        ):
            if secret:
                text = text.replace(secret, "[redacted]")
        return text


def envelope_message(payload: Any) -> str:
    """The envelope's message and errorCode, for a one-line explanation."""
    if not isinstance(payload, Mapping):
        return ""
    message = " ".join(str(payload.get("message") or "").split())[:200]
    code = payload.get("errorCode")
    if code not in (None, 0):
        message = f"{message} (errorCode {code})" if message else f"errorCode {code}"
    return message
