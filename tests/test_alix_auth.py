"""The Alix adapter's authentication (runner.providers.alix_auth): the partner signature,
credentials from the environment, and the access token obtained, refreshed and shared.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from runner.errors import (
    AuthenticationFailed,
    ConfigError,
)
from runner.logs import scrub_secrets
from runner.providers.alix_auth import AlixCredentials, sign
from runner.providers.base import (
    Applied,
)
from tests.alix_fake import (
    CARD,
    EMAIL,
    HUNDRED,
    LIFETIME,
    PARTNER,
    SECRET,
    Keys,
    alix,
    credentials,
    events,
    make_keys,
    signature_of,
    verifies,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield cast("list[dict[str, Any]]", captured)  # structlog's event dicts


# -- signatures -----------------------------------------------------------------------------


def test_signature_verifies_with_the_public_key(keys: Keys) -> None:
    """The partner signature is PKCS#1 v1.5 SHA-256 over `partnerCode|secretKey`, base64."""
    signature = sign(PARTNER, SECRET, keys.private_pem)
    assert verifies(keys.public_pem, f"{PARTNER}|{SECRET}", signature)


def test_signature_covers_exactly_partner_bar_secret(keys: Keys) -> None:
    """The signature does not verify over any other text or with another key."""
    signature = sign(PARTNER, SECRET, keys.private_pem)
    assert not verifies(keys.public_pem, f"{PARTNER}{SECRET}", signature)
    assert not verifies(keys.public_pem, f"{SECRET}|{PARTNER}", signature)
    assert not verifies(keys.other_public_pem, f"{PARTNER}|{SECRET}", signature)


def test_signature_round_trips_with_the_library_verifier(keys: Keys) -> None:
    """Signing is deterministic, so the same credentials always give the same signature."""
    assert sign(PARTNER, SECRET, keys.private_pem) == signature_of(
        keys.private_pem, f"{PARTNER}|{SECRET}"
    )


def test_sign_refuses_a_key_that_is_not_rsa() -> None:
    """An EC key is a configuration error, named as such."""
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    with pytest.raises(ConfigError, match="not an RSA private key"):
        sign(PARTNER, SECRET, pem)


# -- credentials ----------------------------------------------------------------------------


def env_with(tmp_path: Path, keys: Keys, **override: str) -> dict[str, str]:
    private = tmp_path / "partner.pem"
    public = tmp_path / "alix-webhook.pem"
    private.write_bytes(keys.private_pem)
    public.write_bytes(keys.other_public_pem)
    env = {
        "ALIX_PARTNER_CODE": PARTNER,
        "ALIX_SECRET_KEY": SECRET,
        "ALIX_PRIVATE_KEY_FILE": str(private),
        "ALIX_USER_EMAIL": EMAIL,
        "ALIX_WEBHOOK_PUBLIC_KEY_FILE": str(public),
    }
    env.update(override)
    return {k: v for k, v in env.items() if v != "<unset>"}


def test_credentials_from_env(tmp_path: Path, keys: Keys) -> None:
    """Every variable is read, and the PEM files are loaded as bytes."""
    creds = AlixCredentials.from_env(env_with(tmp_path, keys), require_webhook_key=True)
    assert creds.partner_code == PARTNER
    assert creds.secret_key == SECRET
    assert creds.private_key_pem == keys.private_pem
    assert creds.user_email == EMAIL
    assert creds.webhook_public_key_pem == keys.other_public_pem


def test_credentials_repr_hides_the_secrets(tmp_path: Path, keys: Keys) -> None:
    """Neither the secret key nor any key material appears in the repr."""
    text = repr(AlixCredentials.from_env(env_with(tmp_path, keys)))
    assert SECRET not in text
    assert "PRIVATE KEY" not in text
    assert "PUBLIC KEY" not in text
    assert PARTNER in text


def test_secret_key_is_scrubbed_from_logs_once_read(tmp_path: Path, keys: Keys) -> None:
    """Reading the credentials registers the secret key with the log scrubber."""
    AlixCredentials.from_env(env_with(tmp_path, keys))
    event = scrub_secrets(None, "info", {"event": "x", "detail": f"key={SECRET}"})
    assert SECRET not in event["detail"]


