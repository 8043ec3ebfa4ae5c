"""The Alix adapter without the sandbox: signatures, credentials, the classification of every
answer, webhook verification, and tokens and topups over real HTTP against a tiny fake Alix.
"""

from __future__ import annotations

import base64
import json
import math
import socket
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any, cast

import anyio
import pytest
import structlog
from aiohttp import web
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from runner.errors import (
    AccessTokenRejected,
    AuthenticationFailed,
    ConfigError,
    NotDocumented,
    ProviderError,
    WebhookRejected,
)
from runner.logs import scrub_secrets
from runner.providers.alix import AlixProvider
from runner.providers.alix_answers import LIST_WINDOW_MARGIN, RULES, classify_topup
from runner.providers.alix_auth import AlixCredentials, sign
from runner.providers.base import (
    Applied,
    NotApplied,
    Outcome,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    StillPending,
    Unknown,
)
from runner.providers.http import HttpAnswer
from runner.webhooks.verify import TopupEvent, verify_topup_webhook
from tests.alix import pem_pair

PARTNER = "PARTNER-7"
SECRET = "s3cr3t-Key-0123456789"
EMAIL = "ops@example.com"
CARD = "3f9c2d4e-5a6b-4c7d-8e9f-0a1b2c3d4e5f"
HUNDRED = Decimal("100.00")
T0 = 1_731_578_091
LIFETIME = 60.0  # seconds; refreshed 12 s early (a fifth of it, under the 30 s cap)


# -- keys -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    private_pem: bytes
    public_pem: bytes
    other_private_pem: bytes
    other_public_pem: bytes


@pytest.fixture(scope="module")
def keys() -> Keys:
    mine = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Keys(*(pem.encode() for key in (mine, other) for pem in pem_pair(key)))


