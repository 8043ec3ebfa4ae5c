"""Helpers for end-to-end tests: the real command as a subprocess, reports read back."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

import anyio

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
