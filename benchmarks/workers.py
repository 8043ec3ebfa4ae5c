"""Makespan of one run shared by one, two and three workers through a PostgreSQL ledger (issue 8).

Each measured run starts a fresh standalone sandbox (`topup-runner sandbox`, on 127.0.0.1 only)
and a fresh database on a throwaway PostgreSQL server (tests/pgserver.py), then starts N
`topup-runner run` processes at once with the same job, the same run key and the same
`--ledger postgresql://...` URL: they cooperate through the ledger. Two scenarios:

- rate-bound: the sandbox limits requests to R/s and every worker is given the same
  `--rate-limit R`. The limit is shared through the ledger, not multiplied by the workers, so
  the makespan should stay at the bound max((N-1)/R, (k-1)*c), not shrink below it, and the
  sandbox should send no 429;
- client-bound: no rate limit, a sandbox latency L and a small `--concurrency C` per worker,
  so each worker's own capacity (about C/L topups per second) is the bound: the makespan should
  fall about 1/N with N workers.

The makespan is the sandbox's own record (`GET /_sandbox/state`): last applied `at` minus
first. The same record proves each row applied exactly once (per card, as many applied topups
as the job has rows for it), and its counters give the 429s and cooldown refusals it sent.

Exit status 0 if, in every run, every row was applied exactly once, the sandbox counted no 429
and no cooldown refusal, and every worker exited 0; 1 if not; 2 if it could not measure (no
PostgreSQL, a sandbox did not start, bad options); 130 on Ctrl-C or SIGTERM. Makespans are
printed against their bounds, not judged.

    python benchmarks/workers.py            # about 2 minutes
    python benchmarks/workers.py --quick    # a smoke run in under a minute
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import secrets
import shlex
import shutil
import string
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random
from typing import Any

import makespan as ms

# tests/pgserver.py starts the throwaway PostgreSQL; it lives beside the tests, not in runner/.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.pgserver import (
    PostgresServer,
    PostgresStartError,
    PostgresUnavailable,
)

HOST = ms.HOST
AMOUNT = ms.AMOUNT
WORKER_COUNTS = (1, 2, 3)
# Workers still going after this long are stuck, not slow: 60 s + 10 x the bound.
TIMEOUT_BASE = 60.0
TIMEOUT_FACTOR = 10.0


# -- settings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """What bounds the run, and the limits the sandbox and every worker run under."""

    name: str
    rate: float | None  # requests/s, sandbox and workers alike; None: no limit
    latency: float  # seconds the sandbox adds to every answer
    cooldown: float  # seconds between two applied topups of one card
    concurrency: int  # requests in flight, per worker
    rows: int
    lease: float | None  # workers' --lease; None: the runner's default

    def __post_init__(self) -> None:
        if self.rate is not None and not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number per second, got {self.rate}")
        if not (math.isfinite(self.latency) and self.latency >= 0):
            raise ValueError(f"latency must be zero or more seconds, got {self.latency}")
        if not (math.isfinite(self.cooldown) and self.cooldown > 0):
            raise ValueError(f"cooldown must be a positive number of seconds, got {self.cooldown}")
        if self.concurrency < 1:
            raise ValueError(f"concurrency must be at least 1, got {self.concurrency}")
        if self.rows < 2:
            raise ValueError(f"a job needs at least 2 rows, got {self.rows}")
        if self.lease is not None and not (math.isfinite(self.lease) and self.lease > 0):
            raise ValueError(f"lease must be a positive number of seconds, got {self.lease}")

    def bound(self, job: ms.Shape, workers: int) -> float:
        """The shortest first-to-last span: the rate's, else the workers' own capacity.

        Either way a card's rows are at least a cooldown apart. Without a rate limit each
        worker completes at most `concurrency` topups per `latency`, so N rows need about
        ceil(N / (workers x concurrency)) - 1 round trips after the first answer.
        """
        chain = (job.k - 1) * self.cooldown
        if self.rate is not None:
            return max((job.n - 1) / self.rate, chain)
        waves = math.ceil(job.n / (workers * self.concurrency)) - 1
        return max(waves * self.latency, chain)


def make_job(rows: int, heavy_cards: int, heavy_rows: int, rng: Random) -> ms.Shape:
    """Card ids in file order, every row topping up AMOUNT: a few cards with several rows
    (spread through the file, so their cooldown holds across workers), the rest one each."""

    def card() -> str:
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))

    heavy = [card() for _ in range(heavy_cards)]
    repeated = [c for _ in range(heavy_rows) for c in heavy][:rows]
    cards = [card() for _ in range(rows - len(repeated))]
    # Heavy cards in turn, evenly through the file: each card's rows far apart, not in a block.
    for i, c in enumerate(repeated):
        cards.insert(round(i * len(cards) / max(1, len(repeated))) + i, c)
    return ms.Shape("row", "heavy cards spread through the file", tuple(cards))


# -- processes --------------------------------------------------------------------------------


def sandbox_command(scenario: Scenario, port: int, seed: int) -> list[str]:
    command = [
        *ms.python_command(),
        "sandbox",
        "--host",
        HOST,
        "--port",
        str(port),
        "--cooldown",
        f"{scenario.cooldown:g}",
        "--latency",
        f"{scenario.latency:g}",
        "--seed",
        str(seed),
    ]
    if scenario.rate is not None:
        command += ["--rate-limit", f"{scenario.rate:g}"]
    return command


def sandbox(
    scenario: Scenario, seed: int, env: Mapping[str, str], logs: Path
) -> contextlib.AbstractContextManager[ms.Sandbox]:
    """A fresh sandbox process for one run, stopped on the way out."""
    port = ms.free_port()
    command = sandbox_command(scenario, port, seed)
    return ms.running_sandbox(command, port, env, logs / f"sandbox-{port}.log")


def worker_command(
    job: Path, api: str, scenario: Scenario, ledger: str, run_key: str, output: Path
) -> list[str]:
    rate = "unlimited" if scenario.rate is None else f"{scenario.rate:g}"
    lease = [] if scenario.lease is None else ["--lease", f"{scenario.lease:g}"]
    return [
        *ms.python_command(),
        "run",
        str(job),
        "--provider",
        "uncash",
        "--base-url",
        api,
        "--ledger",
        ledger,
        "--run-key",
        run_key,
        "--rate-limit",
        rate,
        "--cooldown",
        f"{scenario.cooldown:g}",
        "--concurrency",
        str(scenario.concurrency),
        "--output",
        str(output),
        "--log-format",
        "json",
        "--no-progress",
        *lease,
    ]


@dataclass(frozen=True, slots=True)
class Worker:
    exit_code: int | None  # None: still running at the timeout, so stopped
    finished: Mapping[str, Any] | None  # its own `run.finished` event
    log: Path


def run_workers(
    commands: Sequence[list[str]], workdir: Path, env: Mapping[str, str], timeout: float
) -> tuple[list[Worker], float]:
    """Start every command at once, wait for all; each worker and the wall time, start to end."""
    logs = [workdir / f"worker-{i}.log" for i in range(1, len(commands) + 1)]
    processes: list[subprocess.Popen[bytes]] = []
    started = time.monotonic()
    try:
        for command, log in zip(commands, logs, strict=True):
            with log.open("wb") as err:
                processes.append(
                    subprocess.Popen(
                        command,
                        stdout=subprocess.DEVNULL,
                        stderr=err,
                        stdin=subprocess.DEVNULL,
                        env=dict(env),
                    )
                )
        deadline = started + timeout
        codes: list[int | None] = []
        for process in processes:
            try:
                codes.append(process.wait(max(0.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                codes.append(None)
        wall = time.monotonic() - started
    finally:
        for process in processes:
            ms.stop_process(process)
    workers = [
        Worker(code, ms.finished_event(log), log) for code, log in zip(codes, logs, strict=True)
    ]
    return workers, wall


# -- judging from the provider's record -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Measurement:
    """One run (a scenario, a number of workers) as the sandbox saw it."""

    scenario: Scenario
    workers: list[Worker]
    rows: int
    bound: float
    makespan: float | None
    wall: float
    applied: int
    exactly_once: bool
    problems: tuple[str, ...]
    rate_refusals: int
    cooldown_refusals: int
    posts: int

    @property
    def ok(self) -> bool:
        return not self.problems and self.rate_refusals == 0 and self.cooldown_refusals == 0

    def ratio(self) -> float | None:
        if self.makespan is None or self.bound <= 0:
            return None
        return self.makespan / self.bound


def judge(
    scenario: Scenario, job: ms.Shape, workers: list[Worker], wall: float, state: Mapping[str, Any]
) -> Measurement:
    applied = sorted(state["applied"], key=lambda record: record["seq"])
    times = [float(record["at"]) for record in applied]
    problems: list[str] = []
    for i, worker in enumerate(workers, 1):
        if worker.exit_code is None:
            problems.append(f"worker {i} still running at the timeout: stopped ({worker.log})")
        elif worker.exit_code != 0:
            problems.append(f"worker {i} exited with {worker.exit_code} ({worker.log})")
    expected = job.counts
    got = Counter(str(record["card_id"]) for record in applied)
    wrong = {c: (expected[c], got[c]) for c in expected | got if expected[c] != got[c]}
    if wrong:
        shown = ", ".join(
            f"{c[:8]}: {e} rows, {g} applied" for c, (e, g) in list(wrong.items())[:3]
        )
        problems.append(f"{len(wrong)} card(s) not applied exactly once per row ({shown})")
    counters = state["counters"]
    refusals = counters.get("refusals", {})
    return Measurement(
        scenario=scenario,
        workers=workers,
        rows=job.n,
        bound=scenario.bound(job, len(workers)),
        makespan=times[-1] - times[0] if len(times) > 1 else None,
        wall=wall,
        applied=len(applied),
        exactly_once=not wrong,
        problems=tuple(problems),
        rate_refusals=int(refusals.get("rate_limited", 0)),
        cooldown_refusals=int(refusals.get("cooldown", 0)),
        posts=int(counters.get("requests", {}).get("POST /api/v1/cards/{id}/topup", 0)),
    )


def measure(
    scenario: Scenario,
    job: ms.Shape,
    workers: int,
    server: PostgresServer | None,
    seed: int,
    token: str,
    workdir: Path,
) -> Measurement:
    """`workers` processes on one run of `job`, against a fresh sandbox and ledger.

    The ledger is a fresh database on `server`, or without one a fresh SQLite file (for one
    worker: the embedded default, as a point of comparison).
    """
    # Unique, so that a count given twice in --workers measures twice.
    rundir = Path(tempfile.mkdtemp(prefix=f"{scenario.name}-{workers}-", dir=workdir))
    job_file = rundir / "job.csv"
    ms.write_job(job, job_file)
    env = ms.child_env(token)
    if server is None:
        ledger = str(rundir / "ledger.sqlite")
    else:
        ledger = server.create_database(f"{scenario.name}_{workers}")
    run_key = f"workers-{scenario.name}-{workers}-{secrets.token_hex(3)}"
    with sandbox(scenario, seed, env, rundir) as sb:
        sb.register_cards(sorted(job.counts))
        commands = [
            worker_command(job_file, sb.api, scenario, ledger, run_key, rundir / f"out-{i}.csv")
            for i in range(1, workers + 1)
        ]
        timeout = TIMEOUT_BASE + TIMEOUT_FACTOR * scenario.bound(job, 1)
        ran, wall = run_workers(commands, rundir, env, timeout)
        state = sb.state()
    (rundir / "sandbox-state.json").write_text(json.dumps(state, indent=1), encoding="utf-8")
    if server is not None:
        server.drop_database(ledger)
    return judge(scenario, job, ran, wall, state)


# -- report -----------------------------------------------------------------------------------


def table(results: Sequence[Measurement]) -> str:
    header = (
        "scenario",
        "workers",
        "N",
        "bound (s)",
        "makespan (s)",
        "makespan/bound",
        "vs 1 worker",
        "wall (s)",
        "429s",
        "cooldown refusals",
        "exactly once",
        "exit codes",
    )
    single = {r.scenario.name: r.makespan for r in results if len(r.workers) == 1}
    rows = []
    for r in results:
        one = single.get(r.scenario.name)
        speedup = one / r.makespan if one and r.makespan else None
        rows.append(
            (
                r.scenario.name,
                str(len(r.workers)),
                str(r.rows),
                ms.num(r.bound),
                ms.num(r.makespan),
                ms.num(r.ratio(), ".3f"),
                "-" if speedup is None else f"x{speedup:.2f}",
                ms.num(r.wall, ".1f"),
                str(r.rate_refusals),
                str(r.cooldown_refusals),
                "yes" if r.exactly_once else "no",
                ",".join("-" if w.exit_code is None else str(w.exit_code) for w in r.workers),
            )
        )
    return ms.render_table(header, rows)


def diagnostics(results: Sequence[Measurement]) -> str:
    """Who sent what: each worker's own `run.finished` figures, and any problem."""
    out = []
    for r in results:
        sent = ["-" if w.finished is None else str(w.finished.get("sent", "-")) for w in r.workers]
        out.append(
            f"{r.scenario.name} x{len(r.workers)}: {r.posts} topup POSTs for {r.applied} "
            f"applied; sent per worker (own log): {' + '.join(sent)}"
        )
        for problem in r.problems:
            out.append(f"  PROBLEM: {problem}")
    return "\n".join(out)


