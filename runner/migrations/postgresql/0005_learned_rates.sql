-- The request rate `--rate-limit auto` learned, per target (provider and normalised base URL,
-- runner.targets.target_of): the next run on that target starts near it, not at the bottom.
CREATE TABLE learned_rates (
    target TEXT PRIMARY KEY,
    rate DOUBLE PRECISION NOT NULL,
    updated_at TEXT NOT NULL
);
-- The rate every worker of a run paces at, with `auto` (NULL: none shared yet).
ALTER TABLE run_pace ADD COLUMN rate DOUBLE PRECISION;
