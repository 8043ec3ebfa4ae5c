"""Job files: what loads, what is refused, and that every refusal names file, row and column."""

from __future__ import annotations

import codecs
import dataclasses
import gc
import os
import re
import tempfile
import threading
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runner import jobs
from runner.errors import JobInvalid, Problem
from runner.jobs import MAX_PROBLEMS, Job, load_job
from runner.jobs import source as job_source
from runner.money import parse_amount

REPO = Path(__file__).resolve().parent.parent


def write(directory: Path, name: str, content: str | bytes) -> Path:
    path = directory / name
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def problems_of(path: Path) -> tuple[Problem, ...]:
    with pytest.raises(JobInvalid) as caught:
        load_job(path)
    assert all(p.file == str(path) for p in caught.value.problems)
    return caught.value.problems


def only_problem(path: Path) -> Problem:
    problems = problems_of(path)
    assert len(problems) == 1, problems
    return problems[0]


SIMPLE_CSV = "card_id,amount,reference,name\nc-1,250,EMP-1,Ann\nc-2,99.5,EMP-2,Bob\n"
SIMPLE_YAML = """\
topups:
  - {card_id: "c-1", amount: "250", reference: "EMP-1", name: "Ann"}
  - {card_id: "c-2", amount: "99.50", reference: "EMP-2", name: "Bob"}
"""


class TestCsvLoads:
    def test_rows_in_file_order(self, tmp_path: Path) -> None:
        """Each data row becomes a JobRow, numbered from 1, amounts as two-place Decimals."""
        job = load_job(write(tmp_path, "job.csv", SIMPLE_CSV))
        assert [(r.row, r.card_id, r.amount, r.reference) for r in job.rows] == [
            (1, "c-1", Decimal("250.00"), "EMP-1"),
            (2, "c-2", Decimal("99.50"), "EMP-2"),
        ]
        assert str(job.rows[0].amount) == "250.00"

    def test_extra_columns_are_carried(self, tmp_path: Path) -> None:
        """Columns other than card_id, amount, reference travel with each row, in file order."""
        job = load_job(write(tmp_path, "job.csv", "name,card_id,dept,amount\nAnn,c-1,Ops,5\n"))
        assert job.extra_columns == ("name", "dept")
        assert job.rows[0].extra == (("name", "Ann"), ("dept", "Ops"))

    def test_extra_values_are_untouched(self, tmp_path: Path) -> None:
        """Extra cells keep their spaces; empty extra cells are empty strings."""
        job = load_job(write(tmp_path, "job.csv", 'card_id,amount,note,x\nc,5,"  hi  ",\n'))
        assert job.rows[0].extra == (("note", "  hi  "), ("x", ""))

    def test_reference_is_optional(self, tmp_path: Path) -> None:
        """Without a reference column every row's reference is empty."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount\nc,5\n"))
        assert job.rows[0].reference == ""
        assert job.extra_columns == ()

    def test_card_id_keeps_leading_zeros(self, tmp_path: Path) -> None:
        """A numeric-looking card id stays the exact string in the file."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount\n000123,5\n"))
        assert job.rows[0].card_id == "000123"

    def test_header_is_matched_case_insensitively(self, tmp_path: Path) -> None:
        """Header names are stripped and matched regardless of case."""
        job = load_job(write(tmp_path, "job.csv", " Card_ID ,AMOUNT, Reference\nc,5,r\n"))
        assert (job.rows[0].card_id, job.rows[0].reference) == ("c", "r")

    def test_values_are_stripped(self, tmp_path: Path) -> None:
        """Spaces (also non-breaking) around card id, amount and reference are ignored."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,reference\n c ,\u00a05 , r \n"))
        row = job.rows[0]
        assert (row.card_id, row.amount, row.reference) == ("c", Decimal("5.00"), "r")

    def test_quoted_thousands_separator(self, tmp_path: Path) -> None:
        """A quoted "1,250.00" is one amount of 1250.00."""
        job = load_job(write(tmp_path, "job.csv", 'card_id,amount\nc,"1,250.00"\n'))
        assert job.rows[0].amount == Decimal("1250.00")

    def test_blank_rows_are_ignored_and_not_counted(self, tmp_path: Path) -> None:
        """Empty lines, all-empty rows and trailing blank lines are skipped; rows stay dense."""
        text = "card_id,amount\n\nc-1,5\n,\n  \n , \nc-2,6\n\n\n"
        job = load_job(write(tmp_path, "job.csv", text))
        assert [(r.row, r.card_id) for r in job.rows] == [(1, "c-1"), (2, "c-2")]

    def test_short_rows_fill_missing_cells(self, tmp_path: Path) -> None:
        """A row that omits trailing optional cells gets empty strings for them."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,reference,name\nc,5\n"))
        assert (job.rows[0].reference, job.rows[0].extra) == ("", (("name", ""),))

    def test_repeated_rows_are_allowed(self, tmp_path: Path) -> None:
        """The same card, amount and reference twice is two rows (preflight warns, not us)."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount\nc,5\nc,5\n"))
        assert len(job.rows) == 2

    def test_na_like_text_stays_text(self, tmp_path: Path) -> None:
        """NA, null and NaN in text cells are kept as written, never read as missing."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,reference,name\nNA,5,null,NaN\n"))
        row = job.rows[0]
        assert (row.card_id, row.reference, row.extra) == ("NA", "null", (("name", "NaN"),))

    def test_sep_comma_line_is_skipped(self, tmp_path: Path) -> None:
        """Excel's "sep=," first line is understood and skipped."""
        job = load_job(write(tmp_path, "job.csv", "sep=,\ncard_id,amount\nc,5\n"))
        assert job.rows[0].card_id == "c"

    def test_csv_has_no_run_settings(self, tmp_path: Path) -> None:
        """A CSV job names no run key, provider or settings."""
        job = load_job(write(tmp_path, "job.csv", SIMPLE_CSV))
        assert (job.run_key, job.provider, dict(job.settings)) == (None, None, {})

    def test_mixed_fast_and_slow_rows_keep_their_positions(self, tmp_path: Path) -> None:
        """Rows needing the slow path (spaces, separators) keep their order and values."""
        lines = [f"c{i},{i}.5" if i % 3 else f' c{i} ,"{i * 1000:,}"' for i in range(1, 3001)]
        job = load_job(write(tmp_path, "job.csv", "card_id,amount\n" + "\n".join(lines)))
        assert job.rows[2].card_id == "c3"
        assert job.rows[2].amount == Decimal("3000.00")
        assert job.rows[3].amount == Decimal("4.50")
        assert [r.row for r in job.rows] == list(range(1, 3001))

    @settings(max_examples=50, deadline=None)
    @given(
        st.lists(
            st.tuples(
                st.integers(min_value=0, max_value=10**9),
                st.integers(min_value=0, max_value=99),
                st.sampled_from(["{w}.{c:02d}", "{w:,}.{c:02d}", " {w}.{c:02d} ", "0{w}.{c:02d}"]),
            ).filter(lambda t: t[:2] != (0, 0)),
            min_size=1,
            max_size=30,
        )
    )
    def test_amounts_agree_with_parse_amount(self, amounts: list[tuple[int, int, str]]) -> None:
        """Whatever path a cell takes, its amount is exactly what parse_amount gives."""
        cells = [shape.format(w=w, c=c) for w, c, shape in amounts]
        text = "card_id,amount\n" + "".join(f'c,"{cell}"\n' for cell in cells)
        with tempfile.TemporaryDirectory() as directory:
            job = load_job(write(Path(directory), "job.csv", text))
        assert [r.amount for r in job.rows] == [parse_amount(cell) for cell in cells]


