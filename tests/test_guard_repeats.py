"""The repeat-payment guard across runs (issue 16): rows another run key paid within the
window refuse the job before anything is sent, judged by the sandbox's own record."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.guard import age_sqlite, cards, job, refusals, requests, run, sandbox, topups

pytestmark = pytest.mark.anyio


async def test_the_same_rows_under_a_new_run_key_are_refused_and_listed(tmp_path: Path) -> None:
    """Paid under `oct`, the same rows under `oct-again`: exit 3, each row listed with the
    earlier run key and row, no request sent."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll, "--run-key", "oct")).code == 0
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--run-key", "oct-again")
        assert done.code == 3, done.stderr
        assert requests(sb) == before
        assert topups(sb) == 3
    lines = refusals(done)
    for row in (1, 2, 3):
        assert any(f"row {row} " in line and f"run key oct row {row} " in line for line in lines)
    assert any("(same reference)" in line for line in lines)
    assert "--allow-repeat-of" in lines[-1]


async def test_an_edited_file_with_the_same_rows_is_refused(tmp_path: Path) -> None:
    """A file with one row added has a new digest, so a new derived key: its old rows are
    repeats; a renamed copy of the first file resumes its run instead (not a repeat)."""
    ids = cards(3)
    payroll = job(tmp_path, ids)
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll)).code == 0
        copy = shutil.copy(payroll, tmp_path / "renamed.csv")
        resumed = await run(sb, tmp_path, Path(copy))
        assert resumed.code == 0, resumed.stderr
        edited = job(tmp_path, [*ids, cards(1)[0]], name="edited")
        done = await run(sb, tmp_path, edited)
        assert done.code == 3, done.stderr
        assert topups(sb) == 3
    assert len([line for line in refusals(done) if "already paid" in line]) == 3


async def test_allow_repeat_of_names_the_run_that_may_be_repeated(tmp_path: Path) -> None:
    """--allow-repeat-of oct: the rows are paid again; --repeat-window 0 switches it off."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll, "--run-key", "oct")).code == 0
        done = await run(sb, tmp_path, payroll, "--run-key", "nov", "--allow-repeat-of", "oct")
        assert done.code == 0, done.stderr
        assert topups(sb) == 4
        again = await run(sb, tmp_path, payroll, "--run-key", "dec", "--allow-repeat-of", "oct")
        assert again.code == 3, again.stderr  # nov paid them too
        off = await run(sb, tmp_path, payroll, "--run-key", "dec", "--repeat-window", "0")
        assert off.code == 0, off.stderr
        assert topups(sb) == 6


async def test_resuming_a_run_is_never_a_repeat(tmp_path: Path) -> None:
    """The same key again resumes its run: exit 0, nothing paid twice, not refused."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll, "--run-key", "oct")).code == 0
        again = await run(sb, tmp_path, payroll, "--run-key", "oct")
        assert again.code == 0, again.stderr
        assert topups(sb) == 2


async def test_payments_older_than_the_window_are_not_repeats(tmp_path: Path) -> None:
    """Paid eight days ago (the window is 7d): the same rows run under a new key."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll, "--run-key", "oct")).code == 0
        age_sqlite(tmp_path / "ledger.sqlite", "rows", "finished_at", 8)
        assert (await run(sb, tmp_path, payroll, "--run-key", "nov")).code == 0
        assert topups(sb) == 4


def daily_job(tmp: Path, ids: list[str], recurring: bool) -> Path:
    lines = ["settings: {recurring: daily}"] if recurring else []
    lines.append("topups:")
    lines += [f'  - {{card_id: "{card}", amount: "25.00", reference: "D-{n}"}}'
              for n, card in enumerate(ids)]  # fmt: skip
    path = tmp / "daily.yaml"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("recurring", [True, False])
async def test_a_daily_recurring_job_runs_each_day(tmp_path: Path, recurring: bool) -> None:
    """`recurring: daily` in its settings: yesterday's run is expected, today's runs; a second
    run the same day under another key is still refused. Undeclared, day two is refused."""
    payroll = daily_job(tmp_path, cards(2), recurring)
    async with sandbox() as sb:
        assert (await run(sb, tmp_path, payroll, "--run-key", "daily-1")).code == 0
        age_sqlite(tmp_path / "ledger.sqlite", "rows", "finished_at", 1)
        day_two = await run(sb, tmp_path, payroll, "--run-key", "daily-2")
        assert day_two.code == (0 if recurring else 3), day_two.stderr
        twice = await run(sb, tmp_path, payroll, "--run-key", "daily-2b")
        assert twice.code == 3, twice.stderr
        assert topups(sb) == (4 if recurring else 2)


@pytest.mark.postgres
async def test_the_guard_works_on_a_shared_ledger(pg_url: str, tmp_path: Path) -> None:
    """On PostgreSQL too: the same rows under a new key are refused, listed, nothing sent."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        first = await run(sb, tmp_path, payroll, "--run-key", "oct", ledger=pg_url)
        assert first.code == 0, first.stderr
        before = requests(sb)
        done = await run(sb, tmp_path, payroll, "--run-key", "nov", ledger=pg_url)
        assert done.code == 3, done.stderr
        assert requests(sb) == before
        assert topups(sb) == 2
    assert any("run key oct row 1" in line for line in refusals(done)), done.stderr
