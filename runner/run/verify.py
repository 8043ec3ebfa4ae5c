"""`topup-runner verify`: a run's hash chain recomputed from the ledger (every record in order,
the first that does not fit named), its rows and attempts held against the chain, and, given a
report, the report's rows held against the ledger's and against its own Summary digest.

What this proves, and what it cannot, is in the README's "Verifying a run" section.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from runner.domain import RowRecord, RunInfo
from runner.errors import LedgerError
from runner.ledger import Ledger
from runner.ledger.chain import HMAC_SHA256, KEY_ENV, ledger_key, parse_head
from runner.ledger.chain_check import ChainVerdict
from runner.report.cells import fitted
from runner.report.chunks import is_split, job_rows, split_info
from runner.report.csvout import csv_text
from runner.report.digest import CHAIN_LINE, DIGEST_LINE, ReportFile, millis, read_report, xlsx_text
from runner.report.rows import header, utc, values
from runner.run.finish import info_from_facts, report_figures
from runner.run.record import open_for, read_run

# Problems listed after the first: enough to see a pattern, never a flood.
SHOWN = 20


@dataclass(slots=True)
class Verification:
    """What `verify` found: `lines` to show, `problems` (the first one first); sound when
    there are none and the run is chained."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    chained: bool = True

    @property
    def sound(self) -> bool:
        return self.chained and not self.problems


def verify_run(
    where: Path | str, run_key: str, report: Path | None, env: Mapping[str, str]
) -> Verification:
    """Check run `run_key` of the ledger at `where` (read-only), and `report` if given.
    LedgerError or ConfigError (one line) for inputs that cannot be read at all."""
    if isinstance(where, Path) and not where.exists():
        raise LedgerError(f"ledger {where}: no such file")
    key = ledger_key(env)
    result = Verification()
    with ExitStack() as stack:
        ledger = open_for(where, stack, readonly=True)
        spec, facts = read_run(ledger, run_key)
        if spec is None or facts is None:
            raise LedgerError(f"ledger {ledger.name}: no run with key {run_key!r}")
        verdict = ledger.check_chain(run_key, key)
        _say_chain(result, verdict, key)
        if report is not None:
            found = read_report(report)  # before the ledger's rows: a bad file is exit 2
            info = info_from_facts(spec, facts)
            currency = report_figures(spec, facts, None).currency
            _check_report(result, report, found, verdict, ledger, info, currency)
    return result


def _say_chain(result: Verification, verdict: ChainVerdict, key: bytes | None) -> None:
    run = verdict.run_key
    if not verdict.chained:
        result.chained = False
        result.lines.append(
            f"run {run}: unchained: it was recorded before this ledger kept hash chains "
            "(ledger schema 3), so its ledger records cannot be verified"
        )
        return
    if verdict.head is None:  # its head or records hold what no runner writes
        result.lines.append(f"run {run}: ledger chain cannot be read as one")
        result.problems.extend(f"ledger: {problem}" for problem in verdict.problems)
        return
    keyed = verdict.head.algo == HMAC_SHA256
    how = f"keyed ({HMAC_SHA256}, {KEY_ENV})" if keyed else "unkeyed (sha256)"
    result.lines.append(
        f"run {run}: ledger chain of {verdict.records} records, {how}, head {verdict.head_text}"
    )
    result.problems.extend(f"ledger: {problem}" for problem in verdict.problems)
    if not keyed and key is not None:
        # Whoever can write the database can rewrite a keyed chain as an unkeyed one: given
        # a key, an unkeyed chain is no proof (unset the key to check an unkeyed run).
        result.problems.append(
            f"ledger: the chain is unkeyed but {KEY_ENV} is set: a keyed chain rewritten "
            f"without its key looks like this (unset {KEY_ENV} for a run begun without one)"
        )


def _check_report(
    result: Verification,
    path: Path,
    found: ReportFile,
    verdict: ChainVerdict,
    ledger: Ledger,
    info: RunInfo,
    currency: str,
) -> None:
    # The rows first: a cell edited names its row and column; the digest then says only
    # that the file changed.
    try:
        records, info = _results_rows(ledger, info)
        problems = _row_problems(found, records, info, currency)
    except LedgerError as exc:  # a value changed by hand that no report could show
        problems = [f"the ledger's rows cannot be shown as a report's: {exc}"]
    stated = found.summary.get(DIGEST_LINE)
    if stated is None:
        problems.append(f"its Summary states no {DIGEST_LINE}")
    elif stated != found.digest:
        problems.append(
            f"its Results rows do not give the {DIGEST_LINE} its Summary states: the file "
            "was edited after it was written"
        )
    named = found.summary.get("run key")
    if named is not None and named != info.run_key:
        problems.append(f"it is the report of run {named!r}, not of {info.run_key!r}")
    problems += _head_problems(found, verdict)
    result.lines.append(
        f"report {path}: {len(found.rows)} rows, {DIGEST_LINE} {found.digest}"
        + ("" if problems else ", as its Summary states and as the ledger holds")
    )
    result.problems.extend(f"report {path}: {problem}" for problem in problems)
    later = _records_since(found, verdict)
    if problems and later:
        result.lines.append(
            f"report {path}: written {later} ledger records ago (a webhook settling a row, "
            "a resumed run): `topup-runner report` writes it again from the ledger"
        )


