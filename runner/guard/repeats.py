"""The repeat-payment guard: rows of this job that another run key already paid within the
window (same card and amount; the same reference makes it surer) refuse the job, listed.

A run's own rows never count, so resuming a run is never a repeat. A recurring job that
declares its period (`recurring: daily`) is refused only for payments closer than half its
period: yesterday's run is expected, a second run today is not.
"""

from __future__ import annotations

from collections.abc import Sequence
from decimal import Decimal

from runner.domain import JobRow
from runner.guard.options import show_duration
from runner.ledger.guards import PaidRow
from runner.money import format_amount

_LISTED = 50


def window_of(repeat_window: float, recurring: float | None) -> float:
    """The look-back in seconds: the repeat window, shortened for a recurring job."""
    if recurring is None:
        return repeat_window
    return min(repeat_window, recurring / 2)


def job_cards(rows: Sequence[JobRow]) -> list[str]:
    """The job's cards as the guard looks them up: lower case, each once."""
    return sorted({r.card_id.lower() for r in rows})


def repeat_problems(
    rows: Sequence[JobRow],
    paid: Sequence[PaidRow],
    allowed: Sequence[str],
    window: float,
) -> list[str]:
    """One line a row of the job paid elsewhere (up to 50), then what to do; [] if none."""
    earlier: dict[tuple[str, Decimal], list[PaidRow]] = {}
    for p in paid:
        if p.run_key not in allowed:
            earlier.setdefault((p.card_id.lower(), p.amount), []).append(p)
    if not earlier:
        return []
    lines: list[str] = []
    keys: dict[str, None] = {}
    found = 0
    for r in rows:
        matches = earlier.get((r.card_id.lower(), r.amount))
        if not matches:
            continue
        found += 1
        # The same reference first, then the latest.
        best = max(matches, key=lambda p: (p.reference == r.reference and bool(r.reference),
                                           p.finished_at is not None, p.finished_at))  # fmt: skip
        keys[best.run_key] = None
        if len(lines) < _LISTED:
            when = f"{best.finished_at:%Y-%m-%d %H:%M} UTC" if best.finished_at else "?"
            same_ref = " (same reference)" if r.reference and best.reference == r.reference else ""
            lines.append(
                f"row {r.row} (card {r.card_id}, {format_amount(r.amount)}) was already paid "
                f"under run key {best.run_key} row {best.row} on {when} ({best.status})"
                f"{same_ref}"
            )
    if not found:
        return []
    if found > _LISTED:
        lines.append(f"... and {found - _LISTED} more rows paid under other run keys")
    shown = ", ".join(list(keys)[:5]) + (" ..." if len(keys) > 5 else "")
    lines.append(
        f"{found} row(s) of this job were paid under other run keys ({shown}) within the "
        f"last {show_duration(window)}: pass --allow-repeat-of RUN_KEY to pay them again on "
        "purpose, or --repeat-window 0; a recurring job says so in its settings "
        "(recurring: daily)"
    )
    return lines