def signature_of(private_pem: bytes, text: str) -> str:
    key = serialization.load_pem_private_key(private_pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return base64.b64encode(key.sign(text.encode(), padding.PKCS1v15(), hashes.SHA256())).decode()


def verifies(public_pem: bytes, text: str, signature: str) -> bool:
    key = serialization.load_pem_public_key(public_pem)
    assert isinstance(key, rsa.RSAPublicKey)
    try:
        key.verify(base64.b64decode(signature), text.encode(), padding.PKCS1v15(), hashes.SHA256())
    except Exception:
        return False
    return True


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


# -- classify_topup -------------------------------------------------------------------------


def answer(status: int, payload: Any, retry_after: str | None = None) -> HttpAnswer:
    body = payload if isinstance(payload, str) else json.dumps(payload)
    return HttpAnswer(status, body, retry_after)


def classify(sent: HttpAnswer, card_id: str = CARD, amount: Decimal = HUNDRED) -> Outcome:
    """The answer's meaning for a topup of 100.00 on CARD, unless told otherwise."""
    return classify_topup(sent, card_id, amount)


def accepted(status: str = "Pending", **data: Any) -> str:
    fields = {
        "type": "TopupCard",
        "fee": 1,
        "amount": 100,
        "balanceBefore": 0,
        "balanceAfter": 0,
        "description": "Topup my card",
        "status": status,
        "createdAt": T0,
    }
    fields.update(data)
    return json.dumps(
        {
            "success": True,
            "message": "Your request has been successful",
            "data": fields,
            "errorCode": 0,
        }
    )


def test_documented_pending_answer_is_applied_pending() -> None:
    """The documented 200 answer is Applied(pending) with fee, balances and createdAt."""
    outcome = classify(answer(200, accepted()))
    assert outcome == Applied(
        fee=Decimal(1),
        card_balance_before=Decimal(0),
        card_balance_after=Decimal(0),
        pending=True,
        provider_ref=str(T0),
    )


def test_settled_at_once_is_applied_not_pending() -> None:
    """status Success in the answer means the topup settled at once."""
    outcome = classify(answer(200, accepted("Success", balanceAfter=100)))
    assert isinstance(outcome, Applied)
    assert outcome.pending is False
    assert outcome.card_balance_after == Decimal(100)


def test_money_in_the_answer_is_exact() -> None:
    """Fractional numbers and numeric strings both parse to exact Decimals."""
    body = '{"success": true, "data": {"status": "Pending", "fee": 1.10, '
    body += '"balanceAfter": "1234.56", "createdAt": 1731578091}}'
    outcome = classify(HttpAnswer(200, body))
    assert isinstance(outcome, Applied)
    assert outcome.fee == Decimal("1.10")
    assert str(outcome.fee) == "1.10"
    assert outcome.card_balance_after == Decimal("1234.56")


def test_failed_status_in_the_answer_is_refused() -> None:
    """status Failed in the answer means nothing was applied."""
    assert classify(answer(200, accepted("Failed"))) == Refused(
        RefusalCode.REJECTED, "Alix answered the topup with status Failed"
    )


def test_unknown_status_in_the_answer_is_unknown_and_named() -> None:
    """An undocumented status is not guessed at: Unknown, naming the value."""
    outcome = classify(answer(200, accepted("Processing")))
    assert isinstance(outcome, Unknown)
    assert "'Processing'" in outcome.message


def test_pending_without_created_at_is_unknown() -> None:
    """A pending topup that nothing could settle is reconciled from the list instead."""
    outcome = classify(answer(200, accepted(createdAt=None)))
    assert isinstance(outcome, Unknown)
    assert "createdAt" in outcome.message


def test_garbage_fee_and_balances_leave_them_unknown() -> None:
    """Unreadable enrichment fields are None; the topup is still applied pending."""
    outcome = classify(answer(200, accepted(fee="abc", balanceAfter=True, balanceBefore=[])))
    assert isinstance(outcome, Applied)
    assert outcome.pending
    assert (outcome.fee, outcome.card_balance_after, outcome.card_balance_before) == (
        None,
        None,
        None,
    )


def test_answer_echoing_another_amount_is_applied_with_a_discrepancy() -> None:
    """An answer echoing 1000 for the 100.00 sent is Applied, but with the discrepancy named."""
    outcome = classify(answer(200, accepted(amount=1000)))
    assert isinstance(outcome, Applied)
    assert outcome.pending
    assert outcome.discrepancy == "the answer's amount is 1000.00, not the 100.00 sent"


@pytest.mark.parametrize("echo", [100, "100", "100.00", 100.0])
def test_answer_echoing_the_amount_in_any_spelling_is_clean(echo: Any) -> None:
    """The amount echoed as a number or a string, with or without cents, is the one sent."""
    outcome = classify(answer(200, accepted(amount=echo)))
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy is None


def test_answer_echoing_an_unreadable_amount_is_a_discrepancy() -> None:
    """An echo that is not an amount does not confirm the amount: a discrepancy."""
    outcome = classify(answer(200, accepted(amount="lots")))
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == "the answer's amount (lots) is not an amount; 100.00 was sent"


def test_answer_naming_another_card_is_applied_with_a_discrepancy() -> None:
    """A `cardId` in the answer that is not the card sent is named as a discrepancy."""
    other = "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"
    outcome = classify(answer(200, accepted(cardId=other)))
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == f"the answer names card {other}, not {CARD}"


@pytest.mark.parametrize("spelling", [CARD.upper(), "{" + CARD + "}", CARD.replace("-", "")])
def test_answer_naming_the_card_in_another_spelling_is_clean(spelling: str) -> None:
    """A UUID re-spelled (case, braces, hyphens) is the same card: no discrepancy."""
    outcome = classify(answer(200, accepted(cardId=spelling)))
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy is None


def test_non_uuid_card_ids_must_match_exactly() -> None:
    """An id that is no UUID is compared as written: another case is another card."""
    outcome = classify(answer(200, accepted(cardId="Card-7")), card_id="card-7")
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == "the answer names card Card-7, not card-7"
    numeric = classify(answer(200, accepted(cardId=7)), card_id="7")
    assert isinstance(numeric, Applied)
    assert numeric.discrepancy is None


@pytest.mark.parametrize(
    ("status", "before", "after", "clean"),
    [
        ("Pending", 0, 0, True),  # the docs' example: not moved yet
        ("Pending", 5, 105, True),
        ("Pending", 5, 55, False),
        ("Pending", 105, 5, False),
        ("Success", 5, 105, True),
        ("Success", 5, 5, False),
        ("Success", 5, 205, False),
    ],
)
def test_balance_pair_must_move_by_the_amount(
    status: str, before: int, after: int, clean: bool
) -> None:
    """Once Success the balances are exactly the amount apart; while Pending, that or 0."""
    outcome = classify(answer(200, accepted(status, balanceBefore=before, balanceAfter=after)))
    assert isinstance(outcome, Applied)
    if clean:
        assert outcome.discrepancy is None
    else:
        moved = Decimal(after - before).quantize(Decimal("0.01"))
        assert outcome.discrepancy == (
            f"the answer's balance went from {before}.00 to {after}.00, a move of {moved}, "
            "not the 100.00 sent"
        )


def test_every_discrepancy_is_named_on_one_line() -> None:
    """Another card and another amount are both named, in one line."""
    other = "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"
    outcome = classify(answer(200, accepted(cardId=other, amount=5)))
    assert isinstance(outcome, Applied)
    assert outcome.discrepancy == (
        f"the answer names card {other}, not {CARD}; "
        "the answer's amount is 5.00, not the 100.00 sent"
    )


@pytest.mark.parametrize(
    "payload",
    [
        {"success": True, "data": None},
        {"success": True},
        {"success": True, "data": "ok"},
        {"message": "ok", "data": {}},
        {"success": "true", "data": {"status": "Pending", "createdAt": T0}},
        [1, 2],
        "<html>proxy</html>",
        "",
    ],
)
def test_unreadable_200_is_unknown(payload: Any) -> None:
    """A 200 that cannot be read may follow an applied topup: Unknown."""
    assert isinstance(classify(answer(200, payload)), Unknown)


def test_success_false_in_200_is_refused_with_message_and_code() -> None:
    """A final refusal inside HTTP 200 (success:false) keeps its message and errorCode."""
    payload = {"success": False, "message": "Card is not active", "data": None, "errorCode": 77}
    assert classify(answer(200, payload)) == Refused(
        RefusalCode.CARD_INACTIVE, "Card is not active (errorCode 77)"
    )


@pytest.mark.parametrize("status", [200, 400, 403, 404, 409, 422])
@pytest.mark.parametrize(
    "message",
    [
        "Card is not eligible",
        "Internal error, please contact support",
        "Transaction processing failed",
        "Topup amount debited, card issuer timed out",
        "Duplicate request",
        "Daily limit exceeded",
    ],
)
def test_refusal_not_known_to_be_final_is_unknown(status: int, message: str) -> None:
    """A refusal whose words are not a named final one may follow money that moved: Unknown."""
    payload = {"success": False, "message": message, "data": None, "errorCode": 99}
    outcome = classify(answer(status, payload))
    assert isinstance(outcome, Unknown)
    assert message in outcome.message
    assert f"HTTP {status}" in outcome.message


def test_documented_400_envelope_is_refused() -> None:
    """The documented 400 answer is Refused(REJECTED) with its message and errorCode."""
    payload = {
        "success": False,
        "message": "The QR code is invalid. Please check and try again",
        "data": None,
        "errorCode": 32,
    }
    assert classify(answer(400, payload)) == Refused(
        RefusalCode.REJECTED,
        "The QR code is invalid. Please check and try again (errorCode 32)",
    )


@pytest.mark.parametrize(
    ("message", "code"),
    [
        ("Insufficient balance", RefusalCode.INSUFFICIENT_FUNDS),
        (
            "Insufficient balance. Required: 101.00 USDT (amount 100.00 + fee 1.00), "
            "available: 5.00 USDT",
            RefusalCode.INSUFFICIENT_FUNDS,
        ),
        ("Not enough funds in wallet", RefusalCode.INSUFFICIENT_FUNDS),
        ("Card not found", RefusalCode.CARD_NOT_FOUND),
        ("Card is not active", RefusalCode.CARD_INACTIVE),
        ("Card is frozen", RefusalCode.CARD_INACTIVE),
        ("Invalid amount", RefusalCode.INVALID_AMOUNT),
        ("Invalid amount: at most 2 decimal places", RefusalCode.INVALID_AMOUNT),
        ("Minimum topup amount is 10.00 USDT", RefusalCode.INVALID_AMOUNT),
        ("Maximum topup amount is 10000.00 USDT", RefusalCode.INVALID_AMOUNT),
    ],
)
@pytest.mark.parametrize("status", [200, 400, 404])
def test_named_final_refusals_get_their_code(message: str, code: RefusalCode, status: int) -> None:
    """A refusal opening with a named pre-check's words is final, with its refusal code."""
    payload = {"success": False, "message": message, "errorCode": 5}
    assert classify(answer(status, payload)) == Refused(code, f"{message} (errorCode 5)")


@pytest.mark.parametrize(
    "message",
    [
        "Processing error: insufficient balance on the issuer after the debit",
        "Upstream connection closed",
        "Amount was debited but the card could not be credited",
        "Invalid card state after topup",
    ],
)
def test_final_words_inside_another_message_are_not_final(message: str) -> None:
    """Final words count only where the message opens with them, not anywhere inside it."""
    assert isinstance(classify(answer(400, {"success": False, "message": message})), Unknown)


def test_rate_limit_wording_in_a_refusal_is_retried() -> None:
    """A refusal that says 'too many requests' applied nothing and will pass later."""
    outcome = classify(answer(200, {"success": False, "message": "Too many requests"}))
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.RATE_LIMITED


@pytest.mark.parametrize("status", [400, 403, 404, 409, 413, 422])
def test_4xx_without_envelope_is_unknown(status: int) -> None:
    """A 4xx with no JSON (a proxy's page) proves nothing: Unknown, its body quoted."""
    outcome = classify(answer(status, "Not Found"))
    assert outcome == Unknown(f"HTTP {status}, a refusal not known to be final: Not Found")


def test_401_asks_for_a_renewed_token() -> None:
    """A 401 raises AccessTokenRejected, an AuthenticationFailed the provider handles."""
    with pytest.raises(AccessTokenRejected):
        classify(answer(401, {"success": False, "message": "Unauthorized"}))
    assert issubclass(AccessTokenRejected, AuthenticationFailed)


def test_429_is_rate_limited_with_retry_after() -> None:
    """429 is RetryLater(RATE_LIMITED) honouring Retry-After."""
    outcome = classify(answer(429, {"success": False, "message": "Slow down"}, "7"))
    assert outcome == RetryLater(RetryKind.RATE_LIMITED, "Slow down", after=7.0)


def test_429_without_retry_after_leaves_the_wait_to_us() -> None:
    """429 without Retry-After has no `after`."""
    outcome = classify(answer(429, ""))
    assert outcome == RetryLater(RetryKind.RATE_LIMITED, "HTTP 429 Too Many Requests")


def test_408_is_transient() -> None:
    """408: the server gave up before reading the request; nothing applied."""
    assert classify(answer(408, "")) == RetryLater(RetryKind.TRANSIENT, "HTTP 408 Request Timeout")


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_is_unknown(status: int) -> None:
    """A 5xx may come from a proxy after the topup applied: Unknown, never retried blindly."""
    outcome = classify(answer(status, {"success": False, "message": "Internal error"}))
    assert outcome == Unknown(f"HTTP {status}: Internal error")


def test_redirect_is_unknown() -> None:
    """A 3xx is no answer to the topup: Unknown."""
    assert isinstance(classify(answer(302, "")), Unknown)


# -- webhook verification -------------------------------------------------------------------


def webhook(
    private_pem: bytes,
    *,
    amount: Any = "100.00",
    status: str = "Success",
    created_at: Any = T0,
    signed: tuple[str, str, str, str] | None = None,
    **top: Any,
) -> bytes:
    """A TopupCard webhook body signed over `cardId|amount|status|createdAt`."""
    text_amount = amount if isinstance(amount, str) else f"{Decimal(amount):.2f}"
    parts = signed or (CARD, text_amount, status, str(created_at))
    body: dict[str, Any] = {
        "success": True,
        "webhookType": "TopupCard",
        "data": {
            "cardId": CARD,
            "amount": amount,
            "fee": 1,
            "status": status,
            "balanceBefore": 0,
            "balanceAfter": 100,
            "createdAt": created_at,
        },
        "signature": signature_of(private_pem, "|".join(parts)),
    }
    body.update(top)
    return json.dumps(body).encode()


def test_valid_webhook_verifies(keys: Keys) -> None:
    """A genuine event yields every field, money exact."""
    event = verify_topup_webhook(webhook(keys.private_pem), keys.public_pem)
    assert event == TopupEvent(
        card_id=CARD,
        amount=HUNDRED,
        amount_text="100.00",
        status="Success",
        fee=Decimal(1),
        balance_before=Decimal(0),
        balance_after=Decimal(100),
        created_at=T0,
    )


def test_amount_string_is_verified_as_sent(keys: Keys) -> None:
    """An amount string is signed exactly as it appears ("100", not "100.00")."""
    event = verify_topup_webhook(webhook(keys.private_pem, amount="100"), keys.public_pem)
    assert event.amount_text == "100"
    assert event.amount == HUNDRED


def test_amount_number_is_verified_as_two_decimals(keys: Keys) -> None:
    """An amount echoed as a JSON number is taken as the runner's two-decimal string."""
    event = verify_topup_webhook(webhook(keys.private_pem, amount=100), keys.public_pem)
    assert event.amount_text == "100.00"


def test_failed_and_unknown_statuses_are_passed_on_as_sent(keys: Keys) -> None:
    """Verification keeps the status visible, whatever it is; the caller decides."""
    for status in ("Failed", "Refunded"):
        event = verify_topup_webhook(webhook(keys.private_pem, status=status), keys.public_pem)
        assert event.status == status


def test_signature_inside_data_is_accepted(keys: Keys) -> None:
    """A signature carried in `data` (as Alix's CreateCard example does) verifies too."""
    payload = json.loads(webhook(keys.private_pem))
    payload["data"]["signature"] = payload.pop("signature")
    event = verify_topup_webhook(json.dumps(payload).encode(), keys.public_pem)
    assert event.created_at == T0


def test_forged_signature_is_rejected(keys: Keys) -> None:
    """Random bytes in the signature do not verify."""
    forged = base64.b64encode(b"\x01" * 256).decode()
    body = webhook(keys.private_pem, signature=forged)
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_topup_webhook(body, keys.public_pem)


def test_signature_by_another_key_is_rejected(keys: Keys) -> None:
    """An event signed with a key that is not Alix's is rejected."""
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_topup_webhook(webhook(keys.other_private_pem), keys.public_pem)


def test_verification_with_the_wrong_public_key_is_rejected(keys: Keys) -> None:
    """A genuine event checked against another public key is rejected."""
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_topup_webhook(webhook(keys.private_pem), keys.other_public_pem)


@pytest.mark.parametrize(
    ("field_name", "value"),
    [
        ("amount", "1000.00"),
        ("status", "Failed"),
        ("createdAt", T0 + 1),
        ("cardId", "9b2e7c1a-0d3f-4e5a-8b6c-7d8e9f0a1b2c"),
    ],
)
def test_tampered_signed_field_is_rejected(keys: Keys, field_name: str, value: Any) -> None:
    """Changing any signed field after signing breaks the signature."""
    payload = json.loads(webhook(keys.private_pem))
    payload["data"][field_name] = value
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_topup_webhook(json.dumps(payload).encode(), keys.public_pem)


def test_amount_respelled_is_rejected(keys: Keys) -> None:
    """Signed "100.00" but sent as "100": the text differs, so the signature does not hold."""
    body = webhook(keys.private_pem, amount="100", signed=(CARD, "100.00", "Success", str(T0)))
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_topup_webhook(body, keys.public_pem)


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[1, 2]", "not a JSON object"),
        (b'{"webhookType": "TopupCard", "webhookType": "TopupCard"}', "appears twice"),
        (b"x" * (64 * 1024 + 1), "larger than"),
    ],
)
def test_malformed_body_is_rejected(keys: Keys, body: bytes, reason: str) -> None:
    """A body that is not one JSON object is rejected, saying why."""
    with pytest.raises(WebhookRejected, match=reason):
        verify_topup_webhook(body, keys.public_pem)


