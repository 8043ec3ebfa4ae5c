"""Guardrails before money moves (issue 16): approval bound to the job's exact content
(`approvals`), a repeat-payment guard across runs (`repeats`), spending caps (`caps`), and a
confirmation on a terminal (`confirm`). `before_sending` runs the first three before a run
opens its provider; every refusal is `GuardRefused`, exit 3, one line per reason."""
