"""What an Alix answer means (runner.providers.alix_answers): every topup answer classified,
and the assumptions that widen the transactions window.
"""

from __future__ import annotations

import json
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from runner.errors import (
    AccessTokenRejected,
    AuthenticationFailed,
)
from runner.providers.alix_answers import LIST_WINDOW_MARGIN, classify_topup
from runner.providers.base import (
    Applied,
    Outcome,
    RefusalCode,
    Refused,
    RetryKind,
    RetryLater,
    Unknown,
)
from runner.providers.http import HttpAnswer
from tests.alix_fake import (
    CARD,
    HUNDRED,
    T0,
    Keys,
    make_keys,
)


@pytest.fixture(scope="module")
def keys() -> Keys:
    return make_keys()


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


def test_window_margin_covers_every_time_zone() -> None:
    """The `from` margin spans the largest UTC offset in use (+14:00)."""
    assert timedelta(hours=14) <= LIST_WINDOW_MARGIN
