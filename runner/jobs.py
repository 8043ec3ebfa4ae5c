"""Job files in, validated rows out: a CSV or YAML job becomes a `Job` of `JobRow`s, or a
`JobInvalid` listing every problem found, each with its file, row and column.
Provider limits, wallet balance and duplicate rows are preflight's business, not this module's.
"""

from __future__ import annotations

import codecs
import csv
import gc
import hashlib
import io
import json
import math
import os
import re
import stat
import warnings
from collections.abc import Hashable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np
import numpy.typing as npt
import pandas as pd
import yaml

from runner.domain import JobRow
from runner.errors import JobInvalid, Problem
from runner.money import CENTS, parse_amount

MAX_PROBLEMS = 50
# Far above any payroll (a million rows is about 60 MB); a FIFO, a device or a runaway file
# is refused before it can fill memory.
MAX_JOB_BYTES = 256 * 1024 * 1024
_GROWTH_CHUNK = 1024 * 1024
REQUIRED_COLUMNS = ("card_id", "amount")
KNOWN_COLUMNS = ("card_id", "amount", "reference")
YAML_KEYS = ("run_key", "provider", "settings", "topups")
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
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I)
_PLAIN_INT = re.compile(r"0|[1-9][0-9]*", re.ASCII)
# Bump when the canonical form changes: run keys derived from digests must not collide.
_DIGEST_VERSION = "topup-runner job content v2"
_DIGEST_SLICE = 65_536  # values hashed at a time
# Distinct amounts whose Decimal rows share; past this (amounts all different) each row has
# its own, and the cache stops growing.
_SHARED_AMOUNTS = 4_096
# From this many rows a column is first looked at for repeated values.
_FEW_DISTINCT_FROM = 10_000
# YAML nesting allowed (a job needs four or five levels: document, topups, row, value).
MAX_YAML_DEPTH = 50
# YAML aliases may expand a file to at most 10 values per value written, plus 100,000. The
# usual use, `<<: *defaults` on every row, adds the defaults' few keys per row of about
# five written values: two or three times the written size. A factor of 10 leaves room for
# larger defaults while keeping the work linear in the file's size, which the parser has
# already paid for; the allowance lets a small file share a sizeable block freely. A
# "billion laughs" of a few lines expands past this at its seventh level of ten.
_ALIAS_FACTOR = 10
_ALIAS_ALLOWANCE = 100_000


@dataclass(frozen=True, slots=True)
class Job:
    """A validated job: its rows in file order and what the file says about the run."""

    path: Path
    rows: tuple[JobRow, ...] = field(repr=False)
    run_key: str | None
    provider: str | None
    settings: Mapping[str, object]
    extra_columns: tuple[str, ...]
    # sha256 of the rows' canonical form: the same rows give the same digest whatever the
    # file format, line endings or byte-order mark. Row numbers are implied by the order.
    content_digest: str


def load_job(path: str | Path) -> Job:
    """Read and validate the job at `path` (.csv, .yaml or .yml); raise JobInvalid if unusable."""
    job_path = Path(path)
    problems = _Problems(str(job_path))
    suffix = job_path.suffix.lower()
    if suffix not in (".csv", ".yaml", ".yml"):
        kind = f'is a "{suffix}" file' if suffix else "has no suffix"
        problems.fail(f"{kind}: a job file must be .csv, .yaml or .yml")
    run_key: str | None = None
    provider: str | None = None
    settings: Mapping[str, object] = MappingProxyType({})
    with _collector_paused():
        if suffix == ".csv":
            # No reference to the text is kept here: _read_csv lets go of it before parsing,
            # so that a large file is not held three times over (text, body, bytes).
            table = _read_csv(_read_text(job_path, problems), problems)
        else:
            table, run_key, provider, settings = _read_yaml(
                _read_text(job_path, problems), problems
            )
        extra_columns = tuple(name for name, _ in table.extras) if table is not None else ()
        # _validate takes the table over: it drops the parsed columns before it builds rows.
        holder = [table] if table is not None else []
        del table
        result = _validate(holder, problems) if holder else None
    problems.raise_if_any()
    # Every None above came with a problem, so raise_if_any has raised.
    assert result is not None
    rows, digest = result
    return Job(
        path=job_path,
        rows=rows,
        run_key=run_key,
        provider=provider,
        settings=settings,
        extra_columns=extra_columns,
        content_digest=digest,
    )


