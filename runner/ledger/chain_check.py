"""Checking a run's hash chain (`chain.py`) against the ledger: every record's hash recomputed
in `seq` order, the head where the last record is, and every row and attempt as stored now
equal to its last record (a row never touched since the run began: to the run's first record).

The first problem found is the first record that does not fit: a broken link names its record;
a row or attempt changed, added or removed outside the runner names its row (and the record it
no longer matches).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from runner.errors import ConfigError, LedgerError
from runner.ledger.chain import (
    ATTEMPT_COLUMNS,
    HMAC_SHA256,
    KEY_ENV,
    ROW_COLUMNS,
    Head,
    Query,
    canon,
    link,
    rows_digest,
    show_head,
)

# Rows a run has created and never touched again hold these (besides the job's columns).
_UNTOUCHED = {"status": "not_attempted", "attempts": 0}
_RESULT_COLUMNS = frozenset(ROW_COLUMNS) - {"row", "card_id", "amount", "reference", "extra"}


@dataclass(slots=True)
class ChainVerdict:
    """What `check_chain` found: `problems` empty when everything holds; `chained` False
    for a run recorded before the ledger kept chains."""

    run_key: str
    chained: bool
    head: Head | None = None
    records: int = 0
    problems: list[str] = field(default_factory=list)
    hashes: dict[int, str] = field(default_factory=dict)  # seq -> hash, as recomputed

    @property
    def head_text(self) -> str | None:
        return show_head(self.head)


def read_head(query: Query, run_key: str) -> Head | None:
    """The run's chain head, or None when it has none (a ledger or run from before chains)."""
    try:
        found = query("SELECT seq, hash, algo FROM chain_heads WHERE run_key = ?", (run_key,))
    except LedgerError as exc:
        if "chain_heads" in str(exc):  # a ledger older than migration 0003, read as it is
            return None
        raise
    if not found:
        return None
    seq, hash_, algo = found[0]
    return Head(int(seq), str(hash_), str(algo))


def check_chain(query: Query, run_key: str, key: bytes | None) -> ChainVerdict:
    """Recompute the run's chain with `key` (TOPUP_LEDGER_KEY's, or None) and compare the
    ledger's rows and attempts with it. ConfigError when the chain is keyed and no key is
    given: nothing can be said then. A value no runner writes (a number of text, say) is a
    problem found, not an error: it is what a change by hand leaves."""
    try:
        return _check(query, run_key, key)
    except (ValueError, TypeError, ArithmeticError) as exc:
        verdict = ChainVerdict(run_key, chained=True)
        verdict.problems.append(
            f"the run's chain, rows or attempts hold what the runner never writes ({exc}): "
            "changed outside the runner"
        )
        return verdict


def _check(query: Query, run_key: str, key: bytes | None) -> ChainVerdict:
    head = read_head(query, run_key)
    verdict = ChainVerdict(run_key, chained=head is not None, head=head)
    if head is None:
        if read_head_records(query, run_key):
            verdict.chained = True
            verdict.problems.append(
                "the chain's head is missing while its records are there: the ledger was "
                "changed outside the runner"
            )
        return verdict
    if head.algo == HMAC_SHA256 and key is None:
        raise ConfigError(
            f"run {run_key!r}: its ledger hash chain is keyed ({HMAC_SHA256}): set "
            f"{KEY_ENV} to the key it was written with to verify it"
        )
    latest = _walk(query, run_key, head, key, verdict)
    _compare_rows(query, run_key, latest, verdict)
    _compare_attempts(query, run_key, latest, verdict)
    _compare_job(query, run_key, latest, verdict)
    return verdict


def read_head_records(query: Query, run_key: str) -> int:
    try:
        ((count,),) = query("SELECT COUNT(*) FROM chain WHERE run_key = ?", (run_key,))
    except LedgerError as exc:
        if "chain" in str(exc):
            return 0
        raise
    return int(count)


_Latest = dict[tuple[str, int | None, int | None], tuple[int, dict[str, Any]]]


