"""The currency a job declares (an optional `currency` column or YAML setting): its shape
checked, and one currency for the whole job. Preflight compares it with the cards' own.
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from runner.jobs.table import Problems

CURRENCY_COLUMN = "currency"
# ISO 4217 codes are three letters; token tickers (Alix's USDT, USDC) run to four or five.
_CODE = re.compile(r"[A-Za-z]{3,5}", re.ASCII)


def parse_currency(text: str) -> str:
    """The code `text` names, upper-cased (`usdt` is USDT); ValueError if it is not one."""
    code = text.strip()
    if not _CODE.fullmatch(code):
        raise ValueError(
            f'"{code}" is not a currency code: write 3 to 5 letters, such as USD or USDT'
        )
    return code.upper()


def declared_currency(
    values: pd.Series[str] | None,
    setting: str | None,
    problems: Problems,
    setting_name: str = "settings.currency",
) -> str | None:
    """The one currency the job declares, or None if it declares none (or got it wrong,
    with each row at fault added to `problems`).

    `setting` is the job-wide declaration, already a valid code; `values` the column's cells.
    A blank cell takes the job's currency. A row naming another is refused: one payroll,
    one currency, so that preflight checks every card against the same code and the report's
    sums are of one money.
    """
    if values is None:
        return setting
    stripped = values.str.strip()
    filled = np.flatnonzero(stripped.to_numpy(dtype=object) != "")
    if not len(filled):
        return setting
    found = setting
    first = 0  # the row (1-based) that declared `found`; 0: the setting
    wrong = False
    # Each distinct spelling is judged once, then its rows named: a million cells of "USD"
    # cost one parse.
    spelled = stripped.iloc[filled]
    for text, positions in spelled.groupby(spelled, sort=False).indices.items():
        rows = filled[positions]
        try:
            code = parse_currency(str(text))
        except ValueError as exc:
            for position in rows.tolist():
                problems.add(str(exc), row=position + 1, column=CURRENCY_COLUMN)
            wrong = True
            continue
        if found is None:
            found, first = code, int(rows[0]) + 1
        elif code != found:
            where = setting_name if first == 0 else f"row {first}"
            for position in rows.tolist():
                problems.add(
                    f"{code} differs from the job's {found} ({where}): a job pays in one "
                    "currency; split it into one job per currency",
                    row=position + 1,
                    column=CURRENCY_COLUMN,
                )
            wrong = True
    return None if wrong else found