@pytest.mark.parametrize(
    "name",
    ["ALIX_PARTNER_CODE", "ALIX_SECRET_KEY", "ALIX_PRIVATE_KEY_FILE", "ALIX_USER_EMAIL"],
)
@pytest.mark.parametrize("value", ["<unset>", "  "])
def test_missing_variable_is_named(tmp_path: Path, keys: Keys, name: str, value: str) -> None:
    """A required variable unset or blank is a ConfigError naming it."""
    with pytest.raises(ConfigError, match=f"^{name} is not set"):
        AlixCredentials.from_env(env_with(tmp_path, keys, **{name: value}))


def test_webhook_key_is_optional_for_run(tmp_path: Path, keys: Keys) -> None:
    """Without ALIX_WEBHOOK_PUBLIC_KEY_FILE, `run` credentials load without a webhook key."""
    env = env_with(tmp_path, keys, ALIX_WEBHOOK_PUBLIC_KEY_FILE="<unset>")
    assert AlixCredentials.from_env(env).webhook_public_key_pem is None


def test_webhook_key_is_required_for_webhook(tmp_path: Path, keys: Keys) -> None:
    """`webhook` needs the public key: its absence is named."""
    env = env_with(tmp_path, keys, ALIX_WEBHOOK_PUBLIC_KEY_FILE="<unset>")
    with pytest.raises(ConfigError, match=r"^ALIX_WEBHOOK_PUBLIC_KEY_FILE is not set"):
        AlixCredentials.from_env(env, require_webhook_key=True)


def test_unreadable_private_key_file_is_named(tmp_path: Path, keys: Keys) -> None:
    """A path that cannot be read names the variable and the path."""
    missing = str(tmp_path / "nowhere.pem")
    with pytest.raises(ConfigError, match=f"^ALIX_PRIVATE_KEY_FILE: cannot read {missing}"):
        AlixCredentials.from_env(env_with(tmp_path, keys, ALIX_PRIVATE_KEY_FILE=missing))


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a key at all", "is not a PEM private key"),
        (b"", "is not a PEM private key"),
        ("public", "is not a PEM private key"),
        ("encrypted", "is encrypted with a passphrase"),
        ("ec", "not an RSA private key"),
    ],
)
def test_invalid_private_key_file_is_named(
    tmp_path: Path, keys: Keys, content: bytes | str, reason: str
) -> None:
    """A file that is not an unencrypted RSA private key PEM names the variable and why."""
    if content == "public":
        data = keys.public_pem
    elif content == "encrypted":
        key = serialization.load_pem_private_key(keys.private_pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        data = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"passphrase"),
        )
    elif content == "ec":
        data = ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    else:
        assert isinstance(content, bytes)
        data = content
    path = tmp_path / "bad.pem"
    path.write_bytes(data)
    with pytest.raises(ConfigError, match=f"^ALIX_PRIVATE_KEY_FILE: .*{reason}") as info:
        AlixCredentials.from_env(env_with(tmp_path, keys, ALIX_PRIVATE_KEY_FILE=str(path)))
    assert "\n" not in str(info.value)


def test_invalid_webhook_key_file_is_named(tmp_path: Path, keys: Keys) -> None:
    """A webhook key file holding a private key (not a public one) is named."""
    path = tmp_path / "wrong.pem"
    path.write_bytes(keys.private_pem)
    env = env_with(tmp_path, keys, ALIX_WEBHOOK_PUBLIC_KEY_FILE=str(path))
    with pytest.raises(ConfigError, match=r"^ALIX_WEBHOOK_PUBLIC_KEY_FILE: .*not a PEM public key"):
        AlixCredentials.from_env(env, require_webhook_key=True)