class TestCsvEncodings:
    def test_utf8_bom_is_ignored(self, tmp_path: Path) -> None:
        """A UTF-8 byte-order mark does not end up in the first header name or the digest."""
        plain = load_job(write(tmp_path, "a.csv", SIMPLE_CSV))
        bom = load_job(write(tmp_path, "b.csv", codecs.BOM_UTF8 + SIMPLE_CSV.encode()))
        assert bom.rows == plain.rows
        assert bom.content_digest == plain.content_digest

    @pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
    def test_utf16_with_bom_is_read(self, tmp_path: Path, encoding: str) -> None:
        """UTF-16 announced by a byte-order mark reads like the UTF-8 file."""
        bom = {"utf-16-le": codecs.BOM_UTF16_LE, "utf-16-be": codecs.BOM_UTF16_BE}
        data = bom.get(encoding, b"") + SIMPLE_CSV.encode(encoding)
        job = load_job(write(tmp_path, "job.csv", data))
        assert job.content_digest == load_job(write(tmp_path, "u8.csv", SIMPLE_CSV)).content_digest

    def test_crlf_reads_like_lf(self, tmp_path: Path) -> None:
        """CRLF line endings give the same rows and digest as LF."""
        lf = load_job(write(tmp_path, "lf.csv", SIMPLE_CSV))
        crlf = load_job(write(tmp_path, "crlf.csv", SIMPLE_CSV.replace("\n", "\r\n")))
        assert (crlf.rows, crlf.content_digest) == (lf.rows, lf.content_digest)

    def test_latin1_is_refused_with_its_line(self, tmp_path: Path) -> None:
        """Bytes that are not UTF-8 are refused, naming the line, never mis-decoded."""
        data = "card_id,amount,name\nc,5,Ren\u00e9\n".encode("latin-1")
        problem = only_problem(write(tmp_path, "job.csv", data))
        assert "not UTF-8" in problem.message
        assert "line 2" in problem.message
        assert problem.row is None

    def test_utf16_without_bom_is_refused(self, tmp_path: Path) -> None:
        """UTF-16 without a byte-order mark shows up as NUL characters and is refused."""
        problem = only_problem(write(tmp_path, "job.csv", SIMPLE_CSV.encode("utf-16-le")))
        assert "UTF-16" in problem.message

    def test_excel_workbook_is_refused(self, tmp_path: Path) -> None:
        """An .xlsx renamed to .csv is named for what it is."""
        problem = only_problem(write(tmp_path, "job.csv", b"PK\x03\x04rest-of-zip"))
        assert "Excel workbook" in problem.message


