"""Throughput benchmark: the runner, ledger included, against a bare aiohttp loop.

With no rate limit, no cooldown and no latency the provider stops being the bottleneck, and
what is left is the client's own cost per topup. In one run this script measures:

- the runner: `topup-runner run JOB --provider uncash --rate-limit unlimited --cooldown 0
  --concurrency C ...` as a subprocess, with its SQLite ledger (synchronous=FULL, as always)
  and its report;
- a bare loop: `C` aiohttp tasks in this process posting the same requests (`{"amount": 10.00}`
  to `/api/v1/cards/{id}/topup` with the bearer token), reading each answer and nothing more,
  on the same event loop implementation as the runner's (uvloop).

Each contender gets a fresh standalone sandbox process (`python -m runner sandbox --cooldown 0`,
no rate limit, no latency, on 127.0.0.1) in which the job's cards are registered first through
`POST /_sandbox/cards`, so that the runner's preflight needs one listing. Topups per second are
read from the sandbox's own record of applied topups (`GET /_sandbox/state`): (applied - 1)
divided by the time from the first to the last applied `at`. Preflight and the report are
outside that window; the runner's wall time and peak RSS are printed beside it.

The same record checks that every card was topped up exactly once by each contender.

    python benchmarks/throughput.py                      # 20,000 cards, concurrency 32
    python benchmarks/throughput.py --rounds 3           # best and median of three rounds each
    python benchmarks/throughput.py --profile prof.svg   # the runner under py-spy (slower)

Exit status: 0 if the runner reaches `--target` (default 0.8) times the bare loop's rate and
every row was applied exactly once by both; 1 if not; 2 if it could not measure.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import aiohttp
import uvloop
from makespan import (
    BenchmarkError,
    Sandbox,
    free_port,
    python_command,
    running_sandbox,
    stop_process,
    terminate_on_sigterm,
)
from makespan import child_env as makespan_child_env

HOST = "127.0.0.1"
TOKEN = "uc_" + "Thru9" * 8
AMOUNT = "10.00"
BODY = '{"amount": ' + AMOUNT + "}"


def card_ids(count: int, seed: int) -> list[str]:
    """`count` distinct UUIDv4 card ids, the same for the same seed."""
    rng = Random(seed)
    return [str(uuid.UUID(int=rng.getrandbits(128), version=4)) for _ in range(count)]


def write_job(path: Path, cards: Sequence[str], rows_per_card: int = 1) -> int:
    """A CSV job: each card `rows_per_card` times (round after round), distinct references."""
    with path.open("w", encoding="utf-8", newline="") as out:
        out.write("card_id,amount,reference\n")
        n = 0
        for round_ in range(rows_per_card):
            for card in cards:
                n += 1
                out.write(f"{card},{AMOUNT},R{n}-{round_ + 1}\n")
    return n


# -- processes --------------------------------------------------------------------------------


def child_env() -> dict[str, str]:
    """No TOPUP_* setting of the caller's leaks into a run; the benchmark's token."""
    return makespan_child_env(TOKEN)


def sandbox(workdir: Path, name: str, wallet: str, seed: int) -> AbstractContextManager[Sandbox]:
    """A fresh standalone sandbox: no rate limit, no cooldown, no latency; stopped on exit."""
    port = free_port()
    command = [
        *python_command(), "sandbox", "--host", HOST, "--port", str(port),
        "--cooldown", "0", "--latency", "0", "--wallet", wallet, "--seed", str(seed),
    ]  # fmt: skip
    return running_sandbox(command, port, child_env(), workdir / f"sandbox-{name}.log")


@dataclass(frozen=True, slots=True)
class Finished:
    """A child process that ended: how, how long it took, its peak resident memory."""

    exit_code: int | None  # None: stopped at its timeout
    wall_s: float
    peak_rss_mb: float
    cpu_s: float = 0.0  # user + system


def wait_measured(process: subprocess.Popen[Any], timeout: float) -> Finished:
    """Wait for `process`, reaping it with wait4 to read its own peak RSS (ru_maxrss)."""
    started = time.monotonic()
    deadline = started + timeout
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            process.returncode = os.waitstatus_to_exitcode(status)
            return Finished(
                process.returncode,
                time.monotonic() - started,
                usage.ru_maxrss / 1024,
                usage.ru_utime + usage.ru_stime,
            )
        if time.monotonic() > deadline:
            stop_process(process)
            return Finished(None, time.monotonic() - started, 0.0)
        time.sleep(0.02)


def runner_command(
    job: Path,
    sb: Sandbox,
    concurrency: int,
    workdir: Path,
    output: str = "out.csv",
    rate_limit: str = "unlimited",
) -> list[str]:
    return [
        *python_command(), "run", str(job), "--provider", "uncash", "--base-url", sb.api,
        "--rate-limit", rate_limit, "--concurrency", str(concurrency), "--cooldown", "0",
        "--ledger", str(workdir / "ledger.sqlite"), "--output", str(workdir / output),
        "--log-format", "json", "--no-progress",
    ]  # fmt: skip


def run_runner(
    command: Sequence[str],
    workdir: Path,
    timeout: float,
    *,
    profile: Path | None = None,
) -> Finished:
    if profile is not None:
        py_spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or "py-spy"
        fmt = "speedscope" if profile.suffix == ".json" else "flamegraph"
        command = [
            py_spy, "record", "--rate", "250", "--format", fmt, "-o", str(profile), "--",
            *command,
        ]  # fmt: skip
    env = child_env()
    with (workdir / "runner.log").open("wb") as err:
        process = subprocess.Popen(
            command, stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL, env=env
        )
        try:
            return wait_measured(process, timeout)
        finally:
            stop_process(process)


# -- the bare loop ----------------------------------------------------------------------------


async def bare_loop(api: str, cards: Sequence[str], concurrency: int) -> int:
    """`concurrency` tasks posting one topup per card, reading each answer; returns non-200s."""
    headers = {
        "Authorization": f"Bearer {TOKEN}",
        "Content-Type": "application/json",
        "Accept": "application/json",
    }
    failures = 0
    queue = iter(cards)
    async with aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=30),
        connector=aiohttp.TCPConnector(limit=concurrency),
    ) as session:

        async def worker() -> None:
            nonlocal failures
            for card in queue:
                async with session.post(f"{api}/cards/{card}/topup", data=BODY) as response:
                    await response.read()
                    if response.status != 200:
                        failures += 1

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return failures


# -- judging ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Rate:
    """One contender's run as the sandbox recorded it."""

    applied: int
    window_s: float
    problems: tuple[str, ...]

    @property
    def per_second(self) -> float:
        return (self.applied - 1) / self.window_s if self.window_s > 0 else 0.0


