"""The ledger's reads that both backends share: a run's spec, where its rows stand, its open
attempts, totals, pending rows, what a report or `status` shows; and how stored values are read.

Portable SQL with `?` placeholders, run through the backend's `_select`; `settle_from_events`
writes through the backend's `apply_event`.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterable, Sequence
from contextlib import AbstractContextManager
from datetime import datetime
from decimal import Decimal
from typing import Any

from runner.domain import RowRecord, RowStatus
from runner.ledger.chain import show_head
from runner.ledger.chain_check import ChainVerdict, check_chain, read_head
from runner.ledger.values import (
    AttemptEntry,
    OpenAttempt,
    PendingRow,
    ProviderEvent,
    RowProgress,
    RunFacts,
    RunOverview,
    RunSpec,
    utcnow,
)
from runner.metrics import StatusTotals


def from_iso(value: str | datetime | None) -> datetime | None:
    """A stored time: ISO text from SQLite, already a datetime from a database server."""
    if value is None or isinstance(value, datetime):
        return value
    return datetime.fromisoformat(value)


def dec(value: str | Decimal | None) -> Decimal | None:
    return None if value is None else Decimal(value)


# What `run_spec` reads of a run.
RUN_COLUMNS = (
    "run_key, provider, base_url, job_file, job_digest, extra_columns, row_count, created_at"
)


def run_spec(r: Sequence[Any]) -> RunSpec:
    return RunSpec(r[0], r[1], r[2], r[3], r[4], tuple(json.loads(r[5])), r[6], from_iso(r[7]))


# What `records` reads of a row, in the order `row_record` takes it.
RECORD_COLUMNS = (
    "row, card_id, amount, reference, extra, status, fee, total_charged, card_balance_before, "
    "card_balance_after, wallet_balance_after, transaction_id, invoice_id, attempts, error, "
    "started_at, finished_at"
)


def row_record(r: Sequence[Any]) -> RowRecord:
    """A report line from a row of RECORD_COLUMNS (money as text or Decimal, times as ISO
    text or datetime: SQLite's or a database server's)."""
    return RowRecord(
        row=r[0],
        card_id=r[1],
        amount=Decimal(r[2]),
        reference=r[3],
        extra=tuple((str(k), str(v)) for k, v in json.loads(r[4])),
        status=RowStatus(r[5]),
        fee=dec(r[6]),
        total_charged=dec(r[7]),
        card_balance_before=dec(r[8]),
        card_balance_after=dec(r[9]),
        wallet_balance_after=dec(r[10]),
        transaction_id=r[11],
        invoice_id=r[12],
        attempts=r[13],
        error=r[14],
        started_at=from_iso(r[15]),
        finished_at=from_iso(r[16]),
    )


class LedgerReads:
    """The reads of a ledger, over the backend's `_select` and `apply_event`."""

    def _select(self, sql: str, params: Sequence[Any] = ()) -> Iterable[tuple[Any, ...]]:
        """The rows a query gives (`?` placeholders, portable SQL); every error a LedgerError."""
        raise NotImplementedError

    def apply_event(self, event: ProviderEvent) -> tuple[int, bool]:
        raise NotImplementedError

    def _listed(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        return list(self._select(sql, params))

    def chain_head(self, run_key: str) -> str | None:
        """The run's hash-chain head as shown (`algo:seq:hash`); None: the run is unchained."""
        try:
            return show_head(read_head(self._listed, run_key))
        except ValueError:  # a head changed by hand: what `verify` then explains
            return "damaged (see topup-runner verify)"

    def check_chain(self, run_key: str, key: bytes | None) -> ChainVerdict:
        """The run's chain recomputed with `key` and held against its rows and attempts,
        all read from one snapshot: a commit made meanwhile is in all of them or in none."""
        with self._read_snapshot():
            return check_chain(self._listed, run_key, key)

    def _read_snapshot(self) -> AbstractContextManager[None]:
        """Reads that follow all see the same commit (the backend's transaction)."""
        return contextlib.nullcontext()

    def find_run(self, run_key: str) -> RunSpec | None:
        found = list(self._select(f"SELECT {RUN_COLUMNS} FROM runs WHERE run_key = ?", (run_key,)))
        return run_spec(found[0]) if found else None

    def runs_with_digest(self, job_digest: str) -> list[RunSpec]:
        """Every run recorded with this job content digest, newest first (`created_at`
        filled in)."""
        return [
            run_spec(row)
            for row in self._select(
                f"SELECT {RUN_COLUMNS} FROM runs WHERE job_digest = ? "
                "ORDER BY created_at DESC, run_key DESC",
                (job_digest,),
            )
        ]

    def progress(self, run_key: str) -> dict[int, RowProgress]:
        """Status and attempts so far of every row that is not final."""
        final = tuple(s.value for s in RowStatus if s.is_final)
        cursor = self._select(
            "SELECT row, status, attempts FROM rows WHERE run_key = ? AND status NOT IN (?, ?, ?)",
            (run_key, *final),
        )
        return {r: RowProgress(RowStatus(s), a) for r, s, a in cursor}

    def open_attempts(self, run_key: str) -> list[OpenAttempt]:
        return self._open_attempts(
            "WHERE run_key = ? AND outcome IS NULL ORDER BY row, attempt", (run_key,)
        )

    def _open_attempts(self, where: str, params: Sequence[Any]) -> list[OpenAttempt]:
        # Imported here, by the one read that makes a card's state: importing the ledger
        # loads no provider module (the lead may move these two values to runner.domain).
        from runner.providers.base import CardState, CardStatus

        cursor = self._select(
            "SELECT row, attempt, card_id, amount, before_status, before_balance, "
            f"before_deposit, sent_at, settle_by FROM attempts {where}",
            params,
        )
        found = []
        for (
            row,
            attempt,
            card_id,
            amount,
            b_status,
            b_balance,
            b_deposit,
            sent_at,
            settle,
        ) in cursor:
            before = None
            if b_balance is not None:
                before = CardState(
                    card_id=card_id,
                    status=CardStatus(b_status or "unknown"),
                    balance=Decimal(b_balance),
                    deposit=dec(b_deposit),
                )
            sent = from_iso(sent_at) or utcnow()
            found.append(
                OpenAttempt(row, attempt, card_id, Decimal(amount), before, sent, from_iso(settle))
            )
        return found

    def attempt_log(self, run_key: str) -> list[AttemptEntry]:
        """Every attempt of the run, by row and attempt: what an audit places topups by."""
        cursor = self._select(
            "SELECT row, attempt, card_id, amount, before_deposit, sent_at, finished_at, "
            "settle_by, outcome FROM attempts WHERE run_key = ? ORDER BY row, attempt",
            (run_key,),
        )
        return [
            AttemptEntry(
                r, a, c, Decimal(m), dec(d), from_iso(s) or utcnow(), from_iso(f), from_iso(b), o
            )
            for r, a, c, m, d, s, f, b, o in cursor
        ]

    def last_attempts(self, run_key: str) -> dict[str, datetime]:
        """When each card's latest attempt was sent: a resumed run honours its cooldown."""
        cursor = self._select(
            "SELECT card_id, MAX(sent_at) FROM attempts WHERE run_key = ? GROUP BY card_id",
            (run_key,),
        )
        return {card: when for card, sent in cursor if (when := from_iso(sent)) is not None}

    def totals(self, run_key: str) -> dict[RowStatus, StatusTotals]:
        """Rows and money of the run by status, summed exactly."""
        sums: dict[RowStatus, list[Any]] = {
            s: [0, Decimal(0), Decimal(0), Decimal(0)] for s in RowStatus
        }
        cursor = self._select(
            "SELECT status, amount, fee, total_charged FROM rows WHERE run_key = ?", (run_key,)
        )
        for status, amount, fee, total in cursor:
            entry = sums[RowStatus(status)]
            entry[0] += 1
            entry[1] += Decimal(amount)
            entry[2] += Decimal(fee) if fee is not None else 0
            entry[3] += Decimal(total) if total is not None else 0
        return {s: StatusTotals(*values) for s, values in sums.items()}

    def fee_samples(self, provider: str, limit: int = 2000) -> list[tuple[Decimal, Decimal]]:
        """(amount, fee) of the provider's most recent topups that reported a fee."""
        cursor = self._select(
            "SELECT rows.amount, rows.fee FROM rows JOIN runs USING (run_key) "
            "WHERE runs.provider = ? AND rows.fee IS NOT NULL "
            "ORDER BY rows.finished_at DESC LIMIT ?",
            (provider, limit),
        )
        return [(Decimal(a), Decimal(f)) for a, f in cursor]

    def learned_rate(self, target: str) -> float | None:
        """The request rate `--rate-limit auto` last learned on `target` (None: never)."""
        found = list(self._select("SELECT rate FROM learned_rates WHERE target = ?", (target,)))
        return float(found[0][0]) if found else None

    def known_refs(self, card_id: str) -> set[str]:
        """Provider references of the card's topups the ledger already accounts for."""
        cursor = self._select(
            "SELECT provider_ref FROM rows WHERE card_id = ? AND provider_ref IS NOT NULL",
            (card_id,),
        )
        return {ref for (ref,) in cursor}

    def pending(self, run_key: str) -> list[PendingRow]:
        cursor = self._select(
            "SELECT row, card_id, amount, provider_ref FROM rows "
            "WHERE run_key = ? AND status = 'pending' ORDER BY row",
            (run_key,),
        )
        return [PendingRow(run_key, r, c, Decimal(a), ref or "") for r, c, a, ref in cursor]

    def settle_from_events(self, run_key: str, provider: str) -> int:
        """Settle the run's pending rows whose event arrived before they were recorded."""
        found = list(
            self._select(
                "SELECT e.card_id, e.amount, e.provider_ref, e.status, e.fee, e.balance_after "
                "FROM provider_events e JOIN rows r ON r.card_id = e.card_id "
                "AND r.amount = e.amount AND r.provider_ref = e.provider_ref "
                "WHERE r.run_key = ? AND r.status = 'pending' AND e.provider = ?",
                (run_key, provider),
            )
        )
        settled = 0
        for card, amount, ref, status, fee, balance in found:
            event = ProviderEvent(
                provider, card, Decimal(amount), ref, RowStatus(status), dec(fee), dec(balance)
            )
            settled += self.apply_event(event)[0]
        return settled

    def run_facts(self, run_key: str) -> RunFacts:
        ((created, finished, first, last),) = self._select(
            "SELECT r.created_at, MAX(w.finished_at), "
            "MIN(CASE WHEN w.status IN ('succeeded', 'pending') THEN w.finished_at END), "
            "MAX(CASE WHEN w.status IN ('succeeded', 'pending') THEN w.finished_at END) "
            "FROM runs r JOIN rows w USING (run_key) WHERE r.run_key = ? GROUP BY r.created_at",
            (run_key,),
        )
        ((sent,),) = self._select("SELECT COUNT(*) FROM attempts WHERE run_key = ?", (run_key,))
        return RunFacts(
            from_iso(created) or utcnow(),
            from_iso(finished),
            sent,
            from_iso(first),
            from_iso(last),
            self.chain_head(run_key),
        )

    def overview(self) -> list[RunOverview]:
        runs = list(
            self._select(
                "SELECT run_key, provider, job_file, row_count, created_at, finished_at "
                "FROM runs ORDER BY created_at"
            )
        )
        result = []
        for key, provider, job_file, count, created, finished in runs:
            by_status = dict(
                self._select(
                    "SELECT status, COUNT(*) FROM rows WHERE run_key = ? GROUP BY status", (key,)
                )
            )
            result.append(
                RunOverview(
                    key,
                    provider,
                    job_file,
                    count,
                    from_iso(created) or utcnow(),
                    from_iso(finished),
                    by_status,
                )
            )
        return result

    def status_counts(self, run_key: str) -> dict[RowStatus, int]:
        counts = dict.fromkeys(RowStatus, 0)
        for status, n in self._select(
            "SELECT status, COUNT(*) FROM rows WHERE run_key = ? GROUP BY status", (run_key,)
        ):
            counts[RowStatus(status)] = n
        return counts