def describe(scenario: Scenario) -> str:
    rate = "no rate limit" if scenario.rate is None else f"rate {scenario.rate:g}/s"
    lease = (
        "the runner's default lease" if scenario.lease is None else f"lease {scenario.lease:g} s"
    )
    return (
        f"{scenario.name}: {rate}, latency {scenario.latency:g} s, cooldown "
        f"{scenario.cooldown:g} s, concurrency {scenario.concurrency} per worker, {lease}"
    )


# -- main -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sizes:
    rate_rows: int
    client_rows: int
    cooldown: float
    lease: float | None


FULL = Sizes(rate_rows=200, client_rows=1200, cooldown=0.5, lease=None)
# A worker with no card left polls every lease/4 s until the others finish theirs: with the
# runner's 15 s lease that idle tail would take a smoke run past a minute.
QUICK = Sizes(rate_rows=40, client_rows=200, cooldown=0.25, lease=4.0)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Makespan of one run shared by 1, 2 and 3 workers through a PostgreSQL ledger.",
    )
    parser.add_argument("--quick", action="store_true", help="smaller jobs: a smoke run")
    parser.add_argument("--rate", type=float, default=20.0, help="rate-bound: requests/s (20)")
    parser.add_argument(
        "--rate-rows",
        type=int,
        help=f"rate-bound job rows ({FULL.rate_rows}; quick {QUICK.rate_rows})",
    )
    parser.add_argument(
        "--client-rows",
        type=int,
        help=f"client-bound job rows ({FULL.client_rows}; quick {QUICK.client_rows})",
    )
    parser.add_argument(
        "--latency", type=float, default=0.05, help="sandbox latency per answer, s (0.05)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=4, help="requests in flight per worker (4)"
    )
    parser.add_argument(
        "--cooldown",
        type=float,
        help=f"seconds between topups of one card ({FULL.cooldown:g}; quick {QUICK.cooldown:g})",
    )
    parser.add_argument(
        "--lease",
        type=float,
        help="workers' --lease, s (the runner's default; quick 4)",
    )
    parser.add_argument("--heavy-cards", type=int, default=4, help="cards with several rows (4)")
    parser.add_argument("--heavy-rows", type=int, default=3, help="rows of each such card (3)")
    parser.add_argument(
        "--workers",
        default=",".join(map(str, WORKER_COUNTS)),
        help="comma-separated worker counts (1,2,3)",
    )
    parser.add_argument(
        "--scenario", action="append", choices=("rate-bound", "client-bound"), help="only this one"
    )
    parser.add_argument(
        "--ledger-backend",
        choices=("postgres", "sqlite"),
        default="postgres",
        help="postgres (default), or sqlite for a one-worker comparison",
    )
    parser.add_argument("--seed", type=int, default=7, help="card ids (7)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (jobs, logs)")
    return parser.parse_args(argv)


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    sizes = QUICK if args.quick else FULL
    cooldown = sizes.cooldown if args.cooldown is None else args.cooldown
    lease = sizes.lease if args.lease is None else args.lease
    both = [
        Scenario(
            "rate-bound",
            rate=args.rate,
            latency=args.latency,
            cooldown=cooldown,
            concurrency=args.concurrency,
            rows=args.rate_rows or sizes.rate_rows,
            lease=lease,
        ),
        Scenario(
            "client-bound",
            rate=None,
            latency=args.latency,
            cooldown=cooldown,
            concurrency=args.concurrency,
            rows=args.client_rows or sizes.client_rows,
            lease=lease,
        ),
    ]
    return [s for s in both if not args.scenario or s.name in args.scenario]


