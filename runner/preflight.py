"""Before anything is sent: the provider's state against the job (wallet, cards, amounts).

Returns the card snapshots the run starts from, or refuses the job with every problem
found. With `allow_partial`, rows whose card cannot take a topup (unknown, inactive, in
another currency than the job declares) are set aside instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import ROUND_CEILING, Decimal

import anyio

from runner.domain import JobRow
from runner.errors import PreflightRefused, RunnerError
from runner.jobs.split import card_limit_problems, duplicate_key, over_max_advice
from runner.money import format_amount
from runner.providers.base import CardState, CardStatus, Provider

_LOOKUP_CONCURRENCY = 8
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE)
_LISTED = 10
_CENT = Decimal("0.01")  # how many card ids a refusal message names before "and N more"


@dataclass(frozen=True, slots=True)
class FeeModel:
    """A fee estimate, `fixed + rate × amount` rounded up to the cent; `source` says whence."""

    fixed: Decimal
    rate: Decimal
    source: str

    def fee(self, amount: Decimal) -> Decimal:
        return (self.fixed + self.rate * amount).quantize(_CENT, rounding=ROUND_CEILING)


def fit_fee_model(
    samples: Sequence[tuple[Decimal, Decimal]], source: str | None = None
) -> FeeModel | None:
    """Learn a fee estimate from earlier (amount, fee) pairs, erring on the high side.

    A least-squares line, then raised until no earlier fee lies above it: preflight must not
    promise that a wallet covers a job when the fees it has seen say otherwise.
    """
    if not samples:
        return None
    amounts = {a for a, _ in samples}
    if len(amounts) < 2:
        rate = max(f / a for a, f in samples if a > 0)
        return FeeModel(Decimal(0), rate, source or f"learned from {len(samples)} earlier topups")
    n = Decimal(len(samples))
    sx = sum((a for a, _ in samples), Decimal(0))
    sy = sum((f for _, f in samples), Decimal(0))
    sxx = sum((a * a for a, _ in samples), Decimal(0))
    sxy = sum((a * f for a, f in samples), Decimal(0))
    rate = max(Decimal(0), (n * sxy - sx * sy) / (n * sxx - sx * sx))
    fixed = (sy - rate * sx) / n
    fixed += max(Decimal(0), max(f - (fixed + rate * a) for a, f in samples))
    return FeeModel(
        max(Decimal(0), fixed), rate, source or f"learned from {len(samples)} earlier topups"
    )


def duplicate_rows(rows: Iterable[JobRow]) -> list[list[int]]:
    """Groups of rows with the same card, amount and reference: likely pasted twice. The
    equal chunks of one split row are not (`runner.jobs.split.duplicate_key`)."""
    groups: dict[tuple[str, Decimal, str, tuple[int, int] | None], list[int]] = {}
    for row in rows:
        position, number = duplicate_key(row)
        groups.setdefault((row.card_id, row.amount, row.reference, position), []).append(number)
    return [found for found in groups.values() if len(found) > 1]


@dataclass(frozen=True, slots=True)
class PreflightReport:
    """What preflight learned: the starting snapshots and the rows it set aside."""

    wallet_balance: Decimal | None  # None: the provider documents no way to read it
    cards: Mapping[str, CardState]
    total_amount: Decimal
    set_aside: Mapping[int, str] = field(default_factory=dict)  # row -> why not sent
    estimated_fees: Decimal | None = None
    fee_source: str = "unknown"


def check_amount_rules(
    rows: Iterable[JobRow], min_amount: Decimal, max_amount: Decimal
) -> list[tuple[JobRow, str]]:
    """Rows whose amount the provider's documented rules refuse."""
    bad = []
    for row in rows:
        if row.amount < min_amount:
            bad.append((row, f"{format_amount(row.amount)} is below the minimum {min_amount}"))
        elif row.amount > max_amount:
            bad.append((row, over_max_advice(row.amount, max_amount)))
    return bad


def _name(ids: Sequence[str]) -> str:
    shown = ", ".join(ids[:_LISTED])
    return shown + (f" and {len(ids) - _LISTED} more" if len(ids) > _LISTED else "")


def _card_key(card_id: str) -> str:
    # UUIDs are case-insensitive: a provider may answer in another case than the job wrote.
    return card_id.lower() if _UUID.fullmatch(card_id) else card_id


async def snapshot_cards(provider: Provider, card_ids: Iterable[str]) -> dict[str, CardState]:
    """The state of each card: one listing, then single lookups for cards it did not show."""
    wanted = set(card_ids)
    listed = {_card_key(card): state for card, state in (await provider.list_cards()).items()}
    found = {card: listed[_card_key(card)] for card in wanted if _card_key(card) in listed}
    missing = sorted(wanted - set(found))
    limiter = anyio.CapacityLimiter(_LOOKUP_CONCURRENCY)
    failed: list[RunnerError] = []

    async def lookup(card: str, scope: anyio.CancelScope) -> None:
        async with limiter:
            try:
                state = await provider.get_card(card)
            except RunnerError as exc:
                # Raised below, as itself: out of a task group it would be an ExceptionGroup.
                failed.append(exc)
                scope.cancel()
                return
        if state is not None:
            found[card] = state

    async with anyio.create_task_group() as tg:
        for card in missing:
            tg.start_soon(lookup, card, tg.cancel_scope)
    if failed:
        raise failed[0]
    return found


