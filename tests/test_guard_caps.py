"""Spending caps (issue 16): --max-total and --max-row (and their settings and TOPUP_*) refuse
the job before anything is sent, naming the rows and the totals."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.guard import cards, exit_metric, job, refusals, requests, run, sandbox, topups

pytestmark = pytest.mark.anyio


async def test_max_row_refuses_naming_the_rows(tmp_path: Path) -> None:
    """Two rows above --max-row: exit 3, one line each, no request sent."""
    payroll = job(tmp_path, cards(3), ["10.00", "500.00", "900.00"])
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, "--max-row", "100")
        assert done.code == 3, done.stderr
        assert requests(sb) == 0
    lines = refusals(done)
    assert len(lines) == 2
    assert lines[0].startswith("topup-runner: refused: row 2 (card ")
    assert lines[0].endswith("is 500.00, above --max-row 100.00")
    assert "row 3 " in lines[1]
    assert exit_metric(tmp_path) == "3"


async def test_max_total_refuses_naming_the_total(tmp_path: Path) -> None:
    """A job totalling 33.00 under --max-total 30: exit 3, no request; 33 passes."""
    payroll = job(tmp_path, cards(3))  # 10 + 11 + 12
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, "--max-total", "30")
        assert done.code == 3, done.stderr
        assert requests(sb) == 0
        assert any("totals 33.00" in line for line in refusals(done)), done.stderr
        ok = await run(sb, tmp_path, payroll, "--max-total", "33.00")
        assert ok.code == 0, ok.stderr
        assert topups(sb) == 3


async def test_caps_come_from_the_environment_and_the_job(tmp_path: Path) -> None:
    """TOPUP_MAX_TOTAL, and settings.max_row in a YAML job, refuse as the options do."""
    ids = cards(2)
    yaml = tmp_path / "job.yaml"
    yaml.write_text(
        "settings: {max_row: '50.00'}\ntopups:\n"
        f'  - {{card_id: "{ids[0]}", amount: "60.00"}}\n'
        f'  - {{card_id: "{ids[1]}", amount: "10.00"}}\n',
        encoding="utf-8",
    )
    async with sandbox() as sb:
        done = await run(sb, tmp_path, yaml)
        assert done.code == 3, done.stderr
        assert len(refusals(done)) == 1
        both = await run(sb, tmp_path, yaml, TOPUP_MAX_TOTAL="20")
        assert both.code == 3, both.stderr
        assert len(refusals(both)) == 2
        assert requests(sb) == 0
        assert topups(sb) == 0


@pytest.mark.parametrize("bad", ["0", "-5", "1.234", "abc", "nan"])
async def test_a_cap_that_is_not_an_amount_is_exit_2(tmp_path: Path, bad: str) -> None:
    """A cap that is no amount is a configuration error: exit 2, one line."""
    payroll = job(tmp_path, cards(1))
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, "--max-total", bad)
        assert done.code == 2, done.stderr
        assert requests(sb) == 0
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr


async def test_a_split_row_is_capped_as_the_file_wrote_it(tmp_path: Path) -> None:
    """--split-over-max pays 25,000.00 as three chunks of about 8,333: --max-row 10,000
    judges the row the file wrote, not its chunks, and names the file's row."""
    payroll = job(tmp_path, cards(2), ["10.00", "25000.00"])
    async with sandbox() as sb:
        done = await run(sb, tmp_path, payroll, "--split-over-max", "--max-row", "10000")
        assert done.code == 3, done.stderr
        assert requests(sb) == 0
        lines = refusals(done)
        assert len(lines) == 1, done.stderr
        assert lines[0].startswith("topup-runner: refused: row 2 (card ")
        assert lines[0].endswith("is 25000.00, above --max-row 10000.00")
        total = await run(sb, tmp_path, payroll, "--split-over-max", "--max-total", "25000")
        assert total.code == 3, total.stderr
        assert any("totals 25010.00 over 2 rows" in line for line in refusals(total))
        assert requests(sb) == 0
