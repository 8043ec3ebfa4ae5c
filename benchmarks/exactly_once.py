"""Exactly once under faults, SIGKILL, a slow provider and a tired operator, at scale.

A sandbox served in this process outlives every runner process. The runner (a real
`topup-runner run` subprocess against it as `--provider uncash`) is SIGKILLed at random
moments several times, then rerun to the end. Every row has its own amount, so the
sandbox's own record of applied topups maps back to rows; the figures printed say whether
any row was paid twice, any success reported without money, any applied topup left
unaccounted, and how many rows ended `needs_review`.

The faults include `late` ones: the provider applies the topup `--slow-seconds` after it
arrived, long after the client gave up (`--timeout 0.5`). And no two starts look alike, as
an operator's would not: no run key is given, and each start (the kills, a second process
started at once beside one of them, and the final run) takes another spelling of the same
job, target and ledger: the file copied under another name, the base URL with a trailing
slash, `localhost`, an upper-case scheme, the ledger through a symlink or a `..` path.

    python benchmarks/exactly_once.py [--rows 5000] [--cards 1000] [--kills 3] [--fault-rate 0.1]
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from decimal import Decimal
from pathlib import Path

import anyio

from runner.sandbox.config import SandboxConfig
from runner.sandbox.faults import FaultKind
from runner.sandbox.server import RunningSandbox, serve_sandbox

TOKEN = "uc_" + "B3nch" * 8


def write_job(folder: Path, rows: int, cards: int, seed: int) -> tuple[Path, dict[Decimal, str]]:
    rng = random.Random(seed)
    ids = [str(uuid.uuid4()) for _ in range(cards)]
    chosen = [ids[n] if n < cards else rng.choice(ids) for n in range(rows)]
    rng.shuffle(chosen)
    amounts = {Decimal("5.00") + Decimal(n) / 100: card for n, card in enumerate(chosen)}
    path = folder / "job.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        out = csv.writer(handle)
        out.writerow(["card_id", "amount", "reference"])
        for n, (amount, card) in enumerate(amounts.items()):
            out.writerow([card, f"{amount:.2f}", f"R{n}"])
    return path, amounts


def spellings(job: Path, sb: RunningSandbox, folder: Path) -> list[tuple[Path, str, str]]:
    """(job file, base URL, ledger) as an operator may give the same three on another day."""
    copy = folder / "job (1).csv"
    shutil.copy(job, copy)
    (folder / "link.sqlite").symlink_to(folder / "ledger.sqlite")
    (folder / "sub").mkdir()
    scheme, rest = sb.base_url.split("://", 1)
    return [
        (job, sb.base_url, str(folder / "ledger.sqlite")),
        (copy, sb.base_url + "/", str(folder / "link.sqlite")),
        (job, sb.base_url.replace("127.0.0.1", "localhost"), str(folder / "sub/../ledger.sqlite")),
        (copy, f"{scheme.upper()}://{rest}//", str(folder / "link.sqlite")),
    ]


def runner_command(
    spelling: tuple[Path, str, str], folder: Path, args: argparse.Namespace
) -> list[str]:
    job, base_url, ledger = spelling
    return [
        sys.executable, "-m", "runner", "run", str(job),
        "--provider", "uncash", "--base-url", base_url,
        "--ledger", ledger, "--output", str(folder / "report.csv"),
        "--log-format", "json", "--no-progress",
        "--cooldown", str(args.cooldown), "--rate-limit", "unlimited",
        "--concurrency", "16", "--timeout", "0.5", "--max-attempts", "10",
        # A late topup applies slow_seconds after it arrived: the grace covers it.
        "--apply-grace", str(args.slow_seconds),
    ]  # fmt: skip


async def bench(args: argparse.Namespace) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TOPUP_")}
    env["UNCASH_API_TOKEN"] = TOKEN
    rng = random.Random(args.seed)
    config = SandboxConfig(
        token=TOKEN,
        cooldown=args.cooldown,
        fault_rate=args.fault_rate,
        # Every kind, `late` too (the sandbox leaves it out of its random draw unless named).
        fault_kinds=tuple(kind.value for kind in FaultKind),
        slow_seconds=args.slow_seconds,
        seed=args.seed,
    )
    with tempfile.TemporaryDirectory(prefix="exactly-once-") as tmp:
        folder = Path(tmp)
        job, amounts = write_job(folder, args.rows, args.cards, args.seed)
        started = time.monotonic()
        async with serve_sandbox(config) as sb:
            ways = spellings(job, sb, folder)
            log = folder / "runner.log"
            kills = []
            rivals: list[int] = []
            for n in range(args.kills):
                seen = len(sb.state.applied)
                target = seen + rng.randint(args.rows // 10, args.rows // 4)
                with log.open("ab") as out:
                    process = await anyio.open_process(
                        runner_command(ways[n % len(ways)], folder, args),
                        env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                    )  # fmt: skip
                # The sandbox has no event to wait on: poll its record.
                while len(sb.state.applied) <= seen and process.returncode is None:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                if n == 0:
                    # A second start of the same job while the first pays, spelled otherwise:
                    # it must find the run locked (exit 75), never pay beside the first.
                    rival = await anyio.run_process(
                        runner_command(ways[1], folder, args),
                        env=env, check=False, stdin=subprocess.DEVNULL,
                    )  # fmt: skip
                    rivals.append(rival.returncode)
                while len(sb.state.applied) < target and process.returncode is None:  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                if process.returncode is not None:
                    tail = log.read_text(errors="replace").splitlines()[-5:]
                    print(f"start {n} ended by itself with {process.returncode}:", *tail, sep="\n")
                    return 1
                process.send_signal(signal.SIGKILL)
                await process.wait()
                kills.append(len(sb.state.applied))
            final = await anyio.run_process(
                runner_command(ways[-1], folder, args), env=env, check=False
            )
            elapsed = time.monotonic() - started
            # A late topup still being processed when the last run ended lands within
            # slow_seconds: judge what the provider's books hold after that.
            await anyio.sleep(args.slow_seconds + 0.5)
            applied = Counter(a.amount for a in sb.state.applied)
            faults = dict(sb.state.faults_injected)
        with (folder / "report.csv").open(newline="", encoding="utf-8") as handle:
            report = list(csv.DictReader(handle))

    statuses = Counter(r["status"] for r in report)
    paid_twice = sum(1 for n in applied.values() if n > 1)
    success_without_money = sum(
        1 for r in report if r["status"] == "succeeded" and applied[Decimal(r["amount"])] != 1
    )
    failed_but_paid = sum(
        1 for r in report if r["status"] == "failed" and applied[Decimal(r["amount"])] > 0
    )
    accounted = {Decimal(r["amount"]) for r in report if r["status"] != "failed"}
    unaccounted = sum(1 for amount in applied if amount not in accounted)
    wrong_card = sum(1 for r in report if amounts[Decimal(r["amount"])] != r["card_id"])
    not_final = sum(
        n for s, n in statuses.items() if s not in ("succeeded", "failed", "needs_review")
    )
    review_share = statuses["needs_review"] / max(1, len(report))

    print(
        f"rows {args.rows} over {args.cards} cards, fault rate {args.fault_rate}, "
        f"{args.kills} SIGKILLs (applied so far at each: {kills}), elapsed {elapsed:.1f} s"
    )
    print(f"faults injected: {', '.join(f'{k}={v}' for k, v in sorted(faults.items()))}")
    print(f"a second process started beside the first exited {rivals} (75: locked out)")
    print(
        f"final run exit code {final.returncode}; statuses: "
        f"{', '.join(f'{s}={n}' for s, n in sorted(statuses.items()))}"
    )
    print(
        f"paid twice {paid_twice}; success without money {success_without_money}; "
        f"failed but paid {failed_but_paid}; applied but unaccounted {unaccounted}; "
        f"wrong card {wrong_card}; rows not final {not_final}; "
        f"needs_review {statuses['needs_review']} ({review_share:.2%})"
    )
    bad = (
        paid_twice + success_without_money + failed_but_paid + unaccounted + wrong_card + not_final
    )
    locked_out = all(code == 75 for code in rivals)
    ok = bad == 0 and review_share <= 0.01 and len(report) == args.rows and locked_out
    print("RESULT:", "exact" if ok else "NOT EXACT")
    return 0 if ok else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--cards", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--fault-rate", type=float, default=0.1)
    parser.add_argument("--cooldown", type=float, default=0.05)
    parser.add_argument(
        "--slow-seconds", type=float, default=1.0, help="how late a slow or late topup is"
    )
    parser.add_argument("--seed", type=int, default=1)
    sys.exit(anyio.run(bench, parser.parse_args()))


if __name__ == "__main__":
    main()
