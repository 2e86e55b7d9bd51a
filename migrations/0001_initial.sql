-- Subjects: one user's trained (or training) DreamBooth subject in one workspace.
CREATE TABLE subjects (
    id          TEXT PRIMARY KEY,
    platform    TEXT NOT NULL,
    workspace   TEXT NOT NULL,
    user_id     TEXT NOT NULL,
    name        TEXT NOT NULL,
    class_noun  TEXT NOT NULL,
    token       TEXT NOT NULL,
    status      TEXT NOT NULL CHECK (status IN ('queued', 'training', 'ready', 'failed')),
    adapter_url TEXT,
    photos_url  TEXT NOT NULL,
    photo_count INTEGER NOT NULL,
    base_model  TEXT NOT NULL,
    error       TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    -- The token is unique per workspace so two subjects can share one prompt.
    UNIQUE (platform, workspace, token),
    UNIQUE (platform, workspace, user_id, name)
);

-- Jobs: every request handed to the engine, and where its result must be delivered.
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,            -- also the arq job id
    kind         TEXT NOT NULL CHECK (kind IN ('train', 'generate')),
    platform     TEXT NOT NULL,
    workspace    TEXT NOT NULL,
    user_id      TEXT NOT NULL,
    subject_id   TEXT REFERENCES subjects (id) ON DELETE SET NULL,
    prompt       TEXT,
    destination  TEXT NOT NULL,               -- JSON: the adapter's channel/thread/message
    status       TEXT NOT NULL
                 CHECK (status IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    result       TEXT,                        -- JSON of the engine's result
    error        TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL,
    delivered_at TEXT
);

CREATE INDEX jobs_by_owner ON jobs (platform, workspace, user_id, created_at);
CREATE INDEX jobs_by_status ON jobs (status);
