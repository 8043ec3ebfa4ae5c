"""Makespan when the provider's rate is unknown to the runner (`makespan.py --unknown-rate`).

Each case is a fresh standalone sandbox with a true rate limit the runner is not told: 7/s,
23/s, 60/s, 23/s halving to 11.5/s mid-run, and 23/s with about 5 % faults (502s and dropped
connections, which must not slow the run: only 429s do). Each gets two jobs (every row a
different card; a heavy-card mix), and two runners on each: `--rate-limit auto` and the fixed
cautious default (5/s, the Uncash default), each against its own fresh sandbox. A fixed run
that cannot end near LB is stopped at FIXED_CAP x LB (shown as ">").

Then the strict cases: a no-burst limiter (`--rate-burst 1`) with 20 ms latency and
`Retry-After` in whole seconds, the rate given exactly; 400 single rows plus one card with 25
rows, which its cooldown chain bounds.

LB is computed from the sandbox's true rate (for the halving case, from its schedule):
makespan is the sandbox's first-to-last applied topup. Printed per case: makespan / LB, the
share of topup requests refused with 429, and the sandbox's cooldown refusals (must be 0).

    python benchmarks/makespan.py --unknown-rate            # about 6 minutes
    python benchmarks/makespan.py --unknown-rate --quick    # fewer cases, shorter jobs
"""

from __future__ import annotations

import argparse
import itertools
import secrets
import string
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from random import Random

from makespan import (
    HOST,
    Sandbox,
    Shape,
    child_env,
    free_port,
    python_command,
    running_sandbox,
    stop_process,
    write_job,
)

COOLDOWN = 1.0
LATENCY = 0.02
TARGET_SECONDS = 15.0  # LB of each rate-bound job
FIXED_DEFAULT = 5.0
FIXED_CAP = 1.6
FAULT_KINDS = "error_before,error_after,drop_before"


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    rate: float
    schedule: tuple[tuple[float, float], ...] = ()
    faults: float = 0.0
    burst: int = 2
    steady: bool = True

    def rows_for(self, seconds: float) -> int:
        """Rows whose rate-bound LB is about `seconds` under this case's true rate."""
        if not self.schedule:
            return round(self.rate * seconds)
        at, later = self.schedule[0]
        return round(self.rate * at + later * (seconds - at))

    def lower_bound(self, rows: int, busiest: int) -> float:
        by_cooldown = (busiest - 1) * COOLDOWN
        if not self.schedule:
            return max((rows - 1) / self.rate, by_cooldown)
        at, later = self.schedule[0]
        before = self.rate * at
        by_rate = (rows - 1) / self.rate if rows - 1 <= before else at + (rows - 1 - before) / later
        return max(by_rate, by_cooldown)


def cards(rng: Random, count: int) -> list[str]:
    alphabet = string.ascii_lowercase + string.digits
    return ["".join(rng.choice(alphabet) for _ in range(12)) for _ in range(count)]


def shapes(rows: int, rng: Random) -> list[Shape]:
    heavy_rows = max(2, round(TARGET_SECONDS * 0.6 / COOLDOWN))
    heavy = cards(rng, 3)
    mix = [c for c in heavy for _ in range(heavy_rows)] + cards(rng, rows - 3 * heavy_rows)
    rng.shuffle(mix)
    return [
        Shape("distinct", "every row a different card", tuple(cards(rng, rows))),
        Shape("heavy-mix", "3 heavy cards among singles", tuple(mix)),
    ]


def sandbox_command(case: Case, port: int) -> list[str]:
    command = [
        *python_command(),
        "sandbox",
        "--host",
        HOST,
        "--port",
        str(port),
        "--cooldown",
        f"{COOLDOWN:g}",
        "--rate-limit",
        f"{case.rate:g}",
        "--rate-burst",
        str(case.burst),
        "--latency",
        f"{LATENCY:g}",
        "--retry-after-whole",
        "--seed",
        "7",
    ]
    if case.schedule:
        command += ["--rate-schedule", ",".join(f"{a:g}:{r:g}" for a, r in case.schedule)]
    if case.faults:
        command += ["--fault-rate", f"{case.faults:g}", "--fault-kinds", FAULT_KINDS]
    return command


@dataclass(frozen=True, slots=True)
class Outcome:
    ratio: float | None
    stopped: bool
    share_429: float
    cooldown_refusals: int
    busiest_gap_max: float | None
    rate_used: str


def measure(case: Case, shape: Shape, rate: str, workdir: Path, token: str) -> Outcome:
    """One runner (`--rate-limit rate`) on `shape` against a fresh sandbox of `case`."""
    workdir.mkdir(parents=True)
    job = workdir / "job.csv"
    write_job(shape, job)
    env = child_env(token)
    port = free_port()
    lb = case.lower_bound(shape.n, shape.k)
    with running_sandbox(sandbox_command(case, port), port, env, workdir / "sandbox.log") as sb:
        sb.register_cards(sorted(shape.counts))
        command = [
            *python_command(),
            *("run", str(job), "--provider", "uncash", "--base-url", sb.api),
            *("--rate-limit", rate, "--cooldown", f"{COOLDOWN:g}", "--concurrency", "8"),
            # A lost answer (the fault cases) is judged from the card's state within seconds:
            # the sandbox applies at once, and a minute's grace would dwarf the job.
            *("--timeout", "1", "--apply-grace", "0.2"),
            *("--ledger", str(workdir / "ledger.sqlite"), "--output", str(workdir / "out.csv")),
            *("--log-format", "json", "--no-progress"),
        ]
        log = workdir / "runner.log"
        stopped = False
        with log.open("wb") as err:
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=env)
            try:
                process.wait(20.0 + FIXED_CAP * lb if rate != "auto" else 60.0 + 3 * lb)
            except subprocess.TimeoutExpired:
                stopped = True
            finally:
                stop_process(process)
        return judge(sb, shape, lb, stopped, log)


