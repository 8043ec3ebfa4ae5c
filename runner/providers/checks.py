"""What an applied answer says, checked against what was sent: the card, the amount, and the
balance pair around the topup. Each check gives a one-line discrepancy or None; the adapters
put the first into `Applied.discrepancy`.
"""

from __future__ import annotations

import uuid
from decimal import Decimal

from runner.money import format_amount, parse_provider_decimal, quantize_cents
from runner.providers.http import snippet


def _as_uuid(card_id: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(card_id)
    except ValueError:
        return None


def same_card_id(a: str, b: str) -> bool:
    """Whether two spellings name one card. Card ids that are UUIDs are compared as UUIDs (case,
    braces and hyphens are spelling, as for the providers, which identify cards by UUID); any
    other id must match exactly, surrounding blanks aside."""
    a, b = a.strip(), b.strip()
    if a == b:
        return True
    ua, ub = _as_uuid(a), _as_uuid(b)
    return ua is not None and ua == ub


def card_discrepancy(answered: object, sent: str) -> str | None:
    """The answer names another card than the one sent (None: it names none, or the same)."""
    if answered is None:
        return None
    readable = isinstance(answered, str | int) and not isinstance(answered, bool)
    if readable and same_card_id(str(answered), sent):
        return None
    return f"the answer names card {snippet(answered, 80)}, not {sent}"


def amount_discrepancy(answered: object, sent: Decimal, field: str = "amount") -> str | None:
    """The answer's `field` is another amount than the one sent, or not an amount at all."""
    if answered is None:
        return None
    try:
        value = parse_provider_decimal(answered)
    except ValueError:
        return (
            f"the answer's {field} ({snippet(answered, 40)}) is not an amount; {_m(sent)} was sent"
        )
    if value != sent:
        return f"the answer's {field} is {_m(value)}, not the {_m(sent)} sent"
    return None


def charged_discrepancy(total: Decimal | None, fee: Decimal | None, sent: Decimal) -> str | None:
    """A total charged (documented as amount + fee) that is not the amount sent plus the fee."""
    if total is None or fee is None or total - fee == sent:
        return None
    return (
        f"the answer's total_charged {_m(total)} minus its fee {_m(fee)} is {_m(total - fee)}, "
        f"not the {_m(sent)} sent"
    )


def moved_discrepancy(
    before: Decimal | None, after: Decimal | None, sent: Decimal, *, may_not_have_moved: bool
) -> str | None:
    """A before/after balance pair that did not move by the amount sent (nor, while the topup
    is still pending and `may_not_have_moved`, by nothing yet). None when either is missing."""
    if before is None or after is None:
        return None
    moved = after - before
    if moved == sent or (may_not_have_moved and moved == 0):
        return None
    return (
        f"the answer's balance went from {_m(before)} to {_m(after)}, a move of {_m(moved)}, "
        f"not the {_m(sent)} sent"
    )


def first(*discrepancies: str | None) -> str | None:
    """Every discrepancy found, in the order checked, as one line; None if there is none."""
    found = [d for d in discrepancies if d]
    return "; ".join(found) if found else None


def _m(value: Decimal) -> str:
    # Two decimals where that is exact; the amount as given where it is not (never rounded).
    return format_amount(value) if quantize_cents(value) == value else f"{value:f}"
