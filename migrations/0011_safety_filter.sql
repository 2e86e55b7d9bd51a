-- The engines' safety checker (NSFW filter), bot side.
--
-- A workspace's switch (/mod safety on|off): 0 turns the checker off for its jobs (adult-only
-- servers); NULL, as every existing row gets, and 1 mean on, the default.
ALTER TABLE workspace_settings ADD COLUMN safety_check INTEGER CHECK (safety_check IN (0, 1));

-- Outputs the safety checker withheld, one row per job, for moderators (/mod blocked lists
-- them with the blocked prompts): whose job, what it was ('images' of a prompt, a 'showcase'
-- grid's cells, a training's 'samples' grid cells), how many of how many, and its prompt.
-- It is the refund ledger too: refunded_units of the job's quota_usage row are given back
-- (images and showcase cells; a training's samples refund nothing). One row per job (INSERT OR
-- IGNORE), so a retried delivery records and refunds once. A table of its own, so no row of
-- 0001–0010 changes.
CREATE TABLE withheld_outputs (
    job_id          TEXT PRIMARY KEY REFERENCES jobs (id) ON DELETE CASCADE,
    platform        TEXT NOT NULL,
    workspace       TEXT NOT NULL,
    user_id         TEXT NOT NULL,
    kind            TEXT NOT NULL CHECK (kind IN ('images', 'showcase', 'samples')),
    withheld        INTEGER NOT NULL CHECK (withheld > 0),
    total           INTEGER,                    -- NULL: not known (a training's grid)
    prompt          TEXT NOT NULL,              -- a training's or showcase's: the subject's name
    negative_prompt TEXT NOT NULL DEFAULT '',
    refunded_units  INTEGER NOT NULL DEFAULT 0 CHECK (refunded_units >= 0),
    created_at      TEXT NOT NULL
);
CREATE INDEX withheld_outputs_by_workspace ON withheld_outputs (platform, workspace, created_at);
