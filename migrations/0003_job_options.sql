-- The generation options a job was asked with (JSON), so Reroll/Vary can repeat them:
-- {"prompt": …, "negative_prompt": …, "count": …, "seed": …, "width": …, "height": …}.
-- Older rows get '{}' and Reroll falls back to what their prompt and result say.
-- Only a column is added: no row of 0001/0002 is rewritten, so nothing in them can be lost.
ALTER TABLE jobs ADD COLUMN options TEXT NOT NULL DEFAULT '{}';
