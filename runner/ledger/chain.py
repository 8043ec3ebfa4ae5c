"""The hash chain of a run: every record the run leaves in the ledger, hashed over the one
before, so that a record changed, dropped or added afterwards shows (`chain_check.py` checks).

What a record is. Each transaction that writes a run's `rows` or `attempts` appends, inside
that same transaction and after its writes, one record for every row and every attempt it
touched: a snapshot of that row's or attempt's columns *as stored* (row, card, amount, status,
fee, transaction id, attempt number, outcome, times...). A run's first record (`run`) is
appended when the run is created: its provider, job digest, row count and a digest of its rows
as the job gave them, so that the rows not yet touched are covered too. The record's body is
canonical JSON (sorted keys, no spaces, ASCII; money and times exactly as the database
returns them), and its hash is SHA-256 over `previous hash + "\\n" + body`, or HMAC-SHA256 with
`TOPUP_LEDGER_KEY` when that is set (each record says which, `algo`). The key is read from the
environment only, and is never stored, logged or shown.

The order, with several workers. A chain needs one order that everyone agrees on. Workers
sharing a PostgreSQL ledger commit concurrently, so the order could be made canonical after
the fact (sorted by time, row, attempt) or be the commit order itself. A canonical order would
let a record's hash depend on records another worker commits later with an earlier time, so
no hash could be final when written. The chain therefore follows the commit order: every
transaction that writes a run's rows or attempts first locks the run's head (`chain_heads`,
`SELECT ... FOR UPDATE`) before any other write, so that the transactions of one run, on any
host, extend its chain one at a time (taken first, the lock never waits while holding a row
lock another worker needs: no deadlock). SQLite's `BEGIN IMMEDIATE` already serialises writers.
A record's `seq` is its place; `verify` needs no order but `seq` to recompute the chain.

A run created before this ledger schema (migration 0003) has no head: it stays unchained, and
`verify` says so rather than calling it tampered or sound.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

from runner.errors import LedgerError

KEY_ENV = "TOPUP_LEDGER_KEY"
SHA256 = "sha256"
HMAC_SHA256 = "hmac-sha256"
FORMAT = 1  # the body's version, in every body as "v"

# What a record holds of a row and of an attempt: every column but the run key (in the body).
ROW_COLUMNS = (
    "row",
    "card_id",
    "amount",
    "reference",
    "extra",
    "status",
    "fee",
    "total_charged",
    "card_balance_before",
    "card_balance_after",
    "wallet_balance_after",
    "transaction_id",
    "invoice_id",
    "attempts",
    "error",
    "started_at",
    "finished_at",
    "provider_ref",
)
ATTEMPT_COLUMNS = (
    "row",
    "attempt",
    "card_id",
    "amount",
    "before_status",
    "before_balance",
    "before_deposit",
    "sent_at",
    "outcome",
    "detail",
    "finished_at",
    "settle_by",
)
# What the `run` record's digest of the job's rows covers: what never changes after creation.
JOB_COLUMNS = ("row", "card_id", "amount", "reference", "extra")

# A record's subject: (kind, run key, row, attempt); attempt None for a row.
Subject = tuple[str, str, int, int | None]
# A query in the ledger's portable SQL (`?` placeholders): the rows it gives (none for a write).
Query = Callable[[str, Sequence[Any]], list[tuple[Any, ...]]]
# Many writes of one statement.
Many = Callable[[str, Sequence[Sequence[Any]]], None]


@dataclass(slots=True)
class Head:
    """The last record of a run's chain."""

    seq: int
    hash: str
    algo: str


def canon(value: Any) -> Any:
    """A stored value as a record holds it: the same value always gives the same JSON, and
    any change of the stored value (12.30 to 12.3 included) gives another."""
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, datetime):
        return value.astimezone(UTC).isoformat(timespec="microseconds")
    if isinstance(value, float):  # a ledger never stores one; something else did
        return repr(value)
    return value


def body_text(
    run_key: str, seq: int, kind: str, row: int | None, attempt: int | None, data: Mapping[str, Any]
) -> str:
    """A record's canonical JSON: what its hash is taken over."""
    return json.dumps(
        {
            "v": FORMAT,
            "run": run_key,
            "seq": seq,
            "kind": kind,
            "row": row,
            "attempt": attempt,
            "data": {name: canon(value) for name, value in data.items()},
        },
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=True,
    )


