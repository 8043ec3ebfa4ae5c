"""`check` gives the verdicts `run`'s preflight gives: the same refusal lines and exit codes on
the same bad jobs, and never an exception group where a runner error was raised."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from runner.config import resolve_settings
from runner.domain import JobRow
from runner.errors import PreflightRefused, ProviderError, ProviderUnavailable, RunnerError
from runner.jobs import load_job
from runner.preflight import preflight
from runner.providers.base import CardState, CardStatus, ProviderRules
from runner.run import check_job
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import TOKEN, Completed, clean_env, run_cli, write_job

pytestmark = pytest.mark.anyio


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens (a port just bound and released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/api/v1"


def refusal_lines(done: Completed) -> list[str]:
    """The lines the command printed as its verdict (not the run's log events)."""
    return [line for line in done.stderr.splitlines() if line.startswith("topup-runner:")]


async def check_and_run(tmp_path: Path, job: Path, base_url: str) -> tuple[Completed, Completed]:
    common = ("--provider", "uncash", "--base-url", base_url, "--log-format", "console",
              "--ledger", str(tmp_path / "l.sqlite"), "--timeout", "1")  # fmt: skip
    env = clean_env(UNCASH_API_TOKEN=TOKEN)
    checked = await run_cli("check", str(job), *common, cwd=tmp_path, env=env)
    ran = await run_cli(
        "run", str(job), *common, "--no-progress", "--output", str(tmp_path / "out.csv"),
        cwd=tmp_path, env=env,
    )  # fmt: skip
    return checked, ran


UNKNOWN = [str(uuid.uuid4()), str(uuid.uuid4())]
FROZEN = str(uuid.uuid4())
GOOD = str(uuid.uuid4())
BAD_JOBS = {
    "unknown cards": (
        SandboxConfig(token=TOKEN, missing_cards=frozenset(UNKNOWN)),
        [(UNKNOWN[0], "10.00", "A"), (UNKNOWN[1], "10.00", "B"), (GOOD, "10.00", "C")],
        "2 card(s) not found",
    ),
    "inactive card": (
        SandboxConfig(token=TOKEN, cards=(SandboxCard(FROZEN, status="frozen"),)),
        [(FROZEN, "10.00", "A"), (GOOD, "10.00", "B")],
        "1 card(s) not active",
    ),
    "insufficient balance": (
        SandboxConfig(token=TOKEN, wallet_balance=Decimal("15.00")),
        [(GOOD, "10.00", "A"), (str(uuid.uuid4()), "10.00", "B")],
        "wallet balance 15.00 cannot cover",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
async def test_check_refuses_as_run_does(tmp_path: Path, case: str) -> None:
    """Unknown, inactive cards or a short wallet: check and run both refuse, exit 3, same line."""
    config, rows, expected = BAD_JOBS[case]
    job = write_job(tmp_path / "job.csv", rows)
    async with serve_sandbox(config) as sb:
        checked, ran = await check_and_run(tmp_path, job, sb.base_url)
        assert not sb.state.applied
    assert (checked.code, ran.code) == (3, 3), checked.stderr + ran.stderr
    assert refusal_lines(checked) == refusal_lines(ran)
    assert len(refusal_lines(checked)) == 1
    assert expected in refusal_lines(checked)[0]
    assert "internal error" not in checked.stderr + ran.stderr


async def test_check_and_run_agree_on_an_unreachable_provider(tmp_path: Path) -> None:
    """A closed port: check and run give one line each, the same code, never 'internal error'."""
    job = write_job(tmp_path / "job.csv", [(GOOD, "10.00", "A")])
    checked, ran = await check_and_run(tmp_path, job, closed_port_url())
    assert checked.code == ran.code == ProviderUnavailable.exit_code == 69, checked.stderr
    assert refusal_lines(checked) == refusal_lines(ran)
    assert len(refusal_lines(checked)) == 1
    assert "internal error" not in checked.stderr + ran.stderr


@pytest.mark.parametrize("case", sorted(BAD_JOBS))
async def test_check_job_raises_the_refusal_itself(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """check_job raises PreflightRefused, not an ExceptionGroup holding it."""
    config, rows, _ = BAD_JOBS[case]
    job = load_job(str(write_job(tmp_path / "job.csv", rows)))
    monkeypatch.setenv("UNCASH_API_TOKEN", TOKEN)
    monkeypatch.setenv("TOPUP_LEDGER", str(tmp_path / "none.sqlite"))
    async with serve_sandbox(config) as sb:
        settings = resolve_settings(
            {"provider": "uncash", "base_url": sb.base_url, "ledger": str(tmp_path / "l.sqlite")},
            job_file=str(job.path),
        )
        with pytest.raises(PreflightRefused):
            await check_job(job, settings)


async def test_check_job_raises_the_provider_error_itself(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unreachable provider is ProviderUnavailable (69, as `run` before its first topup)
    raised from check_job, holding the ProviderError that says why."""
    job = load_job(str(write_job(tmp_path / "job.csv", [(GOOD, "10.00", "A")])))
    monkeypatch.setenv("UNCASH_API_TOKEN", TOKEN)
    settings = resolve_settings(
        {
            "provider": "uncash",
            "base_url": closed_port_url(),
            "ledger": str(tmp_path / "l.sqlite"),
            "timeout": "1",
        },
        job_file=str(job.path),
    )
    with pytest.raises(ProviderUnavailable) as raised:
        await check_job(job, settings)
    assert isinstance(raised.value.cause, ProviderError)


async def test_a_refused_sandbox_check_raises_the_refusal_itself(tmp_path: Path) -> None:
    """With the in-process sandbox, whose server's task group encloses preflight, too."""
    rows = [(str(uuid.uuid4()), "10000.00", f"R{n}") for n in range(101)]  # above its wallet
    job = load_job(str(write_job(tmp_path / "job.csv", rows)))
    settings = resolve_settings({"ledger": str(tmp_path / "l.sqlite")}, job_file=str(job.path))
    assert settings.is_sandbox
    with pytest.raises(PreflightRefused, match="cannot cover"):
        await check_job(job, settings)


class FakeProvider:
    """A provider whose cards and wallet are what the test says; lookups may fail."""

    name = "fake"

    def __init__(
        self,
        cards: dict[str, CardState],
        *,
        wallet: Decimal = Decimal("1000.00"),
        lookup_error: RunnerError | None = None,
    ) -> None:
        self.rules = ProviderRules(Decimal("5.00"), Decimal("10000.00"))
        self.cards = cards
        self.wallet = wallet
        self.lookup_error = lookup_error

    async def wallet_balance(self) -> Decimal:
        return self.wallet

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        return {}

    async def list_cards(self) -> Mapping[str, CardState]:
        return {}  # every card is looked up on its own

    async def get_card(self, card_id: str) -> CardState | None:
        await anyio.lowlevel.checkpoint()
        if self.lookup_error is not None:
            raise self.lookup_error
        return self.cards.get(card_id)


def active(card_id: str, currency: str = "USD") -> CardState:
    return CardState(card_id, CardStatus.ACTIVE, Decimal("0.00"), currency=currency)


async def test_a_failing_card_lookup_raises_its_error_itself() -> None:
    """Preflight's concurrent card lookups raise the provider's error, not a group of them."""
    provider = FakeProvider({}, lookup_error=ProviderError("card lookups fail", provider="fake"))
    rows = [JobRow(n, str(uuid.uuid4()), Decimal("10.00"), "") for n in range(1, 21)]
    with pytest.raises(ProviderError, match="card lookups fail"):
        await preflight(provider, rows)  # type: ignore[arg-type]