@pytest.mark.parametrize("kind", ["CreateCard", "CardTransaction", None, 7])
def test_wrong_webhook_type_is_rejected(keys: Keys, kind: Any) -> None:
    """Only TopupCard events are taken, however well signed."""
    with pytest.raises(WebhookRejected, match="webhookType"):
        verify_topup_webhook(webhook(keys.private_pem, webhookType=kind), keys.public_pem)


def test_success_false_is_rejected(keys: Keys) -> None:
    """The TopupCard event is documented with success:true only."""
    with pytest.raises(WebhookRejected, match="success"):
        verify_topup_webhook(webhook(keys.private_pem, success=False), keys.public_pem)


@pytest.mark.parametrize(
    "change",
    [
        {"createdAt": 1731578091.5},
        {"createdAt": True},
        {"createdAt": None},
        {"amount": "ten"},
        {"amount": 100.125},
        {"status": None},
        {"cardId": "a|b"},
        {"fee": "lots"},
    ],
)
def test_malformed_data_is_rejected(keys: Keys, change: dict[str, Any]) -> None:
    """Fields that cannot be read exactly are a malformed event, not a guess."""
    payload = json.loads(webhook(keys.private_pem))
    payload["data"].update(change)
    with pytest.raises(WebhookRejected, match="malformed data"):
        verify_topup_webhook(json.dumps(payload).encode(), keys.public_pem)