def link(algo: str, key: bytes | None, previous: str, body: str) -> str:
    """A record's hash: over the previous record's hash ("" for the first) and its body."""
    message = f"{previous}\n{body}".encode()
    if algo == HMAC_SHA256:
        if key is None:
            raise LedgerError(f"a keyed ({HMAC_SHA256}) chain needs {KEY_ENV}")
        return hmac.new(key, message, hashlib.sha256).hexdigest()
    return hashlib.sha256(message).hexdigest()


def ledger_key(env: Mapping[str, str] | None = None) -> bytes | None:
    """TOPUP_LEDGER_KEY's bytes, or None when it is unset or empty."""
    value = (os.environ if env is None else env).get(KEY_ENV, "").strip()
    return value.encode() if value else None


def show_head(head: Head | None) -> str | None:
    """A head as the report, the metrics, the summary line and `status` show it."""
    return None if head is None else f"{head.algo}:{head.seq}:{head.hash}"


def parse_head(text: str) -> tuple[str, int, str] | None:
    """(algo, seq, hash) of a head as `show_head` writes it; None if it is not one."""
    parts = text.strip().split(":")
    if len(parts) != 3 or parts[0] not in (SHA256, HMAC_SHA256) or not parts[1].isdigit():
        return None
    return parts[0], int(parts[1]), parts[2]


def touched(batch: Iterable[tuple[str, Sequence[Any]]]) -> list[Subject]:
    """The rows and attempts a batch of `statements.py` statements writes, in order of first
    write. A statement on another table (run_cards) touches none. A statement of rows or
    attempts this does not know would leave its write out of the chain, which `verify` would
    then report as a change made outside the runner: never silence."""
    found: dict[Subject, None] = {}
    for sql, params in batch:
        if sql.startswith("UPDATE rows "):
            found["row", params[-2], params[-1], None] = None
        elif sql.startswith("UPDATE attempts "):
            found["attempt", params[-3], params[-2], params[-1]] = None
        elif sql.startswith("INSERT INTO attempts "):
            found["attempt", params[0], params[1], params[2]] = None
    return list(found)


def rows_digest(query: Query, run_key: str) -> str:
    """SHA-256 of the run's rows as the job gave them (row, card, amount, reference, extra)."""
    digest = hashlib.sha256()
    for r in query(
        f"SELECT {', '.join(JOB_COLUMNS)} FROM rows WHERE run_key = ? ORDER BY row", (run_key,)
    ):
        line = json.dumps([canon(v) for v in r], separators=(",", ":"), ensure_ascii=True)
        digest.update(line.encode() + b"\n")
    return digest.hexdigest()


def run_data(query: Query, run_key: str) -> dict[str, Any]:
    """What the `run` record holds: the run as created, and its rows' digest."""
    found = query("SELECT provider, job_digest, row_count FROM runs WHERE run_key = ?", (run_key,))
    provider, job_digest, row_count = found[0] if found else (None, None, None)
    return {
        "provider": provider,
        "job_digest": job_digest,
        "row_count": row_count,
        "rows": rows_digest(query, run_key),
    }


def snapshots(
    query: Query, run_key: str, subjects: Sequence[Subject]
) -> dict[Subject, dict[str, Any]]:
    """The stored columns of `subjects` (all of one run), read in two queries."""
    rows = sorted({s[2] for s in subjects if s[0] == "row"})
    tried = sorted({s[2] for s in subjects if s[0] == "attempt"})
    found: dict[Subject, dict[str, Any]] = {}
    for kind, columns, wanted in (("row", ROW_COLUMNS, rows), ("attempt", ATTEMPT_COLUMNS, tried)):
        if not wanted:
            continue
        table = "rows" if kind == "row" else "attempts"
        marks = ", ".join("?" for _ in wanted)
        for r in query(
            f"SELECT {', '.join(columns)} FROM {table} WHERE run_key = ? AND row IN ({marks})",
            (run_key, *wanted),
        ):
            data = dict(zip(columns, r, strict=True))
            attempt = data["attempt"] if kind == "attempt" else None
            found[kind, run_key, data["row"], attempt] = data
    return found


