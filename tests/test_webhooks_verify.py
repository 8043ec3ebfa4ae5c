"""Alix webhook verification (runner.webhooks.verify): a signed TopupCard body in, a verified
event out, and every forged, tampered or malformed body rejected.
"""

from __future__ import annotations

import base64
import json
from decimal import Decimal
from typing import Any

import pytest

from runner.errors import (
    ConfigError,
    WebhookRejected,
)
from runner.webhooks.verify import TopupEvent, verify_topup_webhook
from tests.alix_fake import (
    CARD,
    HUNDRED,
    T0,
    Keys,
    make_keys,
    signature_of,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


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