class TestCsvRefuses:
    def test_semicolon_separated(self, tmp_path: Path) -> None:
        """A ";"-separated file is refused as such, not reported as missing columns."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id;amount\nc;5,00\n"))
        assert '";"-separated' in problem.message

    def test_tab_separated(self, tmp_path: Path) -> None:
        """A tab-separated file is refused as such."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id\tamount\nc\t5\n"))
        assert "tab-separated" in problem.message

    def test_declared_semicolon_separator(self, tmp_path: Path) -> None:
        """A "sep=;" first line is refused."""
        problem = only_problem(write(tmp_path, "job.csv", "sep=;\ncard_id;amount\nc;5\n"))
        assert "sep=;" in problem.message

    def test_duplicated_header(self, tmp_path: Path) -> None:
        """A column named twice (in any case) is refused, not silently renamed."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount,Amount\nc,5,6\n"))
        assert (problem.row, problem.column) == (None, "amount")
        assert "2 times" in problem.message

    def test_duplicated_extra_header(self, tmp_path: Path) -> None:
        """An extra column named twice is refused too."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount,name,name\nc,5,a,b\n"))
        assert problem.column == "name"

    @pytest.mark.parametrize("missing", ["card_id", "amount"])
    def test_missing_required_column(self, tmp_path: Path, missing: str) -> None:
        """A missing required column is named in the problem's column."""
        header = ",".join(c for c in ("card_id", "amount", "reference") if c != missing)
        problem = only_problem(write(tmp_path, "job.csv", f"{header}\nx,y\n"))
        assert problem.column == missing

    def test_row_with_too_many_fields(self, tmp_path: Path) -> None:
        """A row longer than the header is refused for that row (an unquoted comma?)."""
        text = "card_id,amount,reference\nc,5,r\nc,1,250.00,r\nc,5,r\n"
        problem = only_problem(write(tmp_path, "job.csv", text))
        assert (problem.row, problem.column) == (2, None)
        assert "4 fields" in problem.message

    def test_first_row_with_too_many_fields(self, tmp_path: Path) -> None:
        """A too-long first row is refused too (pandas would only warn and drop the field)."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount\nc,1,250.00\n"))
        assert (problem.row, problem.column) == (1, None)

    def test_trailing_empty_field_counts_as_a_field(self, tmp_path: Path) -> None:
        """`c,1,250.00,` under a 3-column header is refused, not read as amount 1."""
        text = "card_id,amount,reference\nc,1,250.00,\n"
        problem = only_problem(write(tmp_path, "job.csv", text))
        assert problem.row == 1

    def test_every_long_row_is_reported(self, tmp_path: Path) -> None:
        """Each too-long row gets its own problem, with blank rows not counted."""
        text = "card_id,amount\nc,5\n\nc,1,2\nc,5\nc,3,4\n"
        rows = [p.row for p in problems_of(write(tmp_path, "job.csv", text))]
        assert rows == [2, 4]

    @pytest.mark.parametrize(
        "amount", ["NaN", "nan", "inf", "1e3", "-5", "0", "0.00", "5.001", "", "$5", "1.250,00"]
    )
    def test_bad_amount(self, tmp_path: Path, amount: str) -> None:
        """A bad amount is refused at its row and column."""
        text = f'card_id,amount\nc,5\nc,"{amount}"\n'
        problem = only_problem(write(tmp_path, "job.csv", text))
        assert (problem.row, problem.column) == (2, "amount")

    @pytest.mark.parametrize(
        ("amount", "value"),
        [("12.345", None), ("1.250", None), ("nan", None), ("1,2345", None),
         ("2e3", "2000.00"), ("1 250.5", "1250.50"), ("12,5", "12.50")],
    )  # fmt: skip
    def test_amount_hint_is_the_amount_written(
        self, tmp_path: Path, amount: str, value: str | None
    ) -> None:
        """The refusal's figures, past the quoted cell, are the cell's own value or none."""
        problem = only_problem(write(tmp_path, "job.csv", f'card_id,amount\nc,"{amount}"\n'))
        rest = problem.message.split(f'"{amount}"', 1)[1]
        figures = set(re.findall(r"[0-9]+(?:\.[0-9]+)?", rest))
        assert figures <= ({value} if value is not None else set()), problem.message

    def test_ambiguous_amount_message(self, tmp_path: Path) -> None:
        """The message for a European amount reads as the contract's example."""
        path = write(tmp_path, "job.csv", 'card_id,amount\nc,"1.250,00"\n')
        assert str(only_problem(path)) == (
            f'{path}, row 1, column amount: "1.250,00" is ambiguous: use 1250.00'
        )

    def test_empty_card_id(self, tmp_path: Path) -> None:
        """An empty card id is refused at its row and column."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount\n  ,5\n"))
        assert (problem.row, problem.column, problem.message) == (1, "card_id", "is empty")

    def test_card_id_in_scientific_notation(self, tmp_path: Path) -> None:
        """An id Excel rewrote as 1.23457E+15 is refused: the real id is lost."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount\n1.23457E+15,5\n"))
        assert (problem.row, problem.column) == (1, "card_id")
        assert "scientific" in problem.message

    def test_card_id_with_inner_space(self, tmp_path: Path) -> None:
        """A card id with a space inside is refused."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount\nab cd,5\n"))
        assert problem.column == "card_id"

    def test_reference_with_line_break(self, tmp_path: Path) -> None:
        """A quoted multi-line reference is refused (it would break provider requests)."""
        problem = only_problem(write(tmp_path, "job.csv", 'card_id,amount,reference\nc,5,"a\nb"\n'))
        assert (problem.row, problem.column) == (1, "reference")

    def test_header_only(self, tmp_path: Path) -> None:
        """A header without rows is a job with no rows."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount\n\n\n"))
        assert problem.message == "the job has no rows"

    @pytest.mark.parametrize("content", [b"", b"  \n\n", codecs.BOM_UTF8])
    def test_empty_file(self, tmp_path: Path, content: bytes) -> None:
        """An empty (or blank) file is refused as empty."""
        assert only_problem(write(tmp_path, "job.csv", content)).message == "the file is empty"

    def test_unterminated_quote(self, tmp_path: Path) -> None:
        """A quote never closed is refused with the line it runs to, not swallowed."""
        problem = only_problem(write(tmp_path, "job.csv", 'card_id,amount\nc,5\nc,"6\nd,7\n'))
        assert "not valid CSV" in problem.message

    def test_unnamed_column_with_values(self, tmp_path: Path) -> None:
        """Values under an empty header cell are refused: nobody knows what they are."""
        problem = only_problem(write(tmp_path, "job.csv", "card_id,amount,\nc,5,\nd,6,x\n"))
        assert (problem.row, problem.column) == (2, None)
        assert "column 3" in problem.message

    def test_unnamed_empty_column_is_ignored(self, tmp_path: Path) -> None:
        """A trailing empty column (Excel leaves them) is harmless."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,\nc,5,\n"))
        assert job.extra_columns == ()

    def test_all_problems_in_one_pass(self, tmp_path: Path) -> None:
        """Every bad cell of every row is reported at once, in row then column order."""
        text = "card_id,amount\nok,5\n,NaN\nok,5\nok,-1\n"
        found = [(p.row, p.column) for p in problems_of(write(tmp_path, "job.csv", text))]
        assert found == [(2, "card_id"), (2, "amount"), (4, "amount")]

    def test_problems_are_capped(self, tmp_path: Path) -> None:
        """Beyond MAX_PROBLEMS problems only a count is kept."""
        text = "card_id,amount\n" + "c,x\n" * (MAX_PROBLEMS + 10)
        with pytest.raises(JobInvalid) as caught:
            load_job(write(tmp_path, "job.csv", text))
        assert len(caught.value.problems) == MAX_PROBLEMS
        assert caught.value.truncated == 10
        assert "and 59 more problems" in str(caught.value)


class TestFiles:
    def test_missing_file(self, tmp_path: Path) -> None:
        """A path that does not exist is a problem, not a traceback."""
        assert only_problem(tmp_path / "nope.csv").message == "no such file"

    def test_directory(self, tmp_path: Path) -> None:
        """A directory named like a job is refused."""
        (tmp_path / "dir.csv").mkdir()
        assert "directory" in only_problem(tmp_path / "dir.csv").message

    @pytest.mark.parametrize("name", ["job.txt", "job.xls", "job"])
    def test_unsupported_suffix(self, tmp_path: Path, name: str) -> None:
        """Only .csv, .yaml, .yml and .xlsx are jobs."""
        problem = only_problem(write(tmp_path, name, SIMPLE_CSV))
        assert ".csv, .yaml, .yml or .xlsx" in problem.message

    def test_suffix_case_does_not_matter(self, tmp_path: Path) -> None:
        """JOB.CSV is a CSV job."""
        assert len(load_job(write(tmp_path, "JOB.CSV", SIMPLE_CSV)).rows) == 2

    def test_string_path_is_accepted(self, tmp_path: Path) -> None:
        """load_job takes a str as well as a Path, and keeps it as the job's path."""
        path = write(tmp_path, "job.csv", SIMPLE_CSV)
        assert load_job(str(path)).path == path