class ChainWriter:
    """Extends the chains of the runs a transaction writes. The backend calls `lock` first
    in the transaction, `append` after its writes, and `start` when it creates a run."""

    def __init__(self, key: bytes | None) -> None:
        self._key = key
        self.algo = HMAC_SHA256 if key is not None else SHA256
        self._checked: set[str] = set()  # runs whose last record this key was checked on

    @classmethod
    def from_env(cls) -> ChainWriter:
        return cls(ledger_key())

    def lock(self, query: Query, run_keys: Iterable[str], for_update: bool) -> dict[str, Head]:
        """The heads of `run_keys` that have one (an unchained run has none), locked on
        PostgreSQL until the transaction ends; LedgerError if this process's key is not the
        one the run's chain was begun with."""
        heads: dict[str, Head] = {}
        suffix = " FOR UPDATE" if for_update else ""
        for run_key in sorted(set(run_keys)):  # one order: two transactions never cross
            found = query(
                f"SELECT seq, hash, algo FROM chain_heads WHERE run_key = ?{suffix}", (run_key,)
            )
            if found:
                seq, hash_, algo = found[0]
                heads[run_key] = head = Head(int(seq), str(hash_), str(algo))
                self._check_key(query, run_key, head)
        return heads

    def _check_key(self, query: Query, run_key: str, head: Head) -> None:
        if head.algo != self.algo:
            if head.algo == HMAC_SHA256:
                why = f"is keyed: set {KEY_ENV} as it was when the run began"
            else:
                why = f"was begun without a key: unset {KEY_ENV} to go on with it"
            raise LedgerError(f"run {run_key!r}: its ledger hash chain {why}")
        if head.algo != HMAC_SHA256 or run_key in self._checked:
            return
        last = query(
            "SELECT seq, body, hash FROM chain WHERE run_key = ? AND seq IN (?, ?) ORDER BY seq",
            (run_key, head.seq - 1, head.seq),
        )
        previous = str(last[0][2]) if len(last) == 2 else ""
        body, stored = (str(last[-1][1]), str(last[-1][2])) if last else ("", "")
        if not last or link(self.algo, self._key, previous, body) != stored:
            raise LedgerError(
                f"run {run_key!r}: {KEY_ENV} is not the key its ledger hash chain was begun "
                "with (or the chain was changed): nothing was written"
            )
        self._checked.add(run_key)

    def append(
        self, query: Query, many: Many, subjects: Sequence[Subject], heads: dict[str, Head]
    ) -> None:
        """One record for each of `subjects` of a chained run, as stored now, in order."""
        records: list[tuple[Any, ...]] = []
        for run_key, head in heads.items():
            mine = [s for s in subjects if s[1] == run_key]
            stored = snapshots(query, run_key, mine)
            for subject in mine:
                data = stored.get(subject)
                if data is not None:  # a statement that matched nothing leaves nothing
                    records.append(self._record(head, subject, data))
        self._save(many, records, heads)

    def start(self, query: Query, many: Many, run_key: str) -> None:
        """Begin the chain of a run just created (in the transaction that created it)."""
        head = Head(0, "", self.algo)
        record = self._record(head, ("run", run_key, 0, None), run_data(query, run_key))
        many(
            "INSERT INTO chain_heads (run_key, seq, hash, algo) VALUES (?, ?, ?, ?)",
            [(run_key, head.seq, head.hash, head.algo)],
        )
        self._save(many, [record], {run_key: head})
        self._checked.add(run_key)

    def _record(self, head: Head, subject: Subject, data: Mapping[str, Any]) -> tuple[Any, ...]:
        kind, run_key, row, attempt = subject
        seq = head.seq + 1
        shown_row = None if kind == "run" else row
        body = body_text(run_key, seq, kind, shown_row, attempt, data)
        head.seq, head.hash = seq, link(head.algo, self._key, head.hash, body)
        return (run_key, seq, kind, shown_row, attempt, head.algo, body, head.hash)

    @staticmethod
    def _save(many: Many, records: Sequence[tuple[Any, ...]], heads: dict[str, Head]) -> None:
        if not records:
            return
        many(
            "INSERT INTO chain (run_key, seq, kind, row, attempt, algo, body, hash) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            records,
        )
        many(
            "UPDATE chain_heads SET seq = ?, hash = ? WHERE run_key = ?",
            [(h.seq, h.hash, run_key) for run_key, h in heads.items()],
        )
