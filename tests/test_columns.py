"""Column mapping: `--columns`, TOPUP_COLUMNS and a YAML job's settings.columns say which
headers hold the job's fields; the digest is the mapped rows'."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.errors import ConfigError, JobInvalid
from runner.jobs import JobReading, load_job
from runner.jobs.columns import Columns, job_reading, parse_columns

MAPPING = 'card_id="Card Number",amount="Net Pay",reference="Employee ID"'
EXPORT = "Card Number,Net Pay,Employee ID,Name\nc-1,250.10,E1,Ann\nc-2,10,E2,Bob\n"
CANONICAL = "card_id,amount,reference\nc-1,250.10,E1\nc-2,10.00,E2\n"


def mapped(text: str = MAPPING) -> JobReading:
    return JobReading(columns=parse_columns(text, "--columns"))


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


class TestParse:
    def test_quoted_and_bare_headers(self) -> None:
        """Quoted headers may hold commas and doubled quotes; bare ones are stripped."""
        columns = parse_columns('card_id="No, ""main""", amount = Net Pay', "--columns")
        assert columns.fields == (("card_id", 'No, "main"'), ("amount", "Net Pay"))

    def test_yaml_mapping(self) -> None:
        """A YAML mapping is taken as it is."""
        columns = parse_columns({"card_id": "Card", "amount": "Pay"}, "settings.columns")
        assert columns.fields == (("card_id", "Card"), ("amount", "Pay"))

    @pytest.mark.parametrize(
        "text",
        [
            "card_id",
            "",
            "card_id=",
            'card_id="Card',
            "amout=Pay",
            "card_id=A,card_id=B",
            "card_id=A,amount=a",
            'card_id="A" x',
            "card_id=A,",
        ],
    )
    def test_malformed_is_one_configuration_error(self, text: str) -> None:
        """Every malformed mapping is a ConfigError (exit 2) naming where it came from."""
        with pytest.raises(ConfigError, match=r"^--columns: "):
            parse_columns(text, "--columns")

    def test_command_line_beats_environment(self) -> None:
        """--columns wins over TOPUP_COLUMNS, which is used without it."""
        env = {"TOPUP_COLUMNS": "card_id=Env"}
        assert job_reading({"columns": "card_id=Flag"}, env).columns == Columns(
            (("card_id", "Flag"),)
        )
        assert job_reading({}, env).columns == Columns((("card_id", "Env"),))
        assert job_reading({}, {}).columns is None

    def test_alix_allows_numeric_ids(self) -> None:
        """Only Alix's ids are numbers: its provider turns numeric card ids on."""
        assert job_reading({"provider": "alix"}, {}).numeric_card_ids
        assert job_reading({}, {"TOPUP_PROVIDER": "alix"}).numeric_card_ids
        assert not job_reading({}, {}).numeric_card_ids


class TestCsv:
    def test_mapped_export_is_the_canonical_job(self, tmp_path: Path) -> None:
        """Mapped headers give the rows, and the digest, of the same rows written canonically;
        other columns are carried."""
        job = load_job(write(tmp_path, "export.csv", EXPORT), mapped())
        plain = load_job(write(tmp_path, "plain.csv", CANONICAL))
        assert job.content_digest == plain.content_digest
        assert [(r.card_id, str(r.amount), r.reference) for r in job.rows] == [
            ("c-1", "250.10", "E1"),
            ("c-2", "10.00", "E2"),
        ]
        assert job.extra_columns == ("Name",)

    def test_header_case_and_spaces_do_not_matter(self, tmp_path: Path) -> None:
        """A header is found as CSV headers are: case and surrounding spaces ignored."""
        reading = mapped('card_id=" card number ",amount="NET PAY"')
        job = load_job(write(tmp_path, "e.csv", EXPORT), reading)
        assert [r.card_id for r in job.rows] == ["c-1", "c-2"]
        assert job.extra_columns == ("Employee ID", "Name")

    def test_missing_header_is_refused_before_rows(self, tmp_path: Path) -> None:
        """A mapping naming a header the file lacks is one problem, listing the header."""
        with pytest.raises(JobInvalid) as caught:
            load_job(write(tmp_path, "e.csv", EXPORT), mapped('card_id="Card No"'))
        problem = caught.value.problems[0]
        assert '"Card No"' in problem.message
        assert '"Card Number"' in problem.message
        assert problem.row is None

    def test_field_both_mapped_and_present_is_refused(self, tmp_path: Path) -> None:
        """A header named like a mapped field is ambiguous: refused."""
        text = "card_id,Card Number,amount\nx,c-1,5\n"
        with pytest.raises(JobInvalid, match="rename or remove one"):
            load_job(write(tmp_path, "e.csv", text), mapped('card_id="Card Number"'))

    def test_problems_name_the_files_header(self, tmp_path: Path) -> None:
        """A bad cell of a mapped column is named by the file's header and the field."""
        text = "Card Number,Net Pay\nc-1,12.345\n"
        with pytest.raises(JobInvalid) as caught:
            load_job(
                write(tmp_path, "e.csv", text), mapped('card_id="Card Number",amount="Net Pay"')
            )
        assert caught.value.problems[0].column == "Net Pay (amount)"


class TestYaml:
    def test_settings_columns_map_the_rows(self, tmp_path: Path) -> None:
        """settings.columns maps a YAML job's keys; it is not a run setting."""
        text = (
            "settings: {columns: {card_id: Card Number, amount: Net Pay}, cooldown: 1}\n"
            "topups:\n  - {Card Number: c-1, Net Pay: '5.00', Name: Ann}\n"
        )
        job = load_job(write(tmp_path, "j.yaml", text))
        assert (job.rows[0].card_id, str(job.rows[0].amount)) == ("c-1", "5.00")
        assert dict(job.settings) == {"cooldown": 1}
        assert job.extra_columns == ("Name",)

    def test_operator_mapping_wins_and_missing_key_is_refused(self, tmp_path: Path) -> None:
        """--columns beats settings.columns; a key no row has is refused."""
        text = (
            "settings: {columns: {card_id: Card Number}}\n"
            "topups:\n  - {Card Number: c-1, amount: '5.00'}\n"
        )
        with pytest.raises(JobInvalid, match='"Card"'):
            load_job(write(tmp_path, "j.yaml", text), mapped("card_id=Card"))

    def test_malformed_settings_columns_is_a_problem(self, tmp_path: Path) -> None:
        """A settings.columns that is not a mapping of fields is a job problem (exit 2)."""
        text = "settings: {columns: [1, 2]}\ntopups:\n  - {card_id: c-1, amount: '5.00'}\n"
        with pytest.raises(JobInvalid, match=r"settings\.columns"):
            load_job(write(tmp_path, "j.yaml", text))
