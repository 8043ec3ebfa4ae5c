"""What a card's transactions list says of one topup: the final status of a pending one
(`settle_from`) and whether a lost one applied (`reconcile_from`). Pure: `alix.py` reads the list.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from decimal import Decimal

import structlog

from runner.money import format_amount
from runner.providers.alix_answers import (
    LIST_SHOWS_ACCEPTED_TOPUPS_AT_ONCE,
    AlixTopupRecord,
    TopupStatus,
    applied_from_record,
    same_topup,
    topup_status,
)
from runner.providers.base import (
    Applied,
    NotApplied,
    RefusalCode,
    Refused,
    Settlement,
    StillPending,
    Unknown,
)

log = structlog.get_logger("runner.providers.alix")

FAILED_SETTLEMENT = "the provider reported the topup Failed"


def settle_from(
    records: Sequence[AlixTopupRecord], card_id: str, amount: Decimal, created_at: int
) -> Applied | Refused | StillPending:
    """The final status of the pending topup (card, amount, createdAt) in `records`.

    StillPending while it is pending, not yet listed, ambiguous or in a status nobody
    documented (logged as `alix.status.unknown`)."""
    matches = [r for r in records if same_topup(r, card_id, amount, created_at)]
    if len(matches) != 1:
        if matches:
            log.warning(
                "alix.settle.ambiguous",
                card_id=card_id,
                amount=format_amount(amount),
                created_at=created_at,
                transaction_ids=[r.transaction_id for r in matches],
            )
            return StillPending(f"{len(matches)} topups match: cannot tell which is ours")
        return StillPending("not listed yet")
    record = matches[0]
    status = topup_status(record.status)
    if status is TopupStatus.SUCCESS:
        return applied_from_record(record, amount, pending=False)
    if status is TopupStatus.FAILED:
        return Refused(RefusalCode.REJECTED, FAILED_SETTLEMENT)
    if status is TopupStatus.UNKNOWN:
        log.warning(
            "alix.status.unknown",
            card_id=card_id,
            created_at=created_at,
            transaction_id=record.transaction_id,
            status=record.status,
        )
        return StillPending(f"listed with status {record.status!r}, which is not known")
    return StillPending("listed as Pending")


def reconcile_from(
    records: Sequence[AlixTopupRecord],
    card_id: str,
    amount: Decimal,
    known_refs: Collection[str],
) -> Settlement:
    """Whether a topup of `amount` whose answer was lost is among `records` (the card's topups
    since it was sent); `known_refs` are createdAt values of topups already accounted for."""
    candidates = [
        r
        for r in records
        if same_topup(r, card_id, amount, None) and str(r.created_at) not in known_refs
    ]
    # A Failed topup applied nothing: it may be this attempt's or an earlier one's.
    live = [r for r in candidates if topup_status(r.status) is not TopupStatus.FAILED]
    if len(live) > 1:
        return Unknown(
            f"{len(live)} topups of {format_amount(amount)} since the attempt "
            f"({', '.join(r.transaction_id for r in live)}): cannot tell which is ours"
        )
    if live:
        record = live[0]
        status = topup_status(record.status)
        if status is TopupStatus.UNKNOWN:
            log.warning(
                "alix.status.unknown",
                card_id=card_id,
                created_at=record.created_at,
                transaction_id=record.transaction_id,
                status=record.status,
            )
            return Unknown(
                f"topup {record.transaction_id} has status {record.status!r}, which is not known"
            )
        return applied_from_record(record, amount, pending=status is TopupStatus.PENDING)
    if candidates:
        # One rule for a topup the provider settled Failed, however it is learned (README,
        # "A topup the provider settled Failed"): the row fails, as a Failed webhook makes
        # it; it is not sent again behind the operator's back.
        return Refused(RefusalCode.REJECTED, FAILED_SETTLEMENT)
    if not LIST_SHOWS_ACCEPTED_TOPUPS_AT_ONCE:
        return Unknown("no topup listed yet, and the list may lag behind")
    return NotApplied(
        f"no topup of {format_amount(amount)} listed since the attempt: it was not applied"
    )
