"""Judging a job's cells: a vectorised screen lets the common shapes through and only the rows
it stops are looked at one by one; the rows come out as `JobRow`s with exact Decimal amounts.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from decimal import Decimal

import numpy as np
import numpy.typing as npt
import pandas as pd

from runner.domain import JobRow
from runner.jobs.currency import declared_currency
from runner.jobs.digest import canonical_card_ids, content_digest
from runner.jobs.table import KNOWN_COLUMNS, Problems, Table
from runner.money import CENTS, parse_amount

# Far above any real id (a UUID is 36) or payroll reference; a cell past them is a mistake,
# and a card id goes into a URL path.
MAX_CARD_ID_LENGTH = 200
MAX_REFERENCE_LENGTH = 1_000
# Ids that quote() leaves as they are and that a URL path then resolves away (/cards/../x).
_DOT_SEGMENTS = (".", "..")

# Shapes that need no further thought; everything else takes the slow, explaining path.
# The lookahead keeps zero amounts ("0", "0.00") out of the fast path.
_FAST_AMOUNT = r"(?=[0-9.]*[1-9])[0-9]{1,12}(?:\.[0-9]{1,2})?"
_FAST_CARD_ID = rf"[A-Za-z0-9_-]{{1,{MAX_CARD_ID_LENGTH}}}"
_CONTROL = r"[\x00-\x1f\x7f-\x9f]"
# No surrounding spaces and no control characters: nothing to strip or refuse.
_FAST_REFERENCE = rf"(?=.{{0,{MAX_REFERENCE_LENGTH}}}\Z)" + (
    r"(?:[^\s\x00-\x1f\x7f-\x9f](?:[^\x00-\x1f\x7f-\x9f]*[^\s\x00-\x1f\x7f-\x9f])?)?"
)
# What Excel makes of a long numeric id in a General-format column: the real id is gone.
_EXCEL_SCIENTIFIC = re.compile(r"[0-9](?:\.[0-9]+)?E\+[0-9]{1,3}", re.IGNORECASE)
_WHITESPACE_OR_CONTROL = re.compile(r"[\s\x00-\x1f\x7f-\x9f]")
# Distinct amounts whose Decimal rows share; past this (amounts all different) each row has
# its own, and the cache stops growing.
_SHARED_AMOUNTS = 4_096
# From this many rows a column is first looked at for repeated values.
_FEW_DISTINCT_FROM = 10_000


def validate(
    holder: list[Table], problems: Problems
) -> tuple[tuple[JobRow, ...], str, str | None] | None:
    """The job's rows, content digest and declared currency, or None with every problem
    added to `problems`.

    The table comes in a list, taken out here, so that the parsed columns can be let go of
    before the rows are built: a million rows would otherwise be held twice.
    """
    table = holder.pop()
    # Vectorised screening: only the rows that fail it are looked at one by one.
    card_ok = _matches(table.card_id, _FAST_CARD_ID)
    if table.drop_blank_rows and not card_ok.all():
        # A blank row has a blank card_id, so it is among the few rows the screen let through.
        columns = [values.to_numpy(dtype=object) for values in table.columns()]
        blank = [
            position
            for position in np.flatnonzero(~card_ok).tolist()
            if all(not values[position].strip() for values in columns)
        ]
        if blank:
            keep = np.ones(len(card_ok), dtype=bool)
            keep[blank] = False
            table, card_ok = table.keeping(keep), card_ok[keep]
    count = len(card_ok)
    if count == 0:
        problems.add("the job has no rows")
        return None
    ok = card_ok & _matches(table.amount, _FAST_AMOUNT)
    if table.reference is not None:
        ok &= _matches(table.reference, _FAST_REFERENCE)
    for number, values in table.unnamed:
        filled = np.flatnonzero(values.str.strip().to_numpy(dtype=object) != "")
        if len(filled):
            problems.add(
                f"column {number} has values but no name in the header", row=int(filled[0]) + 1
            )

    card_ids = table.card_id.tolist()
    amounts = table.amount.tolist()
    references = table.reference.tolist() if table.reference is not None else [""] * count
    parsed: dict[int, Decimal] = {}
    order = {name: rank for rank, name in enumerate((None, *KNOWN_COLUMNS))}
    for position in sorted(set(np.flatnonzero(~ok).tolist()) | table.noted.keys()):
        found = list(table.noted.get(position, ()))
        if not any(column is None for column, _ in found):
            found.extend(_judge_row(position, card_ids, amounts, references, table, parsed))
        found.sort(key=lambda note: order.get(note[0], len(order)))
        for column, message in found:
            problems.add(message, row=position + 1, column=column)
    currency = declared_currency(table.currency, table.currency_setting, problems)
    if problems.found:
        return None

    names = [name for name, _ in table.extras]
    extras = [values.tolist() for _, values in table.extras]
    # The parsed columns go now; what is left of their cells is in the lists above.
    del table
    pairs = [
        [(name, value) for value in values] for name, values in zip(names, extras, strict=True)
    ]
    del extras
    # A declared currency is the job's (`Job.currency`, checked by preflight against the
    # cards), not one of its extra columns: the report does not echo it.
    extra_rows: Iterable[tuple[tuple[str, str], ...]] = (
        zip(*pairs, strict=True) if pairs else [()] * count
    )
    # A card's rows share one id string and equal amounts one Decimal: a million rows of a
    # few hundred thousand cards and a handful of amounts are held once each, not per row.
    # Each list slot is replaced as it is read, so the parsed copy goes as the rows come.
    same_card: dict[str, str] = {}
    same_amount: dict[str, tuple[Decimal, str]] = {}
    rows: list[JobRow] = []
    for position, (card_id, text, reference, extra) in enumerate(
        zip(card_ids, amounts, references, extra_rows, strict=True)
    ):
        card_id = card_ids[position] = same_card.setdefault(card_id, card_id)
        amount = parsed.get(position)
        if amount is not None:
            text = str(amount)
        elif (known := same_amount.get(text)) is not None:
            amount, text = known
        else:
            key = text
            if text[0] != "0" and text[-3:-2] == ".":
                amount = Decimal(text)  # already in the canonical two-place form
            else:
                # The fast shape guarantees at most 12 + 2 digits: quantize cannot fail.
                amount = Decimal(text).quantize(CENTS)
                text = str(amount)
            if len(same_amount) < _SHARED_AMOUNTS:
                same_amount[key] = (amount, text)
        amounts[position] = text
        rows.append(JobRow(position + 1, card_id, amount, reference, extra))
    del same_card, same_amount, pairs
    canonical = canonical_card_ids(card_ids)
    if canonical is not card_ids and _respelled_cards(card_ids, canonical, problems):
        return None
    # Only what moves money counts: fixing a typo in a name column must resume the run,
    # not start a new one that pays everyone a second time.
    digest = content_digest([canonical, amounts, references])
    return tuple(rows), digest, currency


def _respelled_cards(card_ids: list[str], canonical: list[str], problems: Problems) -> bool:
    """Whether one card is named in two spellings (a UUID in two cases), each such row added
    to `problems`. The provider sees one card; the runner would see two, and send them side by
    side: two topups in flight on one card break its cooldown and make a lost answer
    impossible to settle from the card's deposit."""
    first: dict[str, tuple[str, int]] = {}
    found = 0
    for position, (written, card) in enumerate(zip(card_ids, canonical, strict=True)):
        seen = first.setdefault(card, (written, position))
        if seen[0] != written:
            found += 1
            if found <= 50:
                problems.add(
                    f'"{written}" is card "{seen[0]}" (row {seen[1] + 1}) in another case: '
                    "write each card one way",
                    row=position + 1,
                    column="card_id",
                )
    return found > 0


