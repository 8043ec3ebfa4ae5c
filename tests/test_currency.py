"""A job that declares a currency is refused (exit 3, nothing sent) when its cards hold another:
preflight against each card's own currency, or the provider's where cards cannot be read."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from decimal import Decimal
from pathlib import Path

import aiohttp
import anyio.lowlevel
import pytest

from runner.domain import JobRow
from runner.errors import PreflightRefused
from runner.jobs import load_job
from runner.preflight import preflight
from runner.providers.base import CardState, CardStatus, ProviderRules
from runner.sandbox.config import SandboxCard, SandboxConfig
from runner.sandbox.server import serve_sandbox
from tests.e2e import TOKEN, Completed, clean_env, read_csv_report, run_cli

pytestmark = pytest.mark.anyio


class FakeProvider:
    """A provider whose cards are what the test says, in the currencies it says."""

    name = "fake"

    def __init__(self, cards: Mapping[str, str], *, reads_cards: bool = True) -> None:
        self.rules = ProviderRules(
            Decimal("5.00"), Decimal("10000.00"), reads_cards=reads_cards, currency="USDT"
        )
        self.cards = {
            card: CardState(card, CardStatus.ACTIVE, Decimal("0.00"), currency=currency)
            for card, currency in cards.items()
        }

    async def wallet_balance(self) -> Decimal:
        return Decimal("1000000.00")

    async def fee_estimates(self, amounts: Sequence[Decimal]) -> Mapping[Decimal, Decimal]:
        return {}

    async def list_cards(self) -> Mapping[str, CardState]:
        return self.cards

    async def get_card(self, card_id: str) -> CardState | None:
        await anyio.lowlevel.checkpoint()
        return self.cards.get(card_id)


def rows(cards: Sequence[str]) -> list[JobRow]:
    return [JobRow(n, card, Decimal("10.00"), f"R{n}") for n, card in enumerate(cards, 1)]


class TestPreflight:
    async def test_a_card_in_another_currency_is_refused(self) -> None:
        """A USD job with a EUR card is refused, the card and both currencies named; a card
        the provider says is in "usd" holds the USD declared."""
        provider = FakeProvider({"a": "usd", "b": "EUR"})
        with pytest.raises(PreflightRefused) as refused:
            await preflight(provider, rows(["a", "b"]), currency="USD")  # type: ignore[arg-type]
        assert refused.value.problems == (
            "1 card(s) hold another currency than the job's USD: b (EUR)",
        )

    async def test_only_a_declaration_is_checked(self) -> None:
        """The same cards pass when the job declares no currency (as before), not when it does."""
        provider = FakeProvider({"a": "EUR"})
        report = await preflight(provider, rows(["a"]))  # type: ignore[arg-type]
        assert report.set_aside == {}
        with pytest.raises(PreflightRefused):
            await preflight(provider, rows(["a"]), currency="USD")  # type: ignore[arg-type]

    async def test_allow_partial_sets_the_card_aside_saying_why(self) -> None:
        """With --allow-partial the row goes aside, its error saying both currencies."""
        provider = FakeProvider({"a": "USD", "b": "EUR"})
        report = await preflight(
            provider,  # type: ignore[arg-type]
            rows(["a", "b"]),
            allow_partial=True,
            currency="USD",
        )
        assert report.set_aside == {2: "preflight: card holds EUR, the job declares USD"}

    async def test_many_cards_are_named_a_few_and_counted(self) -> None:
        """Twelve cards in another currency: ten named, the rest counted."""
        cards = [f"c{n:02d}" for n in range(12)]
        provider = FakeProvider(dict.fromkeys(cards, "EUR"))
        with pytest.raises(PreflightRefused) as refused:
            await preflight(provider, rows(cards), currency="USD")  # type: ignore[arg-type]
        (problem,) = refused.value.problems
        assert problem.startswith("12 card(s) hold another currency than the job's USD: c00 (EUR)")
        assert problem.endswith("c09 (EUR) and 2 more")

    async def test_unreadable_cards_compare_with_the_provider(self) -> None:
        """Cards that cannot be read (Alix) are in the provider's currency: a USD job on a USDT
        provider is refused as a whole, even with --allow-partial; a USDT job goes ahead."""
        provider = FakeProvider({}, reads_cards=False)
        with pytest.raises(PreflightRefused) as refused:
            await preflight(
                provider,  # type: ignore[arg-type]
                rows(["a", "b"]),
                allow_partial=True,
                currency="USD",
            )
        assert refused.value.problems == ("the job declares USD but fake pays in USDT",)
        report = await preflight(provider, rows(["a"]), currency="USDT")  # type: ignore[arg-type]
        assert report.set_aside == {}


CARD = str(uuid.uuid4())


class TestSandbox:
    async def test_a_card_answers_its_currency(self) -> None:
        """A sandbox card made in EUR says so in GET /cards/{id} and GET /cards."""
        config = SandboxConfig(token=TOKEN, cards=(SandboxCard(CARD, currency="eur"),))
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with serve_sandbox(config) as sb, aiohttp.ClientSession(headers=headers) as http:
            async with http.get(f"{sb.base_url}/cards/{CARD}") as answer:
                one = (await answer.json())["data"]
            async with http.get(f"{sb.base_url}/cards") as answer:
                listed = (await answer.json())["data"]["cards"]
        assert one["currency"] == "EUR"
        assert [card["currency"] for card in listed] == ["EUR"]

    def test_a_malformed_currency_is_refused(self) -> None:
        """A sandbox card's currency is a 3 to 5 letter code."""
        with pytest.raises(ValueError, match="currency"):
            SandboxCard(CARD, currency="EU RO")

    async def test_the_admin_api_sets_a_card_currency(self) -> None:
        """POST /admin/cards may set a card's currency."""
        async with serve_sandbox(SandboxConfig(token=TOKEN)) as sb, aiohttp.ClientSession() as http:
            async with http.post(
                f"{sb.root_url}/_sandbox/cards",
                json={"cards": [{"card_id": CARD, "currency": "GBP"}]},
            ) as answer:
                body = await answer.json()
            card = sb.state.card(CARD)
        assert body["cards"][0]["currency"] == "GBP"
        assert card is not None
        assert card.currency == "GBP"