def test_email_without_at_sign_is_refused(tmp_path: Path, keys: Keys) -> None:
    """ALIX_USER_EMAIL must look like an e-mail address."""
    with pytest.raises(ConfigError, match=r"^ALIX_USER_EMAIL"):
        AlixCredentials.from_env(env_with(tmp_path, keys, ALIX_USER_EMAIL="ops"))


# -- tokens ---------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_first_request_obtains_a_token_and_carries_it(keys: Keys) -> None:
    """The first call obtains a token; every topup carries it in `access-token`."""
    async with alix(keys) as (fake, provider, _):
        await provider.topup(CARD, HUNDRED)
        await provider.topup(CARD, HUNDRED)
    assert (fake.issued, fake.refreshed) == (1, 0)
    assert (provider.tokens.issued, provider.tokens.refreshed) == (1, 0)
    assert fake.topup_tokens == [fake.every_token[0]] * 2


@pytest.mark.anyio
async def test_token_is_refreshed_shortly_before_it_expires(keys: Keys) -> None:
    """Near its expiry the token is refreshed before sending; no request meets a 401."""
    async with alix(keys) as (fake, provider, clock):
        await provider.topup(CARD, HUNDRED)
        clock.advance(LIFETIME - 13)  # not yet within the margin
        await provider.topup(CARD, HUNDRED)
        assert fake.refreshed == 0
        clock.advance(2)  # within 12 s of the expiry, still valid at the server
        await provider.topup(CARD, HUNDRED)
    assert (fake.issued, fake.refreshed, fake.unauthorized) == (1, 1, 0)
    assert provider.tokens.refreshed == 1
    assert fake.topup_tokens[2] == fake.every_token[2]


@pytest.mark.anyio
async def test_never_reacquired_while_refresh_works(keys: Keys) -> None:
    """Token after token expires; each is refreshed, none is obtained anew."""
    async with alix(keys) as (fake, provider, clock):
        for _ in range(5):
            await provider.topup(CARD, HUNDRED)
            clock.advance(LIFETIME + 1)
        await provider.topup(CARD, HUNDRED)
    assert (fake.issued, fake.refreshed, fake.unauthorized) == (1, 5, 0)
    assert (provider.tokens.issued, provider.tokens.refreshed) == (1, 5)


@pytest.mark.anyio
async def test_401_mid_run_refreshes_and_sends_again_once(keys: Keys) -> None:
    """A token Alix stopped accepting is refreshed and the topup sent again, once."""
    async with alix(keys) as (fake, provider, _):
        await provider.topup(CARD, HUNDRED)
        fake.revoke_access()
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Applied)
    assert (fake.issued, fake.refreshed, fake.unauthorized) == (1, 1, 1)
    assert len(fake.topup_bodies) == 2  # the refused request never reached the handler's record
    assert len(fake.transactions[CARD]) == 2


@pytest.mark.anyio
async def test_second_401_after_renewal_is_authentication_failed(keys: Keys) -> None:
    """A freshly renewed token refused too blames the credentials, without leaking tokens."""
    async with alix(keys) as (fake, provider, _):
        await provider.topup(CARD, HUNDRED)
        fake.reject_all = True
        with pytest.raises(AuthenticationFailed) as info:
            await provider.topup(CARD, HUNDRED)
    assert fake.refreshed == 1
    assert fake.unauthorized == 2
    assert not any(token in str(info.value) for token in fake.every_token)


@pytest.mark.anyio
async def test_refused_access_token_call_is_authentication_failed(keys: Keys) -> None:
    """Wrong credentials: the access-token call is refused and the run cannot go on."""
    async with alix(keys, secret="wrong-secret") as (fake, provider, _):
        with pytest.raises(AuthenticationFailed, match="ALIX_SECRET_KEY") as info:
            await provider.topup(CARD, HUNDRED)
    assert fake.topup_bodies == []
    assert "wrong-secret" not in str(info.value)


