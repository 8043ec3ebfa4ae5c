-- The ledger of runner/ledger/ (sqlite.py), on PostgreSQL: the same tables and columns as SQLite,
-- with money as NUMERIC (exact, scale kept: 12.30 stays 12.30) and times as TIMESTAMPTZ.
CREATE TABLE runs (
    run_key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    base_url TEXT NOT NULL,
    job_file TEXT NOT NULL,
    job_digest TEXT NOT NULL,
    extra_columns TEXT NOT NULL,
    row_count INTEGER NOT NULL,
    created_at TIMESTAMPTZ NOT NULL,
    finished_at TIMESTAMPTZ
);
CREATE TABLE rows (
    run_key TEXT NOT NULL REFERENCES runs,
    row INTEGER NOT NULL,
    card_id TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    reference TEXT NOT NULL,
    extra TEXT NOT NULL,
    status TEXT NOT NULL,
    fee NUMERIC,
    total_charged NUMERIC,
    card_balance_before NUMERIC,
    card_balance_after NUMERIC,
    wallet_balance_after NUMERIC,
    transaction_id TEXT,
    invoice_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started_at TIMESTAMPTZ,
    finished_at TIMESTAMPTZ,
    provider_ref TEXT,
    PRIMARY KEY (run_key, row)
);
CREATE INDEX rows_by_card ON rows (run_key, card_id);
CREATE INDEX rows_pending ON rows (card_id, provider_ref) WHERE status = 'pending';
CREATE TABLE attempts (
    run_key TEXT NOT NULL,
    row INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    card_id TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    before_status TEXT,
    before_balance NUMERIC,
    before_deposit NUMERIC,
    sent_at TIMESTAMPTZ NOT NULL,
    outcome TEXT,
    detail TEXT,
    finished_at TIMESTAMPTZ,
    PRIMARY KEY (run_key, row, attempt)
);
CREATE INDEX attempts_open ON attempts (run_key, card_id) WHERE outcome IS NULL;
CREATE INDEX attempts_by_card ON attempts (run_key, card_id, sent_at);
CREATE TABLE provider_events (
    provider TEXT NOT NULL,
    card_id TEXT NOT NULL,
    amount NUMERIC NOT NULL,
    provider_ref TEXT NOT NULL,
    status TEXT NOT NULL,
    fee NUMERIC,
    balance_after NUMERIC,
    received_at TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (provider, card_id, amount, provider_ref, status)
);

-- What lets several workers share a run. A card belongs to one worker at a time (`owner`,
-- until `lease_until`, renewed while the worker lives), so its cooldown holds across hosts;
-- `done` once none of its rows is left to send.
CREATE TABLE run_cards (
    run_key TEXT NOT NULL REFERENCES runs,
    card_id TEXT NOT NULL,
    rows_total INTEGER NOT NULL,
    owner TEXT,
    lease_until TIMESTAMPTZ,
    done BOOLEAN NOT NULL DEFAULT false,
    PRIMARY KEY (run_key, card_id)
);
CREATE INDEX run_cards_open ON run_cards (run_key, rows_total DESC, card_id) WHERE NOT done;
-- The provider's request rate, shared: the next free request slot of the run, in seconds
-- since the epoch on the database's clock. Workers reserve slots from it in small blocks.
-- A worker's preflight already paces its requests here, before the run is recorded.
CREATE TABLE run_pace (
    run_key TEXT PRIMARY KEY,
    next_at DOUBLE PRECISION NOT NULL
);
