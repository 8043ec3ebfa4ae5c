-- The hash chain of each run (runner/ledger/chain.py): every record a run's writes leave in
-- rows and attempts, in commit order, each hashed over the one before. `body` is the
-- record's canonical JSON as hashed; `algo` says sha256 or hmac-sha256 (keyed).
CREATE TABLE chain (
    run_key TEXT NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT NOT NULL,
    row INTEGER,
    attempt INTEGER,
    algo TEXT NOT NULL,
    body TEXT NOT NULL,
    hash TEXT NOT NULL,
    PRIMARY KEY (run_key, seq)
);
-- The last record of each run's chain: every transaction that writes a run's rows or
-- attempts locks it first (SELECT ... FOR UPDATE), so the workers of a run extend its chain
-- one at a time, in commit order.
CREATE TABLE chain_heads (
    run_key TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    hash TEXT NOT NULL,
    algo TEXT NOT NULL
);