class TestFileKinds:
    def test_fifo_is_refused_without_hanging(self, tmp_path: Path) -> None:
        """A named pipe given as the job is refused at once, not read until a writer comes."""
        fifo = tmp_path / "job.csv"
        os.mkfifo(fifo)
        outcome: list[Problem] = []
        reader = threading.Thread(target=lambda: outcome.append(only_problem(fifo)), daemon=True)
        reader.start()
        reader.join(timeout=5)
        if reader.is_alive():
            # Unblock the reader so that the test process can end, then fail.
            with open(fifo, "wb"):
                pass
            pytest.fail("reading a FIFO job hung")
        assert "named pipe" in outcome[0].message
        assert "regular file" in outcome[0].message

    def test_symlink_to_dev_zero_is_refused(self, tmp_path: Path) -> None:
        """A link to an endless device is refused before a byte is read."""
        link = tmp_path / "job.csv"
        link.symlink_to("/dev/zero")
        message = only_problem(link).message
        assert "character device" in message
        assert "regular file" in message

    def test_directory_named_like_a_job(self, tmp_path: Path) -> None:
        """A directory is refused as one, by the same check as every other non-file."""
        (tmp_path / "dir.yaml").mkdir()
        assert only_problem(tmp_path / "dir.yaml").message == "is a directory, not a job file"

    def test_oversize_file_is_refused_before_reading(
        self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A file above MAX_JOB_BYTES is refused, the limit stated in the message."""
        monkeypatch.setattr(job_source, "MAX_JOB_BYTES", 100)
        path = write(tmp_path, "job.csv", "card_id,amount\n" + "c-1,5.00\n" * 20)
        message = only_problem(path).message
        assert "100 bytes" in message
        assert "195" in message  # the file's size

    def test_file_at_the_limit_loads(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        """A file of exactly MAX_JOB_BYTES is accepted."""
        text = "card_id,amount\nc-1,5.00\n"
        monkeypatch.setattr(job_source, "MAX_JOB_BYTES", len(text))
        assert len(load_job(write(tmp_path, "job.csv", text)).rows) == 1

    def test_limit_is_256_mib(self) -> None:
        """The documented limit."""
        assert jobs.MAX_JOB_BYTES == 256 * 1024 * 1024

    def test_unreadable_file(self, tmp_path: Path) -> None:
        """A file without read permission is a problem, not a traceback."""
        path = write(tmp_path, "job.csv", SIMPLE_CSV)
        path.chmod(0)
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        assert "cannot be read" in only_problem(path).message


class TestYamlLoads:
    def test_rows_and_run_fields(self, tmp_path: Path) -> None:
        """topups become rows; run_key, provider and settings are returned as given."""
        text = (
            "run_key: payroll-2026-11\nprovider: uncash\n"
            "settings: {rate_limit: 5, cooldown: 120, concurrency: 4}\n" + SIMPLE_YAML
        )
        job = load_job(write(tmp_path, "job.yaml", text))
        assert (job.run_key, job.provider) == ("payroll-2026-11", "uncash")
        assert dict(job.settings) == {"rate_limit": 5, "cooldown": 120, "concurrency": 4}
        assert [(r.row, r.card_id, r.amount) for r in job.rows] == [
            (1, "c-1", Decimal("250.00")),
            (2, "c-2", Decimal("99.50")),
        ]

    def test_settings_are_plain_python_values(self, tmp_path: Path) -> None:
        """Settings numbers and booleans are plain int, float and bool."""
        text = "settings: {concurrency: 4, timeout: 2.5, progress: false}\n" + SIMPLE_YAML
        settings_ = load_job(write(tmp_path, "job.yml", text)).settings
        assert [type(settings_[k]) for k in ("concurrency", "timeout", "progress")] == [
            int,
            float,
            bool,
        ]

    def test_settings_cannot_be_changed(self, tmp_path: Path) -> None:
        """The job's settings mapping is read-only."""
        job = load_job(write(tmp_path, "job.yaml", "settings: {a: 1}\n" + SIMPLE_YAML))
        with pytest.raises(TypeError):
            job.settings["a"] = 2  # type: ignore[index]

    def test_integer_amount_is_accepted(self, tmp_path: Path) -> None:
        """An unquoted whole-number amount is exact and accepted."""
        job = load_job(write(tmp_path, "job.yaml", "topups:\n  - {card_id: c, amount: 250}\n"))
        assert job.rows[0].amount == Decimal("250.00")

    def test_extra_keys_become_columns(self, tmp_path: Path) -> None:
        """Other keys are extra columns in first-seen order; rows lacking one get ""."""
        text = (
            "topups:\n  - {card_id: a, amount: '1', name: Ann}\n"
            "  - {card_id: b, amount: '2', dept: 7, Name: Bo}\n"
        )
        job = load_job(write(tmp_path, "job.yaml", text))
        assert job.extra_columns == ("name", "dept")
        assert job.rows[0].extra == (("name", "Ann"), ("dept", ""))
        assert job.rows[1].extra == (("name", "Bo"), ("dept", "7"))

    def test_dates_stay_as_written(self, tmp_path: Path) -> None:
        """A date-like reference is kept as the text written, not turned into a date."""
        text = "topups:\n  - {card_id: a, amount: '1', reference: 2026-11-01}\n"
        assert load_job(write(tmp_path, "job.yaml", text)).rows[0].reference == "2026-11-01"

    def test_csv_and_yaml_digests_match(self, tmp_path: Path) -> None:
        """The same rows in CSV and YAML give the same content digest."""
        csv_job = load_job(write(tmp_path, "job.csv", SIMPLE_CSV))
        yaml_job = load_job(write(tmp_path, "job.yaml", SIMPLE_YAML))
        assert csv_job.rows == yaml_job.rows
        assert csv_job.content_digest == yaml_job.content_digest

    def test_merge_keys_are_not_repeats(self, tmp_path: Path) -> None:
        """A topup built from another with `<<:` may override its keys."""
        text = "topups:\n  - &base {card_id: a, amount: '5'}\n  - <<: *base\n    card_id: b\n"
        job = load_job(write(tmp_path, "job.yaml", text))
        assert [r.card_id for r in job.rows] == ["a", "b"]
        assert job.rows[1].amount == Decimal("5.00")

    def test_null_reference_is_empty(self, tmp_path: Path) -> None:
        """A null reference reads as no reference."""
        text = "topups:\n  - {card_id: a, amount: '1', reference: ~}\n"
        assert load_job(write(tmp_path, "job.yaml", text)).rows[0].reference == ""


class TestYamlRefuses:
    def yaml_problem(self, tmp_path: Path, item: str) -> Problem:
        text = f"topups:\n  - {{card_id: ok, amount: '1'}}\n  - {item}\n"
        return only_problem(write(tmp_path, "job.yaml", text))

    @pytest.mark.parametrize("amount", ["250.5", "1.0e+3", ".nan", ".inf", "-.inf"])
    def test_float_amount(self, tmp_path: Path, amount: str) -> None:
        """An unquoted decimal (a YAML float) is refused at its row and column."""
        problem = self.yaml_problem(tmp_path, f"{{card_id: c, amount: {amount}}}")
        assert (problem.row, problem.column) == (2, "amount")

    def test_float_amount_message_says_quote(self, tmp_path: Path) -> None:
        """The float refusal says why and shows the quoted spelling to use."""
        problem = self.yaml_problem(tmp_path, "{card_id: c, amount: 250.5}")
        assert problem.message == (
            '250.5 is a YAML float, which cannot hold cents exactly: quote it as "250.5"'
        )

    @pytest.mark.parametrize("amount", ["12.345", "1.250", "2.5e+3", ".nan", "0x10", "0250"])
    def test_amount_hint_proposes_no_other_amount(self, tmp_path: Path, amount: str) -> None:
        """A YAML amount's refusal proposes no example figure and no thousandfold reading."""
        problem = self.yaml_problem(tmp_path, f"{{card_id: c, amount: {amount}}}")
        assert "250.00" not in problem.message
        assert "12345" not in problem.message
        assert "1250" not in problem.message
        assert "quote" in problem.message

    @pytest.mark.parametrize("amount", ["0250", "0x10", "1_000", "1:30", "+5"])
    def test_integer_amount_yaml_reads_differently(self, tmp_path: Path, amount: str) -> None:
        """An unquoted integer YAML would read as another number (octal, hex, ...) is refused."""
        problem = self.yaml_problem(tmp_path, f"{{card_id: c, amount: {amount}}}")
        assert (problem.row, problem.column) == (2, "amount")

    @pytest.mark.parametrize("amount", ["'1e3'", "1e3", "'-5'", "0", "''", "~"])
    def test_bad_amount_text(self, tmp_path: Path, amount: str) -> None:
        """Amount text goes through the same rules as in CSV."""
        problem = self.yaml_problem(tmp_path, f"{{card_id: c, amount: {amount}}}")
        assert (problem.row, problem.column) == (2, "amount")

    def test_integer_card_id(self, tmp_path: Path) -> None:
        """A numeric card id must be quoted so it stays exactly as written."""
        problem = self.yaml_problem(tmp_path, "{card_id: 0012345, amount: '5'}")
        assert (problem.row, problem.column) == (2, "card_id")
        assert '"0012345"' in problem.message

    @pytest.mark.parametrize("field", ["card_id", "reference", "name"])
    def test_boolean_where_text_is_expected(self, tmp_path: Path, field: str) -> None:
        """yes/no/true/false read as booleans are refused wherever text is expected."""
        item = {"card_id": "c", "amount": "'5'", field: "no"}
        body = ", ".join(f"{k}: {v}" for k, v in item.items())
        problem = self.yaml_problem(tmp_path, "{" + body + "}")
        assert (problem.row, problem.column) == (2, field)

    def test_missing_amount(self, tmp_path: Path) -> None:
        """A topup without an amount is refused at its row and column."""
        problem = self.yaml_problem(tmp_path, "{card_id: c}")
        assert (problem.row, problem.column, problem.message) == (2, "amount", "is missing")

    def test_item_not_a_mapping(self, tmp_path: Path) -> None:
        """A topup that is not a mapping is refused at its row."""
        problem = self.yaml_problem(tmp_path, "just text")
        assert (problem.row, problem.column) == (2, None)

    def test_nested_value(self, tmp_path: Path) -> None:
        """A list or mapping where a single value belongs is refused."""
        problem = self.yaml_problem(tmp_path, "{card_id: c, amount: '5', name: [a, b]}")
        assert (problem.row, problem.column) == (2, "name")

    def test_unquoted_comma_in_flow_mapping(self, tmp_path: Path) -> None:
        """`amount: 1,250.00` inside {...} is refused, not read as amount 1."""
        problems = problems_of(
            write(tmp_path, "job.yaml", "topups:\n  - {card_id: c, amount: 1,250.00}\n")
        )
        assert [(p.row, p.column) for p in problems] == [(1, None)]

    def test_repeated_key_in_a_topup(self, tmp_path: Path) -> None:
        """A key given twice is refused (PyYAML would keep the last one silently)."""
        problem = self.yaml_problem(tmp_path, "{card_id: c, amount: '5', amount: '6'}")
        assert (problem.row, problem.column) == (2, "amount")

    def test_key_repeated_in_another_case(self, tmp_path: Path) -> None:
        """Amount and amount in one topup are the same key given twice."""
        problem = self.yaml_problem(tmp_path, "{card_id: c, amount: '5', Amount: '6'}")
        assert (problem.row, problem.column) == (2, "amount")

    def test_repeated_top_level_key(self, tmp_path: Path) -> None:
        """Two topups: lists are refused, not reduced to the second."""
        text = SIMPLE_YAML + "topups:\n  - {card_id: x, amount: '1'}\n"
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert "twice" in problem.message

    def test_unknown_top_level_key(self, tmp_path: Path) -> None:
        """A misspelt top-level key is refused rather than ignored."""
        problem = only_problem(write(tmp_path, "job.yaml", "runkey: x\n" + SIMPLE_YAML))
        assert "runkey" in problem.message

    def test_run_key_must_be_text(self, tmp_path: Path) -> None:
        """A numeric run_key must be quoted."""
        problem = only_problem(write(tmp_path, "job.yaml", "run_key: 2026\n" + SIMPLE_YAML))
        assert problem.message == 'run_key must be text: quote it as "2026"'

    def test_settings_must_be_a_mapping(self, tmp_path: Path) -> None:
        """settings given as a list is refused."""
        problem = only_problem(write(tmp_path, "job.yaml", "settings: [a]\n" + SIMPLE_YAML))
        assert "settings" in problem.message

    @pytest.mark.parametrize(
        ("text", "fragment"),
        [
            ("run_key: x\n", "no topups"),
            ("topups: []\n", "no rows"),
            ("topups:\n", "no rows"),
            ("topups: {card_id: c}\n", "list"),
            ("- {card_id: c, amount: '5'}\n", "mapping"),
            ("# only a comment\n", "no YAML document"),
        ],
    )
    def test_wrong_shape(self, tmp_path: Path, text: str, fragment: str) -> None:
        """A document that is not a mapping with a topups list is refused, saying so."""
        assert fragment in only_problem(write(tmp_path, "job.yaml", text)).message

    def test_malformed_yaml_names_the_line(self, tmp_path: Path) -> None:
        """A syntax error is one problem naming the line it was found on."""
        text = "topups:\n  - {card_id: c, amount: '5'}\n  - [oops\n"
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert "not valid YAML on line 4" in problem.message

    def test_all_problems_in_one_pass(self, tmp_path: Path) -> None:
        """Problems of several rows and of the document come together."""
        text = (
            "run_key: 7\ntopups:\n  - {card_id: 1, amount: 2.5}\n  - {card_id: ok, amount: '5'}\n"
            "  - {card_id: '', amount: '-1'}\n"
        )
        found = [(p.row, p.column) for p in problems_of(write(tmp_path, "job.yaml", text))]
        assert found == [(None, None), (1, "card_id"), (1, "amount"), (3, "card_id"), (3, "amount")]


def laughs(levels: int, width: int, indent: str = "  ") -> str:
    """A "billion laughs" chain: each anchor a list of `width` aliases of the one before."""
    lines = [f"{indent}l0: &l0 [lol]"]
    for n in range(1, levels):
        aliases = ", ".join([f"*l{n - 1}"] * width)
        lines.append(f"{indent}l{n}: &l{n} [{aliases}]")
    return "\n".join(lines) + "\n"


ROW = "topups:\n  - {card_id: c-1, amount: '5'}\n"


class TestYamlAliasBombs:
    def refused_fast(self, tmp_path: Path, text: str) -> Problem:
        started = time.monotonic()
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert time.monotonic() - started < 2.0
        return problem

    def test_billion_laughs_in_settings(self, tmp_path: Path) -> None:
        """Nine levels of nine aliases (387 million values) are refused at once, not built."""
        problem = self.refused_fast(tmp_path, "settings:\n" + laughs(9, 9) + ROW)
        assert "alias" in problem.message
        assert problem.row is None

    def test_modest_alias_bomb_in_settings(self, tmp_path: Path) -> None:
        """A million values from a few lines is refused too: nothing legitimate needs that."""
        problem = self.refused_fast(tmp_path, "settings:\n" + laughs(7, 10) + ROW)
        assert "alias" in problem.message

    def test_alias_bomb_in_a_row(self, tmp_path: Path) -> None:
        """A row's extra column holding the bomb is refused the same way."""
        text = "settings:\n" + laughs(9, 9) + "topups:\n  - {card_id: c-1, amount: '5', x: *l8}\n"
        assert "alias" in self.refused_fast(tmp_path, text).message

    def test_merge_key_bomb(self, tmp_path: Path) -> None:
        """Merge keys that fold mappings of mappings into each other are bounded as well."""
        lines = ["settings:", "  m0: &m0 {a: 1, b: 2, c: 3, d: 4, e: 5, f: 6, g: 7, h: 8}"]
        for n in range(1, 9):
            merged = ", ".join([f"*m{n - 1}"] * 9)
            lines.append(f"  m{n}: &m{n} {{<<: [{merged}], k{n}: 1}}")
        assert "alias" in self.refused_fast(tmp_path, "\n".join(lines) + "\n" + ROW).message

    def test_alias_to_itself(self, tmp_path: Path) -> None:
        """A structure that contains itself is refused, not walked forever."""
        text = "settings: &s {again: *s}\n" + ROW
        assert "itself" in self.refused_fast(tmp_path, text).message

    def test_deep_nesting(self, tmp_path: Path) -> None:
        """Thousands of nested lists are refused with a problem, not a RecursionError."""
        text = "settings: {x: " + "[" * 5000 + "]" * 5000 + "}\n" + ROW
        problem = self.refused_fast(tmp_path, text)
        assert "nested" in problem.message
        assert str(jobs.MAX_YAML_DEPTH) in problem.message

    def test_deep_nesting_through_aliases(self, tmp_path: Path) -> None:
        """Aliases that stack nesting on nesting count as the nesting they expand to."""
        lines = ["settings:", "  d0: &d0 " + "[" * 30 + "]" * 30]
        for n in range(1, 6):
            lines.append(f"  d{n}: &d{n} " + "[" * 30 + f"*d{n - 1}" + "]" * 30)
        problem = self.refused_fast(tmp_path, "\n".join(lines) + "\n" + ROW)
        assert "nested" in problem.message

    def test_merge_defaults_per_row_keep_working(self, tmp_path: Path) -> None:
        """`<<: *defaults` on every row loads, past the 100,000 allowance (the ratio counts)."""
        first = "  - &defaults {card_id: c-0, amount: '5', dept: Ops, site: Paris, team: A}\n"
        rows = "".join(f"  - {{<<: *defaults, card_id: c-{n}}}\n" for n in range(1, 10_000))
        job = load_job(write(tmp_path, "job.yaml", "topups:\n" + first + rows))
        assert len(job.rows) == 10_000
        assert job.rows[-1].extra[0] == ("dept", "Ops")

    def test_settings_reused_through_an_alias(self, tmp_path: Path) -> None:
        """A value given once and referred to a few times is fine."""
        text = "settings: {a: &v [1, 2, 3], b: *v, c: *v}\n" + ROW
        assert load_job(write(tmp_path, "job.yaml", text)).settings["b"] == [1, 2, 3]


class TestCellLimits:
    @pytest.mark.parametrize("card_id", [".", "..", " .. "])
    def test_dot_segment_card_id(self, tmp_path: Path, card_id: str) -> None:
        """ "." and ".." would be read as a path step in the provider's URL: refused."""
        problem = only_problem(write(tmp_path, "job.csv", f"card_id,amount\n{card_id},5\n"))
        assert (problem.row, problem.column) == (1, "card_id")
        assert "URL" in problem.message

    def test_dot_segment_card_id_in_yaml(self, tmp_path: Path) -> None:
        """The same holds for a YAML job."""
        text = "topups:\n  - {card_id: '..', amount: '5'}\n"
        assert only_problem(write(tmp_path, "job.yaml", text)).column == "card_id"

    @pytest.mark.parametrize("card_id", ["...", ".a", "a.b", "a..b"])
    def test_dots_within_an_id_are_fine(self, tmp_path: Path, card_id: str) -> None:
        """Only whole dot segments change a URL; other ids with dots load."""
        job = load_job(write(tmp_path, "job.csv", f"card_id,amount\n{card_id},5\n"))
        assert job.rows[0].card_id == card_id

    def test_card_id_at_the_length_limit(self, tmp_path: Path) -> None:
        """A card id of MAX_CARD_ID_LENGTH characters loads."""
        card_id = "c" * jobs.MAX_CARD_ID_LENGTH
        job = load_job(write(tmp_path, "job.csv", f"card_id,amount\n{card_id},5\n"))
        assert job.rows[0].card_id == card_id

    @pytest.mark.parametrize("character", ["c", "é"])
    def test_card_id_over_the_length_limit(self, tmp_path: Path, character: str) -> None:
        """One character more is refused, the limit stated."""
        card_id = character * (jobs.MAX_CARD_ID_LENGTH + 1)
        problem = only_problem(write(tmp_path, "job.csv", f"card_id,amount\n{card_id},5\n"))
        assert problem.column == "card_id"
        assert "at most 200 characters" in problem.message

    def test_huge_card_id_is_one_short_line_fast(self, tmp_path: Path) -> None:
        """A 10 MB card id gives a one-line problem, quickly, without echoing the id."""
        path = write(tmp_path, "job.csv", "card_id,amount\n" + "x" * 10_000_000 + ",5\n")
        started = time.monotonic()
        problem = only_problem(path)
        assert time.monotonic() - started < 2.0
        assert problem.column == "card_id"
        assert len(str(problem)) < 300
        assert "\n" not in str(problem)

    def test_huge_card_id_with_spaces_is_not_echoed(self, tmp_path: Path) -> None:
        """A long id is refused for its length before its content is shown."""
        path = write(tmp_path, "job.csv", 'card_id,amount\n"' + "x y" * 100_000 + '",5\n')
        assert len(only_problem(path).message) < 200

    def test_reference_at_the_length_limit(self, tmp_path: Path) -> None:
        """A reference of MAX_REFERENCE_LENGTH characters loads."""
        reference = "r" * jobs.MAX_REFERENCE_LENGTH
        text = f"card_id,amount,reference\nc,5,{reference}\n"
        assert load_job(write(tmp_path, "job.csv", text)).rows[0].reference == reference

    def test_reference_over_the_length_limit(self, tmp_path: Path) -> None:
        """One character more is refused, the limit stated, the reference not echoed."""
        reference = "r" * (jobs.MAX_REFERENCE_LENGTH + 1)
        text = f"card_id,amount,reference\nc,5,{reference}\n"
        problem = only_problem(write(tmp_path, "job.csv", text))
        assert problem.column == "reference"
        assert "at most 1,000 characters" in problem.message
        assert reference not in problem.message

    def test_huge_yaml_card_id(self, tmp_path: Path) -> None:
        """A YAML job's 10 MB card id is refused the same way."""
        text = "topups:\n  - {card_id: '" + "x" * 10_000_000 + "', amount: '5'}\n"
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert problem.column == "card_id"
        assert len(problem.message) < 200


CANONICAL_IDS = (
    "card_id,amount,reference\n3f9c2d4e-8a1b-4c2d-9e3f-0a1b2c3d4e5f,250,EMP-1\ncard-7,99.5,EMP-2\n"
)
# Recorded before card ids were canonicalised in the digest: it must never change.
CANONICAL_IDS_DIGEST = "6df32b0fcac63269fb7f12f6c00cfe0755422845a9c6872956ab08bc3214bdfa"


class TestDigest:
    def test_same_amount_written_differently(self, tmp_path: Path) -> None:
        """250, 250.0 and 250.00 are the same amount and the same digest."""
        a = load_job(write(tmp_path, "a.csv", "card_id,amount\nc,250\n"))
        b = load_job(write(tmp_path, "b.csv", "card_id,amount\nc,250.00\n"))
        c = load_job(write(tmp_path, "c.csv", "card_id,amount\nc,250.0\n"))
        assert a.content_digest == b.content_digest == c.content_digest

    @pytest.mark.parametrize(
        "changed",
        [
            "card_id,amount,reference,name\nc-1,250.01,EMP-1,Ann\nc-2,99.5,EMP-2,Bob\n",
            "card_id,amount,reference,name\nc-2,99.5,EMP-2,Bob\nc-1,250,EMP-1,Ann\n",
            "card_id,amount,reference,name\nc-1,250,EMP-9,Ann\nc-2,99.5,EMP-2,Bob\n",
            "card_id,amount,reference,name\nc-1,250,EMP-1,Ann\n",
        ],
    )
    def test_different_rows_differ(self, tmp_path: Path, changed: str) -> None:
        """Changing an amount, the order, a reference or a row changes the digest."""
        base = load_job(write(tmp_path, "base.csv", SIMPLE_CSV))
        assert load_job(write(tmp_path, "x.csv", changed)).content_digest != base.content_digest

    @pytest.mark.parametrize(
        "changed",
        [
            "card_id,amount,reference,nom\nc-1,250,EMP-1,Ann\nc-2,99.5,EMP-2,Bob\n",
            "card_id,amount,reference,name\nc-1,250,EMP-1,Anne\nc-2,99.5,EMP-2,Bob\n",
            "card_id,amount,reference\nc-1,250,EMP-1\nc-2,99.5,EMP-2\n",
        ],
    )
    def test_extra_columns_do_not_count(self, tmp_path: Path, changed: str) -> None:
        """Fixing a name or renaming an extra column keeps the digest: the run resumes."""
        base = load_job(write(tmp_path, "base.csv", SIMPLE_CSV))
        assert load_job(write(tmp_path, "x.csv", changed)).content_digest == base.content_digest

    def test_digest_is_sha256_hex(self, tmp_path: Path) -> None:
        """The digest is 64 lowercase hex characters."""
        digest = load_job(write(tmp_path, "a.csv", SIMPLE_CSV)).content_digest
        assert len(digest) == 64
        assert set(digest) <= set("0123456789abcdef")

    def test_canonical_file_digest_is_unchanged(self, tmp_path: Path) -> None:
        """A file in canonical form keeps the digest earlier versions recorded in ledgers."""
        job = load_job(write(tmp_path, "a.csv", CANONICAL_IDS))
        assert job.content_digest == CANONICAL_IDS_DIGEST

    @pytest.mark.parametrize("spell", [str.upper, lambda s: s[:9] + s[9:].upper()])
    def test_uuid_case_does_not_change_the_digest(self, tmp_path: Path, spell: Any) -> None:
        """A copy with UUID card ids in another case addresses the same cards: same digest."""
        uuid_ = "3f9c2d4e-8a1b-4c2d-9e3f-0a1b2c3d4e5f"
        respelled = CANONICAL_IDS.replace(uuid_, spell(uuid_))
        assert respelled != CANONICAL_IDS
        job = load_job(write(tmp_path, "b.csv", respelled))
        assert job.content_digest == CANONICAL_IDS_DIGEST
        assert job.rows[0].card_id == spell(uuid_)  # rows keep the ids as written

    def test_uuid_case_in_yaml(self, tmp_path: Path) -> None:
        """The same holds across formats: an upper-case YAML copy of the CSV resumes it."""
        text = (
            "topups:\n"
            "  - {card_id: 3F9C2D4E-8A1B-4C2D-9E3F-0A1B2C3D4E5F, amount: '250', reference: EMP-1}\n"
            "  - {card_id: card-7, amount: '99.50', reference: EMP-2}\n"
        )
        assert load_job(write(tmp_path, "c.yaml", text)).content_digest == CANONICAL_IDS_DIGEST

    def test_other_ids_keep_their_case(self, tmp_path: Path) -> None:
        """Ids that are not UUIDs may be case-sensitive at the provider: not folded."""
        changed = CANONICAL_IDS.replace("card-7", "CARD-7")
        assert load_job(write(tmp_path, "d.csv", changed)).content_digest != CANONICAL_IDS_DIGEST

    @given(st.uuids(), st.lists(st.booleans(), min_size=36, max_size=36))
    @settings(max_examples=30, deadline=None)
    def test_any_uuid_spelling_folds(self, uuid_: Any, upper: list[bool]) -> None:
        """Every mix of cases of a UUID gives the digest of its lower-case form."""
        text = str(uuid_)
        spelled = "".join(c.upper() if up else c for c, up in zip(text, upper, strict=True))
        with tempfile.TemporaryDirectory() as folder:
            base = load_job(write(Path(folder), "a.csv", f"card_id,amount\n{text},5\n"))
            other = load_job(write(Path(folder), "b.csv", f"card_id,amount\n{spelled},5\n"))
        assert base.content_digest == other.content_digest


class TestValues:
    def test_rows_are_frozen(self, tmp_path: Path) -> None:
        """A loaded row cannot be changed."""
        job = load_job(write(tmp_path, "a.csv", SIMPLE_CSV))
        with pytest.raises(dataclasses.FrozenInstanceError):
            job.rows[0].amount = Decimal("1")  # type: ignore[misc]

    def test_job_is_frozen(self, tmp_path: Path) -> None:
        """A loaded job cannot be changed."""
        job = load_job(write(tmp_path, "a.csv", SIMPLE_CSV))
        with pytest.raises(dataclasses.FrozenInstanceError):
            job.run_key = "x"  # type: ignore[misc]

    def test_garbage_collector_is_left_enabled(self, tmp_path: Path) -> None:
        """Loading pauses the cyclic collector only while it runs, even when it refuses."""
        load_job(write(tmp_path, "a.csv", SIMPLE_CSV))
        with pytest.raises(JobInvalid):
            load_job(write(tmp_path, "b.csv", "card_id,amount\nc,x\n"))
        assert gc.isenabled()

    def test_repr_leaves_out_the_rows(self, tmp_path: Path) -> None:
        """A job's repr stays short however many rows it has."""
        job = load_job(write(tmp_path, "a.csv", SIMPLE_CSV))
        assert "c-1" not in repr(job)


class TestExampleJobs:
    @pytest.mark.parametrize("name", ["payroll-2026-11.csv", "payroll-2026-11.yaml"])
    def test_example_loads_and_is_sane(self, name: str) -> None:
        """The shipped examples load, fit Uncash's limits, and repeat exactly one card."""
        job: Job = load_job(REPO / "jobs" / name)
        amounts = [r.amount for r in job.rows]
        assert all(Decimal("5.00") <= a <= Decimal("10000.00") for a in amounts)
        assert sum(amounts) < Decimal("20000")
        cards = [r.card_id for r in job.rows]
        assert len(cards) - len(set(cards)) == 1
        assert len({r.reference for r in job.rows}) == len(job.rows)


def test_one_card_in_two_spellings_is_refused(tmp_path: Path) -> None:
    """A UUID written in two cases is one card to the provider: the job is refused, naming both."""
    card = "3f9c2d4e-1a2b-4c3d-8e9f-0a1b2c3d4e5f"
    path = tmp_path / "job.csv"
    path.write_text(f"card_id,amount\n{card},10.00\n{card.upper()},20.00\n", encoding="utf-8")
    with pytest.raises(JobInvalid) as caught:
        load_job(path)
    (problem,) = caught.value.problems
    assert problem.row == 2
    assert problem.column == "card_id"
    assert card in problem.message


class TestCurrency:
    """A job may declare the currency its cards hold: a `currency` column or setting."""

    def test_csv_column_declares_the_currency(self, tmp_path: Path) -> None:
        """A currency column, any case, becomes the job's currency, upper-cased; the rows
        carry none of it (`Job.currency` is what preflight checks)."""
        text = "card_id,amount,Currency\nc-1,5,usd\nc-2,6,USD\n"
        job = load_job(write(tmp_path, "job.csv", text))
        assert job.currency == "USD"
        assert [r.extra for r in job.rows] == [()] * 2

    def test_currency_is_not_an_extra_column(self, tmp_path: Path) -> None:
        """The declared currency is checked, not echoed: the report has its own currency column."""
        path = write(tmp_path, "job.csv", "card_id,amount,currency,name\nc-1,5,USDT,Ann\n")
        job = load_job(path)
        assert job.extra_columns == ("name",)
        assert job.currency == "USDT"
        assert job.rows[0].extra == (("name", "Ann"),)

    def test_blank_cells_take_the_job_currency(self, tmp_path: Path) -> None:
        """A blank currency cell is the job's one currency, not a row left unchecked."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,currency\nc-1,5,EUR\nc-2,6,\n"))
        assert job.currency == "EUR"
        assert job.rows[1].extra == ()

    def test_no_declaration_no_currency(self, tmp_path: Path) -> None:
        """Without a column or setting the job declares nothing, and the rows carry nothing."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount\nc-1,5\n"))
        assert job.currency is None
        assert job.rows[0].extra == ()

    def test_an_empty_column_declares_nothing(self, tmp_path: Path) -> None:
        """A currency column left blank on every row declares nothing."""
        job = load_job(write(tmp_path, "job.csv", "card_id,amount,currency\nc-1,5,\n"))
        assert job.currency is None
        assert job.rows[0].extra == ()

    @pytest.mark.parametrize("code", ["US", "DOLLARS", "US$", "U S D", "€", "ＵＳＤ", "12"])
    def test_malformed_code_is_refused_with_row_and_column(self, tmp_path: Path, code: str) -> None:
        """A code that is not 3 to 5 ASCII letters is refused at its row and column."""
        path = write(tmp_path, "job.csv", f'card_id,amount,currency\nc-1,5,USD\nc-2,6,"{code}"\n')
        problem = only_problem(path)
        assert (problem.row, problem.column) == (2, "currency")
        assert "3 to 5 letters" in problem.message

    def test_rows_in_two_currencies_are_refused(self, tmp_path: Path) -> None:
        """One job pays in one currency: a row declaring another is refused, naming both."""
        path = write(tmp_path, "job.csv", "card_id,amount,currency\nc-1,5,USD\nc-2,6,eur\n")
        problem = only_problem(path)
        assert (problem.row, problem.column) == (2, "currency")
        assert "EUR differs from the job's USD (row 1)" in problem.message

    def test_currency_does_not_change_the_digest(self, tmp_path: Path) -> None:
        """Declaring a currency moves no money: the same rows resume the same run."""
        plain = load_job(write(tmp_path, "a.csv", "card_id,amount\nc-1,5\n"))
        declared = load_job(write(tmp_path, "b.csv", "card_id,amount,currency\nc-1,5,USD\n"))
        assert plain.content_digest == declared.content_digest

    def test_repeated_currency_column_is_refused(self, tmp_path: Path) -> None:
        """Two currency columns are ambiguous: refused like any repeated known column."""
        path = write(tmp_path, "job.csv", "card_id,amount,currency,CURRENCY\nc-1,5,USD,EUR\n")
        assert only_problem(path).column == "currency"

    def test_yaml_setting_declares_the_currency(self, tmp_path: Path) -> None:
        """settings.currency declares it for every row and is not passed on as a run setting."""
        text = "settings: {currency: usdt, concurrency: 2}\n" + SIMPLE_YAML
        job = load_job(write(tmp_path, "job.yaml", text))
        assert job.currency == "USDT"
        assert dict(job.settings) == {"concurrency": 2}
        assert all("currency" not in dict(r.extra) for r in job.rows)
        assert job.extra_columns == ("name",)

    def test_yaml_row_currency(self, tmp_path: Path) -> None:
        """A row of a YAML job may declare it too."""
        text = 'topups:\n  - {card_id: "c-1", amount: "5", currency: "eur"}\n'
        assert load_job(write(tmp_path, "job.yaml", text)).currency == "EUR"

    def test_yaml_row_against_the_setting_is_refused(self, tmp_path: Path) -> None:
        """A row declaring another currency than settings.currency is refused at that row."""
        text = (
            "settings: {currency: USD}\n"
            'topups:\n  - {card_id: "c-1", amount: "5"}\n'
            '  - {card_id: "c-2", amount: "5", currency: "EUR"}\n'
        )
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert (problem.row, problem.column) == (2, "currency")
        assert "settings.currency" in problem.message

    @pytest.mark.parametrize("value", ["123", "true", "[USD]", '""', "U-S-D"])
    def test_yaml_setting_malformed_is_refused(self, tmp_path: Path, value: str) -> None:
        """settings.currency must be 3 to 5 letters of text: anything else is exit 2."""
        text = f"settings: {{currency: {value}}}\n" + SIMPLE_YAML
        problem = only_problem(write(tmp_path, "job.yaml", text))
        assert "settings.currency" in problem.message
        assert problem.row is None
