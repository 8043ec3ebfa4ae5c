"""A CSV job's text into a table of string columns: the header checked (required columns,
repeats, a `sep=` line, the wrong separator), each malformed row located by its line.
"""

from __future__ import annotations

import csv
import io
import re
import warnings

import pandas as pd

from runner.jobs.columns import Columns, rename_headers
from runner.jobs.table import KNOWN_COLUMNS, REQUIRED_COLUMNS, Problems, Table


def read_csv(text: str, problems: Problems, columns: Columns | None = None) -> Table | None:
    header_line, header_number, body = _split_header(text)
    del text  # the body is a copy: the caller holds no reference, so the text goes now
    declared = header_line.strip()
    if declared.lower().startswith("sep="):
        if declared[4:] != ",":
            problems.fail(
                f'declares "{declared}" as its first line: save it comma-separated (CSV UTF-8)'
            )
        header_line, skipped, body = _split_header(body)
        header_number += skipped
        if not header_line.strip():
            problems.fail("has no header row")
    try:
        fields = next(csv.reader([header_line], strict=True))
    except csv.Error as exc:
        problems.fail(f"the header row is not valid CSV: {exc}", row=None)
    names = list(_without_formula_guard(pd.DataFrame([[name.strip() for name in fields]])).iloc[0])
    names = rename_headers(names, columns, problems)
    keys = [name.lower() for name in names]

    if not set(REQUIRED_COLUMNS) <= set(keys):
        # A `;` or tab file has the right names in one cell; say so instead of "missing".
        for separator, label in ((";", '";"-separated'), ("\t", "tab-separated")):
            if separator in header_line:
                problems.fail(
                    f"looks {label} (European Excel?): save it comma-separated as CSV UTF-8; "
                    "the separator is not guessed"
                )
    blocking = False
    for key in dict.fromkeys(k for k in keys if k):
        count = keys.count(key)
        if count > 1:
            problems.add(
                f'column "{key}" appears {count} times in the header: keep one', column=key
            )
            blocking = blocking or key in KNOWN_COLUMNS
    for key in REQUIRED_COLUMNS:
        if key not in keys:
            found = ", ".join(n for n in names if n) or "nothing"
            problems.add(f'missing required column "{key}" (found: {found})', column=key)
            blocking = True
    if blocking:
        return None

    body_first_line = header_number + 1
    holder = [body]
    del body
    frame, noted = _parse_body(holder, len(fields), body_first_line, problems)
    if frame is None:
        return None
    frame = _without_formula_guard(frame)

    def column(key: str) -> pd.Series[str]:
        return frame[keys.index(key)]

    return Table(
        card_id=column("card_id"),
        amount=column("amount"),
        reference=column("reference") if "reference" in keys else None,
        currency=column("currency") if "currency" in keys else None,
        extras=[
            (names[j], frame[j])
            for j, key in enumerate(keys)
            if key and key not in KNOWN_COLUMNS and keys.index(key) == j
        ],
        unnamed=[(j + 1, frame[j]) for j, name in enumerate(names) if not name],
        noted=noted,
        drop_blank_rows=True,
    )


# The formula guard of the runner's CSV reports and failed-rows jobs (runner.report.neutralise):
# a quote put before text that starts, after any quotes, with = + - @ tab or CR. Taking one
# such quote off gives back the text exactly, so a failed-rows job reads back as it was paid.
_FORMULA_GUARD = re.compile(r"^'(?='*[=+\-@\t\r])")


def _without_formula_guard(frame: pd.DataFrame) -> pd.DataFrame:
    """`frame` with the CSV formula guard's quote taken off each value that carries it."""
    for j in frame.columns:
        column = frame[j]
        if column.str.startswith("'").any():
            frame[j] = column.str.replace(_FORMULA_GUARD, "", n=1, regex=True)
    return frame


def _split_header(text: str) -> tuple[str, int, str]:
    """The first non-blank line, its 1-based line number, and the text after it."""
    start, number = 0, 1
    while True:
        end = text.find("\n", start)
        line = text[start:] if end < 0 else text[start:end]
        if end < 0 or line.strip():
            return line, number, "" if end < 0 else text[end + 1 :]
        start, number = end + 1, number + 1


def _parse_body(
    holder: list[str], width: int, first_line: int, problems: Problems
) -> tuple[pd.DataFrame | None, dict[int, list[tuple[str | None, str]]]]:
    """The data rows as `width` string columns, and the rows that have more fields than the
    header, which pandas cannot report one by one. The body comes in a list, taken out here,
    so that its text is let go of while pandas parses the bytes."""
    data = holder.pop().encode("utf-8")
    try:
        with warnings.catch_warnings():
            # pandas only *warns* when the first row is too long, and drops the extra fields.
            warnings.simplefilter("error", pd.errors.ParserWarning)
            frame = pd.read_csv(
                # Bytes, not StringIO: StringIO holds four bytes a character, pandas wants UTF-8.
                io.BytesIO(data),
                encoding="utf-8",
                header=None,
                names=list(range(width)),
                index_col=False,
                dtype=str,
                keep_default_na=False,
                na_filter=False,
                skip_blank_lines=True,
                sep=",",
                quotechar='"',
                engine="c",
            )
    except (pd.errors.ParserError, pd.errors.ParserWarning):
        return _parse_body_slowly(data.decode("utf-8"), width, first_line, problems)
    except pd.errors.EmptyDataError:
        frame = pd.DataFrame({j: pd.Series([], dtype=str) for j in range(width)})
    return frame, {}


def _parse_body_slowly(
    body: str, width: int, first_line: int, problems: Problems
) -> tuple[pd.DataFrame | None, dict[int, list[tuple[str | None, str]]]]:
    """The csv module's reading of a body pandas refused, so each bad row gets its problem.
    Blank rows are dropped here already, so that the noted positions are final."""
    records: list[list[str]] = []
    noted: dict[int, list[tuple[str | None, str]]] = {}
    reader = csv.reader(io.StringIO(body), strict=True)
    try:
        for record in reader:
            if all(not cell.strip() for cell in record):
                continue
            if len(record) > width:
                message = (
                    f"has {len(record)} fields but the header has {width}: "
                    'quote any value containing ",", such as "1,250.00"'
                )
                noted[len(records)] = [(None, message)]
                del record[width:]
            record.extend([""] * (width - len(record)))
            records.append(record)
    except csv.Error as exc:
        line = first_line + reader.line_num - 1
        problems.add(f"is not valid CSV on line {line}: {exc}")
        return None, {}
    return pd.DataFrame(records, columns=list(range(width)), dtype=str), noted


# ---------------------------------------------------------------------------------------------
# YAML