def _results_rows(ledger: Ledger, info: RunInfo) -> tuple[Iterator[RowRecord], RunInfo]:
    """The rows the report's Results shows, as its writer makes them: a split run's chunks
    joined into one row per job row (its chunks' own lines, in `Chunks`, are not compared:
    each chunk is a ledger row, and the chain covers those)."""
    probe = ledger.records(info.run_key)
    try:
        split = is_split(probe)
    finally:
        if isinstance(probe, Generator):
            probe.close()  # the ledger's reading connection, opened for one row
    if split:
        return job_rows(ledger.records(info.run_key)), split_info(info)
    return ledger.records(info.run_key), info


def _records_since(found: ReportFile, verdict: ChainVerdict) -> int:
    """How many records the ledger's chain has gained since the report was written."""
    head = parse_head(found.summary.get(CHAIN_LINE, ""))
    if head is None or verdict.head is None:
        return 0
    return max(verdict.head.seq - head[1], 0)


def _head_problems(found: ReportFile, verdict: ChainVerdict) -> list[str]:
    stated = found.summary.get(CHAIN_LINE)
    if stated is None or not verdict.chained:
        return []
    head = parse_head(stated)
    if head is None:
        return [] if stated == "unchained" else [f"its {CHAIN_LINE} {stated!r} is not one"]
    _algo, seq, hash_ = head
    if verdict.hashes.get(seq) != hash_:
        return [
            f"its {CHAIN_LINE} (record #{seq}) is not in the ledger's chain: the ledger's "
            "records were rewritten after the report was written"
        ]
    return []


def _row_problems(found: ReportFile, records: Any, info: RunInfo, currency: str) -> list[str]:
    """The report's header and rows against the ledger's, cell by cell."""
    names = header(info)
    text = _csv_cells if found.kind == "csv" else _xlsx_cells
    problems: list[str] = []
    expected_header = text(list(names), names)  # header names: text cells as any other
    if found.header[: len(expected_header)] != expected_header:
        problems.append("its Results header is not the one the ledger's run gives")
    rows = iter(found.rows)
    count = 0
    record: RowRecord
    for record in records:
        count += 1
        expected = text(values(record, info.extra_columns, currency), names)
        where, cells = next(rows, (None, None))
        if where is None or cells is None:
            problems.append(f"it lacks row {record.row} of the ledger (and any after it)")
            return problems
        cells = cells + [""] * (len(expected) - len(cells))
        for index, (got, want) in enumerate(zip(cells, expected, strict=False)):
            if got != want:
                problems.append(
                    f"{where} (row {record.row}), column {names[index]}: "
                    f"{got or 'empty'!r} in the report, {want or 'empty'!r} in the ledger"
                )
                break
        else:
            if any(cells[len(expected) :]):
                problems.append(f"{where} (row {record.row}) has cells past its last column")
    extra = sum(1 for _ in rows)
    if extra:
        problems.append(f"it has {extra} rows more than the ledger's {count}")
    return problems


def _csv_cells(row: list[Any], names: list[str]) -> list[str]:
    return [csv_text(value) for value in row]


def _xlsx_cells(row: list[Any], names: list[str]) -> list[str]:
    cells = []
    for index, value in enumerate(row):
        if isinstance(value, str):
            value = fitted(value, sheet="Results", row=0, column=names[index], quiet=True)
        elif isinstance(value, datetime):  # UTC, to the millisecond, as written
            value = millis(utc(value))
        cells.append(xlsx_text(value))
    return cells


def show_verification(found: Verification) -> list[str]:
    """What `verify` prints: what was checked, then the verdict, the first problem named."""
    lines = list(found.lines)
    if found.sound:
        lines.append("verified: every record fits the chain and everything checked holds")
        return lines
    if found.problems:
        lines.append(f"NOT VERIFIED: first problem: {found.problems[0]}")
        more = found.problems[1 : SHOWN + 1]
        lines += [f"  also: {problem}" for problem in more]
        if len(found.problems) > SHOWN + 1:
            lines.append(f"  and {len(found.problems) - SHOWN - 1} more")
    else:
        lines.append("NOT VERIFIED: the run is unchained")
    return lines
