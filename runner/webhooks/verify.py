"""Incoming Alix webhooks: a TopupCard body in, a verified `TopupEvent` out, or `WebhookRejected`.

Only the verification lives here (no server): the signed text is rebuilt from the body exactly
as the ASSUMPTION "TopupCard webhook" of docs/providers.md describes it.
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from cryptography.hazmat.primitives.asymmetric.rsa import RSAPublicKey

from runner.errors import WebhookRejected
from runner.money import format_amount, parse_provider_decimal, quantize_cents
from runner.providers.alix_answers import unix_seconds
from runner.providers.alix_auth import load_public_key, verify_signature

TOPUP_WEBHOOK_TYPE = "TopupCard"
# A TopupCard event is a few hundred bytes; anything far larger is not one.
MAX_BODY_BYTES = 64 * 1024


@dataclass(frozen=True, slots=True)
class TopupEvent:
    """A TopupCard webhook whose signature verified.

    The signature covers `card_id`, `amount_text`, `status` and `created_at` only: `fee` and
    the balances are unsigned, so a replayed signature could carry altered ones. Prefer the
    fee of the topup's own answer; `status` is as sent (see `alix_answers.topup_status`).
    """

    card_id: str
    amount: Decimal
    amount_text: str
    status: str
    fee: Decimal | None
    balance_before: Decimal | None
    balance_after: Decimal | None
    created_at: int


def signed_text(card_id: str, amount_text: str, status: str, created_at: int) -> bytes:
    """ASSUMPTION "TopupCard webhook": the signature is over `cardId|amount|status|createdAt`,
    amount as the string the API sent, createdAt as a decimal integer, in UTF-8."""
    return f"{card_id}|{amount_text}|{status}|{created_at}".encode()


def amount_text_of(value: object) -> tuple[Decimal, str]:
    """ASSUMPTION "TopupCard webhook" (amount as the string the API sent): a JSON string is used
    exactly as it appears; a JSON number, which carries no spelling, is taken to stand for the
    runner's two-decimal string (`100` -> "100.00"), the form every Alix topup is sent in."""
    if isinstance(value, str):
        return parse_provider_decimal(value), value
    amount = parse_provider_decimal(value)
    if amount != quantize_cents(amount):
        raise ValueError(f"amount {amount} has more than two decimals")
    return amount, format_amount(amount)


def verify_topup_webhook(body: bytes, public_key_pem: bytes) -> TopupEvent:
    """The verified TopupCard event of a webhook body, or `WebhookRejected` saying why not.

    A public key that is not a PEM RSA key raises ConfigError: that is the configuration's
    fault, not the sender's.
    """
    key = _public_key(public_key_pem)
    if len(body) > MAX_BODY_BYTES:
        raise WebhookRejected(f"the body is larger than {MAX_BODY_BYTES} bytes")
    payload = _parse(body)
    kind = payload.get("webhookType")
    if kind != TOPUP_WEBHOOK_TYPE:
        raise WebhookRejected(f"webhookType {repr(kind)[:40]} is not {TOPUP_WEBHOOK_TYPE!r}")
    if payload.get("success") is not True:
        raise WebhookRejected("success is not true")
    data = payload.get("data")
    if not isinstance(data, Mapping):
        raise WebhookRejected("data is not an object")
    try:
        card_id = _text(data.get("cardId"), "cardId")
        amount, amount_text = amount_text_of(data.get("amount"))
        status = _text(data.get("status"), "status")
        created_at = unix_seconds(data.get("createdAt"))
        fee = _money(data, "fee")
        balance_before = _money(data, "balanceBefore")
        balance_after = _money(data, "balanceAfter")
    except ValueError as exc:
        raise WebhookRejected(f"malformed data: {exc}") from None
    # The TopupCard docs are not public and Alix's public CreateCard example carries its
    # signature inside `data`: look there too. Either way the signature must verify.
    signature = payload.get("signature", data.get("signature"))
    if not isinstance(signature, str):
        raise WebhookRejected("no signature")
    try:
        raw = base64.b64decode(signature, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookRejected("the signature is not base64") from None
    if not verify_signature(signed_text(card_id, amount_text, status, created_at), raw, key):
        raise WebhookRejected("the signature does not verify with the Alix public key")
    return TopupEvent(
        card_id=card_id,
        amount=amount,
        amount_text=amount_text,
        status=status,
        fee=fee,
        balance_before=balance_before,
        balance_after=balance_after,
        created_at=created_at,
    )


@functools.lru_cache(maxsize=4)
def _public_key(public_key_pem: bytes) -> RSAPublicKey:
    # Parsed once per key rather than once per webhook.
    return load_public_key(public_key_pem)


def _parse(body: bytes) -> Mapping[str, Any]:
    try:
        payload = json.loads(
            body.decode("utf-8"), parse_float=Decimal, object_pairs_hook=_no_duplicates
        )
    except UnicodeDecodeError:
        raise WebhookRejected("the body is not UTF-8") from None
    except ValueError as exc:
        raise WebhookRejected(f"the body is not JSON: {exc}") from None
    if not isinstance(payload, Mapping):
        raise WebhookRejected("the body is not a JSON object")
    return payload


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # With a repeated key, the value we verify and the value another reader uses could differ.
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"the key {key!r} appears twice")
        result[key] = value
    return result


def _text(value: object, name: str) -> str:
    """A signed field as text; a '|' in it would make the signed text ambiguous."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise ValueError(f"{name} is missing or not text")
    text = str(value)
    if not text or "|" in text:
        raise ValueError(f"{name} {repr(text)[:40]} is empty or holds '|'")
    return text


def _money(data: Mapping[str, Any], name: str) -> Decimal | None:
    value = data.get(name)
    return None if value is None else parse_provider_decimal(value)
