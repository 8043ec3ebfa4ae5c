"""What every job reader produces: the problems found so far in one file (each with its row
and column), and the table of cells, column by column, before any value is judged.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import numpy as np
import numpy.typing as npt
import pandas as pd

from runner.errors import JobInvalid, Problem

MAX_PROBLEMS = 50
REQUIRED_COLUMNS = ("card_id", "amount")
# `currency` is a declaration checked against the cards, not a value carried to the report.
KNOWN_COLUMNS = ("card_id", "amount", "reference", "currency")


class Problems:
    """Problems found so far in one file, kept up to MAX_PROBLEMS and counted beyond."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.found: list[Problem] = []
        self.beyond = 0

    def add(self, message: str, row: int | None = None, column: str | None = None) -> None:
        if len(self.found) < MAX_PROBLEMS:
            self.found.append(Problem(file=self.file, message=message, row=row, column=column))
        else:
            self.beyond += 1

    def fail(self, message: str, row: int | None = None, column: str | None = None) -> NoReturn:
        self.add(message, row, column)
        raise JobInvalid(self.found, truncated=self.beyond)

    def raise_if_any(self) -> None:
        if self.found:
            raise JobInvalid(self.found, truncated=self.beyond)


@dataclass(slots=True)
class Table:
    """A job's cells column by column, as read, before any value is judged.

    `noted` holds what reading already found wrong, by 0-based position: a `None` column means
    the whole row is unusable (its cells are not judged further); `judged` lists cells whose
    problem is already noted. `unnamed` are CSV columns with no header name (by 1-based number).
    `currency` is the optional currency column; `currency_setting` a YAML job's
    `settings.currency`, already checked.
    """

    card_id: pd.Series[str]
    amount: pd.Series[str]
    reference: pd.Series[str] | None
    extras: list[tuple[str, pd.Series[str]]]
    currency: pd.Series[str] | None = None
    currency_setting: str | None = None
    unnamed: list[tuple[int, pd.Series[str]]] = field(default_factory=list)
    noted: dict[int, list[tuple[str | None, str]]] = field(default_factory=dict)
    judged: set[tuple[int, str]] = field(default_factory=set)
    drop_blank_rows: bool = False

    def columns(self) -> list[pd.Series[str]]:
        known = [self.card_id, self.amount] + [
            values for values in (self.reference, self.currency) if values is not None
        ]
        return known + [values for _, values in self.extras + self.unnamed]

    def keeping(self, keep: npt.NDArray[np.bool_]) -> Table:
        """This table with only the rows where `keep` is true."""
        assert not self.noted, "rows are only dropped before any problem is noted"

        def take(values: pd.Series[str]) -> pd.Series[str]:
            return values[keep].reset_index(drop=True)

        return Table(
            card_id=take(self.card_id),
            amount=take(self.amount),
            reference=take(self.reference) if self.reference is not None else None,
            extras=[(name, take(values)) for name, values in self.extras],
            currency=take(self.currency) if self.currency is not None else None,
            currency_setting=self.currency_setting,
            unnamed=[(number, take(values)) for number, values in self.unnamed],
            judged=self.judged,
            drop_blank_rows=self.drop_blank_rows,
        )