@contextmanager
def _collector_paused() -> Iterator[None]:
    """Pause CPython's cyclic garbage collector while a job is built.

    A million rows are millions of small container objects, none in a cycle; the collector
    would rescan the growing heap over and over (measured: 22 s instead of 4 s).
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _Problems:
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
class _Table:
    """A job's cells column by column, as read, before any value is judged.

    `noted` holds what reading already found wrong, by 0-based position: a `None` column means
    the whole row is unusable (its cells are not judged further); `judged` lists cells whose
    problem is already noted. `unnamed` are CSV columns with no header name (by 1-based number).
    """

    card_id: pd.Series[str]
    amount: pd.Series[str]
    reference: pd.Series[str] | None
    extras: list[tuple[str, pd.Series[str]]]
    unnamed: list[tuple[int, pd.Series[str]]] = field(default_factory=list)
    noted: dict[int, list[tuple[str | None, str]]] = field(default_factory=dict)
    judged: set[tuple[int, str]] = field(default_factory=set)
    drop_blank_rows: bool = False

    def columns(self) -> list[pd.Series[str]]:
        known = [self.card_id, self.amount] + (
            [self.reference] if self.reference is not None else []
        )
        return known + [values for _, values in self.extras + self.unnamed]

    def keeping(self, keep: npt.NDArray[np.bool_]) -> _Table:
        """This table with only the rows where `keep` is true."""
        assert not self.noted, "rows are only dropped before any problem is noted"

        def take(values: pd.Series[str]) -> pd.Series[str]:
            return values[keep].reset_index(drop=True)

        return _Table(
            card_id=take(self.card_id),
            amount=take(self.amount),
            reference=take(self.reference) if self.reference is not None else None,
            extras=[(name, take(values)) for name, values in self.extras],
            unnamed=[(number, take(values)) for number, values in self.unnamed],
            judged=self.judged,
            drop_blank_rows=self.drop_blank_rows,
        )


# ---------------------------------------------------------------------------------------------
# Bytes to text


def _read_text(path: Path, problems: _Problems) -> str:
    return _decode(_read_bytes(path, problems), problems)


def _read_bytes(path: Path, problems: _Problems) -> bytes:
    """The file's bytes, if it is a regular file of at most MAX_JOB_BYTES.

    Opened without blocking (a FIFO would wait for a writer) and judged by what was opened,
    not by the name (a name can be swapped for a link to /dev/zero between a check and a
    read). At most the limit plus one byte is read, as a file may grow while it is read.
    """
    limit = MAX_JOB_BYTES
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        problems.fail("no such file")
    except OSError as exc:
        problems.fail(f"cannot be read: {exc.strerror or exc}")
    parts: list[bytes] = []
    total = 0
    try:
        status = os.fstat(fd)
        if stat.S_ISDIR(status.st_mode):
            problems.fail("is a directory, not a job file")
        if not stat.S_ISREG(status.st_mode):
            problems.fail(f"is {_file_kind(status.st_mode)}, not a regular file: give a job file")
        if status.st_size > limit:
            problems.fail(
                f"is {status.st_size:,} bytes: a job file may be at most {_size_text(limit)}"
            )
        # Reads of the size the file had (one, as a rule), then small ones only if it grew.
        first = min(status.st_size, limit) + 1
        while total <= limit:
            wanted = first - total if total < first else min(_GROWTH_CHUNK, limit + 1 - total)
            chunk = os.read(fd, wanted)
            if not chunk:
                break
            parts.append(chunk)
            total += len(chunk)
    except OSError as exc:
        problems.fail(f"cannot be read: {exc.strerror or exc}")
    finally:
        os.close(fd)
    if total > limit:
        problems.fail(f"grew past {_size_text(limit)} while it was read: the limit for a job file")
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _file_kind(mode: int) -> str:
    kinds = (
        (stat.S_ISFIFO, "a named pipe (FIFO)"),
        (stat.S_ISCHR, "a character device (such as /dev/zero)"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((name for test, name in kinds if test(mode)), "not a file")


def _size_text(size: int) -> str:
    mib = 1024 * 1024
    return f"{size // mib} MiB" if size % mib == 0 else f"{size:,} bytes"


def _decode(data: bytes, problems: _Problems) -> str:
    """The file's text; anything but UTF-8 (or UTF-16 announced by a BOM) is refused, never
    guessed, because a wrong guess would silently change card ids and references."""
    if data.startswith(b"PK\x03\x04"):
        problems.fail("looks like an Excel workbook, not text: save it as CSV UTF-8")
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            text = data.decode("utf-16")
        except UnicodeDecodeError:
            problems.fail("starts with a UTF-16 byte-order mark but is not valid UTF-16")
    else:
        skip = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
        try:
            text = data[skip:].decode("utf-8")
        except UnicodeDecodeError as exc:
            offset = skip + exc.start
            line = data.count(b"\n", 0, offset) + 1
            problems.fail(
                f"is not UTF-8: byte 0x{data[offset]:02x} on line {line} (offset {offset}) "
                "is not valid UTF-8; save the file as UTF-8 (Excel: CSV UTF-8)"
            )
    if "\x00" in text:
        problems.fail(
            "contains NUL characters: it looks like UTF-16 without a byte-order mark; "
            "save it as UTF-8"
        )
    text = text.lstrip("\ufeff")
    if "\r" in text:
        # One line-ending convention, so that CRLF and LF files (and multi-line cells in
        # them) read identically and give the same content digest.
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if not text or text.isspace():
        problems.fail("the file is empty")
    return text


# ---------------------------------------------------------------------------------------------
# CSV


def _read_csv(text: str, problems: _Problems) -> _Table | None:
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
    names = [name.strip() for name in fields]
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

    def column(key: str) -> pd.Series[str]:
        return frame[keys.index(key)]

    return _Table(
        card_id=column("card_id"),
        amount=column("amount"),
        reference=column("reference") if "reference" in keys else None,
        extras=[
            (names[j], frame[j])
            for j, key in enumerate(keys)
            if key and key not in KNOWN_COLUMNS and keys.index(key) == j
        ],
        unnamed=[(j + 1, frame[j]) for j, name in enumerate(names) if not name],
        noted=noted,
        drop_blank_rows=True,
    )


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
    holder: list[str], width: int, first_line: int, problems: _Problems
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
    body: str, width: int, first_line: int, problems: _Problems
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


@dataclass(frozen=True, slots=True)
class _Typed:
    """A scalar YAML typed on its own, kept with the text it was written as."""

    value: int | float | bool
    source: str


class _TooDeep(Exception):
    """Composing met a node nested deeper than MAX_YAML_DEPTH (at `line`, 1-based)."""

    def __init__(self, line: int) -> None:
        super().__init__(line)
        self.line = line


class _JobLoader(yaml.SafeLoader):
    """SafeLoader that notes repeated keys (plain PyYAML keeps the last one silently), keeps the
    written text of numbers and booleans, and leaves dates as text. It also counts the nodes
    written and the aliases met, and stops composing past MAX_YAML_DEPTH (PyYAML's composer
    recurses, so a deep file would otherwise end in a RecursionError)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        # id() of a constructed mapping -> its repeated keys and their 1-based lines.
        self.repeated: dict[int, list[tuple[str, int]]] = {}
        self.nodes = 0
        self.aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            return super().compose_node(parent, index)
        self.nodes += 1
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                event = self.peek_event()  # type: ignore[no-untyped-call]
                raise _TooDeep(event.start_mark.line + 1)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expansion_problem(root: yaml.Node, written: int) -> str | None:
    """Why the composed graph at `root` may not be constructed, or None.

    PyYAML composes an alias as a reference to its anchor's node, so the graph stays as
    small as the text; what costs is everything after that walks it as a tree (merge keys
    copy, settings are copied, checks descend), where each alias counts as a full copy of
    its target. That expanded size and depth are computed here, once per distinct node.
    """
    bound = _ALIAS_FACTOR * written + _ALIAS_ALLOWANCE
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    on_path: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        children = _children(node)
        if children_done:
            on_path.discard(key)
            total, tallest = 1, 0
            for child in children:
                if isinstance(child, yaml.ScalarNode):
                    total, tallest = total + 1, max(tallest, 1)
                else:
                    total, tallest = total + size[id(child)], max(tallest, height[id(child)])
            if total > bound:
                return (
                    f"its YAML aliases expand to more than {bound:,} values from "
                    f'{written:,} written (a "billion laughs"?): an alias may repeat '
                    "a value, not multiply the file; write the values out"
                )
            if tallest + 1 > MAX_YAML_DEPTH:
                return (
                    f"is nested more than {MAX_YAML_DEPTH} levels deep once its YAML aliases "
                    "are expanded: a job needs only a few"
                )
            size[key], height[key] = total, tallest + 1
            continue
        if key in size:
            continue
        on_path.add(key)
        stack.append((node, True))
        for child in children:
            if id(child) in on_path:
                line = child.start_mark.line + 1
                return f"has a YAML alias that refers to itself (anchor on line {line})"
            if not isinstance(child, yaml.ScalarNode) and id(child) not in size:
                stack.append((child, False))
    return None


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _construct_map(loader: _JobLoader, node: yaml.MappingNode) -> Iterator[dict[Hashable, Any]]:
    data: dict[Hashable, Any] = {}
    yield data
    # Checked before construct_mapping, which folds merge keys (`<<`) into node.value.
    seen: set[tuple[str, str]] = set()
    repeated: list[tuple[str, int]] = []
    for key_node, _ in node.value:
        if isinstance(key_node, yaml.ScalarNode) and not key_node.tag.endswith(":merge"):
            key = (key_node.tag, key_node.value)
            if key in seen:
                repeated.append((key_node.value, key_node.start_mark.line + 1))
            seen.add(key)
    data.update(loader.construct_mapping(node))
    if repeated:
        loader.repeated[id(data)] = repeated


