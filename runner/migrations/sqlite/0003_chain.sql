-- The hash chain of each run (runner/ledger/chain.py): every record a run's writes leave in
-- rows and attempts, in commit order, each hashed over the one before. `body` is the
-- record's canonical JSON as hashed; `algo` says sha256 or hmac-sha256 (keyed).
CREATE TABLE IF NOT EXISTS chain (
    run_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    row INTEGER,
    attempt INTEGER,
    algo TEXT NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_key, seq)
) WITHOUT ROWID;
-- The last record of each run's chain: what writers lock (PostgreSQL) and extend.
CREATE TABLE IF NOT EXISTS chain_heads (
    run_key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    algo TEXT NOT NULL
) WITHOUT ROWID;