def _card_problems(
    rows: Sequence[JobRow], cards: Mapping[str, CardState], set_aside: dict[int, str]
) -> list[str]:
    """Cards the provider does not know or that cannot take money; their rows go aside."""
    problems = []
    unknown = sorted({r.card_id for r in rows if r.card_id not in cards})
    if unknown:
        problems.append(f"{len(unknown)} card(s) not found: {_name(unknown)}")
    inactive = sorted(
        {
            r.card_id
            for r in rows
            if r.card_id in cards and cards[r.card_id].status is not CardStatus.ACTIVE
        }
    )
    if inactive:
        states = [f"{c} ({cards[c].status.value})" for c in inactive]
        problems.append(f"{len(inactive)} card(s) not active: {_name(states)}")
    for r in rows:
        if r.card_id not in cards:
            set_aside[r.row] = "preflight: card not found"
        elif cards[r.card_id].status is not CardStatus.ACTIVE:
            set_aside[r.row] = f"preflight: card is {cards[r.card_id].status.value}"
    return problems


def _currency_problems(
    declared: str,
    rows: Sequence[JobRow],
    cards: Mapping[str, CardState],
    provider: Provider,
    set_aside: dict[int, str],
) -> tuple[list[str], list[str]]:
    """Rows whose card holds another currency than the job declares: set aside, and the
    problems they make; then the problems no row can be set aside for (cards the provider
    documents no way to read hold its own currency, so a mismatch is the whole job's)."""
    rules = provider.rules
    if not rules.reads_cards:
        if declared == rules.currency.upper():
            return [], []
        return [], [f"the job declares {declared} but {provider.name} pays in {rules.currency}"]
    found: dict[str, str] = {}  # card -> the currency it holds
    for r in rows:
        if r.row in set_aside:
            continue
        held = cards[r.card_id].currency.strip().upper()
        if held != declared:
            found[r.card_id] = held
            set_aside[r.row] = f"preflight: card holds {held}, the job declares {declared}"
    if not found:
        return [], []
    problem = f"{len(found)} card(s) hold another currency than the job's {declared}: " + _name(
        [f"{card} ({found[card]})" for card in sorted(found)]
    )
    return [problem], []


def _spread(amounts: Sequence[Decimal], most: int = 20) -> list[Decimal]:
    """Up to `most` of the sorted distinct amounts, the smallest and largest included."""
    if len(amounts) <= most:
        return list(amounts)
    step = (len(amounts) - 1) / (most - 1)
    return sorted({amounts[round(i * step)] for i in range(most)})


async def preflight(
    provider: Provider,
    rows: Sequence[JobRow],
    *,
    allow_partial: bool = False,
    fees: FeeModel | None = None,
    currency: str | None = None,
) -> PreflightReport:
    """Refuse (exit 3) a job the provider cannot take, before a single topup is sent.

    What the provider documents no way to read (Alix: wallet, cards) is not checked; a fee
    the provider quotes in advance (Alix's topup-check) beats any estimate. A job that
    declares a `currency` is checked against each card's (or, where cards cannot be read, the
    provider's): a card in another currency would be paid a sum meant in another money.
    """
    rules = provider.rules
    wallet = await provider.wallet_balance() if rules.reads_wallet else None
    cards = await snapshot_cards(provider, (r.card_id for r in rows)) if rules.reads_cards else {}
    quoted = await provider.fee_estimates(_spread(sorted({r.amount for r in rows})))
    if quoted:
        source = f"quoted by {provider.name} for {len(quoted)} amounts"
        fees = fit_fee_model(list(quoted.items()), source) or fees
    set_aside: dict[int, str] = {}
    problems = _card_problems(rows, cards, set_aside) if rules.reads_cards else []
    # A split row's chunks each fit the card's limit; the row as a whole must (--split-over-max).
    problems += card_limit_problems(rows, cards, set_aside) if rules.reads_cards else []
    mismatched, whole_job = (
        ([], [])
        if currency is None
        else _currency_problems(currency, rows, cards, provider, set_aside)
    )
    problems += mismatched + whole_job

    going = [r for r in rows if r.row not in set_aside]
    total = sum((r.amount for r in going), Decimal("0"))
    estimated = None if fees is None else sum((fees.fee(r.amount) for r in going), Decimal("0"))
    needed = total + (estimated or Decimal("0"))
    if wallet is not None and needed > wallet:
        fee_words = (
            "fees unknown, they come on top"
            if estimated is None or fees is None
            else f"+ estimated fees {format_amount(estimated)}, {fees.source}"
        )
        problems.append(
            f"wallet balance {format_amount(wallet)} cannot cover the amounts "
            f"{format_amount(total)} ({fee_words})"
        )
    partial = allow_partial and not whole_job and (wallet is None or needed <= wallet)
    if problems and not partial:
        raise PreflightRefused("preflight refused the job: " + "; ".join(problems), problems)
    return PreflightReport(
        wallet, cards, total, set_aside, estimated, fees.source if fees else "unknown"
    )
