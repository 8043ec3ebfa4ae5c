"""Workbook jobs (.xlsx): what Excel and LibreOffice put in cells, read as the CSV of the same
rows would be, or refused at its sheet and cell; and end to end on the sandbox."""

from __future__ import annotations

import datetime
import re
import shutil
import zipfile
from decimal import Decimal
from pathlib import Path

import openpyxl
import pytest

from runner.errors import ConfigError, JobInvalid, Problem
from runner.jobs import Job, JobReading, load_job
from runner.jobs.columns import parse_columns
from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import TOKEN, clean_env, read_csv_report, run_cli

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "workbooks"
PAYROLL_COLUMNS = 'card_id="Card Number",amount="Net Pay",reference="Employee ID"'


def workbook(path: Path, rows: list[list[object]], title: str = "Pay") -> Path:
    """A one-sheet workbook written by openpyxl (its formulas have no cached result)."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = title
    for row in rows:
        sheet.append(row)
    book.save(path)
    return path


def with_cached(path: Path, results: dict[str, str]) -> Path:
    """`path` with the formula cells named given a cached result, as Excel saves them."""
    part = "xl/worksheets/sheet1.xml"
    with zipfile.ZipFile(path) as source:
        parts = {name: source.read(name) for name in source.namelist()}
    xml = parts[part].decode()
    for cell, value in results.items():
        xml, found = re.subn(
            rf'<c r="{cell}"([^>]*)><f>([^<]*)</f><v\s*/?>(?:</v>)?</c>',
            rf'<c r="{cell}"\1><f>\2</f><v>{value}</v></c>',
            xml,
        )
        assert found == 1, xml
    parts[part] = xml.encode()
    with zipfile.ZipFile(path, "w") as target:
        for name, data in parts.items():
            target.writestr(name, data)
    return path


def problems_of(path: Path, reading: JobReading | None = None) -> list[Problem]:
    with pytest.raises(JobInvalid) as caught:
        load_job(path, reading)
    return list(caught.value.problems)


def amounts(job: Job) -> list[str]:
    return [f"{row.amount}" for row in job.rows]


class TestLibreOffice:
    """Workbooks LibreOffice made from the CSVs beside them (tests/fixtures/workbooks/make.py)."""

    def test_mapped_payroll_reads_cached_formula_results_as_exact_cents(self) -> None:
        """Float artefacts (250.1, 100.1+200.2) and formulas come out as the cents they mean."""
        reading = JobReading(columns=parse_columns(PAYROLL_COLUMNS, "--columns"))
        job = load_job(FIXTURES / "payroll.xlsx", reading)
        assert amounts(job) == ["250.10", "300.30", "1250.00", "33.33", "19.99"]
        assert job.rows[0].reference == "EMP-0001"
        assert job.extra_columns == ("Department",)
        assert job.rows[0].extra == (("Department", "Sales"),)

    def test_text_ids_keep_leading_zeros_and_point_one_plus_point_two_is_thirty_cents(
        self,
    ) -> None:
        """Text-formatted ids stay as typed; 0.1+0.2 as formula and as value is 0.30."""
        job = load_job(FIXTURES / "artefacts.xlsx")
        assert [row.card_id for row in job.rows] == ["0042", "0043", "0044"]
        assert amounts(job) == ["0.30", "0.30", "250.10"]

    def test_amounts_that_are_not_cents_are_refused_at_their_cell(self) -> None:
        """A third, an error and TRUE are each refused at the cell, with the value shown."""
        found = problems_of(FIXTURES / "bad-amounts.xlsx")
        assert [(p.row, p.column) for p in found] == [
            (1, "amount (cell B2)"),
            (2, "amount (cell B3)"),
            (3, "amount (cell B4)"),
        ]
        assert "33.3333333333333" in found[0].message
        assert "#DIV/0!" in found[1].message
        assert all('sheet "bad-amounts"' in p.file for p in found)

    def test_number_formatted_ids_are_refused(self) -> None:
        """Ids LibreOffice turned into numbers (zeros lost, 1.23E+18) are refused."""
        found = problems_of(FIXTURES / "numeric-ids.xlsx")
        assert [p.column for p in found] == ["card_id (cell A2)", "card_id (cell A3)"]
        assert "holds 123" in found[0].message
        assert "leading zeros" in found[0].message

    def test_alix_takes_integral_ids_but_not_rounded_ones(self) -> None:
        """Where ids are numbers (Alix), 123 is card "123"; a 19-digit id is still refused."""
        found = problems_of(FIXTURES / "numeric-ids.xlsx", JobReading(numeric_card_ids=True))
        assert [p.column for p in found] == ["card_id (cell A3)"]

    def test_workbook_and_its_csv_are_one_job(self) -> None:
        """A CSV job saved as a workbook has the CSV's digest: its run resumes, not repays."""
        csv_job = load_job(FIXTURES / "finished.csv")
        book_job = load_job(FIXTURES / "finished.xlsx")
        assert book_job.content_digest == csv_job.content_digest
        assert amounts(book_job) == amounts(csv_job)

    def test_first_sheet_without_a_job_names_the_others(self) -> None:
        """The first sheet is read; notes there are refused, pointing to the other sheets."""
        found = problems_of(FIXTURES / "sheets.xlsx")
        assert 'sheet "Notes"' in found[0].file
        assert "Pay" in found[0].message
        assert "--sheet" in found[0].message

    def test_second_sheet_by_name_with_formulas_libreoffice_calculated(self) -> None:
        """--sheet Pay (any case) reads that sheet; LibreOffice saved the formulas' results."""
        job = load_job(FIXTURES / "sheets.xlsx", JobReading(sheet="pay"))
        assert amounts(job) == ["0.30", "33.33"]

    def test_merged_cells_are_refused(self) -> None:
        """A merge in the data area is refused, named by its range."""
        found = problems_of(FIXTURES / "sheets.xlsx", JobReading(sheet="Merged"))
        assert "B2:B3 are merged" in found[0].message

    def test_hidden_rows_are_read_and_noted(self) -> None:
        """A hidden row is paid like the others, and the job says so for `check`."""
        job = load_job(FIXTURES / "sheets.xlsx", JobReading(sheet="Hidden"))
        assert amounts(job) == ["5.00", "6.00"]
        assert len(job.notes) == 1
        assert "hidden row" in job.notes[0]
        assert "3" in job.notes[0]

    def test_empty_sheet_is_refused(self) -> None:
        """An empty sheet is a clear error, not an empty job."""
        found = problems_of(FIXTURES / "sheets.xlsx", JobReading(sheet="Empty"))
        assert "is empty" in found[0].message

    def test_missing_sheet_lists_the_sheets(self) -> None:
        """A sheet that is not there: the workbook's sheets are listed."""
        found = problems_of(FIXTURES / "sheets.xlsx", JobReading(sheet="Payroll"))
        assert found[0].message.startswith('has no sheet "Payroll"')
        assert '"Notes", "Pay", "Merged", "Hidden", "Empty"' in found[0].message


