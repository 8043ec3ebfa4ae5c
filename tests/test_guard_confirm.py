"""Confirmation on a terminal (issue 16): a real provider's run on a pseudo-terminal shows
what it will pay and asks before the first topup; "no" sends nothing, "yes" runs. --yes skips
the question, and the sandbox never asks. Judged by the sandbox's own record."""

from __future__ import annotations

import os
import pty
from pathlib import Path

import anyio
import pytest

from runner.sandbox.server import RunningSandbox
from tests.e2e import TOKEN, clean_env, command
from tests.guard import cards, job, options, sandbox, topups

pytestmark = pytest.mark.anyio

PROMPT = b"topups? [y/N]"


async def on_terminal(args: list[str], cwd: Path, answer: str | None) -> tuple[int, str]:
    """`topup-runner ARGS` with a pseudo-terminal for stdin, stdout and stderr; `answer` is
    typed once the question shows (None: the run must end without asking)."""
    leader, follower = pty.openpty()
    env = clean_env(UNCASH_API_TOKEN=TOKEN, COLUMNS="200")
    process = await anyio.open_process(
        command(*args), stdin=follower, stdout=follower, stderr=follower, cwd=cwd, env=env
    )
    os.close(follower)
    seen = b""

    def read() -> bytes:
        try:
            return os.read(leader, 4096)
        except OSError:  # EIO: the terminal's other side is closed, the process is done
            return b""

    try:
        with anyio.fail_after(60):
            while True:
                chunk = await anyio.to_thread.run_sync(read)
                if not chunk:
                    break
                seen += chunk
                if PROMPT in seen and answer is not None:
                    os.write(leader, answer.encode() + b"\n")
                    answer = None
            code = await process.wait()
    finally:
        os.close(leader)
    return code, seen.decode(errors="replace")


def run_args(sb: RunningSandbox, tmp: Path, payroll: Path, *more: str) -> list[str]:
    return [
        "run", str(payroll), *options(sb, tmp), "--output", str(tmp / "out.csv"),
        "--cooldown", "0.05", *more,
    ]  # fmt: skip


async def test_answering_no_sends_nothing(tmp_path: Path) -> None:
    """The question shows provider, rows, total, fees and wallet; "no": exit 3, no topup."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        code, seen = await on_terminal(run_args(sb, tmp_path, payroll), tmp_path, "no")
        assert code == 3, seen
        assert topups(sb) == 0
    assert "provider: uncash at uncash:http://127.0.0.1:" in seen
    assert "rows: 3, total 33.00, estimated fees" in seen
    assert "after the run" in seen
    assert "not confirmed at the terminal" in seen


async def test_answering_yes_runs(tmp_path: Path) -> None:
    """ "yes": every row is paid."""
    payroll = job(tmp_path, cards(3))
    async with sandbox() as sb:
        code, seen = await on_terminal(run_args(sb, tmp_path, payroll), tmp_path, "yes")
        assert code == 0, seen
        assert topups(sb) == 3


async def test_yes_skips_the_question(tmp_path: Path) -> None:
    """--yes on a terminal: no question, every row paid."""
    payroll = job(tmp_path, cards(2))
    async with sandbox() as sb:
        code, seen = await on_terminal(
            run_args(sb, tmp_path, payroll, "--yes"), tmp_path, answer=None
        )
        assert code == 0, seen
        assert topups(sb) == 2
    assert PROMPT.decode() not in seen


async def test_the_sandbox_never_asks(tmp_path: Path) -> None:
    """The built-in sandbox on a terminal runs without a question."""
    payroll = job(tmp_path, cards(2))
    args = ["run", str(payroll), "--output", str(tmp_path / "out.csv"), "--cooldown", "0.05"]
    code, seen = await on_terminal(args, tmp_path, answer=None)
    assert code == 0, seen
    assert PROMPT.decode() not in seen
