"""Which of a file's columns are the job's fields: `--columns card_id="Card Number",...`
(or `TOPUP_COLUMNS`, or a YAML job's `settings.columns`) parsed once, applied to a header, and
the problems of a mapped or workbook file named by the file's own headers and cells.

The mapping only says where the fields are: the job's digest is of the mapped rows, so an
export read through a mapping and the same rows written with the canonical headers are one
job (and one run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from runner.errors import ConfigError
from runner.jobs.table import KNOWN_COLUMNS, Problems

COLUMNS_ENV = "TOPUP_COLUMNS"
SHEET_ENV = "TOPUP_SHEET"
_QUOTES = ('"', "'")


@dataclass(frozen=True, slots=True)
class Columns:
    """Job fields and the file headers that hold them, in the order given."""

    fields: tuple[tuple[str, str], ...]

    def __post_init__(self) -> None:
        seen: dict[str, str] = {}
        headers: dict[str, str] = {}
        for field, header in self.fields:
            if field not in KNOWN_COLUMNS:
                raise ValueError(
                    f"{json.dumps(field)} is not a job field: map {', '.join(KNOWN_COLUMNS)}"
                )
            if field in seen:
                raise ValueError(f"{field} is mapped twice")
            if not header.strip():
                raise ValueError(f"{field} is mapped to an empty header")
            folded = header.strip().lower()
            if folded in headers:
                raise ValueError(
                    f'{headers[folded]} and {field} are both mapped to "{header.strip()}"'
                )
            seen[field], headers[folded] = header, field

    def by_header(self) -> dict[str, str]:
        """Lower-cased, stripped header -> the field it holds."""
        return {header.strip().lower(): field for field, header in self.fields}

    def __str__(self) -> str:
        return ",".join(f"{field}={json.dumps(header)}" for field, header in self.fields)


def parse_columns(value: object, source: str) -> Columns:
    """A mapping from `field="Header",...` text (flag, environment) or a YAML mapping;
    ConfigError naming `source` if it is not one."""
    try:
        if isinstance(value, Mapping):
            pairs = []
            for field, header in value.items():
                if not isinstance(field, str) or not isinstance(header, str):
                    raise ValueError("give each field a header as text")
                pairs.append((field.strip(), header.strip()))
            return Columns(tuple(pairs))
        if not isinstance(value, str):
            raise ValueError('expected field="Header" pairs apart by commas')
        return Columns(tuple(_pairs(value)))
    except ValueError as exc:
        raise ConfigError(
            f'{source}: {exc} (expected e.g. card_id="Card Number",amount="Net Pay")'
        ) from None


def _pairs(text: str) -> list[tuple[str, str]]:
    """`a="x, y",b=z` as [(a, "x, y"), (b, z)]; a quoted header may hold commas, and a
    doubled quote inside it is one quote."""
    pairs: list[tuple[str, str]] = []
    position, size = 0, len(text)
    if not text.strip():
        raise ValueError("it is empty")
    while position < size:
        equals = text.find("=", position)
        comma = text.find(",", position)
        if equals < 0 or 0 <= comma < equals:
            piece = text[position : comma if comma >= 0 else size].strip()
            raise ValueError(f'"{piece}" has no "=": write field="Header"')
        field = text[position:equals].strip()
        position = equals + 1
        while position < size and text[position] == " ":
            position += 1
        if position < size and text[position] in _QUOTES:
            header, position = _quoted(text, position)
            while position < size and text[position] == " ":
                position += 1
            if position < size and text[position] != ",":
                raise ValueError(f"unexpected text after the quoted header of {field}")
        else:
            end = text.find(",", position)
            end = size if end < 0 else end
            header, position = text[position:end].strip(), end
        pairs.append((field, header))
        position += 1  # past the comma
        if position == size and text.endswith(","):
            raise ValueError("it ends with a comma")
    return pairs


def _quoted(text: str, start: int) -> tuple[str, int]:
    quote, position, found = text[start], start + 1, []
    while position < len(text):
        char = text[position]
        if char == quote:
            if text[position + 1 : position + 2] == quote:
                found.append(quote)
                position += 2
                continue
            return "".join(found), position + 1
        found.append(char)
        position += 1
    raise ValueError(f"a header opened with {quote} is not closed")


@dataclass(frozen=True, slots=True)
class JobReading:
    """How the operator asked for the job file to be read, known before it is opened: the
    sheet, the column mapping, and whether card ids may be numbers (Alix's are numeric)."""

    sheet: str | None = None
    columns: Columns | None = None
    numeric_card_ids: bool = False


def job_reading(opts: Mapping[str, object], env: Mapping[str, str] | None = None) -> JobReading:
    """The reading from `--sheet`, `--columns` and `--provider`, else `TOPUP_SHEET`,
    `TOPUP_COLUMNS` and `TOPUP_PROVIDER`: the command line wins, as for every setting."""
    env = os.environ if env is None else env

    def given(name: str, variable: str) -> tuple[str | None, str]:
        value = opts.get(name)
        if value is not None:
            return str(value), f"--{name}"
        text = env.get(variable, "").strip()
        return (text or None), variable

    sheet, sheet_source = given("sheet", SHEET_ENV)
    if sheet is not None and not sheet.strip():
        raise ConfigError(f"{sheet_source}: the sheet's name is empty")
    text, source = given("columns", COLUMNS_ENV)
    provider, _ = given("provider", "TOPUP_PROVIDER")
    return JobReading(
        sheet=sheet.strip() if sheet is not None else None,
        columns=parse_columns(text, source) if text is not None else None,
        numeric_card_ids=(provider or "").strip().lower() == "alix",
    )


class Located(Problems):
    """Problems that name a column by the file's own header (`Net Pay (amount)`) and, in a
    workbook, by the cell too (`amount (cell C4)`); rows stay job rows, as in the report."""

    def __init__(self, file: str) -> None:
        super().__init__(file)
        self.labels: dict[str, str] = {}
        self.letters: dict[str, str] = {}
        self.sheet_rows: list[int] | None = None

    def add(self, message: str, row: int | None = None, column: str | None = None) -> None:
        if column is not None:
            header = self.labels.get(column)
            parts = [column] if header is not None else []
            letter = self.letters.get(column)
            if letter is not None and row is None:
                parts.append(f"column {letter}")
            elif letter is not None and self.sheet_rows and 1 <= (row or 0) <= len(self.sheet_rows):
                parts.append(f"cell {letter}{self.sheet_rows[(row or 0) - 1]}")
            shown = ", ".join(parts)
            column = (header or column) + (f" ({shown})" if shown else "")
        super().add(message, row, column)


def rename_headers(names: list[str], columns: Columns | None, problems: Problems) -> list[str]:
    """`names` (a header as read) with each mapped header replaced by its field; every mapped
    header must be there, and no field may be both mapped and present under its own name."""
    if columns is None:
        return names
    wanted = columns.by_header()
    folded = [name.strip().lower() for name in names]
    require_headers(folded, columns, problems, f"the header (found: {_listed(names)})")
    renamed = list(names)
    fields = dict(columns.fields)
    for position, name in enumerate(folded):
        field = wanted.get(name)
        if field is not None:
            renamed[position] = field
        elif name in fields:
            problems.fail(
                f'the header has a column "{names[position].strip()}" and the column mapping '
                f'reads {name} from "{fields[name]}": rename or remove one',
                column=name,
            )
    return renamed


def _listed(names: list[str]) -> str:
    shown = [json.dumps(name.strip(), ensure_ascii=False) for name in names if name.strip()]
    return ", ".join(shown) or "nothing"


def require_headers(
    present: Iterable[str], columns: Columns, problems: Problems, where: str
) -> None:
    """Refuse a mapping naming a header that is not `present` (lower-cased names), before any
    row is judged; and name the mapped fields by their headers in later problems."""
    found = set(present)
    missing = [header for _, header in columns.fields if header.strip().lower() not in found]
    if missing:
        shown = ", ".join(json.dumps(header, ensure_ascii=False) for header in missing)
        problems.fail(f"the column mapping names {shown}, not found in {where}")
    if isinstance(problems, Located):
        for field, header in columns.fields:
            if header.strip().lower() != field:
                problems.labels[field] = header.strip()