def _walk(
    query: Query, run_key: str, head: Head, key: bytes | None, verdict: ChainVerdict
) -> _Latest:
    """Every record in order, its hash recomputed; the last body of each row and attempt."""
    latest: _Latest = {}
    previous = ""
    broken = False
    expected = 0
    for seq, kind, row, attempt, algo, body, stored in query(
        "SELECT seq, kind, row, attempt, algo, body, hash FROM chain WHERE run_key = ? "
        "ORDER BY seq",
        (run_key,),
    ):
        expected += 1
        where = _name(int(seq), kind, row, attempt)
        parsed = _parse(str(body))
        why = None
        if int(seq) != expected:
            why = f"comes where record #{expected} should: records were removed or added"
        elif algo != head.algo:
            why = f"says {algo} in a {head.algo} chain"
        elif parsed is None or (
            parsed.get("run"),
            parsed.get("seq"),
            parsed.get("kind"),
            parsed.get("row"),
            parsed.get("attempt"),
        ) != (run_key, int(seq), kind, row, attempt):
            why = "holds a body that is not its own"
        else:
            recomputed = link(head.algo, key, previous, str(body))
            if recomputed != stored:
                why = "has a hash that its content and the record before do not give" + (
                    f" with this {KEY_ENV} (a wrong key gives this too)" if key else ""
                )
        if why is not None and not broken:
            verdict.problems.append(f"{where} does not fit the chain: it {why}")
            broken = True
        previous = str(stored)
        verdict.hashes[int(seq)] = str(stored)
        if parsed is not None and isinstance(parsed.get("data"), dict):
            latest[kind, row, attempt] = (int(seq), parsed["data"])
    verdict.records = expected
    if not broken and (expected != head.seq or previous != head.hash):
        verdict.problems.append(
            f"the chain's head says record #{head.seq} but the chain ends at record "
            f"#{expected}: records were removed or the head was changed"
        )
    return latest


def _parse(body: str) -> dict[str, Any] | None:
    try:
        parsed = json.loads(body)
    except ValueError:
        return None
    return parsed if isinstance(parsed, dict) else None


def _name(seq: int, kind: str, row: int | None, attempt: int | None) -> str:
    if kind == "run":
        return f"record #{seq} (the run's start)"
    if kind == "attempt":
        return f"record #{seq} (row {row}, attempt {attempt})"
    return f"record #{seq} (row {row})"


def _differences(now: dict[str, Any], then: dict[str, Any]) -> str:
    names = [n for n in now if now[n] != then.get(n)] + [n for n in then if n not in now]
    return ", ".join(f"{n} {_shown(now.get(n))} in the ledger, {_shown(then.get(n))} when recorded"
                     for n in names[:3])  # fmt: skip


def _shown(value: Any) -> str:
    return "empty" if value is None else str(value)


def _compare_job(query: Query, run_key: str, latest: _Latest, verdict: ChainVerdict) -> None:
    """The job's rows as they are now against the run's first record (after the rows'
    own checks, which name the row when it has a record of its own)."""
    start = latest.get(("run", None, None))
    if start is None:
        verdict.problems.append("the chain has no record of the run's start")
    elif start[1].get("rows") != rows_digest(query, run_key):
        verdict.problems.append(
            f"the job's rows (row, card, amount, reference) differ from record #{start[0]} "
            "(the run's start): a row was changed, added or removed outside the runner"
        )


def _compare_rows(query: Query, run_key: str, latest: _Latest, verdict: ChainVerdict) -> None:
    seen: set[int] = set()
    for r in query(
        f"SELECT {', '.join(ROW_COLUMNS)} FROM rows WHERE run_key = ? ORDER BY row", (run_key,)
    ):
        now = {name: canon(value) for name, value in zip(ROW_COLUMNS, r, strict=True)}
        row = int(now["row"])
        seen.add(row)
        last = latest.get(("row", row, None))
        if last is not None:
            if now != last[1]:
                verdict.problems.append(
                    f"row {row} differs from its record #{last[0]}: {_differences(now, last[1])}"
                )
            continue
        odd = {n: v for n, v in now.items() if n in _RESULT_COLUMNS and v != _UNTOUCHED.get(n)}
        if odd:
            changed = ", ".join(f"{n} {_shown(v)}" for n, v in odd.items())
            verdict.problems.append(
                f"row {row} has no record since the run began but holds {changed}: changed "
                "outside the runner"
            )
    for kind, gone, _attempt in latest:
        if kind == "row" and gone not in seen:
            verdict.problems.append(f"row {gone} has a record but is not in the ledger: removed")


def _compare_attempts(query: Query, run_key: str, latest: _Latest, verdict: ChainVerdict) -> None:
    seen: set[tuple[int, int]] = set()
    for r in query(
        f"SELECT {', '.join(ATTEMPT_COLUMNS)} FROM attempts WHERE run_key = ? "
        "ORDER BY row, attempt",
        (run_key,),
    ):
        now = {name: canon(value) for name, value in zip(ATTEMPT_COLUMNS, r, strict=True)}
        row, attempt = int(now["row"]), int(now["attempt"])
        seen.add((row, attempt))
        last = latest.get(("attempt", row, attempt))
        if last is None:
            verdict.problems.append(
                f"row {row}, attempt {attempt} has no record: added outside the runner"
            )
        elif now != last[1]:
            verdict.problems.append(
                f"row {row}, attempt {attempt} differs from its record #{last[0]}: "
                f"{_differences(now, last[1])}"
            )
    for kind, gone, tried in latest:
        if kind == "attempt" and (gone, tried) not in seen:
            verdict.problems.append(
                f"row {gone}, attempt {tried} has a record but is not in the ledger: removed"
            )