@pytest.mark.parametrize("signature", [None, 12, "not base64!!"])
def test_missing_or_unreadable_signature_is_rejected(keys: Keys, signature: Any) -> None:
    """No signature, or one that is not base64, is rejected before any verification."""
    with pytest.raises(WebhookRejected, match="signature"):
        verify_topup_webhook(webhook(keys.private_pem, signature=signature), keys.public_pem)


def test_invalid_public_key_is_a_config_error(keys: Keys) -> None:
    """A bad public key is the configuration's fault, not the sender's."""
    with pytest.raises(ConfigError, match="webhook public key"):
        verify_topup_webhook(webhook(keys.private_pem), b"-----BEGIN NOTHING-----")


# -- a tiny Alix on 127.0.0.1 ---------------------------------------------------------------


class FakeClock:
    """The token clock shared by the client and the fake server, moved by hand."""

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class RecordingThrottle:
    """A `Throttle` that never waits and remembers every call it got."""

    def __init__(self) -> None:
        self.acquired = 0
        self.slowed: list[float | None] = []

    async def acquire(self) -> None:
        self.acquired += 1

    def slow_down(self, retry_after: float | None) -> None:
        self.slowed.append(retry_after)


def wire(value: Any) -> str:
    """JSON with Decimals written as the exact numbers they are (as a JavaScript server would)."""
    raw: dict[str, str] = {}

    def convert(v: Any) -> Any:
        if isinstance(v, Decimal):
            key = f"@@{len(raw)}@@"
            raw[key] = str(v)
            return key
        if isinstance(v, dict):
            return {k: convert(x) for k, x in v.items()}
        if isinstance(v, list):
            return [convert(x) for x in v]
        return v

    text = json.dumps(convert(value))
    for key, number in raw.items():
        text = text.replace(f'"{key}"', number)
    return text


def envelope(data: Any = None, *, success: bool = True, message: str = "ok", code: int = 0) -> str:
    return wire({"success": success, "message": message, "data": data, "errorCode": code})


Scripted = tuple[int, str, dict[str, str]]


