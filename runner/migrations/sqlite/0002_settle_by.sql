-- When the provider may still apply an attempt whose outcome is unknown: until then, a
-- resumed run may not take the attempt's silence for "not applied". UTC, stored as sent_at.
ALTER TABLE attempts ADD COLUMN settle_by TEXT;
