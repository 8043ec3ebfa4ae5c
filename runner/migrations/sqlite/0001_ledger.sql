-- The ledger as topup-runner wrote it before ledgers were stamped (application_id 0,
-- user_version 0): applied to a new ledger, and to an unstamped one of those tables (after
-- the rows.provider_ref column of the earliest ones is added), hence IF NOT EXISTS.
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    provider TEXT NOT NULL,
    base_url TEXT NOT NULL,
    job_file TEXT NOT NULL,
    job_digest TEXT NOT NULL,
    extra_columns TEXT NOT NULL,
    row_count INTEGER NOT NULL,
    created_at TEXT NOT NULL,
    finished_at TEXT
);
CREATE TABLE IF NOT EXISTS rows (
    run_key TEXT NOT NULL,
    row INTEGER NOT NULL,
    card_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    reference TEXT NOT NULL,
    extra TEXT NOT NULL,
    status TEXT NOT NULL,
    fee TEXT,
    total_charged TEXT,
    card_balance_before TEXT,
    card_balance_after TEXT,
    wallet_balance_after TEXT,
    transaction_id TEXT,
    invoice_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    started_at TEXT,
    finished_at TEXT,
    provider_ref TEXT,
    PRIMARY KEY (run_key, row)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS attempts (
    run_key TEXT NOT NULL,
    row INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    card_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    before_status TEXT,
    before_balance TEXT,
    before_deposit TEXT,
    sent_at TEXT NOT NULL,
    outcome TEXT,
    detail TEXT,
    finished_at TEXT,
    PRIMARY KEY (run_key, row, attempt)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS attempts_open ON attempts (run_key) WHERE outcome IS NULL;
CREATE INDEX IF NOT EXISTS rows_pending ON rows (card_id, provider_ref) WHERE status = 'pending';
-- Verified provider events (Alix webhooks), kept even when no row matches yet: a webhook
-- may arrive before the run has recorded the topup as pending.
CREATE TABLE IF NOT EXISTS provider_events (
    provider TEXT NOT NULL,
    card_id TEXT NOT NULL,
    amount TEXT NOT NULL,
    provider_ref TEXT NOT NULL,
    status TEXT NOT NULL,
    fee TEXT,
    balance_after TEXT,
    received_at TEXT NOT NULL,
    PRIMARY KEY (provider, card_id, amount, provider_ref, status)
) WITHOUT ROWID;
