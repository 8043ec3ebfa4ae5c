"""What the guardrails keep in the ledger (issue 16): approvals of a job's exact content, and
the rows other runs already paid, looked up by card for the repeat guard.

Portable SQL, as the other reads: `?` placeholders run through the backend's `_select`;
writes are statements for `Ledger.write`. The guard's decisions are `runner.guard`'s.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

from runner.ledger.statements import Statement, iso

# How many card ids one lookup names: well under SQLite's and PostgreSQL's parameter limits.
_CARDS_A_QUERY = 500


@dataclass(frozen=True, slots=True)
class Approval:
    """One approval as recorded: who, when, until when, of which content."""

    digest: str
    approver: str
    os_user: str
    approved_at: datetime
    expires_at: datetime
    revoked_at: datetime | None
    run_key: str
    target: str
    job_file: str
    row_count: int
    total: Decimal
    snapshot: dict[str, Any]
    public_key: str | None = None
    signature: str | None = None


@dataclass(frozen=True, slots=True)
class PaidRow:
    """A row another run paid (succeeded, or accepted and pending)."""

    run_key: str
    row: int
    card_id: str
    amount: Decimal
    reference: str
    status: str
    finished_at: datetime | None


_APPROVAL_COLUMNS = (
    "digest, approver, os_user, approved_at, expires_at, revoked_at, run_key, target, "
    "job_file, row_count, total, snapshot, public_key, signature"
)


def _when(value: str | datetime | None) -> datetime | None:
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def _approval(r: Sequence[Any]) -> Approval:
    approved, expires = _when(r[3]), _when(r[4])
    assert approved is not None  # NOT NULL columns
    assert expires is not None
    return Approval(
        r[0], r[1], r[2], approved, expires, _when(r[5]), r[6], r[7], r[8], int(r[9]),
        Decimal(r[10]), json.loads(r[11]), r[12], r[13],
    )  # fmt: skip


def approval_insert(approval: Approval) -> list[Statement]:
    """The statement that records `approval`."""
    a = approval
    values = (
        a.digest, a.approver, a.os_user, iso(a.approved_at), iso(a.expires_at),
        iso(a.revoked_at), a.run_key, a.target, a.job_file, a.row_count, str(a.total),
        json.dumps(a.snapshot, sort_keys=True), a.public_key, a.signature,
    )  # fmt: skip
    marks = ", ".join("?" * len(values))
    return [(f"INSERT INTO approvals ({_APPROVAL_COLUMNS}) VALUES ({marks})", values)]


def approval_revoke(digest: str, approver: str, at: datetime) -> list[Statement]:
    """The statement that revokes every approval `approver` gave of `digest`."""
    return [
        (
            "UPDATE approvals SET revoked_at = ? WHERE digest = ? AND approver = ? "
            "AND revoked_at IS NULL",
            (iso(at), digest, approver),
        )
    ]


class GuardReads:
    """The guardrails' reads, over the backend's `_select`."""

    def _select(self, sql: str, params: Sequence[Any] = ()) -> Iterable[tuple[Any, ...]]:
        raise NotImplementedError

    def approvals(self, digest: str, job_file: str, run_key: str) -> list[Approval]:
        """Every approval of `digest`, and those given for the same job file or run key
        (voided by a change since, but worth naming), oldest first."""
        return [
            _approval(r)
            for r in self._select(
                f"SELECT {_APPROVAL_COLUMNS} FROM approvals "
                "WHERE digest = ? OR job_file = ? OR run_key = ? ORDER BY approved_at",
                (digest, job_file, run_key),
            )
        ]

    def paid_elsewhere(
        self, cards: Sequence[str], run_key: str, provider: str, since: datetime
    ) -> list[PaidRow]:
        """Rows of runs other than `run_key` on `provider` that paid one of `cards` (lower
        case) since `since`: succeeded or pending."""
        found: list[PaidRow] = []
        for start in range(0, len(cards), _CARDS_A_QUERY):
            chunk = cards[start : start + _CARDS_A_QUERY]
            marks = ", ".join("?" * len(chunk))
            for r in self._select(
                "SELECT r.run_key, r.row, r.card_id, r.amount, r.reference, r.status, "
                "r.finished_at FROM rows r JOIN runs u ON u.run_key = r.run_key "
                f"WHERE lower(r.card_id) IN ({marks}) AND r.status IN ('succeeded', 'pending') "
                "AND r.run_key <> ? AND u.provider = ? AND r.finished_at >= ?",
                (*chunk, run_key, provider, iso(since)),
            ):
                found.append(PaidRow(r[0], int(r[1]), r[2], Decimal(r[3]), r[4], r[5], _when(r[6])))
        return found
