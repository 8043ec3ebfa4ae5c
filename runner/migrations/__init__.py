"""SQL migrations of the ledger, one folder a backend, applied in file-name order.

`sqlite/NNNN_*.sql`: a SQLite ledger's `PRAGMA user_version` is the NNNN of the last one
applied. `postgresql/*.sql`: each applied once, recorded in the `topup_migrations` table.
"""