class TestOpenpyxl:
    """Workbooks openpyxl writes: stored doubles, no cached formula results."""

    def test_stored_doubles_within_a_billionth_of_a_cent_are_that_cent(
        self, tmp_path: Path
    ) -> None:
        """250.1 and 0.1+0.2 stored as doubles are 250.10 and 0.30."""
        path = workbook(
            tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", 250.1], ["c-2", 0.1 + 0.2]]
        )
        assert amounts(load_job(path)) == ["250.10", "0.30"]

    @pytest.mark.parametrize("value", [250.123, 0.305, 10.0000001])
    def test_doubles_off_the_cent_are_refused_with_the_value(
        self, tmp_path: Path, value: float
    ) -> None:
        """A double further than 1e-9 from a whole cent is refused, its value shown."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", value]])
        found = problems_of(path)
        assert len(found) == 1
        assert repr(value) in found[0].message

    def test_formula_without_cached_result_is_refused(self, tmp_path: Path) -> None:
        """openpyxl saves formulas uncalculated: the amount is unknown, so refused."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", "=0.1+0.2"]])
        found = problems_of(path)
        assert found[0].column == "amount (cell B2)"
        assert "no saved result" in found[0].message

    def test_formula_with_excel_style_cached_result(self, tmp_path: Path) -> None:
        """Excel saves 0.1+0.2 as 0.30000000000000004: read as 0.30."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", "=0.1+0.2"]])
        assert amounts(load_job(with_cached(path, {"B2": "0.30000000000000004"}))) == ["0.30"]

    def test_text_ids_kept_number_ids_refused(self, tmp_path: Path) -> None:
        """ "00123" typed as text is kept; 123 as a number is refused."""
        path = workbook(
            tmp_path / "j.xlsx", [["card_id", "amount"], ["00123", 5], [123, 5], [1.5e16, 5]]
        )
        found = problems_of(path)
        assert [p.row for p in found] == [2, 3]
        assert "1.5e+16" in found[1].message

    @pytest.mark.parametrize("value", [datetime.date(2026, 11, 30), True, datetime.time(12, 0)])
    def test_dates_and_booleans_are_not_amounts(self, tmp_path: Path, value: object) -> None:
        """A date, a time or a boolean in an amount cell is refused."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", value]])
        found = problems_of(path)
        assert found[0].column == "amount (cell B2)"

    def test_blank_rows_are_ignored_and_others_carried(self, tmp_path: Path) -> None:
        """Blank rows (trailing or not) are skipped; other columns reach the report as text."""
        rows: list[list[object]] = [
            ["card_id", "amount", "reference", "Hired", "Bonus"],
            ["c-1", 5, 1001, datetime.date(2020, 1, 2), False],
            [None, None, None, None, None],
            ["c-2", "6.50", "E2", None, 12.5],
            ["", "  ", None],
            [None],
        ]
        job = load_job(workbook(tmp_path / "j.xlsx", rows))
        assert amounts(job) == ["5.00", "6.50"]
        assert job.rows[0].reference == "1001"
        assert job.rows[0].extra == (("Hired", "2020-01-02"), ("Bonus", "FALSE"))
        assert job.rows[1].extra == (("Hired", ""), ("Bonus", "12.5"))

    def test_header_only_has_no_rows(self, tmp_path: Path) -> None:
        """A header and nothing else is refused as a job with no rows."""
        found = problems_of(workbook(tmp_path / "j.xlsx", [["card_id", "amount"]]))
        assert found[0].message == "the job has no rows"

    def test_values_outside_the_header_are_refused(self, tmp_path: Path) -> None:
        """A value in a column with no header is a mistake, named by its cell."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", 5, "stray"]])
        assert "cell C2" in problems_of(path)[0].message

    def test_hidden_first_sheet_needs_naming(self, tmp_path: Path) -> None:
        """A hidden first sheet is not read unless named."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", 5]])
        book = openpyxl.load_workbook(path)
        book.create_sheet("Visible")
        book["Pay"].sheet_state = "hidden"
        book.save(path)
        assert "hidden" in problems_of(path)[0].message
        assert len(load_job(path, JobReading(sheet="Pay")).rows) == 1

    def test_text_renamed_xlsx_and_protected_files_are_refused(self, tmp_path: Path) -> None:
        """A CSV named .xlsx, and an OLE file (password-protected or .xls), get one line."""
        text = tmp_path / "text.xlsx"
        text.write_text("card_id,amount\nc-1,5\n", encoding="utf-8")
        assert "not an .xlsx workbook" in problems_of(text)[0].message
        ole = tmp_path / "ole.xlsx"
        ole.write_bytes(b"\xd0\xcf\x11\xe0\xa1\xb1\x1a\xe1" + b"\0" * 600)
        assert "password-protected" in problems_of(ole)[0].message

    def test_row_numbers_past_excel_are_refused(self, tmp_path: Path) -> None:
        """A row numbered past Excel's 1,048,576 is refused, not looped to."""
        path = workbook(tmp_path / "j.xlsx", [["card_id", "amount"], ["c-1", 5]])
        with zipfile.ZipFile(path) as source:
            parts = {name: source.read(name) for name in source.namelist()}
        name = "xl/worksheets/sheet1.xml"
        parts[name] = parts[name].replace(b'<row r="2"', b'<row r="99999999"')
        with zipfile.ZipFile(path, "w") as target:
            for part, data in parts.items():
                target.writestr(part, data)
        assert "99,999,999" in problems_of(path)[0].message

    def test_sheet_option_for_a_csv_is_a_configuration_error(self, tmp_path: Path) -> None:
        """--sheet names a sheet; a CSV has none."""
        path = tmp_path / "j.csv"
        shutil.copyfile(FIXTURES / "finished.csv", path)
        with pytest.raises(ConfigError, match="not a workbook"):
            load_job(path, JobReading(sheet="Pay"))


