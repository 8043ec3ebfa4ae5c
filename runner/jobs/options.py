"""The command-line options that say how a job file is read (`--sheet`, `--columns`): kept
out of the run's settings, because they are needed before the job exists."""

from __future__ import annotations

import click

from runner.jobs.columns import job_reading

__all__ = ["JOB_READING", "JOB_READING_OPTIONS", "job_reading"]

# Options of `run` and `check` that are not Settings: resolve_settings never sees them.
JOB_READING = ("sheet", "columns")

JOB_READING_OPTIONS = [
    click.option(
        "--sheet",
        metavar="NAME",
        help="The sheet of an .xlsx job to read (also TOPUP_SHEET). [default: the first]",
    ),
    click.option(
        "--columns",
        metavar='card_id="H",amount="H",...',
        help="Which headers hold the job's fields, e.g. "
        'card_id="Card Number",amount="Net Pay",reference="Employee ID" '
        "(also TOPUP_COLUMNS, or a YAML job's settings.columns).",
    ),
]
