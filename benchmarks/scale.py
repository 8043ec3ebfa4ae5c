"""Scale benchmark: a 1,000,000-row job through `check`, `run` and `report`, with peak memory.

The job is 100,000 cards x 10 rows by default (`--cards`, `--rows-per-card`): a million rows
as a large payout run has them, the same cards paid several times, so that the dispatcher's
per-card queues and cooldown bookkeeping and the provider's card listing are all exercised at
scale. Why not more cards: `check` waits for the provider's one `GET /cards`, which the
sandbox (pure Python) renders at about 20 us a card, 4-5 s for 200,000 cards; with 200,000 x 5
`check` takes about 12 s, of which the runner's own work is about 8 s. A million distinct cards
would make that listing 280 MB. Every row has its own reference, so no row looks pasted twice.

A standalone sandbox (`python -m runner sandbox --cooldown 0`, no rate limit, no latency, a wallet
big enough) is started on 127.0.0.1 and told the job's cards through `POST /_sandbox/cards`, so
that preflight finds them in its one `GET /cards` listing. Then, each as a subprocess whose peak
RSS is read from wait4 (ru_maxrss, the kernel's own high-water mark):

- `topup-runner check JOB ...`: must finish in under 10 s;
- `topup-runner check JOB.xlsx --columns ...`: the job's first 100,000 rows (`--xlsx-rows`) as
  a payroll workbook with its own headers (ids as text, amounts as numbers), read through a
  column mapping: must finish in under 15 s (`--xlsx-only` stops after it);
- `topup-runner run JOB ... --rate-limit unlimited --cooldown 0 --output report.csv`: must
  finish with every row succeeded and a peak RSS under 600 MB;
- `topup-runner report --output report.xlsx` (unless `--no-xlsx`): the same run rewritten as
  xlsx from the ledger, timed (a million rows fit one sheet; beyond 1,048,575 they go on).

Exactly once is checked from the sandbox's side without downloading its million-record log:
every card's `deposit` must be rows-per-card x the amount, and the wallet must have gone down
by exactly the sum of what the report says was charged.

    python benchmarks/scale.py                                   # about 15 minutes on 2 cores
    python benchmarks/scale.py --cards 200000 --rows-per-card 5  # more cards, same million
    python benchmarks/scale.py --cards 10000                     # 100,000 rows: a smoke run

Exit status 0 if every bound holds and every row was applied exactly once; 1 if not; 2 if it
could not measure.
"""

from __future__ import annotations

import argparse
import csv
import json
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from decimal import Decimal
from pathlib import Path
from typing import Any

import makespan as ms
import throughput as tp

CHECK_BOUND_S = 10.0
XLSX_CHECK_BOUND_S = 15.0
XLSX_COLUMNS = 'card_id="Card Number",amount="Net Pay",reference="Employee ID"'
RSS_BOUND_MB = 600.0


def api_json(sb: ms.Sandbox, path: str) -> Any:
    """GET an API route with the token, as a client would."""
    request = urllib.request.Request(sb.api + path, headers={"Authorization": f"Bearer {tp.TOKEN}"})
    with urllib.request.urlopen(request, timeout=600) as response:
        return json.load(response)


def run_measured(command: list[str], log: Path, timeout: float) -> tp.Finished:
    with log.open("wb") as out:
        process = subprocess.Popen(
            command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env=tp.child_env(),
        )  # fmt: skip
        try:
            return tp.wait_measured(process, timeout)
        finally:
            ms.stop_process(process)


def common_options(sb: ms.Sandbox, folder: Path) -> list[str]:
    return [
        "--provider", "uncash", "--base-url", sb.api, "--rate-limit", "unlimited",
        "--cooldown", "0", "--concurrency", "32", "--ledger", str(folder / "ledger.sqlite"),
        "--run-key", "scale-bench", "--log-format", "json", "--no-progress",
    ]  # fmt: skip