def uncash(base_url: str, tmp_path: Path, *more: str) -> list[str]:
    return [
        *("--provider", "uncash", "--base-url", base_url),
        *("--ledger", str(tmp_path / "ledger.sqlite"), "--output", str(tmp_path / "report.csv")),
        *("--cooldown", "0.3", "--rate-limit", "200", "--log-format", "json", *more),
    ]


BAD_RUNS: dict[str, tuple[str, ...]] = {
    "bad-amounts": ("bad-amounts.xlsx",),
    "number-ids": ("numeric-ids.xlsx",),
    "notes-sheet": ("sheets.xlsx",),
    "merged": ("sheets.xlsx", "--sheet", "Merged"),
    "empty-sheet": ("sheets.xlsx", "--sheet", "Empty"),
    "missing-sheet": ("sheets.xlsx", "--sheet", "Nope"),
    "mapping-missing-header": ("payroll.xlsx", "--columns", 'card_id="Card No"'),
    "malformed-mapping": ("payroll.xlsx", "--columns", "card_id"),
    "uncalculated": ("uncalculated.xlsx",),
}


@pytest.mark.anyio
@pytest.mark.parametrize("name", sorted(BAD_RUNS))
async def test_bad_workbook_exits_2_and_sends_nothing(tmp_path: Path, name: str) -> None:
    """Each bad workbook or reading option: one line, exit 2, no request to the provider."""
    file, *more = BAD_RUNS[name]
    workbook(tmp_path / "uncalculated.xlsx", [["card_id", "amount"], ["c-1", "=5+5"]])
    if file != "uncalculated.xlsx":
        shutil.copyfile(FIXTURES / file, tmp_path / file)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(tmp_path / file),
            *uncash(sb.base_url, tmp_path, *more),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN),
        )
        requests = sum(sb.state.requests.values())
    assert done.code == 2, done.stderr
    assert requests == 0
    assert "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) >= 1
    assert not (tmp_path / "report.csv").exists()