# -- end to end: the command line against the sandbox over HTTP --------------------------------


def write_csv(path: Path, lines: Sequence[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


async def cli(command: str, tmp_path: Path, job: Path, base_url: str, *more: str) -> Completed:
    args = ["--provider", "uncash", "--base-url", base_url, "--log-format", "console",
            "--ledger", str(tmp_path / "l.sqlite"), "--timeout", "2", *more]  # fmt: skip
    if command == "run":
        args += ["--no-progress", "--cooldown", "0", "--output", str(tmp_path / "out.csv")]
    return await run_cli(
        command, str(job), *args, cwd=tmp_path, env=clean_env(UNCASH_API_TOKEN=TOKEN)
    )


def verdict(done: Completed) -> list[str]:
    return [line for line in done.stderr.splitlines() if line.startswith("topup-runner:")]


USD, EUR = str(uuid.uuid4()), str(uuid.uuid4())
MIXED_CARDS = SandboxConfig(token=TOKEN, cards=(SandboxCard(USD), SandboxCard(EUR, currency="EUR")))


async def test_run_and_check_refuse_a_card_in_another_currency(tmp_path: Path) -> None:
    """A USD job with one EUR card: check and run exit 3 with the same line, nothing sent."""
    lines = ["card_id,amount,currency", f"{USD},10,USD", f"{EUR},10,"]
    job = write_csv(tmp_path / "job.csv", lines)
    async with serve_sandbox(MIXED_CARDS) as sb:
        checked = await cli("check", tmp_path, job, sb.base_url)
        ran = await cli("run", tmp_path, job, sb.base_url)
        assert not sb.state.applied
    assert (checked.code, ran.code) == (3, 3), checked.stderr + ran.stderr
    assert verdict(checked) == verdict(ran)
    assert f"1 card(s) hold another currency than the job's USD: {EUR} (EUR)" in verdict(ran)[0]


async def test_allow_partial_pays_the_cards_in_the_declared_currency(tmp_path: Path) -> None:
    """--allow-partial pays the USD card and reports the EUR one failed, saying why; the
    report has one currency column, the declaration not echoed beside it."""
    lines = ["card_id,amount,currency", f"{USD},10,usd", f"{EUR},10,"]
    job = write_csv(tmp_path / "job.csv", lines)
    async with serve_sandbox(MIXED_CARDS) as sb:
        ran = await cli("run", tmp_path, job, sb.base_url, "--allow-partial")
        applied = [topup.card_id for topup in sb.state.applied]
    assert ran.code == 1, ran.stderr
    assert applied == [USD]
    report = read_csv_report(tmp_path / "out.csv")
    assert [(r["card_id"], r["status"], r["currency"]) for r in report] == [
        (USD, "succeeded", "USD"),
        (EUR, "failed", "USD"),
    ]
    assert report[1]["error"] == "preflight: card holds EUR, the job declares USD"
    header = (tmp_path / "out.csv").read_text(encoding="utf-8").splitlines()[0].split(",")
    assert [name for name in header if "currency" in name] == ["currency"]
    # The failed-rows job declares the currency too: rerun, the EUR card is refused again.
    failed = load_job(str(tmp_path / "out.failed.csv"))
    assert failed.currency == "USD"
    assert [r.card_id for r in failed.rows] == [EUR]


def yaml_job(tmp_path: Path, currency: str) -> Path:
    """A YAML job of one topup of the USD card, declaring `currency` as a setting."""
    job = tmp_path / "job.yaml"
    job.write_text(
        f'settings: {{currency: {currency}}}\ntopups:\n  - {{card_id: "{USD}", amount: "10"}}\n',
        encoding="utf-8",
    )
    return job


async def test_a_job_in_another_currency_than_every_card_is_refused(tmp_path: Path) -> None:
    """A YAML job declaring EUR (lower case, as a setting) against USD cards: exit 3."""
    job = yaml_job(tmp_path, "eur")
    async with serve_sandbox(MIXED_CARDS) as sb:
        ran = await cli("run", tmp_path, job, sb.base_url)
        assert not sb.state.applied
    assert ran.code == 3, ran.stderr
    assert "hold another currency than the job's EUR" in verdict(ran)[0]


async def test_a_malformed_code_is_exit_2(tmp_path: Path) -> None:
    """A currency that is no code stops the job as invalid, naming file, row and column."""
    job = write_csv(tmp_path / "job.csv", ["card_id,amount,currency", f"{USD},10,dollars"])
    async with serve_sandbox(MIXED_CARDS) as sb:
        ran = await cli("run", tmp_path, job, sb.base_url)
        assert not sb.state.applied
    assert ran.code == 2, ran.stderr
    assert "row 1, column currency" in ran.stderr


async def test_a_yaml_setting_in_the_cards_currency_runs(tmp_path: Path) -> None:
    """settings.currency matching the cards runs: it is not taken for an unknown setting."""
    job = yaml_job(tmp_path, "USD")
    async with serve_sandbox(MIXED_CARDS) as sb:
        ran = await cli("run", tmp_path, job, sb.base_url)
        applied = [topup.card_id for topup in sb.state.applied]
    assert ran.code == 0, ran.stderr
    assert applied == [USD]