def reproduce_command(args: argparse.Namespace) -> str:
    parts = ["python", "benchmarks/workers.py"]
    if args.quick:
        parts.append("--quick")
    for flag in ("rate_rows", "client_rows", "cooldown", "lease"):
        value = getattr(args, flag)
        if value is not None:
            parts += [f"--{flag.replace('_', '-')}", f"{value:g}"]
    parts += ["--rate", f"{args.rate:g}", "--latency", f"{args.latency:g}"]
    parts += ["--concurrency", str(args.concurrency), "--workers", args.workers]
    parts += ["--heavy-cards", str(args.heavy_cards), "--heavy-rows", str(args.heavy_rows)]
    if args.ledger_backend != "postgres":
        parts += ["--ledger-backend", args.ledger_backend]
    parts += ["--seed", str(args.seed)]
    for name in args.scenario or ():
        parts += ["--scenario", name]
    return shlex.join(parts)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        counts = [int(part) for part in args.workers.split(",")]
        if not counts or min(counts) < 1:
            raise ValueError("--workers: counts must be 1 or more")
        chosen = scenarios(args)
        if args.heavy_cards < 0 or args.heavy_rows < 1:
            raise ValueError("--heavy-cards must be 0 or more and --heavy-rows 1 or more")
        if args.ledger_backend == "sqlite" and counts != [1]:
            raise ValueError("--ledger-backend sqlite: one worker only (--workers 1)")
    except ValueError as exc:
        print(f"workers: {exc}", file=sys.stderr)
        return 2
    ms.terminate_on_sigterm()
    token = "uc_" + "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(40))
    rng = Random(args.seed)
    jobs = {s.name: make_job(s.rows, args.heavy_cards, args.heavy_rows, rng) for s in chosen}

    workdir = Path(tempfile.mkdtemp(prefix="workers-"))
    results: list[Measurement] = []
    try:
        # More connections than the default 100: every worker may hold several.
        with (
            PostgresServer(settings={"max_connections": "200"})
            if args.ledger_backend == "postgres"
            else contextlib.nullcontext()
        ) as server:
            for scenario in chosen:
                job = jobs[scenario.name]
                for n in counts:
                    print(
                        f"measuring {scenario.name} with {n} worker(s): N={job.n} k={job.k} "
                        f"bound={scenario.bound(job, n):.2f} s ...",
                        file=sys.stderr,
                        flush=True,
                    )
                    results.append(measure(scenario, job, n, server, args.seed, token, workdir))
    except (PostgresUnavailable, PostgresStartError, ms.BenchmarkError) as exc:
        print(f"workers: cannot measure: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("workers: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work dir kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    for scenario in chosen:
        print(describe(scenario))
    print(
        "bound: rate-bound max((N-1)/R, (k-1)*c); client-bound max((ceil(N/(workers*C))-1)*L, "
        "(k-1)*c); makespan = first to last applied topup in the sandbox's record"
    )
    print(table(results))
    print()
    print(diagnostics(results))
    print()
    print(f"reproduce: {reproduce_command(args)}")

    bad = [f"{r.scenario.name} x{len(r.workers)}" for r in results if not r.ok]
    if bad:
        print(
            "CHECK FAILED: a row not applied exactly once, a 429, a cooldown refusal or a "
            f"worker failure on: {', '.join(bad)}"
        )
        if not args.keep:
            print("rerun with --keep to keep the jobs, the workers' logs and the sandbox records")
        return 1
    print("check passed: every row applied exactly once, no 429, no cooldown refusal")
    return 0


if __name__ == "__main__":
    sys.exit(main())