def write_workbook(path: Path, cards: list[str], rows: int) -> None:
    """The job's first `rows` rows (round after round over the cards) as an export would
    have them: its own headers, ids as text, amounts as numbers (binary doubles). Written as
    Excel and LibreOffice write (shared strings, a <dimension>), not in openpyxl's write-only
    mode, whose inline strings and missing dimension cost a reader twice as much."""
    import openpyxl

    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    sheet.title = "Payroll"
    sheet.append(["Card Number", "Net Pay", "Employee ID", "Department"])
    amount = float(tp.AMOUNT)
    for n in range(rows):
        sheet.append([cards[n % len(cards)], amount, f"R{n + 1}-{n // len(cards) + 1}", "Ops"])
    book.save(path)


def check_workbook(
    folder: Path, cards: list[str], rows: int, options: list[str]
) -> tuple[str, str | None]:
    """The figure of `check` on a `rows`-row workbook, and a problem if it failed its bound."""
    book = folder / "job.xlsx"
    started = time.monotonic()
    write_workbook(book, cards, rows)
    written_s = time.monotonic() - started
    command = [*ms.python_command(), "check", str(book), "--columns", XLSX_COLUMNS, *options]
    check = run_measured(command, folder / "check-xlsx.log", 300)
    figure = (
        f"xlsx check: {check.wall_s:6.1f} s  peak RSS {check.peak_rss_mb:4.0f} MB  "
        f"CPU {check.cpu_s:.1f} s  ({rows:,} rows, {book.stat().st_size / 1e6:.1f} MB, "
        f"written in {written_s:.1f} s; bound {XLSX_CHECK_BOUND_S:g} s)"
    )
    if check.exit_code != 0:
        return figure, f"xlsx check exit {check.exit_code}: {tail(folder / 'check-xlsx.log')}"
    if check.wall_s >= XLSX_CHECK_BOUND_S:
        return figure, f"xlsx check took {check.wall_s:.1f} s"
    return figure, None


def tail(path: Path, lines: int = 3) -> str:
    return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])


