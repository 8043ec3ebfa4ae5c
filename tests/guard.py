"""Helpers for the guardrail tests (issue 16): `topup-runner` against a standalone sandbox
serving the Uncash API, each test judged by the sandbox's own record."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from runner.sandbox.config import SandboxConfig
from runner.sandbox.server import RunningSandbox, serve_sandbox
from tests.e2e import TOKEN, Completed, clean_env, run_cli, write_job


@asynccontextmanager
async def sandbox() -> AsyncIterator[RunningSandbox]:
    async with serve_sandbox(SandboxConfig(token=TOKEN, cooldown=0.05)) as sb:
        yield sb


def topups(sb: RunningSandbox) -> int:
    """Topups the sandbox applied."""
    return len(sb.state.applied)


def requests(sb: RunningSandbox) -> int:
    """Requests of any kind the sandbox received (preflight's reads included)."""
    return sum(sb.state.requests.values())


def cards(n: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(n)]


def job(tmp: Path, ids: list[str], amounts: list[str] | None = None, name: str = "job") -> Path:
    amounts = amounts or [f"{10 + n}.00" for n in range(len(ids))]
    pairs = enumerate(zip(ids, amounts, strict=True))
    rows = [(card, amount, f"EMP-{n}") for n, (card, amount) in pairs]
    return write_job(tmp / f"{name}.csv", rows)


def options(sb: RunningSandbox, tmp: Path, ledger: str | None = None) -> list[str]:
    """The provider, target and ledger options `approve`, `check` and `run` share."""
    return [
        "--provider", "uncash", "--base-url", sb.base_url,
        "--ledger", ledger or str(tmp / "ledger.sqlite"),
    ]  # fmt: skip


async def approve(
    sb: RunningSandbox, tmp: Path, job_file: Path, by: str, *more: str, ledger: str | None = None
) -> Completed:
    given = options(sb, tmp, ledger)
    return await cli("approve", str(job_file), "--by", by, *given, *more, cwd=tmp)


async def run(
    sb: RunningSandbox, tmp: Path, job_file: Path, *more: str, ledger: str | None = None,
    **env: str,
) -> Completed:  # fmt: skip
    return await cli(
        "run", str(job_file), *options(sb, tmp, ledger),
        "--output", str(tmp / "out.csv"), "--metrics-file", str(tmp / "m.prom"),
        "--cooldown", "0.05", "--no-progress", "--log-format", "console", *more,
        cwd=tmp, **env,
    )  # fmt: skip


async def cli(*args: str, cwd: Path, **env: str) -> Completed:
    return await run_cli(*args, cwd=cwd, env=clean_env(UNCASH_API_TOKEN=TOKEN, **env))


def exit_metric(tmp: Path) -> str | None:
    for line in (tmp / "m.prom").read_text(encoding="utf-8").splitlines():
        if line.startswith("topup_runner_exit_code"):
            return line.rsplit(" ", 1)[1]
    return None


def refusals(done: Completed) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("topup-runner: refused:")]


def age_sqlite(ledger: Path, table: str, column: str, days: float) -> None:
    """Move the ledger's `column` times of `table` `days` into the past: time passing, without
    a test that sleeps (the ledger's form: ISO text, UTC, to the millisecond)."""
    conn = sqlite3.connect(ledger)
    with conn:
        conn.execute(
            f"UPDATE {table} SET {column} = "
            f"strftime('%Y-%m-%dT%H:%M:%f+00:00', {column}, '-{days} days') "
            f"WHERE {column} IS NOT NULL"
        )
    conn.close()