def _matches(values: pd.Series[str], pattern: str) -> npt.NDArray[np.bool_]:
    if len(values) > _FEW_DISTINCT_FROM and len(set(values.iloc[:1000])) <= 50:
        # A column of few distinct values (amounts, often): match each value once.
        distinct = values.unique()
        if len(distinct) * 20 < len(values):
            good = [value for value in distinct if re.fullmatch(pattern, value)]
            return values.isin(good).to_numpy(dtype=bool)
    return values.str.fullmatch(pattern).to_numpy(dtype=bool)


def _judge_row(
    position: int,
    card_ids: list[str],
    amounts: list[str],
    references: list[str],
    table: Table,
    parsed: dict[int, Decimal],
) -> list[tuple[str | None, str]]:
    """What is wrong with the cells of one row the screen stopped; stripped cells are stored
    back, and amounts parsed here are kept in `parsed`."""
    found: list[tuple[str | None, str]] = []
    if (position, "card_id") not in table.judged:
        card_ids[position] = card_ids[position].strip()
        message = _card_id_problem(card_ids[position])
        if message is not None:
            found.append(("card_id", message))
    if (position, "amount") not in table.judged:
        try:
            parsed[position] = parse_amount(amounts[position])
        except ValueError as exc:
            found.append(("amount", str(exc)))
    if (position, "reference") not in table.judged:
        references[position] = references[position].strip()
        if len(references[position]) > MAX_REFERENCE_LENGTH:
            message = _too_long(references[position], "a reference", MAX_REFERENCE_LENGTH)
            found.append(("reference", message))
        elif re.search(_CONTROL, references[position]):
            found.append(("reference", "contains a line break or control character"))
    return found


def _too_long(value: str, what: str, limit: int) -> str:
    return f"is {len(value):,} characters long: {what} may be at most {limit:,} characters"


def _card_id_problem(card_id: str) -> str | None:
    if not card_id:
        return "is empty"
    if len(card_id) > MAX_CARD_ID_LENGTH:
        return _too_long(card_id, "a card id", MAX_CARD_ID_LENGTH)
    if card_id in _DOT_SEGMENTS:
        return (
            f'"{card_id}" is not a card id: in the provider\'s URL it would be read as a path '
            "step and address something else"
        )
    if _EXCEL_SCIENTIFIC.fullmatch(card_id):
        return (
            f'"{card_id}" is a number Excel rewrote in scientific notation: the real id is lost; '
            "format the column as Text and export again"
        )
    if _WHITESPACE_OR_CONTROL.search(card_id):
        return f"{json.dumps(card_id, ensure_ascii=False)} contains spaces or control characters"
    return None


# ---------------------------------------------------------------------------------------------
