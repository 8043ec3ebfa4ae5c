"""topup-runner: fund many virtual cards at once, exactly once, with a report that proves it."""

__version__ = "0.1.0"