def judge(state: Mapping[str, Any], expected: Counter[str], failure: str | None) -> Rate:
    applied = state["applied"]
    times = [float(record["at"]) for record in applied]
    got = Counter(str(record["card_id"]) for record in applied)
    problems = [failure] if failure else []
    wrong = sum(1 for card in expected | got if expected[card] != got[card])
    if wrong:
        problems.append(f"{wrong} cards not topped up exactly as often as the job says")
    window = max(times) - min(times) if times else 0.0
    return Rate(len(applied), window, tuple(problems))


def measure_runner(
    cards: Sequence[str], concurrency: int, workdir: Path, args: argparse.Namespace, name: str
) -> tuple[Rate, Finished]:
    folder = workdir / name
    folder.mkdir()
    job = folder / "job.csv"
    write_job(job, cards)
    with sandbox(folder, "runner", args.wallet, args.seed) as sb:
        sb.register_cards(cards)
        command = runner_command(job, sb, concurrency, folder, rate_limit=args.rate_limit)
        finished = run_runner(command, folder, args.timeout, profile=args.profile)
        failure = None
        if finished.exit_code != 0:
            tail = (folder / "runner.log").read_text(errors="replace").strip().splitlines()[-3:]
            failure = f"runner exit {finished.exit_code}: {' | '.join(tail)}"
        rate = judge(sb.state(), Counter(cards), failure)
    return rate, finished


def measure_bare(
    cards: Sequence[str], concurrency: int, workdir: Path, args: argparse.Namespace, name: str
) -> Rate:
    folder = workdir / name
    folder.mkdir()
    with sandbox(folder, "bare", args.wallet, args.seed) as sb:
        sb.register_cards(cards)
        # On the runner's own event loop (uvloop, as `topup-runner run` uses): a comparison
        # of clients, not of event loops.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as loop:
            failures = loop.run(bare_loop(sb.api, cards, concurrency))
        failure = f"bare loop: {failures} answers were not 200" if failures else None
        return judge(sb.state(), Counter(cards), failure)


