"""Helpers for end-to-end tests: the real command as a subprocess, reports read back."""

from __future__ import annotations

import csv
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from runner.sandbox.server import RunningSandbox

TOKEN = "uc_" + "T3st" * 10
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Completed:
    code: int
    stdout: str
    stderr: str


def clean_env(**extra: str) -> dict[str, str]:
    """The environment of a user who set nothing but what the test names."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TOPUP_", "UNCASH_", "ALIX_"))}
    env["PYTHONPATH"] = str(ROOT)
    # The sandbox applies a topup before it answers unless a test makes it late, so the wait
    # before a lost answer may be judged "not applied" is scaled down like its cooldowns;
    # tests of late application give their own --apply-grace (the command line wins).
    env["TOPUP_APPLY_GRACE"] = "0.2"
    env.update(extra)
    return env


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "runner", *args]


async def run_cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> Completed:
    """Run `topup-runner ARGS` while the test's event loop keeps serving its sandbox."""
    result = await anyio.run_process(
        command(*args), cwd=cwd, env=env or clean_env(), check=False, stdin=subprocess.DEVNULL
    )
    return Completed(result.returncode, result.stdout.decode(), result.stderr.decode())


def read_csv_report(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def money(text: str) -> Decimal | None:
    return Decimal(text) if text else None


def write_job(path: Path, rows: list[tuple[str, str, str]], extra: str | None = None) -> Path:
    """A CSV job of (card_id, amount, reference) rows."""
    header = "card_id,amount,reference" + (f",{extra}" if extra else "")
    lines = [header]
    for n, (card, amount, reference) in enumerate(rows):
        line = f"{card},{amount},{reference}"
        if extra:
            line += f",value-{n}"
        lines.append(line)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def files_containing(folder: Path, text: str) -> list[Path]:
    """Files directly in `folder` whose bytes hold `text`."""
    return [p for p in folder.iterdir() if p.is_file() and text.encode() in p.read_bytes()]


async def until(condition: Callable[[], bool], limit: float = 20.0) -> None:
    """Poll state that has no event to wait on (the sandbox's) until `condition` holds."""
    with anyio.fail_after(limit):
        while not condition():  # noqa: ASYNC110
            await anyio.sleep(0.01)


def unique_amount_job(
    tmp: Path, rows: int, cards: int, seed: int, base: Decimal = Decimal("5.00")
) -> tuple[Path, dict[Decimal, str]]:
    """Rows over `cards` cards, each row with its own amount (`base` plus a cent a row), so
    that money maps back to rows; the job's path and each amount's card."""
    rng = random.Random(seed)
    ids = [str(uuid.uuid4()) for _ in range(cards)]
    chosen = [ids[n] if n < cards else rng.choice(ids) for n in range(rows)]
    amounts = {base + Decimal(n) / 100: card for n, card in enumerate(chosen)}
    job = write_job(
        tmp / "job.csv", [(c, f"{a:.2f}", f"R{n}") for n, (a, c) in enumerate(amounts.items())]
    )
    return job, amounts


def judge(sb: RunningSandbox, report: list[dict[str, str]], amounts: dict[Decimal, str]) -> None:
    """The sandbox's record against the report: no unaccounted topup, no success without money."""
    applied = Counter(a.amount for a in sb.state.applied)
    assert all(n == 1 for n in applied.values()), "a row was paid twice"
    for row in report:
        amount = Decimal(row["amount"])
        assert row["card_id"] == amounts[amount]
        if row["status"] == "succeeded":
            assert applied[amount] == 1, f"row {row['row']} reported paid but no money moved"
        elif row["status"] == "failed":
            assert applied[amount] == 0, f"row {row['row']} reported failed but was paid"
        else:
            assert row["status"] == "needs_review", row
    reported = {Decimal(r["amount"]) for r in report if r["status"] != "failed"}
    assert set(applied) <= reported, "the sandbox applied a topup the report does not account for"