def judge(sb: Sandbox, shape: Shape, lb: float, stopped: bool, log: Path) -> Outcome:
    state = sb.state()
    applied = sorted(state["applied"], key=lambda r: r["seq"])
    times = [float(r["at"]) for r in applied]
    counters = state["counters"]
    refusals = counters.get("refusals", {})
    posts = int(counters.get("requests", {}).get("POST /api/v1/cards/{id}/topup", 0))
    busiest = shape.counts.most_common(1)[0][0]
    heavy = [float(r["at"]) for r in applied if r["card_id"] == busiest]
    gaps = [b - a for a, b in itertools.pairwise(heavy)]
    makespan = times[-1] - times[0] if len(times) > 1 else None
    if not stopped and len(applied) != shape.n:
        stopped = True  # not every row applied: not a finished run
    used = "-"
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if '"run.finished"' in line and '"rate_used"' in line:
            used = line.split('"rate_used": ')[1].split('"')[1]
            break
    return Outcome(
        ratio=None if makespan is None or lb <= 0 else makespan / lb,
        stopped=stopped,
        share_429=int(refusals.get("rate_limited", 0)) / max(1, posts),
        cooldown_refusals=int(refusals.get("cooldown", 0)),
        busiest_gap_max=max(gaps, default=None),
        rate_used=used,
    )


def show(o: Outcome) -> str:
    ratio = "-" if o.ratio is None else f"{'>' if o.stopped else ''}{o.ratio:.3f}"
    return f"{ratio:>7} {100 * o.share_429:5.1f}% {o.cooldown_refusals:3d}  {o.rate_used}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unknown-rate", action="store_true")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--no-fixed", action="store_true", help="only the auto runner")
    parser.add_argument("--case", help="only the cases whose name holds this (no strict ones)")
    args = parser.parse_args(argv)
    rng = Random(18)
    cases = [
        Case("7/s", 7.0),
        Case("23/s", 23.0),
        Case("60/s", 60.0),
        Case("23/s halving at 7.5 s", 23.0, schedule=((7.5, 11.5),), steady=False),
        Case("23/s, 5% faults", 23.0, faults=0.05, steady=False),
    ]
    if args.quick:
        cases = cases[1:2] + cases[3:4]
    if args.case:
        cases = [case for case in cases if args.case in case.name]
    token = "uc_" + secrets.token_hex(20)
    failures: list[str] = []
    print("case                  job        runner  makespan/LB  429%  cooldown-refusals  rate")
    with tempfile.TemporaryDirectory(prefix="unknown-rate-") as tmp:
        root = Path(tmp)
        for n, case in enumerate(cases):
            for shape in shapes(case.rows_for(TARGET_SECONDS), rng):
                rates = ["auto"] if args.no_fixed else ["auto", f"{FIXED_DEFAULT:g}"]
                if case.faults:
                    # The reference: told the true rate. What it loses to faults is what a
                    # lost answer costs (reconciled before it is sent again), not the rate.
                    rates.append(f"{case.rate:g}")
                for rate in rates:
                    o = measure(case, shape, rate, root / f"{n}-{shape.name}-{rate}", token)
                    print(f"{case.name:21} {shape.name:10} {rate:>6}  {show(o)}", flush=True)
                    if rate != "auto":
                        continue
                    limit = 1.10 if case.steady else 1.15
                    if o.ratio is None or o.stopped or o.ratio > limit:
                        failures.append(f"{case.name} {shape.name}: ratio above {limit}")
                    if o.share_429 >= 0.05 or o.cooldown_refusals:
                        failures.append(f"{case.name} {shape.name}: 429s or cooldown refusals")
        if args.case:
            return 1 if failures else 0
        strict = Case("strict 40/s, no burst", 40.0, burst=1)
        heavy = cards(rng, 1)[0]
        singles = cards(rng, 100 if args.quick else 400)
        rows = [*singles[: len(singles) // 2], *([heavy] * 25), *singles[len(singles) // 2 :]]
        shape = Shape("heavy-25", "singles and one card of 25 rows", tuple(rows))
        for rate in ("40", "auto"):
            o = measure(strict, shape, rate, root / f"strict-{rate}", token)
            gap = "-" if o.busiest_gap_max is None else f"{o.busiest_gap_max:.2f} s"
            print(f"{strict.name:21} {shape.name:10} {rate:>6}  {show(o)}  heavy gap max {gap}")
            if rate == "40" and (o.ratio is None or o.ratio > 1.05 or o.share_429 >= 0.01):
                failures.append(f"strict {rate}: ratio above 1.05 or 429s at 1 % or more")
    for failure in failures:
        print("FAILED:", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