# -- main -------------------------------------------------------------------------------------


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/throughput.py", "--cards", str(args.cards)]
    parts += ["--concurrency", str(args.concurrency), "--rounds", str(args.rounds)]
    return shlex.join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Runner topups/s against a bare aiohttp loop.")
    parser.add_argument("--cards", type=int, default=20_000, help="distinct cards, one row each")
    parser.add_argument("--concurrency", type=int, default=32, help="requests in flight, both")
    parser.add_argument("--rounds", type=int, default=1, help="measure each contender N times")
    parser.add_argument("--seed", type=int, default=11, help="card ids")
    parser.add_argument(
        "--rate-limit", default="unlimited", help="the runner's --rate-limit (e.g. 1000000)"
    )
    parser.add_argument("--target", type=float, default=0.8, help="runner/bare ratio to reach")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds per runner run")
    parser.add_argument(
        "--profile", type=Path, help="record the runner with py-spy into this .svg (or .json)"
    )
    parser.add_argument("--keep", action="store_true", help="keep the work dir (jobs, logs)")
    args = parser.parse_args(argv)
    if args.cards < 2 or args.concurrency < 1 or args.rounds < 1:
        parser.error("--cards must be at least 2, --concurrency and --rounds at least 1")
    # Every topup is 10.00 plus the sandbox's default fee (2.5 % + 0.50): leave room.
    args.wallet = str(max(1_000_000, 12 * args.cards))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    terminate_on_sigterm()
    cards = card_ids(args.cards, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="throughput-"))
    runner_rates: list[float] = []
    bare_rates: list[float] = []
    problems: list[str] = []
    try:
        for round_ in range(1, args.rounds + 1):
            # Alternate who goes first, so that a noisy neighbour hurts both alike on average.
            order = ("runner", "bare") if round_ % 2 else ("bare", "runner")
            for who in order:
                print(f"round {round_}: {who} ...", file=sys.stderr, flush=True)
                if who == "runner":
                    rate, finished = measure_runner(
                        cards, args.concurrency, workdir, args, f"runner-{round_}"
                    )
                    runner_rates.append(rate.per_second)
                    print(
                        f"  runner: {rate.per_second:8.0f} topups/s ({rate.applied} applied in "
                        f"{rate.window_s:.2f} s); whole run {finished.wall_s:.1f} s, "
                        f"CPU {finished.cpu_s:.1f} s, peak RSS {finished.peak_rss_mb:.0f} MB",
                        flush=True,
                    )
                else:
                    rate = measure_bare(cards, args.concurrency, workdir, args, f"bare-{round_}")
                    bare_rates.append(rate.per_second)
                    print(
                        f"  bare:   {rate.per_second:8.0f} topups/s ({rate.applied} applied in "
                        f"{rate.window_s:.2f} s)",
                        flush=True,
                    )
                problems.extend(f"{who} round {round_}: {p}" for p in rate.problems)
    except BenchmarkError as exc:
        print(f"throughput: cannot measure: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("throughput: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    runner_best, bare_best = max(runner_rates), max(bare_rates)
    runner_median, bare_median = statistics.median(runner_rates), statistics.median(bare_rates)
    ratio = runner_median / bare_median
    print(
        f"{args.cards} distinct cards, concurrency {args.concurrency}, {args.rounds} round(s); "
        "topups/s from the sandbox's record (first to last applied)"
    )
    print(f"runner (ledger included): median {runner_median:.0f}/s, best {runner_best:.0f}/s")
    print(f"bare aiohttp loop:        median {bare_median:.0f}/s, best {bare_best:.0f}/s")
    print(f"ratio runner/bare (medians): {ratio:.2f}  (target {args.target:.2f})")
    print(f"reproduce: {reproduce_command(args)}")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if ratio < args.target:
        print(f"CHECK FAILED: runner below {args.target:.2f} x the bare loop")
    return 1 if problems or ratio < args.target else 0


if __name__ == "__main__":
    sys.exit(main())
