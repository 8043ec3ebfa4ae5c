"""Running a job: `run_job()` sends its topups and writes its report; `check_job()` looks it over.

One concern a module: resume, policy, cards, workers, attempt, record (the ledger), finish."""

from runner.run.check import check_job
from runner.run.finish import RunResult, rewrite_report
from runner.run.job import run_job
from runner.run.record import default_ledger_path

__all__ = ["RunResult", "check_job", "default_ledger_path", "rewrite_report", "run_job"]
