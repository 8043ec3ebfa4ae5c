-- Approvals of a job's exact content (issue 16): one row per approval given; a revoked one
-- keeps its row with revoked_at set. `digest` binds it to the rows, the target and the run
-- key; the snapshot is preflight's view when it was given (JSON: wallet, fees, fee source).
CREATE TABLE IF NOT EXISTS approvals (
    digest TEXT NOT NULL,
    approver TEXT NOT NULL,
    os_user TEXT NOT NULL,
    approved_at TIMESTAMPTZ NOT NULL,
    expires_at TIMESTAMPTZ NOT NULL,
    revoked_at TIMESTAMPTZ,
    run_key TEXT NOT NULL,
    target TEXT NOT NULL,
    job_file TEXT NOT NULL,
    row_count INTEGER NOT NULL,
    total TEXT NOT NULL,
    snapshot TEXT NOT NULL,
    public_key TEXT,
    signature TEXT,
    PRIMARY KEY (digest, approver, approved_at)
);
-- The repeat guard looks rows up by card, across runs, in any spelling of a UUID.
CREATE INDEX IF NOT EXISTS rows_by_card ON rows (lower(card_id));
