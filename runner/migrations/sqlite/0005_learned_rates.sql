-- The request rate `--rate-limit auto` learned, per target (provider and normalised base URL,
-- runner.targets.target_of): the next run on that target starts near it, not at the bottom.
CREATE TABLE IF NOT EXISTS learned_rates (
    target TEXT PRIMARY KEY,
    rate REAL NOT NULL,
    updated_at TEXT NOT NULL
);