@pytest.mark.anyio
async def test_one_refresh_for_twenty_callers_on_an_expired_token(keys: Keys) -> None:
    """Twenty topups meeting an expired token wait for one refresh, then all go."""
    outcomes: list[Any] = []
    async with alix(keys, refresh_delay=0.05) as (fake, provider, clock):
        await provider.tokens.current()
        clock.advance(LIFETIME + 1)

        async def one(i: int) -> None:
            outcomes.append(await provider.topup(f"card-{i:02d}", HUNDRED))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
    assert (fake.issued, fake.refreshed, fake.unauthorized) == (1, 1, 0)
    assert (provider.tokens.issued, provider.tokens.refreshed) == (1, 1)
    assert len(outcomes) == 20
    assert all(isinstance(o, Applied) for o in outcomes)


@pytest.mark.anyio
async def test_one_refresh_for_twenty_callers_refused_with_the_same_token(keys: Keys) -> None:
    """Twenty 401s for one old token cause one refresh: later callers see it was renewed."""
    outcomes: list[Any] = []
    async with alix(keys, refresh_delay=0.05) as (fake, provider, _):
        await provider.tokens.current()
        fake.revoke_access()

        async def one(i: int) -> None:
            outcomes.append(await provider.topup(f"card-{i:02d}", HUNDRED))

        async with anyio.create_task_group() as tg:
            for i in range(20):
                tg.start_soon(one, i)
    assert (fake.issued, fake.refreshed) == (1, 1)
    assert fake.unauthorized == 20
    assert len(outcomes) == 20
    assert all(isinstance(o, Applied) for o in outcomes)


@pytest.mark.anyio
async def test_refused_refresh_falls_back_to_a_new_token_once_loudly(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """When the refresh itself is refused, a new token is obtained once and logged as an error."""
    async with alix(keys) as (fake, provider, clock):
        await provider.topup(CARD, HUNDRED)
        fake.refuse_refresh = True
        clock.advance(LIFETIME + 1)
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Applied)
    assert (fake.issued, fake.refreshed) == (2, 0)
    assert (provider.tokens.issued, provider.tokens.refreshed) == (2, 0)
    [event] = events(logs, "alix.token.reacquired")
    assert event["log_level"] == "error"


@pytest.mark.anyio
async def test_refused_refresh_and_refused_reacquire_is_authentication_failed(keys: Keys) -> None:
    """If obtaining a new token is refused too, the credentials are at fault."""
    async with alix(keys) as (fake, provider, clock):
        await provider.topup(CARD, HUNDRED)
        fake.refuse_refresh = fake.refuse_access = True
        clock.advance(LIFETIME + 1)
        with pytest.raises(AuthenticationFailed):
            await provider.topup(CARD, HUNDRED)


@pytest.mark.anyio
async def test_token_without_lifetime_is_refreshed_on_401_only(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """No expiresIn: no proactive refresh (logged), and a 401 still renews it."""
    async with alix(keys, lifetime=None) as (fake, provider, clock):
        await provider.topup(CARD, HUNDRED)
        clock.advance(10**6)
        await provider.topup(CARD, HUNDRED)
        assert fake.refreshed == 0
        fake.revoke_access()
        await provider.topup(CARD, HUNDRED)
    assert (fake.issued, fake.refreshed) == (1, 1)
    assert events(logs, "alix.token.lifetime_unknown")


@pytest.mark.anyio
async def test_tokens_and_secrets_never_reach_logs_or_reprs(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """Issue, refresh, 401 and re-acquire: no token, secret or signature in any event or repr."""
    async with alix(keys) as (fake, provider, clock):
        await provider.topup(CARD, HUNDRED)
        clock.advance(LIFETIME + 1)
        await provider.topup(CARD, HUNDRED)
        fake.revoke_access()
        await provider.topup(CARD, HUNDRED)
        fake.refuse_refresh = True
        clock.advance(LIFETIME + 1)
        await provider.topup(CARD, HUNDRED)
        shown = repr(provider) + repr(provider.tokens) + repr(credentials(keys))
    secrets = [*fake.every_token, SECRET, sign(PARTNER, SECRET, keys.private_pem)]
    text = json.dumps(logs, default=str) + shown
    assert logs
    assert not [s for s in secrets if s in text]
