"""`python -m runner` is the same program as the `topup-runner` command."""

from runner.cli import main

main()
