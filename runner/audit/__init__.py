"""The audit of a run against the provider's own books: `topup-runner audit` and `run --audit`.

`books.py` reads the provider's record of each card, `match.py` matches it one to one against
the ledger's rows, `audit.py` runs both and writes back what the match learned, `output.py`
writes the Audit sheet, `command.py` is the command. Imported only by those who audit.
"""

from runner.audit.audit import audit_run
from runner.audit.values import AuditResult, Kind, Line, Proof

__all__ = ["AuditResult", "Kind", "Line", "Proof", "audit_run"]