def _construct_typed(loader: yaml.SafeLoader, node: yaml.Node) -> _Typed:
    assert isinstance(node, yaml.ScalarNode)
    tag = node.tag.rsplit(":", 1)[-1]
    constructors = {
        "int": yaml.SafeLoader.construct_yaml_int,
        "float": yaml.SafeLoader.construct_yaml_float,
        "bool": yaml.SafeLoader.construct_yaml_bool,
    }
    value: int | float | bool = constructors[tag](loader, node)
    return _Typed(value=value, source=node.value)


for _tag in ("int", "float", "bool"):
    _JobLoader.add_constructor(f"tag:yaml.org,2002:{_tag}", _construct_typed)
_JobLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
_JobLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _read_yaml(
    text: str, problems: _Problems
) -> tuple[_Table | None, str | None, str | None, Mapping[str, object]]:
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None and loader.aliases:
            problem = _expansion_problem(node, loader.nodes)
            if problem is not None:
                problems.fail(problem)
        document = None if node is None else loader.construct_document(node)
    except _TooDeep as exc:
        problems.fail(
            f"is nested more than {MAX_YAML_DEPTH} levels deep on line {exc.line}: "
            "a job needs only a few"
        )
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" on line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problems.fail(f"is not valid YAML{where}: {exc.problem or exc.context}")
    except yaml.YAMLError as exc:
        problems.fail(f"is not valid YAML: {exc}")
    finally:
        loader.dispose()
    if document is None:
        problems.fail("holds no YAML document: expected a mapping with a topups: list")
    if not isinstance(document, dict):
        problems.fail(f"expected a mapping with a topups: list, found {_kind(document)}")

    for key, line in loader.repeated.pop(id(document), []):
        problems.add(f'"{key}" is given twice (line {line}): keep one')
    for key in document:
        if key not in YAML_KEYS:
            problems.add(f"unknown top-level key {_show_key(key)}: expected {', '.join(YAML_KEYS)}")
    run_key = _optional_text(document, "run_key", problems)
    provider = _optional_text(document, "provider", problems)
    settings = _settings(document.get("settings"), problems)

    topups = document.get("topups")
    table = None
    if "topups" not in document:
        problems.add("has no topups: list (one mapping per card, with card_id and amount)")
    elif topups is None or topups == []:
        problems.add("the job has no rows")
    elif not isinstance(topups, list):
        problems.add(f"topups must be a list of mappings, found {_kind(topups)}")
    else:
        table = _yaml_table(topups, loader.repeated)
    # Whatever is left is repeated inside settings or deeper: still a mistake worth stopping for.
    for repeated in loader.repeated.values():
        for key, line in repeated:
            problems.add(f'the key "{key}" is given twice on line {line}: keep one')
    return table, run_key, provider, settings


