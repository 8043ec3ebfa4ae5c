"""The request rate a run learned with `--rate-limit auto`: read from the ledger before the first
topup (so that a run starts near the last known good rate), kept there at the end, and what
`check` says of it. Kept per target: provider and normalised base URL (runner.targets)."""

from __future__ import annotations

import structlog

from runner.config import Settings
from runner.errors import LedgerError
from runner.ledger import Ledger, utcnow
from runner.ledger.statements import learned_rate as learned_rate_statement
from runner.run.resume import target_of
from runner.scheduler import Pacer, lower_bound

log = structlog.get_logger("runner.run")


async def learned_rate(ledger: Ledger, settings: Settings) -> float | None:
    """The rate an earlier run learned on this run's target (None: none, or a ledger older
    than the table, opened read-only)."""
    try:
        return await ledger.call(ledger.learned_rate, target_of(settings))
    except LedgerError:
        return None


async def start_at_learned(ledger: Ledger, settings: Settings, pacer: Pacer) -> None:
    """With `auto`, start the pacer at what an earlier run learned, if one did."""
    if settings.rate_auto:
        pacer.start_from(await learned_rate(ledger, settings))
        log.info(
            "rate.start",
            rate_per_s=round(pacer.current_rate or 0.0, 3),
            learned=pacer.learned is not None,
            ceiling_per_s=settings.rate_ceiling,
        )


async def keep_learned(ledger: Ledger, settings: Settings, pacer: Pacer) -> None:
    """With `auto`, keep what this run learned for the next run on the same target."""
    control = pacer.control
    if not settings.rate_auto or control is None or ledger.readonly:
        return
    statement = learned_rate_statement(target_of(settings), control.keep(), utcnow())
    try:
        await ledger.write([statement])
    except LedgerError as exc:  # the run's outcome matters more than its learned rate
        log.warning("rate.not_kept", error=str(exc))


def check_lines(settings: Settings, rows: int, busiest: int, learned: float | None) -> list[str]:
    """`check`'s lower bounds: at the configured rate, and at the last learned one."""
    rate, cooldown = settings.rate_limit, settings.cooldown
    configured = "unlimited" if rate is None else f"{rate:g}/s"
    if settings.rate_auto:
        ceiling = settings.rate_ceiling
        configured = f"auto from {configured}" + ("" if ceiling is None else f", max {ceiling:g}/s")
    lines = [
        f"estimated minimum duration: {lower_bound(rows, busiest, rate, cooldown):.1f} s "
        f"(rate {configured}, cooldown {cooldown:g} s)"
    ]
    if learned is None:
        lines.append("learned rate: none yet on this target (--rate-limit auto learns one)")
    else:
        at = lower_bound(rows, busiest, learned, cooldown)
        lines.append(
            f"estimated minimum duration at the last learned rate {learned:.3g}/s: {at:.1f} s"
        )
    return lines