@dataclass
class FakeAlix:
    """Auth, topup, topup-check and the transactions list, as the assumptions describe them."""

    public_key: rsa.RSAPublicKey
    clock: FakeClock
    lifetime: float | None = LIFETIME
    refresh_delay: float = 0.0
    refuse_refresh: bool = False
    refuse_access: bool = False
    reject_all: bool = False
    topup_mode: str = "normal"  # or "drop", "hang"
    issued: int = 0
    refreshed: int = 0
    unauthorized: int = 0
    access: dict[str, float] = field(default_factory=dict)  # token -> expiry on the clock
    refresh: dict[str, str] = field(default_factory=dict)  # refresh token -> its access token
    every_token: list[str] = field(default_factory=list)
    topup_bodies: list[str] = field(default_factory=list)
    topup_tokens: list[str] = field(default_factory=list)
    scripted: list[Scripted] = field(default_factory=list)
    check_bodies: list[Any] = field(default_factory=list)
    transactions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    list_queries: list[dict[str, str]] = field(default_factory=list)
    list_failures: int = 0
    list_failure_status: int = 503
    next_created_at: int = T0
    release: anyio.Event = field(default_factory=anyio.Event)

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/v2/auth/access-token", self.access_token)
        app.router.add_post("/api/v2/auth/refresh-token", self.refresh_token)
        app.router.add_post("/api/v2/cards/topup", self.topup)
        app.router.add_post("/api/v2/cards/topup-check", self.topup_check)
        app.router.add_get("/api/v2/cards/{card}/transactions", self.list_transactions)
        return app

    def revoke_access(self) -> None:
        """Every access token stops working; refresh tokens still do."""
        self.access.clear()

    def _signed(self, body: dict[str, Any]) -> bool:
        try:
            self.public_key.verify(
                base64.b64decode(body["signature"], validate=True),
                f"{PARTNER}|{SECRET}".encode(),
                padding.PKCS1v15(),
                hashes.SHA256(),
            )
        except Exception:
            return False
        return body.get("partnerCode") == PARTNER

    def _grant(self) -> web.Response:
        n = len(self.every_token)
        access, refresh = f"acc-{n:04d}-tok", f"ref-{n:04d}-tok"
        self.every_token += [access, refresh]
        self.access[access] = self.clock() + (self.lifetime or 10**9)
        self.refresh[refresh] = access
        data: dict[str, Any] = {"accessToken": access, "refreshToken": refresh}
        if self.lifetime is not None:
            data["expiresIn"] = Decimal(str(self.lifetime))
        return web.Response(text=envelope(data), content_type="application/json")

    @staticmethod
    def _refused(status: int = 401, message: str = "Unauthorized") -> web.Response:
        return web.Response(
            status=status,
            text=envelope(None, success=False, message=message, code=status),
            content_type="application/json",
        )

    async def access_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refuse_access or not self._signed(body) or body.get("userEmail") != EMAIL:
            return self._refused(message="Invalid partner credentials")
        self.issued += 1
        return self._grant()

    async def refresh_token(self, request: web.Request) -> web.Response:
        body = await request.json()
        if self.refresh_delay:
            await anyio.sleep(self.refresh_delay)  # lets every other caller pile up meanwhile
        old = body.get("refreshToken")
        if self.refuse_refresh or not self._signed(body) or old not in self.refresh:
            return self._refused(message="Invalid refresh token")
        self.access.pop(self.refresh.pop(old), None)  # single use; revokes its access token
        self.refreshed += 1
        return self._grant()

    def _authorized(self, request: web.Request) -> bool:
        token = request.headers.get("access-token", "")
        ok = not self.reject_all and self.access.get(token, -math.inf) > self.clock()
        if not ok:
            self.unauthorized += 1
        return ok

    async def topup(self, request: web.Request) -> web.StreamResponse:
        if not self._authorized(request):
            return self._refused()
        text = await request.text()
        self.topup_bodies.append(text)
        self.topup_tokens.append(request.headers["access-token"])
        if self.topup_mode == "hang":
            await self.release.wait()
        if self.scripted:
            status, out, headers = self.scripted.pop(0)
            return web.Response(status=status, text=out, headers=headers)
        body = json.loads(text)
        amount = Decimal(body["amount"])
        self.next_created_at += 1
        fee = (amount / 100).quantize(Decimal("0.01"))
        item = {
            "id": f"tx-{self.next_created_at}",
            "type": "TopupCard",
            "cardId": body["cardId"].lower(),
            "amount": amount,
            "fee": fee,
            "status": "Pending",
            "balanceBefore": Decimal(0),
            "balanceAfter": Decimal(0),
            "createdAt": self.next_created_at,
        }
        self.transactions.setdefault(body["cardId"].lower(), []).insert(0, item)
        if self.topup_mode == "drop":  # applied, and then the answer is lost
            assert request.transport is not None
            request.transport.close()
            return web.Response()
        data = {k: v for k, v in item.items() if k not in ("id", "cardId")}
        return web.Response(text=envelope(data), content_type="application/json")

    async def topup_check(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        body = await request.json()
        self.check_bodies.append(body)
        amount = Decimal(body["amount"])
        if amount == Decimal("999.00"):
            return self._refused(400, "Amount not allowed for this card type")
        fee = (amount / 100).quantize(Decimal("0.01"))
        return web.Response(
            text=envelope({"netAmount": amount + fee, "fee": fee}),
            content_type="application/json",
        )

    async def list_transactions(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._refused()
        query = dict(request.query)
        self.list_queries.append(query)
        if self.list_failures:
            self.list_failures -= 1
            return web.Response(status=self.list_failure_status, text="busy")
        items = self.transactions.get(request.match_info["card"].lower(), [])
        if "status" in query:
            items = [i for i in items if i["status"] == query["status"]]
        size = int(query.get("pageSize", "10"))
        page = int(query.get("page", "1"))
        total = math.ceil(len(items) / size)
        chunk = items[(page - 1) * size : page * size]
        return web.Response(
            text=envelope({"totalPage": total, "items": chunk}), content_type="application/json"
        )


@asynccontextmanager
async def serving(fake: FakeAlix) -> AsyncIterator[str]:
    """The fake on a loopback port; yields its API root."""
    runner = web.AppRunner(fake.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}/api/v2"
    finally:
        fake.release.set()
        await runner.cleanup()


def credentials(keys: Keys, secret: str = SECRET) -> AlixCredentials:
    return AlixCredentials(PARTNER, secret, keys.private_pem, EMAIL)


@asynccontextmanager
async def alix(
    keys: Keys,
    *,
    secret: str = SECRET,
    client_timeout: float = 2.0,
    throttle: RecordingThrottle | None = None,
    **options: Any,
) -> AsyncIterator[tuple[FakeAlix, AlixProvider, FakeClock]]:
    """A fake Alix and a provider pointed at it, sharing one hand-moved clock."""
    clock = FakeClock()
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    fake = FakeAlix(public, clock, **options)
    async with serving(fake) as base_url:
        provider = AlixProvider(
            credentials(keys, secret),
            base_url=base_url,
            timeout=client_timeout,
            throttle=throttle,
            clock=clock,
            retry_delay=0.0,
        )
        try:
            yield fake, provider, clock
        finally:
            await provider.aclose()


def free_port() -> int:
    """A loopback port nobody listens on (bound, noted, released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@pytest.fixture
def logs() -> Iterator[list[dict[str, Any]]]:
    with structlog.testing.capture_logs() as captured:
        yield cast("list[dict[str, Any]]", captured)  # structlog's event dicts


def events(captured: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in captured if e["event"] == name]


# -- topups over HTTP -----------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_sends_the_amount_as_a_two_decimal_string(keys: Keys) -> None:
    """The body is {"cardId", "amount": "100.00"}, the amount a JSON string."""
    async with alix(keys) as (fake, provider, _):
        outcome = await provider.topup(CARD, Decimal("100"))
    assert json.loads(fake.topup_bodies[0]) == {"cardId": CARD, "amount": "100.00"}
    assert isinstance(outcome, Applied)
    assert outcome.pending
    assert outcome.fee == Decimal("1.00")
    assert outcome.provider_ref == str(T0 + 1)


@pytest.mark.anyio
async def test_topup_keeps_cents_exactly(keys: Keys) -> None:
    """An amount with cents is sent with exactly those cents."""
    async with alix(keys) as (fake, provider, _):
        await provider.topup(CARD, Decimal("1234.5"))
    assert json.loads(fake.topup_bodies[0])["amount"] == "1234.50"


@pytest.mark.anyio
async def test_more_than_two_decimals_is_refused_without_sending(keys: Keys) -> None:
    """An amount beyond cents is refused locally; not even a token is asked for."""
    async with alix(keys) as (fake, provider, _):
        outcome = await provider.topup(CARD, Decimal("10.005"))
    assert outcome == Refused(
        RefusalCode.INVALID_AMOUNT, "10.005 has more than two decimals: not sent"
    )
    assert fake.topup_bodies == []
    assert fake.issued == 0


@pytest.mark.anyio
async def test_every_request_goes_through_the_throttle(keys: Keys) -> None:
    """The token call and the topup each acquire the run's throttle."""
    throttle = RecordingThrottle()
    async with alix(keys, throttle=throttle) as (_, provider, _):
        await provider.topup(CARD, HUNDRED)
    assert throttle.acquired == 2


@pytest.mark.anyio
async def test_429_slows_the_run_down(keys: Keys) -> None:
    """A 429 tells the throttle its Retry-After and is RetryLater(RATE_LIMITED)."""
    throttle = RecordingThrottle()
    async with alix(keys, throttle=throttle) as (fake, provider, _):
        fake.scripted.append(
            (429, envelope(None, success=False, message="Slow"), {"Retry-After": "3"})
        )
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == RetryLater(RetryKind.RATE_LIMITED, "Slow", after=3.0)
    assert throttle.slowed == [3.0]


@pytest.mark.anyio
async def test_success_false_over_http_is_refused(keys: Keys) -> None:
    """HTTP 200 with success:false and a final refusal's words reaches the engine as one."""
    async with alix(keys) as (fake, provider, _):
        message = "Insufficient balance"
        fake.scripted.append((200, envelope(None, success=False, message=message, code=9), {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Refused(RefusalCode.INSUFFICIENT_FUNDS, "Insufficient balance (errorCode 9)")


@pytest.mark.anyio
async def test_undocumented_refusal_over_http_is_unknown(keys: Keys) -> None:
    """HTTP 200 with success:false in other words reaches the engine as Unknown."""
    async with alix(keys) as (fake, provider, _):
        fake.scripted.append((200, envelope(None, success=False, message="Nope", code=9), {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Unknown("HTTP 200, a refusal not known to be final: Nope (errorCode 9)")


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "body"), [(502, "Bad Gateway"), (200, "<html>ok</html>")])
async def test_unreadable_answers_over_http_are_unknown(keys: Keys, status: int, body: str) -> None:
    """A 5xx or a 200 that is not JSON: money may have moved."""
    async with alix(keys) as (fake, provider, _):
        fake.scripted.append((status, body, {}))
        outcome = await provider.topup(CARD, HUNDRED)
    assert isinstance(outcome, Unknown)


@pytest.mark.anyio
async def test_dropped_connection_after_sending_is_unknown(keys: Keys) -> None:
    """The server read the topup and closed the connection: Unknown."""
    async with alix(keys, topup_mode="drop") as (fake, provider, _):
        outcome = await provider.topup(CARD, HUNDRED)
    assert len(fake.transactions[CARD]) == 1
    assert isinstance(outcome, Unknown)


@pytest.mark.anyio
async def test_timeout_after_sending_is_unknown(keys: Keys) -> None:
    """No answer before the timeout: Unknown."""
    async with alix(keys, topup_mode="hang", client_timeout=0.2) as (fake, provider, _):
        await provider.tokens.current()  # the token arrives in time; the topup does not
        outcome = await provider.topup(CARD, HUNDRED)
    assert outcome == Unknown("no answer before the timeout")
    assert len(fake.topup_bodies) == 1


@pytest.mark.anyio
async def test_connection_refused_is_transient(keys: Keys) -> None:
    """Once the server is gone, connecting fails before anything is sent: RetryLater."""
    clock = FakeClock()
    public = serialization.load_pem_public_key(keys.public_pem)
    assert isinstance(public, rsa.RSAPublicKey)
    fake = FakeAlix(public, clock)
    async with serving(fake) as base_url:
        provider = AlixProvider(credentials(keys), base_url=base_url, clock=clock, retry_delay=0)
        try:
            await provider.tokens.current()
        except BaseException:
            await provider.aclose()
            raise
    try:
        await anyio.sleep(0.01)  # the closed keep-alive connection leaves the pool
        outcome = await provider.topup(CARD, HUNDRED)
    finally:
        await provider.aclose()
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT
    assert outcome.message.startswith("cannot connect")


@pytest.mark.anyio
async def test_no_token_to_be_had_is_transient(keys: Keys) -> None:
    """Nobody listens: no token, so the topup was never sent and may be retried."""
    provider = AlixProvider(
        credentials(keys), base_url=f"http://127.0.0.1:{free_port()}/api/v2", retry_delay=0
    )
    try:
        outcome = await provider.topup(CARD, HUNDRED)
    finally:
        await provider.aclose()
    assert isinstance(outcome, RetryLater)
    assert outcome.kind is RetryKind.TRANSIENT
    assert outcome.message.startswith("no access token")


def test_base_url_is_required(keys: Keys) -> None:
    """Alix publishes no URL: an empty base URL is a configuration error."""
    with pytest.raises(ConfigError, match="--base-url"):
        AlixProvider(credentials(keys), base_url=" ")


@pytest.mark.anyio
async def test_undocumented_reads_say_so(keys: Keys) -> None:
    """Wallet and card reads are not guessed at: the rules say so and the calls raise."""
    assert RULES.reads_wallet is False
    assert RULES.reads_cards is False
    assert RULES.min_amount == Decimal("10.00")
    assert RULES.max_amount == Decimal("10000.00")
    provider = AlixProvider(credentials(keys), base_url="http://127.0.0.1:9/api/v2")
    with pytest.raises(NotDocumented, match="Alix documents no wallet-balance endpoint"):
        await provider.wallet_balance()
    with pytest.raises(ProviderError):
        await provider.get_card(CARD)
    with pytest.raises(ProviderError):
        await provider.list_cards()
    await provider.aclose()


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


# -- topup-check ----------------------------------------------------------------------------


@pytest.mark.anyio
async def test_topup_check_quotes_net_amount_and_fee(keys: Keys) -> None:
    """topup-check is sent with a string amount and answers exact Decimals."""
    async with alix(keys) as (fake, provider, _):
        net, fee = await provider.topup_check("GEC", Decimal("250"))
    assert fake.check_bodies == [{"cardType": "GEC", "amount": "250.00"}]
    assert (net, fee) == (Decimal("252.50"), Decimal("2.50"))


@pytest.mark.anyio
async def test_fee_estimates_leave_out_refused_quotes(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """Each amount is quoted; a refused quote is logged and left out, not fatal."""
    async with alix(keys) as (_, provider, _):
        fees = await provider.fee_estimates([Decimal("10"), Decimal("100"), Decimal("999")])
    assert fees == {Decimal("10"): Decimal("0.10"), Decimal("100"): Decimal("1.00")}
    assert len(events(logs, "alix.fee_quote.failed")) == 1


@pytest.mark.anyio
async def test_fee_estimates_raise_authentication_failed_as_itself(keys: Keys) -> None:
    """Refused credentials stop preflight with AuthenticationFailed, not an exception group."""
    async with alix(keys, secret="wrong-secret") as (_, provider, _):
        with pytest.raises(AuthenticationFailed):
            await provider.fee_estimates([Decimal("10"), Decimal("20")])


# -- transactions, settle, reconcile --------------------------------------------------------


def item(
    created_at: int, *, amount: Any = "100.00", status: str = "Pending", **more: Any
) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "id": f"tx-{created_at}",
        "type": "TopupCard",
        "cardId": CARD,
        "amount": amount,
        "fee": Decimal("1.00"),
        "status": status,
        "balanceBefore": Decimal("5.00"),
        "balanceAfter": Decimal("105.00"),
        "createdAt": created_at,
    }
    fields.update(more)
    return fields


def at(unix: int) -> datetime:
    return datetime.fromtimestamp(unix, UTC)


@pytest.mark.anyio
async def test_transactions_follow_every_page(keys: Keys) -> None:
    """120 topups over three pages all come back, newest first, money exact."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 200 - i, amount=Decimal("10.10")) for i in range(120)]
        records = await provider.transactions(CARD)
    assert [q["page"] for q in fake.list_queries] == ["1", "2", "3"]
    assert len(records) == 120
    assert records[0].created_at == T0 + 200
    assert all(r.amount == Decimal("10.10") and str(r.amount) == "10.10" for r in records)


@pytest.mark.anyio
async def test_transactions_query_names_type_and_a_widened_utc_from(keys: Keys) -> None:
    """type=TopupCard and `from` as YYYY-MM-DD HH:MM:SS UTC, widened; createdAt filters."""
    since = at(T0)
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1), item(T0), item(T0 - 1)]
        records = await provider.transactions(CARD, since=since, status="Pending")
    query = fake.list_queries[0]
    assert query["type"] == "TopupCard"
    assert query["status"] == "Pending"
    assert query["from"] == (since - LIST_WINDOW_MARGIN).strftime("%Y-%m-%d %H:%M:%S")
    assert [r.created_at for r in records] == [T0 + 1, T0]


@pytest.mark.anyio
async def test_unreadable_topup_in_the_list_is_an_error(keys: Keys) -> None:
    """A topup that cannot be read is never skipped: it might be the one looked for."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, amount="lots")]
        with pytest.raises(ProviderError, match="tx-"):
            await provider.transactions(CARD)


@pytest.mark.anyio
async def test_list_of_another_card_is_an_error(keys: Keys) -> None:
    """Items of another card mean the list is not the one asked for."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, cardId="someone-else")]
        with pytest.raises(ProviderError, match="someone-else"):
            await provider.transactions(CARD)


@pytest.mark.anyio
async def test_card_id_case_does_not_matter(keys: Keys) -> None:
    """Alix may answer a UUID in another case than the job wrote it."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0)]
        records = await provider.transactions(CARD.upper())
    assert len(records) == 1


@pytest.mark.anyio
async def test_settle_success(keys: Keys) -> None:
    """A listed Success settles the pending topup with its id, fee and balances."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, amount=5), item(T0, status="Success")]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert settled == Applied(
        fee=Decimal("1.00"),
        card_balance_before=Decimal("5.00"),
        card_balance_after=Decimal("105.00"),
        transaction_id=f"tx-{T0}",
        provider_ref=str(T0),
    )


@pytest.mark.anyio
@pytest.mark.parametrize("after", ["5.00", "205.00"])
async def test_settle_success_whose_balances_did_not_move_by_the_amount(
    keys: Keys, after: str
) -> None:
    """A listed Success whose balance pair did not move by the amount carries a discrepancy."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Success", balanceAfter=Decimal(after))]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert isinstance(settled, Applied)
    assert settled.discrepancy is not None
    assert f"from 5.00 to {after}" in settled.discrepancy


@pytest.mark.anyio
async def test_reconcile_finds_a_topup_whose_balances_moved_by_another_amount(
    keys: Keys,
) -> None:
    """A lost topup found in the list with a wrong balance pair is Applied with a discrepancy."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, balanceAfter=Decimal("55.00"))]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.discrepancy == (
        "the answer's balance went from 5.00 to 55.00, a move of 50.00, not the 100.00 sent"
    )


@pytest.mark.anyio
async def test_settle_failed(keys: Keys) -> None:
    """A listed Failed is a refusal: nothing was applied."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Failed")]
        settled = await provider.settle(CARD, HUNDRED, str(T0))
    assert settled == Refused(RefusalCode.REJECTED, "the provider reported the topup Failed")


@pytest.mark.anyio
@pytest.mark.parametrize("listed", [[item(T0)], [], [item(T0 + 1)], [item(T0, amount="99.00")]])
async def test_settle_pending_or_not_listed_is_still_pending(keys: Keys, listed: list[Any]) -> None:
    """Still Pending, or no item with that (card, amount, createdAt): not settled yet."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = listed
        assert isinstance(await provider.settle(CARD, HUNDRED, str(T0)), StillPending)


@pytest.mark.anyio
async def test_settle_unknown_status_is_still_pending_and_logged(
    keys: Keys, logs: list[dict[str, Any]]
) -> None:
    """An undocumented status settles nothing and is logged with its value."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0, status="Reversed")]
        assert isinstance(await provider.settle(CARD, HUNDRED, str(T0)), StillPending)
    [event] = events(logs, "alix.status.unknown")
    assert event["status"] == "Reversed"


@pytest.mark.anyio
async def test_reconcile_finds_the_lost_pending_topup(keys: Keys) -> None:
    """A topup created just before our clock said we sent is ours: Applied(pending)."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 - 3)]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.pending
    assert settled.provider_ref == str(T0 - 3)
    assert settled.transaction_id == f"tx-{T0 - 3}"


@pytest.mark.anyio
async def test_reconcile_finds_the_lost_settled_topup(keys: Keys) -> None:
    """Found already Success: applied, not pending."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, status="Success")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert not settled.pending


@pytest.mark.anyio
@pytest.mark.parametrize(
    "listed",
    [
        [],
        [item(T0 - 6)],  # before the skew allowance: an earlier topup
        [item(T0 + 1, amount="50.00")],
        [item(T0 + 1, status="Failed")],
    ],
)
async def test_reconcile_not_applied(keys: Keys, listed: list[Any]) -> None:
    """Nothing of that amount since the attempt (or only Failed): NotApplied, safe to resend."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = listed
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, NotApplied)


@pytest.mark.anyio
async def test_reconcile_two_candidates_is_unknown(keys: Keys) -> None:
    """Two topups of that amount since the attempt: cannot tell which is ours."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1)]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert "cannot tell" in settled.message


@pytest.mark.anyio
async def test_reconcile_ignores_topups_the_ledger_already_knows(keys: Keys) -> None:
    """A topup the engine already recorded is not the lost one."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1)]
        settled = await provider.reconcile(
            CARD, HUNDRED, None, sent_at=at(T0), known_refs={str(T0 + 1)}
        )
    assert isinstance(settled, Applied)
    assert settled.provider_ref == str(T0 + 2)


@pytest.mark.anyio
async def test_reconcile_failed_earlier_and_pending_now(keys: Keys) -> None:
    """A Failed earlier attempt beside a Pending one: the Pending one is ours."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 2), item(T0 + 1, status="Failed")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)
    assert settled.provider_ref == str(T0 + 2)


@pytest.mark.anyio
async def test_reconcile_unknown_status_is_unknown(keys: Keys, logs: list[dict[str, Any]]) -> None:
    """Found in an undocumented status: Unknown, and the value is logged."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1, status="OnHold")]
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert "'OnHold'" in settled.message
    assert events(logs, "alix.status.unknown")[0]["status"] == "OnHold"


@pytest.mark.anyio
async def test_reconcile_with_an_unreadable_list_is_unknown(keys: Keys) -> None:
    """The list failing every retry leaves the outcome unknown, never NotApplied."""
    async with alix(keys) as (fake, provider, _):
        fake.list_failures = 10
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Unknown)
    assert len(fake.list_queries) == 4


@pytest.mark.anyio
async def test_list_refused_with_4xx_is_not_retried(keys: Keys) -> None:
    """A 4xx to a read (a wrong --base-url, say) is an error at once, not a retry loop."""
    async with alix(keys, list_failures=10, list_failure_status=404) as (fake, provider, _):
        with pytest.raises(ProviderError, match="HTTP 404"):
            await provider.transactions(CARD)
    assert len(fake.list_queries) == 1


@pytest.mark.anyio
async def test_reconcile_retries_a_transient_list_failure(keys: Keys) -> None:
    """A read is safe to repeat: one 503 is retried and the topup still found."""
    async with alix(keys) as (fake, provider, _):
        fake.transactions[CARD] = [item(T0 + 1)]
        fake.list_failures = 1
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=at(T0))
    assert isinstance(settled, Applied)


@pytest.mark.anyio
async def test_reconcile_without_send_time_is_unknown(keys: Keys) -> None:
    """Without `sent_at` the list cannot be searched: Unknown."""
    async with alix(keys) as (_, provider, _):
        settled = await provider.reconcile(CARD, HUNDRED, None)
    assert isinstance(settled, Unknown)


@pytest.mark.anyio
async def test_lost_answer_is_reconciled_end_to_end(keys: Keys) -> None:
    """A topup whose connection dropped is found in the list by its send time."""
    async with alix(keys, topup_mode="drop") as (fake, provider, _):
        sent_at = datetime.now(UTC)
        fake.next_created_at = math.floor(sent_at.timestamp()) - 1  # Alix's clock, a bit behind
        outcome = await provider.topup(CARD, HUNDRED)
        assert isinstance(outcome, Unknown)
        settled = await provider.reconcile(CARD, HUNDRED, None, sent_at=sent_at)
    assert isinstance(settled, Applied)
    assert settled.pending


def test_window_margin_covers_every_time_zone() -> None:
    """The `from` margin spans the largest UTC offset in use (+14:00)."""
    assert timedelta(hours=14) <= LIST_WINDOW_MARGIN