def _optional_text(document: dict[Any, Any], key: str, problems: _Problems) -> str | None:
    value = document.get(key)
    if value is None:
        return None
    if isinstance(value, str) and value.strip():
        return value.strip()
    if isinstance(value, str):
        problems.add(f"{key} is empty: leave it out or give a value")
    elif isinstance(value, _Typed):
        problems.add(f'{key} must be text: quote it as "{value.source}"')
    else:
        problems.add(f"{key} must be text, found {_kind(value)}")
    return None


def _settings(value: object, problems: _Problems) -> Mapping[str, object]:
    if value is None:
        return MappingProxyType({})
    if not isinstance(value, dict) or not all(isinstance(key, str) for key in value):
        problems.add("settings must be a mapping of names to values")
        return MappingProxyType({})
    return MappingProxyType({key: _plain(item) for key, item in value.items()})


def _plain(value: object) -> object:
    """`value` with our YAML wrappers replaced by the plain Python values they carry."""
    if isinstance(value, _Typed):
        return value.value
    if isinstance(value, dict):
        return {_plain(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return value


def _yaml_table(topups: list[Any], repeated: dict[int, list[tuple[str, int]]]) -> _Table:
    columns: dict[str, list[str]] = {key: [] for key in KNOWN_COLUMNS}
    extra_names: dict[str, str] = {}  # lower-cased key -> the spelling first seen
    extra_cells: list[dict[str, str]] = []
    noted: dict[int, list[tuple[str | None, str]]] = {}
    judged: set[tuple[int, str]] = set()

    for position, item in enumerate(topups):
        notes = noted.setdefault(position, [])
        cells: dict[str, str] = {}
        if not isinstance(item, dict):
            notes.append((None, f"expected a mapping with card_id and amount, found {_kind(item)}"))
            item = {}
        for key, line in repeated.pop(id(item), []):
            notes.append((key.strip().lower(), f'"{key}" is given twice (line {line}): keep one'))
            judged.add((position, key.strip().lower()))
        for key, value in item.items():
            if not isinstance(key, str):
                hint = (
                    ' (an unquoted "," in an amount? quote it)' if isinstance(key, _Typed) else ""
                )
                notes.append((None, f"has a key {_show_key(key)} that is not text{hint}"))
                continue
            name = key.strip().lower()
            if name in cells:
                notes.append((name, f'"{key}" is given twice (keys ignore case and spaces)'))
                judged.add((position, name))
                continue
            text, message = _yaml_cell(value, name)
            cells[name] = text
            if message is not None:
                notes.append((name, message))
                judged.add((position, name))
            if name not in KNOWN_COLUMNS:
                extra_names.setdefault(name, key.strip())
        for name in REQUIRED_COLUMNS:
            if name not in cells and isinstance(topups[position], dict):
                notes.append((name, "is missing"))
                judged.add((position, name))
        for name in KNOWN_COLUMNS:
            columns[name].append(cells.pop(name, ""))
        extra_cells.append(cells)
        if not notes:
            del noted[position]

    def series(values: Iterable[str]) -> pd.Series[str]:
        return pd.Series(list(values), dtype=str)

    return _Table(
        card_id=series(columns["card_id"]),
        amount=series(columns["amount"]),
        reference=series(columns["reference"]),
        extras=[
            (spelling, series(cells.get(name, "") for cells in extra_cells))
            for name, spelling in extra_names.items()
        ],
        noted=noted,
        judged=judged,
    )


def _yaml_cell(value: object, column: str) -> tuple[str, str | None]:
    """The text of one YAML value for `column`, or "" and why it cannot be used."""
    if value is None:
        return "", None
    if isinstance(value, str):
        return value, None
    if isinstance(value, _Typed):
        source = value.source
        if isinstance(value.value, bool):
            return "", f"{source} is read by YAML as {str(value.value).lower()}: quote it"
        if column == "card_id":
            return "", f'{source} is a YAML number: quote it as "{source}" to keep it exact'
        if column != "amount":
            return source, None  # carried as written: the number is only ever shown
        if isinstance(value.value, int):
            if _PLAIN_INT.fullmatch(source):
                return source, None
            return "", f'{source} is read by YAML as {value.value}: quote it, such as "250.00"'
        if not math.isfinite(value.value):
            return "", f'{source} is not a number: expected an amount such as "250.00"'
        try:
            parse_amount(source)
            suggestion = f'"{source}"'
        except ValueError:
            suggestion = 'a plain decimal such as "250.00"'
        return "", (
            f"{source} is a YAML float, which cannot hold cents exactly: quote it as {suggestion}"
        )
    return "", f"must be a single value, not {_kind(value)}"


def _kind(value: object) -> str:
    if isinstance(value, _Typed):
        return f"the {type(value.value).__name__} {value.source}"
    kinds = {dict: "a mapping", list: "a list", str: "text", type(None): "nothing"}
    return kinds.get(type(value), f"a {type(value).__name__}")


def _show_key(key: object) -> str:
    if isinstance(key, _Typed):
        return key.source
    return json.dumps(key, ensure_ascii=False) if isinstance(key, str) else repr(key)


# ---------------------------------------------------------------------------------------------
# Judging the cells


def _validate(holder: list[_Table], problems: _Problems) -> tuple[tuple[JobRow, ...], str] | None:
    """The job's rows and content digest, or None with every problem added to `problems`.

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
    canonical = _canonical_card_ids(card_ids)
    if canonical is not card_ids and _respelled_cards(card_ids, canonical, problems):
        return None
    # Only what moves money counts: fixing a typo in a name column must resume the run,
    # not start a new one that pays everyone a second time.
    digest = _content_digest([canonical, amounts, references])
    return tuple(rows), digest


def _respelled_cards(card_ids: list[str], canonical: list[str], problems: _Problems) -> bool:
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
    table: _Table,
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
# Content digest


def _canonical_card_ids(card_ids: list[str]) -> list[str]:
    """The ids as the providers tell cards apart: a UUID in any case is the same card (UUIDs
    are case-insensitive on input, RFC 9562; the providers answer in lower case, and the
    sandbox, preflight and the Alix adapter all compare them so). A copy of a job with its
    UUIDs re-spelled must resume the run, not pay again. Other ids are kept as written: they
    may be case-sensitive. Lower case is the canonical form, so the digest of a file already
    in it is the one earlier versions recorded; the list is only copied if an id changes."""
    folded: list[str] | None = None
    for position, card_id in enumerate(card_ids):
        if card_id.islower() or card_id == (lower := card_id.lower()):
            continue
        if _UUID.fullmatch(card_id):
            if folded is None:
                folded = list(card_ids)
            folded[position] = lower
    return card_ids if folded is None else folded


def _content_digest(columns: list[list[str]]) -> str:
    """sha256 of the rows' canonical form, whatever the file's format, encoding or line endings.

    The form is column-wise (card_id, amount with two decimals, reference),
    each column's values joined by the unit separator, length-prefixed; a column in which a
    value holds that separator is JSON-encoded instead, so the form is always unambiguous.
    """
    count = len(columns[0])
    digest = hashlib.sha256()
    header = [_DIGEST_VERSION, count]
    digest.update(json.dumps(header, ensure_ascii=False).encode())
    for values in columns:
        # b"U" + the values joined by the separator, a slice at a time: the same bytes as
        # joining the whole column, without a second copy of a million values in memory.
        # The first pass measures (the length comes first) and looks for the separator.
        slices = range(0, count, _DIGEST_SLICE)
        size = 1 + max(len(slices) - 1, 0)
        plain = True
        for start in slices:
            part = values[start : start + _DIGEST_SLICE]
            joined = "\x1f".join(part)
            plain = plain and joined.count("\x1f") == len(part) - 1
            size += len(joined.encode())
        if not plain:
            section = b"J" + json.dumps(values, ensure_ascii=False).encode()
            digest.update(b"%d:" % len(section) + section)
            continue
        digest.update(b"%d:U" % size)
        for start in slices:
            if start:
                digest.update(b"\x1f")
            digest.update("\x1f".join(values[start : start + _DIGEST_SLICE]).encode())
    return digest.hexdigest()