@pytest.mark.anyio
async def test_mapped_workbook_runs_to_the_workbooks_amounts(tmp_path: Path) -> None:
    """A LibreOffice payroll with its own headers, mapped: the report and the sandbox hold
    exactly the workbook's amounts, and the other columns ride along."""
    job = tmp_path / "payroll.xlsx"
    shutil.copyfile(FIXTURES / "payroll.xlsx", job)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        done = await run_cli(
            "run",
            str(job),
            *uncash(sb.base_url, tmp_path),
            cwd=tmp_path,
            env=clean_env(UNCASH_API_TOKEN=TOKEN, TOPUP_COLUMNS=PAYROLL_COLUMNS),
        )
        applied = {a.card_id: a.amount for a in sb.state.applied}
    assert done.code == 0, done.stderr
    report = read_csv_report(tmp_path / "report.csv")
    expected = ["250.10", "300.30", "1250.00", "33.33", "19.99"]
    assert [row["amount"] for row in report] == expected
    assert [applied[row["card_id"]] for row in report] == [Decimal(a) for a in expected]
    assert {row["status"] for row in report} == {"succeeded"}
    assert [row["Department"] for row in report] == ["Sales", "Sales", "Ops", "Ops", "Ops"]
    assert report[0]["reference"] == "EMP-0001"


@pytest.mark.anyio
async def test_finished_csv_saved_as_workbook_sends_nothing(tmp_path: Path) -> None:
    """A finished CSV job, saved as .xlsx by LibreOffice and run: 0 topups, exit 0."""
    for name in ("finished.csv", "finished.xlsx"):
        shutil.copyfile(FIXTURES / name, tmp_path / name)
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.3)) as sb:
        env = clean_env(UNCASH_API_TOKEN=TOKEN)
        args = uncash(sb.base_url, tmp_path)
        first = await run_cli("run", str(tmp_path / "finished.csv"), *args, cwd=tmp_path, env=env)
        paid = len(sb.state.applied)
        again = await run_cli("run", str(tmp_path / "finished.xlsx"), *args, cwd=tmp_path, env=env)
        assert len(sb.state.applied) == paid == 4
        assert len(sb.state.topup_arrivals) == 4
    assert (first.code, again.code) == (0, 0), again.stderr
    assert "0 topups sent by this process" in again.stdout


@pytest.mark.anyio
async def test_check_warns_of_hidden_rows(tmp_path: Path) -> None:
    """`check` says that hidden rows were read (they will be paid)."""
    job = tmp_path / "sheets.xlsx"
    shutil.copyfile(FIXTURES / "sheets.xlsx", job)
    done = await run_cli("check", str(job), "--sheet", "Hidden", cwd=tmp_path)
    assert done.code == 0, done.stderr
    assert "hidden row" in done.stdout