def read_report(path: Path) -> tuple[Counter[str], Decimal]:
    statuses: Counter[str] = Counter()
    charged = Decimal("0.00")
    with path.open(newline="", encoding="utf-8") as handle:
        for record in csv.DictReader(handle):
            statuses[record["status"]] += 1
            if record["total_charged"]:
                charged += Decimal(record["total_charged"])
    return statuses, charged


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="A million rows: check, run, report, memory.")
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--rows-per-card", type=int, default=10)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--no-xlsx", action="store_true", help="skip the xlsx report rewrite")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument("--xlsx-rows", type=int, default=100_000, help="0: no workbook check")
    parser.add_argument("--xlsx-only", action="store_true", help="stop after the xlsx check")
    args = parser.parse_args(argv)
    rows = args.cards * args.rows_per_card
    wallet = Decimal(rows) * 12  # 10.00 + the sandbox's default fee (0.75) per row, and room
    folder = Path(tempfile.mkdtemp(prefix="scale-"))
    problems: list[str] = []
    figures: list[str] = []
    try:
        cards = tp.card_ids(args.cards, args.seed)
        job = folder / "job.csv"
        tp.write_job(job, cards, args.rows_per_card)
        print(f"job: {rows} rows, {args.cards} cards x {args.rows_per_card}", file=sys.stderr)
        with tp.sandbox(folder, "scale", str(wallet), args.seed) as sb:
            started = time.monotonic()
            sb.register_cards(cards)
            print(f"cards registered in {time.monotonic() - started:.1f} s", file=sys.stderr)
            options = common_options(sb, folder)

            check = run_measured(
                [*ms.python_command(), "check", str(job), *options], folder / "check.log", 300
            )
            figures.append(
                f"check:  {check.wall_s:6.1f} s  peak RSS {check.peak_rss_mb:4.0f} MB  "
                f"CPU {check.cpu_s:.1f} s  (bound {CHECK_BOUND_S:g} s)"
            )
            print(figures[-1], file=sys.stderr, flush=True)
            if check.exit_code != 0:
                problems.append(f"check exit {check.exit_code}: {tail(folder / 'check.log')}")
            elif check.wall_s >= CHECK_BOUND_S:
                problems.append(f"check took {check.wall_s:.1f} s")
            if args.xlsx_rows:
                figure, problem = check_workbook(folder, cards, args.xlsx_rows, options)
                figures.append(figure)
                print(figure, file=sys.stderr, flush=True)
                problems.extend([problem] if problem else [])
            if args.xlsx_only:
                return report_figures(args, rows, figures, problems)

            report_csv = folder / "report.csv"
            run = run_measured(
                [*ms.python_command(), "run", str(job), *options, "--output", str(report_csv)],
                folder / "run.log",
                6 * 3600,
            )
            window = None
            finished = tp_event(folder / "run.log", "run.finished")
            if finished is not None and finished.get("makespan_s"):
                window = float(finished["makespan_s"])
            rate = f"{rows / window:.0f} topups/s" if window else "rate unknown"
            written = tp_event(folder / "run.log", "report.written")
            csv_s = f"{written['seconds']} s" if written else "unknown"
            figures.append(
                f"run:    {run.wall_s:6.1f} s  peak RSS {run.peak_rss_mb:4.0f} MB  "
                f"CPU {run.cpu_s:.1f} s  ({rate} first to last applied; csv report {csv_s}; "
                f"bound {RSS_BOUND_MB:g} MB)"
            )
            print(figures[-1], file=sys.stderr, flush=True)
            if run.exit_code != 0:
                problems.append(f"run exit {run.exit_code}: {tail(folder / 'run.log')}")
            if run.peak_rss_mb >= RSS_BOUND_MB:
                problems.append(f"run peak RSS {run.peak_rss_mb:.0f} MB")

            statuses, charged = read_report(report_csv) if report_csv.exists() else (Counter(), 0)
            if statuses != Counter({"succeeded": rows}):
                problems.append(f"report statuses {dict(statuses)}, expected {rows} succeeded")
            listed = api_json(sb, "/cards")["data"]["cards"]
            expected = Decimal(args.rows_per_card) * Decimal(tp.AMOUNT)
            wrong = sum(1 for card in listed if Decimal(str(card["deposit"])) != expected)
            if len(listed) != args.cards or wrong:
                problems.append(f"{wrong} of {len(listed)} cards without exactly {expected}")
            balance = Decimal(str(api_json(sb, "/wallet/balance")["data"]["balance"]))
            if wallet - balance != charged:
                problems.append(
                    f"the wallet went down by {wallet - balance}, the report says {charged}"
                )

        if not args.no_xlsx and run.exit_code is not None:
            report_xlsx = folder / "report.xlsx"
            rewrite = run_measured(
                [
                    *ms.python_command(), "report", "--ledger", str(folder / "ledger.sqlite"),
                    "--run-key", "scale-bench", "--output", str(report_xlsx),
                ],
                folder / "report.log",
                3600,
            )  # fmt: skip
            size = report_xlsx.stat().st_size / 1e6 if report_xlsx.exists() else 0
            figures.append(
                f"report: {rewrite.wall_s:6.1f} s  peak RSS {rewrite.peak_rss_mb:4.0f} MB  "
                f"(xlsx, {size:.0f} MB, from the ledger)"
            )
            print(figures[-1], file=sys.stderr, flush=True)
            if rewrite.exit_code != 0:
                problems.append(f"report exit {rewrite.exit_code}: {tail(folder / 'report.log')}")
    except ms.BenchmarkError as exc:
        print(f"scale: cannot measure: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("scale: interrupted", file=sys.stderr)
        return 130
    finally:
        if args.keep:
            print(f"work dir kept: {folder}", file=sys.stderr)
        else:
            shutil.rmtree(folder, ignore_errors=True)

    return report_figures(args, rows, figures, problems)


def report_figures(
    args: argparse.Namespace, rows: int, figures: list[str], problems: list[str]
) -> int:
    print(f"{rows} rows ({args.cards} cards x {args.rows_per_card}), concurrency 32")
    for line in figures:
        print(line)
    command = ["python", "benchmarks/scale.py", "--cards", str(args.cards)]
    command += ["--rows-per-card", str(args.rows_per_card)]
    print(f"reproduce: {shlex.join(command)}")
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    if not problems:
        print("check passed: every bound held and every row was applied exactly once")
    return 1 if problems else 0


def tp_event(log: Path, name: str) -> dict[str, Any] | None:
    """The runner's last `name` event from its JSON log, if it got that far."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            return event
    return None


if __name__ == "__main__":
    sys.exit(main())
